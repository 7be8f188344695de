"""`update_engines`' decisions on the CPU: TensorRT is replaced by a fake builder that writes a plan file and
records its calls, so every rebuild decision is checked where TensorRT cannot run.

The folder holds small hand-made graphs under the registry's names for the tiny model, each with external
data, and a manifest as `build-engines --onnx-only` leaves it (model facts, artifacts, stamps). The reference
for each decision is the rule it implements: rebuild exactly the plans whose graph, profile, options or build
environment changed, or whose file is gone or truncated; keep the timing cache only while the manifest vouches
for where it was measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from k4trt.core.gpu import GpuInfo
from k4trt.core.graphs import folder_graphs, request_cases
from k4trt.core.manifest import Activation, Artifact, BuildEnvironment, FileDigest, Inspection, Manifest, ModelFacts
from k4trt.engine import update as update_mod
from k4trt.engine.trt_api import MISSING, tensorrt_version
from k4trt.engine.update import TIMING_CACHE, current_environment, update_engines
from k4trt.errors import K4TRTError
from k4trt.export.onnx_set import OnnxSet
from k4trt.models.vae import tiny_vae_config
from k4trt.weights.tiny import TINY_DIT

H100 = BuildEnvironment("11.4.0.1", GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 85_000_000_000))
MODEL = ModelFacts(TINY_DIT, tiny_vae_config())
SIZES = [(64, 48)]


class FakeBuilder:
    """Writes `plan:<graph sha>:<ranges>` as the plan and appends to the timing cache, as a build would."""

    def __init__(self) -> None:
        self.built: list[str] = []

    def __call__(self, onnx_path, plan_path, ranges, timing_cache, precision, *, optimization_level, workspace_bytes,
                 degree=1):
        self.built.append(plan_path.name)
        plan = f"plan:{hashlib.sha256(onnx_path.read_bytes()).hexdigest()}:{sorted(ranges.items())}".encode()
        plan_path.write_bytes(plan)
        with timing_cache.open("ab") as cache:
            cache.write(plan_path.name.encode())
        return FileDigest(len(plan), hashlib.sha256(plan).hexdigest())


class FakeInspector:
    """Returns a record naming the plan it inspected (or refuses the graphs in `refuse`), as `inspect_plan` would."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = refuse
        self.inspected: list[str] = []

    def __call__(self, plan_path, spec, ranges, dit, version):
        self.inspected.append(plan_path.name)
        assert plan_path.is_file()  # inspected after it was written
        if spec.name in self.refuse:
            raise K4TRTError(f"{plan_path.name}: TensorRT {version} did not fuse the DiT's attention: layer 'x'")
        shapes = {name: r.max for name, r in ranges.items()}
        return Inspection(version, shapes, 3, ("attention",) if spec.is_dit else (), 2 if spec.precision == "fp8" else 0,
                          Activation(plan_path.name, "out", (1, 2), 4))


def _write_graph(path: Path, inputs: list[str], outputs: list[str], seed: int) -> None:
    """Identity-like graph over the given names, with one external-data initializer that `seed` varies."""
    weight = numpy_helper.from_array(np.full((4,), seed, dtype=np.float32), "w")
    nodes = [helper.make_node("Identity", [inputs[0]], [outputs[0]])]
    nodes += [helper.make_node("Identity", ["w"], [name]) for name in outputs[1:]]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], [weight])
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location=path.name + ".data",
                    size_threshold=0)


def _onnx_set(folder: Path, sizes=SIZES, max_seconds: int = 2, seed: int = 0, fp8_scope: str = "all") -> OnnxSet:
    graphs = folder_graphs("fp8", MODEL.dit_config, MODEL.vae_config)
    manifest, _ = Manifest.load_or_start(folder, lambda line: None)
    manifest.model = manifest.model or MODEL
    for spec in graphs.values():
        if not (folder / spec.onnx).exists():
            _write_graph(folder / spec.onnx, spec.input_names, spec.output_names, seed)
        files = [spec.onnx, spec.onnx + ".data"]
        manifest.artifacts[spec.stem] = Artifact({}, {f: manifest.file_sha(folder, f) for f in files})
    manifest.save(folder)
    return OnnxSet(folder, "fp8", graphs, request_cases(sizes, max_seconds), MODEL, exported=[], fp8_scope=fp8_scope)


@pytest.fixture
def folder(tmp_path):
    _onnx_set(tmp_path)
    return tmp_path


