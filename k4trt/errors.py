"""One exception type for everything a user can fix; the CLI prints its message as one line, no traceback."""


class K4TRTError(Exception):
    """A problem with the user's input or environment. The message says what was wrong and how to fix it."""


def first_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message, for one-line reports; the type's name when it has none
    (or in front of it, with `with_type`, where the type is the information: `UnpicklingError: ...`)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]
