"""The Python objects k4trt hands to TensorRT, exercised on the CPU through a stand-in `tensorrt` module.

TensorRT cannot be installed here, so a minimal module with the base classes and enums these objects derive
from replaces it for these tests. No TensorRT result is faked: what is checked is k4trt's side of the
callbacks, against the contract of TensorRT 11.1's Python bindings (python/src/infer/pyCore.cpp): the error
recorder's count answers under both names (`get_num_errors` is what TensorRT's C++ side calls, `num_errors`
what Python callers use), the stream writer receives `write(bytes)` and must return the count, the stream
reader is called `read(num_bytes, stream)` until it has supplied num_bytes and `seek(offset, where)`.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sys
import types

import pytest

from k4trt.engine import plan_io, trt_api
from k4trt.errors import K4TRTError


class ErrorCodeTRT(enum.Enum):
    INTERNAL_ERROR = 3
    FAILED_ALLOCATION = 5


class SeekPosition(enum.Enum):
    SET = 0
    CUR = 1
    END = 2


class _Base:
    def __init__(self) -> None:
        pass


@pytest.fixture
def fake_trt(monkeypatch):
    module = types.ModuleType("tensorrt")
    module.__version__ = "11.4.0.106"
    module.Runtime = type("Runtime", (), {})
    module.ErrorCodeTRT = ErrorCodeTRT
    module.SeekPosition = SeekPosition
    module.IErrorRecorder = type("IErrorRecorder", (_Base,), {})
    module.IStreamWriter = type("IStreamWriter", (_Base,), {})
    module.IStreamReaderV2 = type("IStreamReaderV2", (_Base,), {})
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def test_the_error_recorder_counts_under_both_names_and_every_error_is_reported(fake_trt):
    recorder = trt_api.error_recorder()
    recorder.report_error(ErrorCodeTRT.FAILED_ALLOCATION, "Requested amount of GPU memory could not be allocated")
    recorder.report_error(ErrorCodeTRT.INTERNAL_ERROR, "[builder] no implementation for layer /attn")
    recorder.report_error(ErrorCodeTRT.INTERNAL_ERROR, "[builder] no implementation for layer /attn")
    assert recorder.get_num_errors() == recorder.num_errors() == 3
    errors = trt_api.recorded_errors(recorder)
    assert errors == ["FAILED_ALLOCATION: Requested amount of GPU memory could not be allocated",
                      "INTERNAL_ERROR: [builder] no implementation for layer /attn",
                      "INTERNAL_ERROR: [builder] no implementation for layer /attn"]
    assert trt_api.describe_errors(errors) == (
        "FAILED_ALLOCATION: Requested amount of GPU memory could not be allocated | "
        "INTERNAL_ERROR: [builder] no implementation for layer /attn")
    assert trt_api.is_out_of_memory(errors)
    recorder.clear()
    assert recorder.get_num_errors() == 0 and trt_api.describe_errors([]) == "no error was reported"


def test_the_plan_writer_streams_to_the_file_and_hashes_what_it_wrote(fake_trt, tmp_path):
    chunks = [os.urandom(n) for n in (1, 4096, 100_000, 7)]
    with (tmp_path / "plan").open("wb") as file:
        writer, written = plan_io.plan_writer(file)
        assert [writer.write(chunk) for chunk in chunks] == [len(c) for c in chunks]
    data = (tmp_path / "plan").read_bytes()
    assert data == b"".join(chunks)
    assert written.plan_file().size == len(data) and written.plan_file().sha256 == hashlib.sha256(data).hexdigest()


def test_the_plan_reader_supplies_the_file_in_bounded_chunks_and_seeks(fake_trt, tmp_path, monkeypatch):
    data = os.urandom(10_000)
    (tmp_path / "dit.plan").write_bytes(data)
    monkeypatch.setattr(plan_io, "CHUNK", 1024)
    seen = {}

    def deserialize_cuda_engine(self, reader):
        """As TensorRT's binding does: seek, then read until the requested bytes have arrived."""
        assert reader.seek(16, SeekPosition.END) and reader.read(16, 0) == data[-16:]
        assert reader.seek(0, SeekPosition.SET)
        got, sizes = b"", []
        while len(got) < len(data):
            chunk = reader.read(len(data) - len(got), 0)
            sizes.append(len(chunk))
            got += chunk
        seen.update(data=got, sizes=sizes)
        return "engine"

    fake_trt.Runtime.deserialize_cuda_engine = deserialize_cuda_engine
    assert plan_io.deserialize(fake_trt.Runtime(), tmp_path / "dit.plan") == "engine"
    assert seen["data"] == data and max(seen["sizes"]) == 1024  # never one buffer of the whole plan


def test_versions_decide_the_strongly_typed_flag_and_the_oldest_tensorrt(fake_trt):
    assert trt_api.needs_strongly_typed_flag("10.14.1.48") and not trt_api.needs_strongly_typed_flag("11.0.0.1")
    assert trt_api.parse_version("11.4.0.106") == (11, 4) and trt_api.parse_version("garbage") == (0, 0)
    trt_api.require_tensorrt()  # 11.4 passes
    fake_trt.__version__ = "10.13.3.9"
    with pytest.raises(K4TRTError, match=r"TensorRT 10.13.3.9 is older than 10.14, the first that parses the DiT's "
                                         r"ONNX Attention op: pip install -U 'k4trt\[trt-cu12\]'"):
        trt_api.require_tensorrt()
    assert trt_api.tensorrt_version() is None


def test_misaligned_addresses_are_refused():
    trt_api.check_aligned(0x7F0000000100, "x")
    with pytest.raises(ValueError, match=r"buffer of x is at 0x7f0000000140, not 256-byte aligned"):
        trt_api.check_aligned(0x7F0000000140, "buffer of x")