def _update(folder: Path, environment=H100, inspector=None, **kwargs):
    builder, log = FakeBuilder(), []
    onnx_set = _onnx_set(folder, **{k: kwargs.pop(k) for k in ("sizes", "max_seconds", "fp8_scope") if k in kwargs})
    manifest = update_engines(onnx_set, environment, build=builder, inspect=inspector or FakeInspector(), log=log.append,
                              **kwargs)
    return builder.built, log, manifest


ALL = ["dit.fp8.plan", "vae_image.plan", "vae_head.plan", "vae_body.plan"]


def test_first_build_builds_every_graph_and_records_it(folder):
    built, log, manifest = _update(folder)
    assert built == ALL
    back = Manifest.load(folder)
    assert back is not None and back.environment == H100
    assert set(back.engines) == set(ALL)
    for name, record in back.engines.items():
        assert record.plan is not None and record.plan.sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert not back.stamps.stale(folder / name, name)  # recorded as written: nobody reads it back to hash it
    assert back.engines["dit.fp8.plan"].profile["x"].max == (5, 6, 8, 16)  # 2 s at 64x48


def test_noop_rerun_builds_nothing_and_reads_no_graph_or_plan(folder, monkeypatch):
    _update(folder)
    reads: list[Path] = []
    monkeypatch.setattr("k4trt.fsutil.sha256_file", lambda path, *a: reads.append(path) or "0" * 64)
    built, log, _ = _update(folder)
    assert built == [] and reads == []
    assert all(line.endswith("is up to date") for line in log)


def test_changed_graph_rebuilds_only_its_plan(folder):
    _update(folder)
    spec = folder_graphs("fp8", MODEL.dit_config, MODEL.vae_config)["vae_head"]
    _write_graph(folder / spec.onnx, spec.input_names, spec.output_names, seed=7)  # re-exported from new weights
    built, log, _ = _update(folder)
    assert built == ["vae_head.plan"]
    assert any(line.startswith("building vae_head.plan: ONNX changed: ") and "vae_head.onnx.data" in line for line in log)


def test_changed_weights_drop_their_engines_and_the_next_build_makes_them_again(folder):
    _update(folder)
    manifest = Manifest.load(folder)
    assert manifest is not None
    manifest.artifacts["dit.fp8"] = Artifact({"kandinsky4_distil_512.pt": "old"}, manifest.artifacts["dit.fp8"].files)
    manifest.weights = {"kandinsky4_distil_512.pt": FileDigest(1, "old")}
    manifest.record_weights({"kandinsky4_distil_512.pt": FileDigest(1, "new")}, "/w")  # what a re-export does
    manifest.save(folder)
    built, _, _ = _update(folder)
    assert built == ["dit.fp8.plan"]


def test_other_durations_rebuild_the_dit_and_other_sizes_every_graph(folder):
    _update(folder)
    assert _update(folder, max_seconds=1)[0] == ["dit.fp8.plan"]  # the VAE graphs' shapes do not depend on it
    assert _update(folder, max_seconds=1, sizes=[(64, 48), (48, 64)])[0] == ALL


def test_another_fp8_scope_rebuilds_the_dit_alone(folder):
    _update(folder)
    built, log, manifest = _update(folder, fp8_scope="ffn")
    assert built == ["dit.fp8.plan"] and "FP8 scope all -> ffn" in log[0]
    assert manifest.engines["dit.fp8.plan"].fp8_scope == "ffn" and manifest.engines["vae_head.plan"].fp8_scope is None


def test_a_plan_recorded_without_an_inspection_is_rebuilt(folder):
    _update(folder)
    manifest = Manifest.load(folder)
    assert manifest is not None
    manifest.engines["vae_body.plan"] = dataclasses.replace(manifest.engines["vae_body.plan"], inspection=None)
    manifest.save(folder)
    built, log, _ = _update(folder)
    assert built == ["vae_body.plan"] and "vae_body.plan was never inspected" in log[3]


def test_other_builder_options_rebuild_everything(folder):
    _update(folder)
    built, log, _ = _update(folder, optimization_level=5)
    assert built == ALL and "build options changed" in log[0]


