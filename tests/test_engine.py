"""k4trt.engine on a CPU: profiles, fingerprints, manifest decisions, and the plumbing around a TensorRT build.

TensorRT itself is absent here, so builds are only exercised up to the point where TensorRT would run; the
real builds are in test_trt_executor.py (marked `tensorrt`).
"""

from __future__ import annotations

import dataclasses
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

from k4trt.config import DiTConfig
from k4trt.engine import build as build_mod
from k4trt.engine.build import BuildProgress, _cancel_on_interrupt, build_engine
from k4trt.engine.fingerprint import hash_onnx, hash_tree, sha256_file
from k4trt.engine.gpu import GpuInfo
from k4trt.engine.layout import onnx_name, plan_name, rebuild_command
from k4trt.engine.manifest import (
    EngineRecord,
    Manifest,
    PlanFile,
    check_compatible,
    needs_rebuild,
    plan_problem,
    read_manifest,
    write_manifest,
)
from k4trt.engine.profiles import ShapeRange, derive_ranges, to_profile, uncovered
from k4trt.engine.trt_api import MISSING, is_out_of_memory, tensorrt_version
from k4trt.engine.update import update_engines
from k4trt.errors import K4TRTError

HAS_TRT = tensorrt_version() is not None
needs_no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed; this checks the message when it is absent")

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 85_000_000_000)

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


# ---------------------------------------------------------------- names and fingerprints


def test_file_names_follow_the_engines_folder_contract():
    assert onnx_name("dit", "fp8") == "dit.fp8.onnx" and plan_name("dit", "bf16") == "dit.bf16.plan"
    assert onnx_name("vae_head", "fp8") == "vae_head.onnx" and plan_name("vae_body", "bf16") == "vae_body.plan"
    with pytest.raises(K4TRTError, match="fp8 or bf16"):
        plan_name("dit", "fp16")


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


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"k4trt" * 1000)
    import hashlib

    assert sha256_file(f) == hashlib.sha256(b"k4trt" * 1000).hexdigest()
    with pytest.raises(K4TRTError, match="cannot read"):
        sha256_file(tmp_path / "missing")


