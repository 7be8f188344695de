"""Turns every user-fixable failure into one line on stderr and an exit code, never a traceback.

SIGTERM (a `kill`, a scheduler's timeout, a container stop) and SIGHUP (a closed terminal or SSH session)
end a command the way Ctrl-C does: as a `KeyboardInterrupt` raised in the main thread, which unwinds every
`with` block, so each writer stops its ffmpeg and removes its temporary file, and then one line says so.
A second signal while that runs is ignored, so the clean-up itself cannot be cut short. Signals the
process was started with ignored (`nohup`, a background job's SIGINT) stay ignored.

Python runs a signal handler wherever the main thread happens to be, and in a few places (a `__del__`, a
weakref callback such as the import system's module-lock one, hit by a signal during start-up) an exception
cannot propagate: Python prints it as "Exception ignored" and carries on, and the run would finish with exit
0. Such a swallowed interrupt is delivered again a moment later, from a timer, once that place is left.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from k4trt.errors import K4TRTError, first_line

EXIT_USER_ERROR = 2  # an interrupt exits with 128 + the signal's number, as shells report a signal's death
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_cli(command: Callable[[], int]) -> int:
    previous, unraisable = _install_handlers(), sys.unraisablehook
    try:
        return command()
    except K4TRTError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:
        signum = interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
        name = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{name}; nothing was left half-written", file=sys.stderr)
        return 128 + signum
    except MemoryError:
        print("error: out of host memory; try a shorter --duration or a smaller --size", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:
        # torch.cuda.OutOfMemoryError, matched by name so this module needs no torch import; its first line
        # says how much was asked for and how much was free.
        if type(error).__name__ != "OutOfMemoryError":
            raise
        print(f"error: out of GPU memory ({first_line(error)}); try a shorter --duration or a smaller --size, "
              "or free the GPU of other work", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_handlers() -> dict[int, signal.Handlers | Callable[[int, FrameType | None], object] | int | None]:
    """Raise `Interrupted` on the first of SIGINT, SIGTERM, SIGHUP and ignore the rest; returns what was there.
    Signal handlers can only be set from the main thread; elsewhere (a test runner's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    raised = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Interrupted(signum)

    default_hook = sys.unraisablehook

    def redeliver(unraisable: sys.UnraisableHookArgs) -> None:
        nonlocal raised
        if not isinstance(unraisable.exc_value, Interrupted):
            default_hook(unraisable)
            return
        raised = False
        # Not raised here: a handler run inside this hook would be swallowed the same way.
        timer = threading.Timer(0.01, _thread.interrupt_main, (unraisable.exc_value.signum,))
        timer.daemon = True
        timer.start()

    sys.unraisablehook = redeliver
    previous = {}
    for signum in HANDLED:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, interrupt)
    return previous