@pytest.mark.parametrize("environment", [
    BuildEnvironment("11.4.0.1", GpuInfo("NVIDIA H200", (9, 0), 150_000_000_000)),
    BuildEnvironment("11.5.0.2", H100.gpu),
], ids=["other-gpu", "other-tensorrt"])
def test_another_environment_rebuilds_everything_and_discards_the_timing_cache(folder, environment):
    _update(folder)
    built, log, manifest = _update(folder, environment)
    assert built == ALL and manifest.environment == environment
    assert log[0].startswith("rebuilding every engine: ")
    assert any(line.startswith(f"discarding {folder / TIMING_CACHE}") for line in log)
    assert (folder / TIMING_CACHE).read_bytes() == b"".join(p.encode() for p in ALL)  # only this build's tactics


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_without_a_trustworthy_manifest_everything_is_rebuilt_and_the_timing_cache_discarded(folder, damage):
    _update(folder)
    if damage == "missing":
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text("{ not json")
    built, log, _ = _update(folder)
    assert built == ALL
    assert any(line.startswith(f"discarding {folder / TIMING_CACHE}") for line in log)


def test_a_truncated_or_deleted_plan_is_rebuilt(folder):
    _update(folder)
    (folder / "vae_body.plan").write_bytes(b"pl")
    (folder / "vae_image.plan").unlink()
    built, log, _ = _update(folder)
    assert built == ["vae_image.plan", "vae_body.plan"]
    assert any("truncated or replaced" in line for line in log) and any("is missing" in line for line in log)


def test_force_rebuilds_what_is_up_to_date(folder):
    _update(folder)
    built, log, _ = _update(folder, force=True)
    assert built == ALL and all(line.endswith("--force") for line in log if line.startswith("building"))
    assert sum(line.startswith("building") for line in log) == len(ALL)


@pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed; this checks the message without it")
def test_the_build_environment_needs_tensorrt_and_a_gpu(monkeypatch):
    with pytest.raises(K4TRTError, match=re.escape(MISSING)):
        current_environment()
    monkeypatch.setattr(update_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(update_mod, "tensorrt_version", lambda: "11.4.0.1")
    monkeypatch.setattr(update_mod, "current_gpu", lambda: None)
    with pytest.raises(K4TRTError, match="needs a CUDA GPU visible to PyTorch"):
        current_environment()
    monkeypatch.setattr(update_mod, "current_gpu", lambda: H100.gpu)
    assert current_environment() == H100


def test_every_built_plan_is_inspected_and_the_record_kept_with_it(folder):
    inspector = FakeInspector()
    _update(folder, inspector=inspector)
    assert inspector.inspected == ALL
    back = Manifest.load(folder)
    assert back is not None
    dit = back.engines["dit.fp8.plan"]
    assert dit.fp8_scope == "all" and back.engines["vae_head.plan"].fp8_scope is None
    assert dit.inspection is not None and dit.inspection.attention_layers == ("attention",)
    assert dit.inspection.fp8_gemm_layers == 2 and dit.inspection.shapes["x"] == (5, 6, 8, 16)  # the profile's max
    assert dit.inspection.largest_activation == Activation("dit.fp8.plan", "out", (1, 2), 4)


def test_a_plan_whose_attention_did_not_fuse_is_deleted_and_not_recorded(folder):
    with pytest.raises(K4TRTError, match=r"dit.fp8.plan: TensorRT 11.4.0.1 did not fuse the DiT's attention"):
        _update(folder, inspector=FakeInspector(refuse=("dit",)))
    assert not (folder / "dit.fp8.plan").exists()
    back = Manifest.load(folder)
    assert back is not None and "dit.fp8.plan" not in back.engines
    built, _, _ = _update(folder)  # the refusal stopped the run; the next one builds the DiT again, then the rest
    assert built == ALL


def test_a_timing_cache_the_manifest_did_not_record_is_discarded(folder):
    _update(folder)
    (folder / TIMING_CACHE).write_bytes(b"someone else's tactics")
    built, log, _ = _update(folder, force=True)
    assert any(line.startswith(f"discarding {folder / TIMING_CACHE}: it is not the") for line in log)
    assert (folder / TIMING_CACHE).read_bytes() == b"".join(p.encode() for p in ALL)
    built, log, _ = _update(folder, force=True)  # the cache this build wrote is vouched for
    assert not any(line.startswith("discarding") for line in log)


def test_fp8_graphs_on_a_gpu_without_fp8_tensor_cores_are_refused_before_any_build(folder):
    a100 = BuildEnvironment("11.4.0.1", GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 85_000_000_000))
    with pytest.raises(K4TRTError, match=r"dit.fp8.onnx needs FP8 tensor cores \(compute capability 8.9\+\), which "
                                         r"NVIDIA A100-SXM4-80GB \(compute capability 8.0\) lacks; build the bf16 DiT: "
                                         r"build-engines --out .* --precision bf16"):
        _update(folder, a100)
    assert not list(folder.glob("*.plan"))
