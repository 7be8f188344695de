"""Access to the optional TensorRT package, and the error bookkeeping every TensorRT call site shares.

TensorRT is an optional extra (`k4trt[trt-cu12]` or `k4trt[trt-cu13]`, by the CUDA major of the installed
torch): nothing imports it at module level, so the CLI, the PyTorch and ONNX Runtime backends and the tests
run where it is absent. Call sites do `require_tensorrt(); import tensorrt as trt` inside the function: the
check turns absence into one actionable line, and the plain import keeps the module fully typed by
tensorrt-stubs for the type-check test.

Written against TensorRT 11's documentation, not yet run with TensorRT (README, "What was verified where").
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from k4trt.errors import K4TRTError

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL = ("pip install 'k4trt[trt-cu12]' (a CUDA 12 torch, driver r535+) or 'k4trt[trt-cu13]' (a CUDA 13 torch, "
           "driver r580+); `k4trt doctor` says which fits")
MISSING = f"TensorRT is not installed: {INSTALL}"
#: the DiT's attention is the ONNX Attention op, which the parser reads from 10.14 on (its release notes:
#: "Added support for the Attention operator"); 10.x before that cannot build the graphs this k4trt exports
MIN_VERSION = (10, 14)
#: TensorRT networks are strongly typed from 11.0 on, where the flag that asked for it is deprecated and
#: ignored (TensorRT 11.0.0 release notes, "Strongly typed networks are now the default"; the 11.1 Python
#: bindings keep NetworkDefinitionCreationFlag.STRONGLY_TYPED with the comment "Deprecated: always enabled")
ALWAYS_STRONGLY_TYPED = (11, 0)
#: setTensorAddress: "The pointer must have at least 256-byte alignment" (TensorRT C++ API, IExecutionContext)
ALIGNMENT = 256

# Phrases TensorRT and CUDA use when an allocation fails (the error code alone is often a generic INTERNAL_ERROR).
_OOM_MARKERS = ("out of memory", "outofmemory", "could not be allocated", "failed_allocation", "cudaerrormemoryallocation")
#: PyPI distributions of the TensorRT runtime libraries, by the CUDA major they are built for; the bare
#: `tensorrt` metapackage installs the CUDA 13 build since 11.0 (TensorRT 11 installation guide)
_VARIANTS = {"tensorrt-cu12-libs": 12, "tensorrt-cu12": 12, "tensorrt-cu13-libs": 13, "tensorrt-cu13": 13}


def require_tensorrt() -> None:
    """Raise K4TRTError with the install command unless a working TensorRT of at least MIN_VERSION imports.

    `tensorrt-stubs` installs a bare `tensorrt/` folder of .pyi files that imports as an empty namespace
    package, so a successful import alone does not prove TensorRT is there: the runtime classes must be.
    """
    try:
        module = importlib.import_module("tensorrt")
    except ImportError:
        raise K4TRTError(MISSING) from None
    except OSError as e:  # the wheel is there but its CUDA libraries are not loadable
        raise K4TRTError(f"TensorRT could not be loaded ({e}); check `k4trt doctor`, then {INSTALL}") from None
    if not hasattr(module, "Runtime"):
        raise K4TRTError(MISSING)
    version = str(module.__version__)
    if parse_version(version) < MIN_VERSION:
        raise K4TRTError(f"TensorRT {version} is older than {'.'.join(map(str, MIN_VERSION))}, the first that parses "
                         f"the DiT's ONNX Attention op: {INSTALL.replace('pip install', 'pip install -U')}")


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None where it is absent or too old (never raises: doctor and
    manifests use it)."""
    try:
        require_tensorrt()
    except K4TRTError:
        return None
    import tensorrt as trt

    return trt.__version__


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "11.4.0.106"."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return (0, 0)


def needs_strongly_typed_flag(version: str) -> bool:
    """Whether a network must be created with the STRONGLY_TYPED flag: only before TensorRT 11."""
    return parse_version(version) < ALWAYS_STRONGLY_TYPED


def cuda_variant() -> int | None:
    """The CUDA major the installed TensorRT wheels are built for (12 or 13), from their distribution names;
    None where no such distribution is installed (TensorRT absent, or installed from a tarball)."""
    for name, major in _VARIANTS.items():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return major
    return None


def is_out_of_memory(messages: Sequence[str]) -> bool:
    """Whether TensorRT's error messages say a GPU allocation failed."""
    text = " ".join(messages).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def check_aligned(address: int, what: str) -> None:
    """Refuse a device address TensorRT may not be given (see ALIGNMENT): a misaligned binding is undefined
    behaviour in TensorRT, so it is stopped here with the tensor's name."""
    if address % ALIGNMENT:
        raise ValueError(f"{what} is at {address:#x}, not {ALIGNMENT}-byte aligned as TensorRT requires")


def error_recorder() -> trt.IErrorRecorder:
    """A thread-safe IErrorRecorder that keeps every error's description, so a failure can be explained (and
    an out-of-memory told apart) in the one-line K4TRTError raised for it rather than only in log output
    (TensorRT Developer Guide, "How TensorRT Works" > "Error Handling and Logging").

    The count is defined under both of its names: TensorRT's C++ side calls the override `get_num_errors`
    (the Python bindings' trampoline, python/src/infer/pyCore.cpp: PYBIND11_OVERLOAD_PURE_NAME(...,
    "get_num_errors", getNbErrors)), while the binding exposes it to Python as `num_errors`, the name
    tensorrt-stubs declares. Read the messages with `recorded_errors(recorder)`.
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

        def get_num_errors(self) -> int:
            return self.num_errors()

        def report_error(self, arg0: trt.ErrorCodeTRT, arg1: str) -> bool:
            with self._lock:
                self._errors.append((arg0, arg1))
            return False  # not fatal by itself: the failing call reports failure through its return value

    return _Recorder()


def recorded_errors(recorder: trt.IErrorRecorder) -> list[str]:
    """Every description an `error_recorder()` collected, oldest first."""
    return [f"{recorder.get_error_code(i).name}: {recorder.get_error_desc(i)}" for i in range(recorder.num_errors())]


def describe_errors(errors: Sequence[str]) -> str:
    """All recorded errors on one line, each once, oldest first (the first is usually the cause, the last the
    consequence); "no error was reported" when there are none."""
    unique = list(dict.fromkeys(e.replace("\n", " ").strip() for e in errors))
    return " | ".join(unique) if unique else "no error was reported"
