"""One exception type for everything a user can fix; the CLI prints its message as one line, no traceback."""


class K4TRTError(Exception):
    """A problem with the user's input or environment. The message says what was wrong and how to fix it."""


class RequestValueError(K4TRTError, ValueError):
    """A request value k4trt cannot serve (seed out of range, size too large, ...). A ValueError too, so Python
    callers can catch it as the standard library's kind of error; the CLI prints it as one line."""


class RequestTypeError(K4TRTError, TypeError):
    """A Python API argument of the wrong type (a width of 64.0, a seed of "42"), named before any work starts."""


def first_line(error: BaseException) -> str:
    """`Type: first line of the message` (or just the type): enough to say what failed inside one line of ours."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def listed(items: list[str], shown: int = 3) -> str:
    """The first few names, and how many more, so a message naming many files or tensors stays one line."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
