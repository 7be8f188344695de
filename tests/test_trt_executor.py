"""The TensorRT executor.

Without TensorRT (CI, laptops) only the refusal paths and the test graphs themselves run. With TensorRT and a
GPU, one small graph per entry of the graph registry (`k4trt.core.graphs.folder_graphs`: the DiT and the
VAE's image, head and body graphs, with the registry's tensor names, dtypes and dynamic axes) is built with
the real build code and run through the executor, against ONNX Runtime on the same graphs in float32.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from k4trt.config import DiTConfig
from k4trt.core.gpu import GpuInfo, current_gpu
from k4trt.core.graphs import GraphSpec, folder_graphs, input_shapes, request_cases
from k4trt.core.manifest import BuildEnvironment, EngineRecord, FileDigest, Manifest, ModelFacts
from k4trt.engine.trt_api import MISSING, tensorrt_version
from k4trt.errors import K4TRTError
from k4trt.export.onnx_set import OnnxSet
from k4trt.models.vae import tiny_vae_config
from k4trt.runtime.engines_folder import choose_dit
from k4trt.runtime.trt_executor import TensorRTExecutor

HAS_TRT = tensorrt_version() is not None
HAS_GPU = current_gpu() is not None
needs_trt_gpu = pytest.mark.skipif(
    not (HAS_TRT and HAS_GPU),
    reason="no CUDA GPU" if HAS_TRT else "TensorRT is not installed (pip install 'k4trt[trt-cu12]' or '[trt-cu13]')",
)

MODEL = ModelFacts(DiTConfig(), tiny_vae_config())  # the released DiT's tensor dims, a small decoder's caches
GRAPHS = folder_graphs("bf16", MODEL.dit_config, MODEL.vae_config)
CASES = request_cases([(128, 64)], 1)  # an image and 1 s at 128x64: latents 1x8x16 and 3x8x16


# ---------------------------------------------------------------- without TensorRT


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed; this checks the message when it is absent")
def test_executor_without_tensorrt_names_the_pip_command(tmp_path):
    with pytest.raises(K4TRTError, match=re.escape(MISSING)):
        TensorRTExecutor(tmp_path)


def _manifest_with(*plans: str) -> Manifest:
    record = EngineRecord("dit", "bf16", {}, {}, {}, FileDigest(1, "00"))
    return Manifest(weights_dir="/w", model=MODEL, engines={p: record for p in plans})


def test_dit_engine_prefers_fp8_and_honours_an_explicit_precision():
    both = {"dit.fp8", "dit.bf16"}
    assert choose_dit(_manifest_with(), both, None, Path("e"), "engine") == "fp8"
    assert choose_dit(_manifest_with(), both, "bf16", Path("e"), "engine") == "bf16"
    assert choose_dit(_manifest_with(), {"dit.bf16"}, None, Path("e"), "engine") == "bf16"


def test_missing_dit_precision_names_the_build_command():
    with pytest.raises(K4TRTError, match=r"e has no fp8 DiT engine \(it has bf16\); build it: "
                                         r"build-engines --weights /w --out e --precision fp8$"):
        choose_dit(_manifest_with(), {"dit.bf16"}, "fp8", Path("e"), "engine")
    with pytest.raises(K4TRTError, match="it has none"):
        choose_dit(_manifest_with(), set(), None, Path("e"), "engine")


# ---------------------------------------------------------------- one small graph per registry entry


def _graph(folder: Path, spec: GraphSpec, dtype: int) -> None:
    """`spec`'s inputs and outputs, in `dtype` (float32 tensors of the registry stay float32), computing:
    DiT: velocity = (x @ w) · time + mean(text) + mean(rope); VAE: frames = 2 · z[:, :3] (+ mean(cache 0)[:, :3]
    over time for the body) and each cache k out = z · (k + 1). Constants are float32 initializers cast to
    `dtype`, so the bf16 (TensorRT) and float32 (ONNX Runtime) graphs hold identical values."""
    elem = {torch.bfloat16: dtype, torch.float32: TensorProto.FLOAT}
    rank = {"x": 4, "text": 2, "time": 1, "rope": 6, "velocity": 4}
    def info(t):
        return helper.make_tensor_value_info(t.name, elem[t.dtype], [f"{t.name}{i}" for i in range(rank.get(t.name, 5))])

    inputs, outputs = ([info(t) for t in tensors] for tensors in (spec.inputs, spec.outputs))
    inits: list[onnx.TensorProto] = [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
                                     for n, v in (("c0", [0]), ("c3", [3]), ("axis1", [1]), ("axis2", [2]))]

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_f32"))
        return helper.make_node("Cast", [name + "_f32"], [name], to=dtype)

    if spec.is_dit:
        x, text, time, rope = spec.input_names
        latent = MODEL.dit_config.in_visual_dim
        nodes = [
            const("w", np.random.default_rng(0).standard_normal((latent, latent)) / 4),
            helper.make_node("MatMul", [x, "w"], ["xw"]),
            helper.make_node("Cast", [time], ["time_c"], to=dtype),
            helper.make_node("Mul", ["xw", "time_c"], ["scaled"]),
            helper.make_node("ReduceMean", [text], ["text_mean"], keepdims=0),
            helper.make_node("ReduceMean", [rope], ["rope_mean"], keepdims=0),
            helper.make_node("Add", ["scaled", "text_mean"], ["plus_text"]),
            helper.make_node("Add", ["plus_text", "rope_mean"], [spec.output_names[0]]),
        ]
    else:
        z, *caches_in = spec.input_names
        frames, *caches_out = spec.output_names
        nodes = [const("two", np.array(2.0)), helper.make_node("Slice", [z, "c0", "c3", "axis1"], ["rgb"]),
                 helper.make_node("Mul", ["rgb", "two"], ["rgb2"])]
        if caches_in:
            nodes += [helper.make_node("ReduceMean", [caches_in[0], "axis2"], ["cache_mean"], keepdims=1),
                      helper.make_node("Slice", ["cache_mean", "c0", "c3", "axis1"], ["cache_rgb"]),
                      helper.make_node("Add", ["rgb2", "cache_rgb"], [frames])]
        else:
            nodes += [helper.make_node("Identity", ["rgb2"], [frames])]
        for k, name in enumerate(caches_out):
            nodes += [const(f"k{k}", np.array(k + 1.0)), helper.make_node("Mul", [z, f"k{k}"], [name])]
    model = helper.make_model(helper.make_graph(nodes, spec.stem, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(folder / spec.onnx), save_as_external_data=True, location=spec.onnx + ".data",
                    size_threshold=64)  # the DiT's weight goes to external data as an export's do; indices stay inline


def _feeds(spec: GraphSpec, case: tuple[int, int, int], device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random inputs of the shapes the registry gives `spec` for `case`; caches of the body are the shapes
    the head leaves, which are the body's cache inputs by construction of the registry."""
    g = torch.Generator().manual_seed(sum(case))
    shapes = input_shapes(spec, MODEL.dit_config, MODEL.vae_config, case)
    return [torch.randn(shape, generator=g).to(device, t.dtype if t.dtype == torch.float32 else dtype)
            for t, shape in zip(spec.inputs, shapes.values(), strict=True)]


