"""Plans to and from files without one host copy of the whole plan (5-11 GB for the DiT).

Building streams the serialized plan through an IStreamWriter straight into the (temporary) plan file,
hashing it on the way; loading hands TensorRT an IStreamReaderV2 that reads the file in chunks, which the
bindings copy to wherever TensorRT wants them (device memory included). TensorRT Developer Guide, "The
Python API" > "Serializing a Plan" / "Deserializing a Plan" (streamed forms).

Both callback signatures are the TensorRT 11.1 Python bindings' (python/src/infer/pyCore.cpp: the trampoline
calls `read(num_bytes, stream)` and expects a buffer back, and `write(data)` with one bytes object and expects
the count written); tensorrt-stubs 10.13 declares the C++ signatures instead, hence the ignores below.

Written against TensorRT 11's documentation, not yet run with TensorRT (README, "What was verified where").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

from k4trt.core.manifest import FileDigest

if TYPE_CHECKING:
    import tensorrt as trt

#: read size per callback: large enough that the per-call Python overhead vanishes, small next to a plan
CHUNK = 64 << 20


def plan_writer(file: IO[bytes]) -> tuple[trt.IStreamWriter, _Written]:
    """An IStreamWriter appending to `file`, and the running record (size, SHA-256) of what it wrote."""
    import tensorrt as trt

    written = _Written()

    class _Writer(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)

        def write(self, data: bytes) -> int:  # pyright: ignore[reportIncompatibleMethodOverride]
            file.write(data)
            written.add(data)
            return len(data)

    return _Writer(), written


class _Written:
    def __init__(self) -> None:
        self.size = 0
        self._digest = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self._digest.update(data)

    def plan_file(self) -> FileDigest:
        return FileDigest(self.size, self._digest.hexdigest())


def deserialize(runtime: trt.Runtime, path: Path) -> trt.ICudaEngine | None:
    """`runtime.deserialize_cuda_engine` from `path`, read CHUNK bytes at a time; None when TensorRT fails
    (its recorder says why)."""
    import tensorrt as trt

    whence = {trt.SeekPosition.SET: os.SEEK_SET, trt.SeekPosition.CUR: os.SEEK_CUR, trt.SeekPosition.END: os.SEEK_END}

    with path.open("rb", buffering=0) as file:

        class _Reader(trt.IStreamReaderV2):
            def __init__(self) -> None:
                trt.IStreamReaderV2.__init__(self)

            def read(self, num_bytes: int, stream: int) -> bytes:  # pyright: ignore[reportIncompatibleMethodOverride]
                return file.read(min(num_bytes, CHUNK))

            def seek(self, offset: int, where: trt.SeekPosition) -> bool:
                # END "offsets backward from the end of the stream" (SeekPosition's doc), whatever the sign
                file.seek(-abs(offset) if where == trt.SeekPosition.END else offset, whence[where])
                return True

        return runtime.deserialize_cuda_engine(_Reader())
