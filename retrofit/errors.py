"""The one exception type for user mistakes: the CLI prints its message on one line, never a traceback."""


class RetrofitError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
