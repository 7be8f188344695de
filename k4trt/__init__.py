"""k4trt: Kandinsky 4.0 T2V Flash on TensorRT, ONNX Runtime or PyTorch, one sampler for all three."""

from importlib.metadata import PackageNotFoundError, version

from k4trt.errors import K4TRTError

__all__ = ["K4TRTError", "Pipeline", "__version__"]

try:
    __version__ = version("k4trt")  # pyproject.toml's, the one place the version is written
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown (not installed)"


def __getattr__(name: str):
    # Lazy so that `import k4trt` stays cheap for the CLI's --help and for `k4trt doctor`.
    if name == "Pipeline":
        from k4trt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