def test_every_registry_graph_is_valid_and_runs_in_onnxruntime(tmp_path):
    """The float32 versions of the TensorRT test graphs, run here so the GPU tests start from sound graphs."""
    import onnxruntime as ort

    (tmp_path / "bf16").mkdir()
    for spec in GRAPHS.values():
        _graph(tmp_path / "bf16", spec, TensorProto.BFLOAT16)  # the TensorRT inputs pass onnx.checker
        _graph(tmp_path, spec, TensorProto.FLOAT)
        session = ort.InferenceSession(str(tmp_path / spec.onnx), providers=["CPUExecutionProvider"])
        for case in CASES:
            feeds = dict(zip(spec.input_names, (t.numpy() for t in _feeds(spec, case, "cpu", torch.float32)), strict=True))
            outputs = session.run(spec.output_names, feeds)
            assert len(outputs) == len(spec.outputs)


# ---------------------------------------------------------------- with TensorRT and a GPU


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    from k4trt.engine.update import current_environment, update_engines

    folder = tmp_path_factory.mktemp("engines")
    manifest = Manifest(weights_dir="/w", model=MODEL)
    manifest.save(folder)
    for spec in GRAPHS.values():
        _graph(folder, spec, TensorProto.BFLOAT16)
    update_engines(OnnxSet(folder, "bf16", GRAPHS, CASES, MODEL, []), current_environment(), optimization_level=0)
    return folder


