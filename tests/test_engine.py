"""Profiles and the plumbing around a TensorRT build, on a CPU. Rebuild decisions are test_update_engines.py's,
the manifest test_manifest.py's.

TensorRT itself is absent here, so builds are only exercised up to the point where TensorRT would run; the
real builds are in test_trt_executor.py (marked `tensorrt`).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from k4trt.core.profiles import ShapeRange, derive_ranges, uncovered
from k4trt.engine import build as build_mod
from k4trt.engine.build import BuildProgress, _cancel_on_interrupt, build_engine, to_profile
from k4trt.engine.trt_api import MISSING, is_out_of_memory, tensorrt_version
from k4trt.errors import K4TRTError

HAS_TRT = tensorrt_version() is not None
needs_no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed; this checks the message when it is absent")

# Two cases of the DiT's inputs: 12 s at 672x384 (the default case) and an image at 512x512.
DIT_SHAPES = {
    "x": [(25, 48, 84, 16), (1, 64, 64, 16)],
    "text": [(224, 4096), (224, 4096)],
    "time": [(1,), (1,)],
    "rope": [(25, 24, 42, 32, 2, 2), (1, 32, 32, 32, 2, 2)],
}


# ---------------------------------------------------------------- profiles


def test_ranges_take_elementwise_min_and_max_over_cases():
    ranges = derive_ranges(DIT_SHAPES, opt_case=0)
    assert ranges["x"] == ShapeRange(min=(1, 48, 64, 16), opt=(25, 48, 84, 16), max=(25, 64, 84, 16))
    assert ranges["text"] == ShapeRange((224, 4096), (224, 4096), (224, 4096))
    assert ranges["rope"].min == (1, 24, 32, 32, 2, 2) and ranges["rope"].max == (25, 32, 42, 32, 2, 2)


def test_opt_is_the_requested_default_case():
    ranges = derive_ranges(DIT_SHAPES, opt_case=1)
    assert ranges["x"].opt == (1, 64, 64, 16)
    assert ranges["rope"].opt == (1, 32, 32, 32, 2, 2)  # every input takes the same case


def test_opt_without_default_case_is_the_largest_real_case_not_a_box_corner():
    # 3x44x92 = 12 144, 25x92x44 = 101 200, 25x64x64 = 102 400 latent positions
    shapes = {"x": [(3, 44, 92, 16), (25, 92, 44, 16), (25, 64, 64, 16)], "t": [(1,), (1,), (1,)]}
    ranges = derive_ranges(shapes)
    assert ranges["x"].opt == (25, 64, 64, 16)
    assert ranges["x"].max == (25, 92, 92, 16)  # the box corner exists only as max


def test_largest_case_ties_go_to_the_first():
    ranges = derive_ranges({"x": [(2, 3), (3, 2)]})
    assert ranges["x"].opt == (2, 3)


@pytest.mark.parametrize(
    ("shapes", "opt_case", "message"),
    [
        ({"x": [(1, 2), (1, 2, 3)]}, None, "different ranks"),
        ({"x": [(1, 2)], "y": [(1,), (2,)]}, None, "same cases"),
        ({}, None, "no input"),
        ({"x": []}, None, "no cases"),
        ({"x": [(1, 0)]}, None, "positive"),
        ({"x": [(1, -4)]}, None, "positive"),
        ({"x": [(1, 2)]}, 1, "opt_case"),
    ],
)
def test_inconsistent_shape_lists_are_rejected(shapes, opt_case, message):
    with pytest.raises(ValueError, match=message):
        derive_ranges(shapes, opt_case)


def test_polygraphy_profile_carries_min_opt_max():
    profile = to_profile(derive_ranges(DIT_SHAPES, opt_case=0))
    assert list(profile) == ["x", "text", "time", "rope"]
    assert profile["x"].min == (1, 48, 64, 16)
    assert profile["x"].opt == (25, 48, 84, 16)
    assert profile["x"].max == (25, 64, 84, 16)


def test_uncovered_names_inputs_outside_the_profile():
    ranges = derive_ranges(DIT_SHAPES, opt_case=0)
    assert uncovered(ranges, {"x": (13, 48, 84, 16), "time": (1,)}) == []
    problems = uncovered(ranges, {"x": (25, 92, 44, 16), "extra": (1,)})
    assert problems[0].startswith("x (25, 92, 44, 16) is outside (1, 48, 64, 16)..(25, 64, 84, 16)")
    assert "extra" in problems[1]
    assert uncovered(ranges, {"time": (1, 1)})  # wrong rank is never covered


def test_shape_range_json_round_trip():
    r = ShapeRange((1, 2), (3, 4), (5, 6))
    assert ShapeRange.from_json(json.loads(json.dumps(r.to_json()))) == r


# ---------------------------------------------------------------- build plumbing (TensorRT absent or bypassed)


def _matmul_onnx(path: Path, *, quantized: bool = False, external: bool = False, dtype: int = TensorProto.FLOAT) -> Path:
    """x[N, 16] @ w[16, 16] (optionally through a QuantizeLinear/DequantizeLinear pair)."""
    w = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(16, 16) / 256, "w")
    nodes = [helper.make_node("MatMul", ["xq" if quantized else "x", "w"], ["y"])]
    inits = [w]
    if quantized:
        inits += [numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["xq"])] + nodes
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", dtype, ["n", 16])],
                              [helper.make_tensor_value_info("y", dtype, ["n", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


RANGES = {"x": ShapeRange((4, 16), (4, 16), (4, 16))}


@needs_no_trt
def test_build_without_tensorrt_names_the_pip_command(tmp_path):
    with pytest.raises(K4TRTError, match=re.escape(MISSING)):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", RANGES, tmp_path / "timing.cache", "bf16")


def test_tensorrt_stubs_alone_do_not_count_as_tensorrt():
    """tensorrt-stubs makes `import tensorrt` succeed as an empty namespace package."""
    if importlib.util.find_spec("tensorrt") is None or HAS_TRT:
        pytest.skip("needs tensorrt-stubs without TensorRT")
    assert tensorrt_version() is None


@pytest.fixture
def bypass_trt_check(monkeypatch):
    """Let build_engine run up to the TensorRT call; the call itself is replaced per test by a failure."""
    monkeypatch.setattr(build_mod, "require_tensorrt", lambda: None)


@pytest.mark.parametrize("failure", [RuntimeError("TensorRT exploded"), KeyboardInterrupt()])
def test_failed_or_interrupted_build_leaves_no_plan_and_keeps_old_files(tmp_path, bypass_trt_check, monkeypatch, failure):
    onnx_path = _matmul_onnx(tmp_path / "vae_head.onnx")
    (tmp_path / "timing.cache").write_bytes(b"old cache")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(build_mod, "_serialize", fail)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(type(failure)):
        build_engine(onnx_path, tmp_path / "vae_head.plan", RANGES, tmp_path / "timing.cache", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no plan, no .partial left behind
    assert (tmp_path / "timing.cache").read_bytes() == b"old cache"

    (tmp_path / "vae_head.plan").write_bytes(b"previous plan")
    with pytest.raises(type(failure)):
        build_engine(onnx_path, tmp_path / "vae_head.plan", RANGES, tmp_path / "timing.cache", "bf16")
    assert (tmp_path / "vae_head.plan").read_bytes() == b"previous plan"


@pytest.mark.parametrize(("quantized", "precision", "found"), [(True, "bf16", "carries FP8 quantization"),
                                                               (False, "fp8", "carries no FP8 quantization")])
def test_build_refuses_an_onnx_whose_precision_is_mislabelled(tmp_path, bypass_trt_check, quantized, precision, found):
    onnx_path = _matmul_onnx(tmp_path / "dit.onnx", quantized=quantized)
    with pytest.raises(K4TRTError, match=f"{found}, but precision {precision} was asked for.*--precision {precision}"):
        build_engine(onnx_path, tmp_path / "dit.plan", RANGES, tmp_path / "timing.cache", precision)


def test_build_names_a_missing_onnx(tmp_path, bypass_trt_check):
    with pytest.raises(K4TRTError, match="does not exist; export it first"):
        build_engine(tmp_path / "dit.fp8.onnx", tmp_path / "dit.fp8.plan", RANGES, tmp_path / "t", "fp8")


def test_out_of_memory_is_recognised_in_tensorrt_errors():
    assert is_out_of_memory(["INTERNAL_ERROR: [virtualMemoryBuffer.cpp::resizePhysical] Error Code 2: OutOfMemory"])
    assert is_out_of_memory(["FAILED_ALLOCATION: Requested amount of GPU memory (123 bytes) could not be allocated."])
    assert is_out_of_memory(["Cuda Runtime (out of memory)"])
    assert not is_out_of_memory(["INVALID_ARGUMENT: shape mismatch"])
    assert not is_out_of_memory([])


def test_progress_prints_phases_and_throttled_steps():
    out = io.StringIO()
    progress = BuildProgress("dit.fp8.plan", interval=0.0, out=out)
    progress.phase_start("Building engine", None, 2)
    progress.phase_start("Tactic selection", "Building engine", 10)
    assert progress.step_complete("Tactic selection", 3) is True
    progress.phase_finish("Tactic selection")
    progress.finish()
    lines = out.getvalue().splitlines()
    assert all(line.startswith("[dit.fp8.plan") for line in lines)
    assert "Building engine ..." in lines[1]
    assert "Building engine 0/2 > Tactic selection 4/10" in lines[2]
    assert lines[-1].endswith("done")
    quiet = io.StringIO()
    slow = BuildProgress("p", interval=3600, out=quiet)
    slow.phase_start("inner", "outer", 5)
    slow.step_complete("inner", 0)
    assert len(quiet.getvalue().splitlines()) == 1  # only the opening line


def test_ctrl_c_during_a_build_cancels_it_through_the_monitor():
    progress = BuildProgress("p", out=io.StringIO())
    with pytest.raises(KeyboardInterrupt), _cancel_on_interrupt(progress):
        os.kill(os.getpid(), signal.SIGINT)
        assert progress.cancelled
        assert progress.step_complete("any", 0) is False  # TensorRT is asked to stop
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