def test_hash_tree_walks_folders_relative_to_root(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    (tmp_path / "dit.pt").write_bytes(b"1")
    hashes = hash_tree(tmp_path, [tmp_path / "dit.pt", tmp_path / "vae"])
    assert list(hashes) == ["dit.pt", "vae/config.json"]


def test_hash_onnx_includes_external_data_and_changes_with_it(tmp_path):
    path = _matmul_onnx(tmp_path / "dit.bf16.onnx", external=True)
    hashes = hash_onnx(path)
    assert set(hashes) == {"dit.bf16.onnx", "dit.bf16.onnx.data"}
    data = tmp_path / "dit.bf16.onnx.data"
    data.write_bytes(data.read_bytes()[::-1])
    assert hash_onnx(path)["dit.bf16.onnx.data"] != hashes["dit.bf16.onnx.data"]
    assert hash_onnx(path)["dit.bf16.onnx"] == hashes["dit.bf16.onnx"]


def test_hash_onnx_names_missing_external_data_and_broken_files(tmp_path):
    path = _matmul_onnx(tmp_path / "vae_head.onnx", external=True)
    (tmp_path / "vae_head.onnx.data").unlink()
    with pytest.raises(K4TRTError, match="missing external data.*build-engines"):
        hash_onnx(path)
    (tmp_path / "vae_body.onnx").write_bytes(b"\x08\x07garbage\xff\xff")
    with pytest.raises(K4TRTError, match="not a valid ONNX file.*build-engines"):
        hash_onnx(tmp_path / "vae_body.onnx")


# ---------------------------------------------------------------- manifest


def _record(graph: str = "dit", precision: str = "fp8", plan: PlanFile | None = PlanFile(5, "ab")) -> EngineRecord:
    return EngineRecord(
        graph=graph,
        precision=precision,
        onnx={f"{graph}.onnx": "11", f"{graph}.onnx.data": "22"},
        profile=derive_ranges(DIT_SHAPES, opt_case=0),
        options={"optimization_level": 3, "workspace_bytes": None},
        plan=plan,
    )


def _manifest(**changes) -> Manifest:
    base = Manifest(
        tensorrt_version="10.13.0.35",
        gpu=H100,
        weights_dir="/data/weights",
        weights={"kandinsky4_distil_512.pt": "aa", "vae/diffusion_pytorch_model.safetensors": "bb"},
        dit_config=DiTConfig(),
        vae_scaling_factor=0.7,
        engines={"dit.fp8.plan": _record()},
    )
    return dataclasses.replace(base, **changes)


def _folder_with_plan(tmp_path: Path, manifest: Manifest) -> Path:
    for name, record in manifest.engines.items():
        assert record.plan is not None
        (tmp_path / name).write_bytes(b"x" * record.plan.size)
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_manifest_round_trip(tmp_path):
    m = _manifest(engines={"dit.fp8.plan": _record(), "vae_head.plan": _record("vae_head", "bf16", None)})
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert read_manifest(tmp_path).dit_config.axes_dims == (16, 24, 24)  # tuples survive JSON
    assert not list(tmp_path.glob("*.partial"))


def test_missing_manifest_is_none_and_a_broken_one_names_the_rebuild(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"format": 1, "gpu": ')
    with pytest.raises(K4TRTError, match=r"manifest.json is unreadable.*build-engines --out .* --force"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(K4TRTError, match="unreadable"):
        read_manifest(tmp_path)


def test_nothing_changed_means_no_rebuild(tmp_path):
    folder = _folder_with_plan(tmp_path, _manifest())
    wanted = _manifest(engines={"dit.fp8.plan": _record(plan=None)})  # what a build would write now
    assert needs_rebuild(read_manifest(folder), wanted, "dit.fp8.plan", folder) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tensorrt_version": "10.14.1.48"}, "TensorRT 10.13.0.35 -> 10.14.1.48"),
        ({"gpu": GpuInfo("NVIDIA H200", (9, 0), 150_000_000_000)},
         "GPU NVIDIA H100 80GB HBM3 (compute capability 9.0) -> NVIDIA H200"),
        ({"gpu": GpuInfo("NVIDIA H100 80GB HBM3", (9, 1), 85_000_000_000)}, "compute capability 9.1"),
        ({"weights": {"kandinsky4_distil_512.pt": "cc", "vae/diffusion_pytorch_model.safetensors": "bb"}},
         "weights changed: kandinsky4_distil_512.pt"),
        ({"dit_config": DiTConfig(num_blocks=2)}, "model configuration changed"),
        ({"vae_scaling_factor": 0.5}, "model configuration changed"),
    ],
)
def test_each_environment_change_forces_a_rebuild(tmp_path, change, reason):
    folder = _folder_with_plan(tmp_path, _manifest())
    wanted = _manifest(**change)
    reasons = needs_rebuild(read_manifest(folder), wanted, "dit.fp8.plan", folder)
    assert any(reason in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("onnx", {"dit.onnx": "11", "dit.onnx.data": "33"}, "ONNX changed: dit.onnx.data"),
        ("profile", derive_ranges(DIT_SHAPES, opt_case=1), "shape profile changed"),
        ("options", {"optimization_level": 5, "workspace_bytes": None}, "build options changed"),
        ("precision", "bf16", "precision fp8 -> bf16"),
    ],
)
def test_each_engine_change_forces_a_rebuild(tmp_path, field, value, reason):
    folder = _folder_with_plan(tmp_path, _manifest())
    wanted = _manifest(engines={"dit.fp8.plan": dataclasses.replace(_record(), **{field: value})})
    reasons = needs_rebuild(read_manifest(folder), wanted, "dit.fp8.plan", folder)
    assert any(reason in r for r in reasons), reasons


def test_missing_manifest_plan_record_or_plan_file_forces_a_rebuild(tmp_path):
    wanted = _manifest()
    assert needs_rebuild(None, wanted, "dit.fp8.plan", tmp_path) == [f"no manifest.json in {tmp_path}"]
    folder = _folder_with_plan(tmp_path, _manifest(engines={}))
    assert "not in manifest.json" in needs_rebuild(read_manifest(folder), wanted, "dit.fp8.plan", folder)[-1]
    folder = _folder_with_plan(tmp_path, wanted)
    (folder / "dit.fp8.plan").unlink()
    assert "is missing" in needs_rebuild(read_manifest(folder), wanted, "dit.fp8.plan", folder)[-1]


