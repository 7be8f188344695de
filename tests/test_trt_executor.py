"""The TensorRT executor.

Without TensorRT (CI, laptops) only the refusal paths run. With TensorRT and a GPU, three tiny graphs that
follow the engines-folder contract (names, dtypes, dynamic dims) are built with the real build code and
run through the executor, against ONNX Runtime on the same graphs in float32.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from k4trt.config import DiTConfig
from k4trt.engine.gpu import GpuInfo, current_gpu
from k4trt.engine.manifest import EngineRecord, Manifest, PlanFile
from k4trt.engine.profiles import ShapeRange
from k4trt.engine.trt_api import MISSING, tensorrt_version
from k4trt.errors import K4TRTError
from k4trt.runtime.trt_executor import TensorRTExecutor, _dit_plan

HAS_TRT = tensorrt_version() is not None
HAS_GPU = current_gpu() is not None
needs_trt_gpu = pytest.mark.skipif(
    not (HAS_TRT and HAS_GPU), reason="no CUDA GPU" if HAS_TRT else "TensorRT is not installed (pip install 'k4trt[trt]')"
)


# ---------------------------------------------------------------- without TensorRT


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed; this checks the message when it is absent")
def test_executor_without_tensorrt_names_the_pip_command(tmp_path):
    with pytest.raises(K4TRTError, match=re.escape(MISSING)):
        TensorRTExecutor(tmp_path)


def _manifest_with(*plans: str) -> Manifest:
    record = EngineRecord("dit", "fp8", {}, {"x": ShapeRange((1,), (1,), (1,))}, {}, PlanFile(1, "00"))
    return Manifest("10.13.0.35", GpuInfo("GPU", (9, 0), 1), "/w", {}, DiTConfig(), 0.7,
                    {p: dataclasses.replace(record, precision=p.split(".")[1]) for p in plans})


def test_dit_plan_prefers_fp8_and_honours_an_explicit_precision():
    both = _manifest_with("dit.fp8.plan", "dit.bf16.plan")
    assert _dit_plan(both, None, Path("e")) == "dit.fp8.plan"
    assert _dit_plan(both, "bf16", Path("e")) == "dit.bf16.plan"
    assert _dit_plan(_manifest_with("dit.bf16.plan"), None, Path("e")) == "dit.bf16.plan"


def test_missing_dit_precision_names_the_build_command():
    with pytest.raises(K4TRTError, match=r"e has no fp8 DiT engine \(it has bf16\); build it: "
                                         r"build-engines --weights /w --out e --precision fp8"):
        _dit_plan(_manifest_with("dit.bf16.plan"), "fp8", Path("e"))
    with pytest.raises(K4TRTError, match="it has none"):
        _dit_plan(_manifest_with(), None, Path("e"))


# ---------------------------------------------------------------- tiny contract graphs

LATENT = 16
CASES = [(3, 8, 16), (1, 8, 8)]  # (T, h, w) latent shapes: 1 s at 128x64, an image at 64x64


def _graphs(folder: Path, dtype: int) -> None:
    """dit, vae_head, vae_body with the contract's I/O names. Constants are float32 initializers cast to
    `dtype`, so the bf16 (TensorRT) and float32 (ONNX Runtime) graphs hold identical values."""
    rng = np.random.default_rng(0)

    def io(name: str, shape: list, elem: int = dtype) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, shape)

    def const(name: str, value: np.ndarray) -> tuple[onnx.TensorProto, onnx.NodeProto]:
        return numpy_helper.from_array(value.astype(np.float32), name + "_f32"), helper.make_node(
            "Cast", [name + "_f32"], [name], to=dtype)

    def int64(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    def save(name: str, nodes: list, inputs: list, outputs: list, inits: list) -> None:
        model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 19)])
        onnx.checker.check_model(model)
        onnx.save_model(model, str(folder / (f"{name}.bf16.onnx" if name == "dit" else f"{name}.onnx")))

    w_init, w_cast = const("w", rng.standard_normal((LATENT, LATENT)) / 4)
    save("dit", [
        w_cast,
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Cast", ["time"], ["time_c"], to=dtype),
        helper.make_node("Mul", ["xw", "time_c"], ["scaled"]),
        helper.make_node("ReduceMean", ["text"], ["text_mean"], keepdims=0),
        helper.make_node("ReduceMean", ["rope"], ["rope_mean"], keepdims=0),
        helper.make_node("Add", ["scaled", "text_mean"], ["plus_text"]),
        helper.make_node("Add", ["plus_text", "rope_mean"], ["velocity"]),
    ], [io("x", ["T", "h", "w", LATENT]), io("text", [224, 4096]), io("time", [1], TensorProto.FLOAT),
        io("rope", ["T", "h2", "w2", 32, 2, 2])], [io("velocity", ["T", "h", "w", LATENT])], [w_init])

    k_init, k_cast = const("k", np.array(1.5))
    slice_consts = [int64("c0", [0]), int64("c3", [3]), int64("axis1", [1]), int64("axis2", [2])]
    save("vae_head", [
        k_cast,
        helper.make_node("Slice", ["z", "c0", "c3", "axis1"], ["rgb"]),
        helper.make_node("Add", ["rgb", "rgb"], ["frames"]),
        helper.make_node("Mul", ["z", "k"], ["cache_out_0"]),
    ], [io("z", [1, LATENT, "t", "h", "w"])],
        [io("frames", [1, 3, "t", "h", "w"]), io("cache_out_0", [1, LATENT, "t", "h", "w"])], [k_init] + slice_consts)
    save("vae_body", [
        k_cast,
        helper.make_node("Slice", ["z", "c0", "c3", "axis1"], ["rgb"]),
        helper.make_node("ReduceMean", ["cache_in_0", "axis2"], ["cache_mean"], keepdims=1),
        helper.make_node("Slice", ["cache_mean", "c0", "c3", "axis1"], ["cache_rgb"]),
        helper.make_node("Add", ["rgb", "cache_rgb"], ["frames"]),
        helper.make_node("Mul", ["z", "k"], ["cache_out_0"]),
    ], [io("z", [1, LATENT, 2, "h", "w"]), io("cache_in_0", [1, LATENT, "c", "h", "w"])],
        [io("frames", [1, 3, 2, "h", "w"]), io("cache_out_0", [1, LATENT, 2, "h", "w"])], [k_init] + slice_consts)


def _case_shapes() -> dict[str, dict[str, list[tuple[int, ...]]]]:
    return {
        "dit": {
            "x": [(t, h, w, LATENT) for t, h, w in CASES],
            "text": [(224, 4096)] * len(CASES),
            "time": [(1,)] * len(CASES),
            "rope": [(t, h // 2, w // 2, 32, 2, 2) for t, h, w in CASES],
        },
        "vae_head": {"z": [(1, LATENT, t, h, w) for t, h, w in CASES]},
        "vae_body": {"z": [(1, LATENT, 2, h, w) for _, h, w in CASES],
                     "cache_in_0": [(1, LATENT, t, h, w) for t, h, w in CASES]},
    }


def test_tiny_graphs_are_valid_and_run_in_onnxruntime(tmp_path):
    """The float32 twins of the TensorRT test graphs, checked here so the GPU tests start from sound graphs."""
    import onnxruntime as ort

    (tmp_path / "bf16").mkdir()
    _graphs(tmp_path / "bf16", TensorProto.BFLOAT16)  # the TensorRT inputs pass onnx.checker
    _graphs(tmp_path, TensorProto.FLOAT)
    session = ort.InferenceSession(str(tmp_path / "dit.bf16.onnx"), providers=["CPUExecutionProvider"])
    feeds = _dit_inputs(3, 8, 16, "cpu", torch.float32)
    (velocity,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert velocity.shape == (3, 8, 16, LATENT)


def _dit_inputs(t: int, h: int, w: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(t * 100 + h + w)
    return {
        "x": torch.randn(t, h, w, LATENT, generator=g).to(device, dtype),
        "text": torch.randn(224, 4096, generator=g).to(device, dtype),
        "time": torch.tensor([0.25]).to(device),
        "rope": torch.randn(t, h // 2, w // 2, 32, 2, 2, generator=g).to(device, dtype),
    }


# ---------------------------------------------------------------- with TensorRT and a GPU


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    from k4trt.engine.update import update_engines

    folder = tmp_path_factory.mktemp("engines")
    weights = tmp_path_factory.mktemp("weights")
    (weights / "kandinsky4_distil_512.pt").write_bytes(b"tiny")
    _graphs(folder, TensorProto.BFLOAT16)
    update_engines(folder, "bf16", _case_shapes(), weights_dir=weights, weights_files=[weights / "kandinsky4_distil_512.pt"],
                   dit_config=DiTConfig(), vae_scaling_factor=0.7, opt_case=0, optimization_level=0)
    return folder


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_dit_engine_matches_onnxruntime(engines, tmp_path):
    import onnxruntime as ort

    _graphs(tmp_path, TensorProto.FLOAT)
    session = ort.InferenceSession(str(tmp_path / "dit.bf16.onnx"), providers=["CPUExecutionProvider"])
    executor = TensorRTExecutor(engines, device="cuda")
    assert executor.vae_scaling_factor == 0.7 and executor.dit_config == DiTConfig()
    for t, h, w in CASES + [(2, 8, 12)]:  # both built cases and one inside the box
        feeds = _dit_inputs(t, h, w, "cuda", torch.bfloat16)
        velocity = executor.dit(**feeds)
        assert velocity.dtype == torch.bfloat16 and velocity.shape == (t, h, w, LATENT)
        (expected,) = session.run(None, {k: v.float().cpu().numpy() for k, v in feeds.items()})
        torch.testing.assert_close(velocity.float().cpu(), torch.from_numpy(expected), rtol=3e-2, atol=3e-2)
    executor.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_vae_chunks_pass_caches_along(engines):
    executor = TensorRTExecutor(engines, device="cuda")
    z = torch.randn(1, LATENT, 5, 8, 16, device="cuda", dtype=torch.bfloat16)
    frames, caches = executor.vae_chunk(z[:, :, :3], None)  # a non-contiguous slice, as the schedule passes
    torch.testing.assert_close(frames, 2 * z[:, :3, :3])
    assert len(caches) == 1 and caches[0].shape == (1, LATENT, 3, 8, 16)
    frames, caches = executor.vae_chunk(z[:, :, 3:], caches)
    expected = z[:, :3, 3:].float() + (1.5 * z[:, :3, :3].float()).mean(dim=2, keepdim=True)
    torch.testing.assert_close(frames.float(), expected, rtol=3e-2, atol=3e-2)
    executor.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_update_rebuilds_nothing_when_nothing_changed(engines):
    from k4trt.engine.update import update_engines

    manifest = json.loads((engines / "manifest.json").read_text())
    weights = Path(manifest["weights_dir"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in engines.glob("*.plan")}
    log: list[str] = []
    update_engines(engines, "bf16", _case_shapes(), weights_dir=weights, weights_files=[weights / "kandinsky4_distil_512.pt"],
                   dit_config=DiTConfig(), vae_scaling_factor=0.7, opt_case=0, optimization_level=0, log=log.append)
    assert log == ["dit.bf16.plan is up to date", "vae_head.plan is up to date", "vae_body.plan is up to date"]
    assert {p.name: p.stat().st_mtime_ns for p in engines.glob("*.plan")} == mtimes


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_request_outside_the_profile_names_build_engines(engines):
    executor = TensorRTExecutor(engines, device="cuda")
    with pytest.raises(K4TRTError, match=r"dit.bf16.plan .* was not built for this request .*"
                                         r"build-engines --weights .* --sizes 128x64 --max-duration 2 --force"):
        executor.dit(**_dit_inputs(5, 8, 16, "cuda", torch.bfloat16))
    executor.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_truncated_or_corrupt_plans_are_refused_with_the_rebuild_command(engines, tmp_path):
    copy = shutil.copytree(engines, tmp_path / "copy")
    plan = copy / "vae_body.plan"
    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(K4TRTError, match=r"vae_body.plan has \d+ bytes but was written with \d+ .*build-engines"):
        TensorRTExecutor(copy, device="cuda")
    plan.write_bytes(b"\0" * 64 + data[64:])
    with pytest.raises(K4TRTError, match=r"vae_body.plan is corrupt or not a plan for this TensorRT .*build-engines"):
        TensorRTExecutor(copy, device="cuda")


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_engines_from_another_tensorrt_version_are_refused(engines, tmp_path):
    copy = shutil.copytree(engines, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tensorrt_version"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(K4TRTError, match=r"with TensorRT 0\.0\.1, but this machine has .*rebuild them: build-engines "
                                         r"--weights .* --force"):
        TensorRTExecutor(copy, device="cuda")


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_cuda_graph_around_the_executor_replays_like_eager(engines):
    from k4trt.runtime.cuda_graph import CudaGraphRunner

    executor = TensorRTExecutor(engines, device="cuda")

    def two_steps(x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        v = executor.dit(x, text, time, rope)
        return executor.dit((x.float() - 0.5 * v.float()).to(x.dtype), text, time, rope)

    runner = CudaGraphRunner(two_steps)
    for seed in range(3):
        feeds = _dit_inputs(3, 8, 16, "cuda", torch.bfloat16)
        feeds["x"] = feeds["x"] + seed
        out = runner(*feeds.values()).clone()
        torch.testing.assert_close(out, two_steps(**feeds))
    assert runner.captured
    executor.close()
