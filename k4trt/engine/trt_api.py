"""Access to the optional TensorRT package, and the error bookkeeping every TensorRT call site shares.

TensorRT is an optional extra (`k4trt[trt]`): nothing imports it at module level, so the CLI, the PyTorch and
ONNX Runtime backends and the tests run where it is absent. Call sites do
`require_tensorrt(); import tensorrt as trt` inside the function: the check turns absence into one actionable
line, and the plain import keeps the module fully typed by tensorrt-stubs for the type-check test.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from k4trt.errors import K4TRTError

if TYPE_CHECKING:
    import tensorrt as trt

MISSING = "TensorRT is not installed: pip install 'k4trt[trt]' (needs an NVIDIA GPU with CUDA 12+)"

# Phrases TensorRT and CUDA use when an allocation fails (the error code alone is often a generic INTERNAL_ERROR).
_OOM_MARKERS = ("out of memory", "outofmemory", "could not be allocated", "failed_allocation", "cudaerrormemoryallocation")


def require_tensorrt() -> None:
    """Raise K4TRTError with the install command unless a working TensorRT can be imported.

    `tensorrt-stubs` installs a bare `tensorrt/` folder of .pyi files that imports as an empty namespace
    package, so a successful import alone does not prove TensorRT is there: the runtime classes must be.
    """
    try:
        module = importlib.import_module("tensorrt")
    except ImportError:
        raise K4TRTError(MISSING) from None
    except OSError as e:  # the wheel is there but its CUDA libraries are not loadable
        raise K4TRTError(f"TensorRT could not be loaded ({e}): pip install 'k4trt[trt]' (needs CUDA 12+)") from None
    if not hasattr(module, "Runtime"):
        raise K4TRTError(MISSING)


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None where it is absent (never raises: doctor and manifests use it)."""
    try:
        require_tensorrt()
    except K4TRTError:
        return None
    import tensorrt as trt

    return trt.__version__


def is_out_of_memory(messages: Sequence[str]) -> bool:
    """Whether TensorRT's error messages say a GPU allocation failed."""
    text = " ".join(messages).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def error_recorder() -> trt.IErrorRecorder:
    """A thread-safe IErrorRecorder that keeps every error's description, so a failure can be explained (and
    an out-of-memory told apart) in the one-line K4TRTError raised for it rather than only in log output
    (TensorRT Developer Guide, "How TensorRT Works" > "Error Handling and Logging").

    Read the messages with `recorded_errors(recorder)`.
    """
    require_tensorrt()
    import tensorrt as trt

    class _Recorder(trt.IErrorRecorder):
        def __init__(self) -> None:
            trt.IErrorRecorder.__init__(self)
            self._lock = threading.Lock()
            self._errors: list[tuple[trt.ErrorCodeTRT, str]] = []

        def clear(self) -> None:
            with self._lock:
                self._errors.clear()

        def get_error_code(self, arg0: int) -> trt.ErrorCodeTRT:
            with self._lock:
                return self._errors[arg0][0]

        def get_error_desc(self, arg0: int) -> str:
            with self._lock:
                return self._errors[arg0][1]

        def has_overflowed(self) -> bool:
            return False

        def num_errors(self) -> int:
            with self._lock:
                return len(self._errors)

        def report_error(self, arg0: trt.ErrorCodeTRT, arg1: str) -> bool:
            with self._lock:
                self._errors.append((arg0, arg1))
            return False  # not fatal by itself: the failing call reports failure through its return value

    return _Recorder()


def recorded_errors(recorder: trt.IErrorRecorder) -> list[str]:
    """The descriptions an `error_recorder()` collected, oldest first."""
    return [f"{recorder.get_error_code(i).name}: {recorder.get_error_desc(i)}" for i in range(recorder.num_errors())]