def test_truncated_plan_is_detected_from_the_recorded_size(tmp_path):
    folder = _folder_with_plan(tmp_path, _manifest())
    record = read_manifest(folder).engines["dit.fp8.plan"]
    assert plan_problem(folder, "dit.fp8.plan", record) is None
    (folder / "dit.fp8.plan").write_bytes(b"xx")
    problem = plan_problem(folder, "dit.fp8.plan", record)
    assert problem is not None and "has 2 bytes but was written with 5 (truncated or replaced)" in problem
    assert "truncated" in needs_rebuild(read_manifest(folder), _manifest(), "dit.fp8.plan", folder)[-1]


def test_check_compatible_accepts_the_same_gpu_model_and_version(tmp_path):
    other_memory = GpuInfo(H100.name, H100.compute_capability, 1)
    check_compatible(_manifest(), "10.13.0.35", other_memory, tmp_path)


@pytest.mark.parametrize(
    ("version", "gpu"),
    [("10.13.0.35", GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 85_000_000_000)), ("10.14.1.48", H100)],
)
def test_check_compatible_refuses_another_gpu_or_tensorrt_with_the_rebuild_command(tmp_path, version, gpu):
    with pytest.raises(K4TRTError) as error:
        check_compatible(_manifest(), version, gpu, tmp_path)
    message = str(error.value)
    built = "built for NVIDIA H100 80GB HBM3 (compute capability 9.0) with TensorRT 10.13.0.35"
    assert f"engines in {tmp_path} were {built}" in message
    assert f"rebuild them: build-engines --weights /data/weights --out {tmp_path} --force" in message
    assert "\n" not in message


def test_rebuild_command_shapes():
    assert rebuild_command(Path("e")) == "build-engines --out e --force"
    assert rebuild_command(Path("e"), "w", extra="") == "build-engines --weights w --out e"


# ---------------------------------------------------------------- build plumbing (TensorRT absent or bypassed)


@needs_no_trt
def test_build_without_tensorrt_names_the_pip_command(tmp_path):
    with pytest.raises(K4TRTError, match=re.escape(MISSING)):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {"x": [(1, 16)]}, tmp_path / "timing.cache", "bf16")


@needs_no_trt
def test_update_engines_without_tensorrt_names_the_pip_command(tmp_path):
    with pytest.raises(K4TRTError, match=re.escape("pip install 'k4trt[trt]'")):
        update_engines(tmp_path, "fp8", {}, weights_dir=tmp_path, weights_files=[], dit_config=DiTConfig(),
                       vae_scaling_factor=0.7)


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
        build_engine(onnx_path, tmp_path / "vae_head.plan", {"x": [(4, 16)]}, tmp_path / "timing.cache", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no plan, no .partial left behind
    assert (tmp_path / "timing.cache").read_bytes() == b"old cache"

    (tmp_path / "vae_head.plan").write_bytes(b"previous plan")
    with pytest.raises(type(failure)):
        build_engine(onnx_path, tmp_path / "vae_head.plan", {"x": [(4, 16)]}, tmp_path / "timing.cache", "bf16")
    assert (tmp_path / "vae_head.plan").read_bytes() == b"previous plan"


@pytest.mark.parametrize(("quantized", "precision", "found"), [(True, "bf16", "carries FP8 quantization"),
                                                               (False, "fp8", "carries no FP8 quantization")])
def test_build_refuses_an_onnx_whose_precision_is_mislabelled(tmp_path, bypass_trt_check, quantized, precision, found):
    onnx_path = _matmul_onnx(tmp_path / "dit.onnx", quantized=quantized)
    with pytest.raises(K4TRTError, match=f"{found}, but precision {precision} was asked for.*--precision {precision}"):
        build_engine(onnx_path, tmp_path / "dit.plan", {"x": [(4, 16)]}, tmp_path / "timing.cache", precision)


def test_build_names_a_missing_onnx(tmp_path, bypass_trt_check):
    with pytest.raises(K4TRTError, match="does not exist; export it first"):
        build_engine(tmp_path / "dit.fp8.onnx", tmp_path / "dit.fp8.plan", {"x": [(4, 16)]}, tmp_path / "t", "fp8")


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


def test_onnx_only_manifest_has_no_engines_and_survives_engine_writes(tmp_path):
    """`build-engines --onnx-only` leaves only the export's record; the engine part is written beside it."""
    import json

    record = {"onnx": {"format": 1, "artifacts": {"vae_head": {"inputs": {"w": "abc"}}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(record))
    assert read_manifest(tmp_path) is None
    manifest = _manifest()
    write_manifest(tmp_path, manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["onnx"] == record["onnx"]
    assert read_manifest(tmp_path) == manifest