def _onnxruntime(tmp_path: Path, spec: GraphSpec):
    import onnxruntime as ort

    _graph(tmp_path, spec, TensorProto.FLOAT)
    return ort.InferenceSession(str(tmp_path / spec.onnx), providers=["CPUExecutionProvider"])


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_every_registry_graph_was_built_and_recorded(engines):
    manifest = Manifest.load(engines)
    assert manifest is not None and set(manifest.engines) == {spec.plan for spec in GRAPHS.values()}
    assert all((engines / spec.plan).is_file() for spec in GRAPHS.values())
    for plan, record in manifest.engines.items():  # inspected after the build, at the profile's largest shapes
        assert record.inspection is not None and record.inspection.layers > 0, plan
        assert record.inspection.shapes == {name: r.max for name, r in record.profile.items()}, plan
        assert record.inspection.fp8_gemm_layers == 0 and record.inspection.largest_activation is not None, plan


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_dit_engine_matches_onnxruntime(engines, tmp_path):
    spec = GRAPHS["dit"]
    session = _onnxruntime(tmp_path, spec)
    executor = TensorRTExecutor(engines, device="cuda")
    assert executor.vae_scaling_factor == MODEL.vae_scaling_factor and executor.dit_config == MODEL.dit_config
    assert executor.dit_precision == "bf16"
    for case in [*CASES, (96, 64, 1)]:  # both built cases and one inside the box
        feeds = _feeds(spec, case, "cuda", torch.bfloat16)
        velocity = executor.dit(*feeds)
        assert velocity.dtype == torch.bfloat16 and velocity.shape == feeds[0].shape
        feed = {n: t.float().cpu().numpy() for n, t in zip(spec.input_names, feeds, strict=True)}
        (expected,) = session.run(spec.output_names, feed)
        torch.testing.assert_close(velocity.float().cpu(), torch.from_numpy(expected), rtol=3e-2, atol=3e-2)
    executor.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_vae_chunks_go_to_their_graphs_and_pass_caches_along(engines, tmp_path):
    executor = TensorRTExecutor(engines, device="cuda")
    case = CASES[1]
    image, head, body = (GRAPHS[f"vae_{role}"] for role in ("image", "head", "body"))
    z_image = _feeds(image, case, "cuda", torch.bfloat16)[0]
    frames, caches = executor.vae_chunk(z_image, None)
    torch.testing.assert_close(frames, 2 * z_image[:, :3]) and caches == []
    z = torch.randn(1, 16, 5, 8, 16, device="cuda", dtype=torch.bfloat16)
    frames, caches = executor.vae_chunk(z[:, :, :3], None)  # a non-contiguous slice, as the schedule passes
    torch.testing.assert_close(frames, 2 * z[:, :3, :3])
    assert len(caches) == len(head.outputs) - 1 and torch.equal(caches[1], 2 * z[:, :, :3])
    body_caches = _feeds(body, case, "cuda", torch.bfloat16)[1:]
    frames, new = executor.vae_chunk(z[:, :, 3:], body_caches)
    expected = 2 * z[:, :3, 3:].float() + body_caches[0][:, :3].float().mean(dim=2, keepdim=True)
    torch.testing.assert_close(frames.float(), expected, rtol=3e-2, atol=3e-2)
    assert len(new) == len(body.outputs) - 1
    executor.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_update_rebuilds_nothing_when_nothing_changed(engines):
    from k4trt.engine.update import current_environment, update_engines

    mtimes = {p.name: p.stat().st_mtime_ns for p in engines.glob("*.plan")}
    log: list[str] = []
    update_engines(OnnxSet(engines, "bf16", GRAPHS, CASES, MODEL, []), current_environment(), optimization_level=0,
                   log=log.append)
    assert log == [f"{spec.plan} is up to date" for spec in GRAPHS.values()]
    assert {p.name: p.stat().st_mtime_ns for p in engines.glob("*.plan")} == mtimes


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt_gpu
def test_request_outside_the_profile_names_build_engines(engines):
    executor = TensorRTExecutor(engines, device="cuda")
    with pytest.raises(K4TRTError, match=r"dit.bf16.plan .* was not built for this request .*"
                                         r"build-engines --weights /w .* --sizes 128x64 --max-duration 2 --force"):
        executor.dit(*_feeds(GRAPHS["dit"], (128, 64, 2), "cuda", torch.bfloat16))
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
    manifest = Manifest.load(copy)
    assert manifest is not None and manifest.environment is not None
    manifest.environment = BuildEnvironment("0.0.1", manifest.environment.gpu)
    manifest.save(copy)
    with pytest.raises(K4TRTError, match=r"with TensorRT 0\.0\.1, but this machine has .*rebuild them: build-engines "
                                         r"--weights /w .* --force"):
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
        feeds = _feeds(GRAPHS["dit"], CASES[1], "cuda", torch.bfloat16)
        feeds[0] = feeds[0] + seed
        out = runner(*feeds).clone()
        torch.testing.assert_close(out, two_steps(*feeds))
    assert runner.captured
    executor.close()


def test_gpu_info_describes_the_model():
    assert GpuInfo("NVIDIA H200", (9, 0), 1).describe() == "NVIDIA H200 (compute capability 9.0)"
