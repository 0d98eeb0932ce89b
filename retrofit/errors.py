"""The one exception type for user mistakes (the CLI prints its message on one line, never a traceback), and
one-line warnings for things a user should know but that need not stop the work."""

import logging

_log = logging.getLogger("retrofit")
_said: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr through the ``retrofit`` logger (the CLI prints it as ``warning: ...``), once per
    process however often the same condition is met (a config is read several times during a convert)."""
    if message not in _said:
        _said.add(message)
        _log.warning(message)


class RetrofitError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def at_least_one(**values) -> None:
    """Counts given as ``name=value`` (None: left at its default) must be whole numbers of at least 1; the message
    names the option as the command line spells it (``gen_length`` -> ``--gen-length``)."""
    for name, value in values.items():
        whole_at_least(f"--{name.replace('_', '-')}", value, 1)


def whole_at_least(flag: str, value, least: int) -> None:
    """``value`` (None: not given) is a whole number of at least ``least``, or one line names ``flag``."""
    if value is None:
        return
    try:
        number = int(value)
        whole = number == float(value)
    except (TypeError, ValueError):
        number, whole = None, False
    if not whole or number < least:
        raise RetrofitError(f"{flag} {value}: must be a whole number of at least {least}")
