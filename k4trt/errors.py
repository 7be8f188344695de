"""One exception type for everything a user can fix; the CLI prints its message as one line, no traceback."""


class K4TRTError(Exception):
    """A problem with the user's input or environment. The message says what was wrong and how to fix it."""
