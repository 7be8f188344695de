"""Turns every user-fixable failure into one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from k4trt.errors import K4TRTError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_cli(command: Callable[[], int]) -> int:
    try:
        return command()
    except K4TRTError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("error: out of host memory; try a shorter --duration or a smaller --size", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:
        # torch.cuda.OutOfMemoryError, matched by name so this module needs no torch import; its first line
        # says how much was asked for and how much was free.
        if type(error).__name__ != "OutOfMemoryError":
            raise
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
        print(f"error: out of GPU memory ({detail}); try a shorter --duration or a smaller --size, "
              "or free the GPU of other work", file=sys.stderr)
        return EXIT_USER_ERROR
