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
