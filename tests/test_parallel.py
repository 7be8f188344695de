"""Sequence parallelism (k4trt.parallel): the maths against one process, the refusals, the exported graph,
and the real thing over gloo with 2 and 4 processes (`k4trt run` under torchrun included).

In-process tests stand in for the process group with threads that swap tensors at a barrier (the same dim-0
all-to-all semantics), which checks the sharding arithmetic in milliseconds; the multi-process tests then
run the product's own process-group exchange. References are single-process runs on fresh random inputs.
Tolerances: float32 within 1e-5 relative to the largest value (the only differences are summation orders of
identical maths), bf16 within 2 units of the reference's last place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dit_cases import random_dit, relative, ulps

from k4trt.cli.main import main as k4trt_main
from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.core.graphs import dit_graph, dit_stem_degree, folder_graphs
from k4trt.core.manifest import Artifact, EngineRecord, Manifest, ModelFacts, _engine_from_json, _engine_to_json
from k4trt.engine.collectives import placeholder_graph
from k4trt.errors import K4TRTError
from k4trt.export.dit_onnx import export_dit, move_exchange_to_custom_domain
from k4trt.export.opcheck import check_graph
from k4trt.export.twin import write_float32_twin
from k4trt.models.dit import build_rope, patchify, unpatchify
from k4trt.models.vae import tiny_vae_config
from k4trt.parallel.collective import ORT_PY_OP_DOMAIN
from k4trt.parallel.degree import check_degree
from k4trt.parallel.dit import SequenceParallelDiT
from k4trt.parallel.layout import TokenLayout
from k4trt.parallel.world import environment_size
from k4trt.runtime.engines_folder import choose_dit
from k4trt.weights.tiny import TINY_DIT

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sp_worker.py")
F32_TOLERANCE, BF16_ULPS = 1e-5, 2
LAUNCH_TIMEOUT = 120  # seconds for one torchrun launch; the checks in it take a few



# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("degree, visual", [(2, 7), (4, 7), (4, 16), (4, 1), (8, 25)])
def test_order_finds_every_token_after_the_exchange_and_skips_the_padding(degree, visual):
    layout = TokenLayout(degree, visual, TEXT_TOKENS)
    labels = torch.arange(visual) + 1.0  # 0 marks a pad row
    text = -torch.arange(TEXT_TOKENS) - 1.0
    gathered = torch.cat([torch.cat([layout.visual_rows(labels, r), layout.text_block(text, r)]) for r in range(degree)])
    assert gathered.shape == (degree * layout.local,)
    assert torch.equal(gathered[layout.order()], torch.cat([labels, text]))
    assert (gathered == 0).sum() == layout.padding == layout.rows * degree - visual < degree
    assert torch.equal(layout.visual_tokens(torch.cat([layout.visual_rows(labels, r) for r in range(degree)])), labels)


# ---------------------------------------------------------------- the maths, ranks as threads


class ThreadExchange:
    """P threads' dim-0 all-to-all: each rank posts its blocks, then takes block `rank` of everyone's."""

    def __init__(self, degree: int) -> None:
        self.degree, self._barrier, self._posted = degree, threading.Barrier(degree, timeout=30), [None] * degree

    def for_rank(self, rank: int):
        def all_to_all(x: torch.Tensor) -> torch.Tensor:
            self._posted[rank] = x
            self._barrier.wait()
            out = torch.cat([posted.chunk(self.degree)[rank] for posted in self._posted])
            self._barrier.wait()
            return out

        return all_to_all


def threaded_dit(dit, x, text, time, rope, degree, order=None):
    """The sequence-parallel DiT with `degree` thread ranks, velocity gathered as the executor does."""
    grid = rope.shape[:3]
    layout = TokenLayout(degree, grid[0] * grid[1] * grid[2], TEXT_TOKENS)
    order = layout.order() if order is None else order
    exchange, rows = ThreadExchange(degree), [None] * degree
    patches, rope_rows = patchify(x, dit.cfg.patch_size).flatten(0, 2), rope.flatten(0, 2)

    def rank(r):
        with torch.inference_mode():
            model = SequenceParallelDiT(dit, exchange.for_rank(r), degree)
            rows[r] = model(layout.visual_rows(patches, r), layout.text_block(text, r), time,
                            layout.visual_rows(rope_rows, r), order)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(degree)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return unpatchify(layout.visual_tokens(torch.cat(rows)), grid, dit.cfg.patch_size)


def inputs(size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*size, TINY_DIT.in_visual_dim, generator=g).to(dtype),
            torch.randn(TEXT_TOKENS, TINY_DIT.in_text_dim, generator=g).to(dtype),
            torch.tensor([float(torch.randint(1, 1000, (1,), generator=g))]),
            build_rope(TINY_DIT, *size, dtype=dtype))


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("size", [(2, 10, 6), (3, 6, 10), (1, 2, 2)])  # 30 tokens (4 ranks: 2 pads), 45, 1
def test_sequence_parallel_dit_equals_one_process(degree, size):
    for dtype in (torch.float32, torch.bfloat16):
        dit = random_dit(TINY_DIT, seed=size[1]).to(dtype)
        x, text, time, rope = inputs(size, dtype, seed=degree)
        with torch.inference_mode():
            expected = dit(x, text, time, rope)
        got = threaded_dit(dit, x, text, time, rope, degree)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        if dtype == torch.float32:
            assert relative(got, expected) <= F32_TOLERANCE
        else:
            assert ulps(got, expected) <= BF16_ULPS


def test_attending_to_the_padding_would_be_caught():
    """Guards the test above: with the pad rows kept among the keys the result is measurably off."""
    size, degree = (3, 6, 10), 4  # 45 tokens: 3 pad rows
    dit = random_dit(TINY_DIT, seed=1)
    x, text, time, rope = inputs(size, torch.float32, seed=3)
    layout = TokenLayout(degree, 45, TEXT_TOKENS)
    with_pads = torch.cat([torch.arange(degree * layout.local)[r * layout.local : r * layout.local + layout.rows]
                           for r in range(degree)] + [layout.order()[45:]])
    with torch.inference_mode():
        expected = dit(x, text, time, rope)
    assert relative(threaded_dit(dit, x, text, time, rope, degree, with_pads)[: 2], expected[: 2]) > 100 * F32_TOLERANCE


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("model_dim, degree, message", [
    (256, 8, "more than the DiT's 4 attention heads"),
    (256, 3, "4 attention heads do not split evenly over 3"),
    (384, 3, "224 text tokens do not split evenly over 3"),
])
def test_degrees_a_dit_cannot_split_over_are_refused_in_one_line(model_dim, degree, message):
    cfg = DiTConfig(in_text_dim=32, time_dim=32, model_dim=model_dim, ff_dim=64, num_blocks=1)
    with pytest.raises(K4TRTError, match=message) as error:
        check_degree(cfg, degree)
    assert "\n" not in str(error.value)
    assert check_degree(TINY_DIT, 4) == 4


def test_a_world_size_without_a_rendezvous_is_refused(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(K4TRTError, match="torchrun --standalone --nproc-per-node 2"):
        environment_size()
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    assert environment_size() == 2


def test_a_run_on_k4trt_run_by_hand_with_a_world_size_stops_before_loading(tiny_weights, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = k4trt_main(["run", "a fox", "--weights", str(tiny_weights), "-o", str(tmp_path / "v.mp4"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "rendezvous" in err and list(tmp_path.iterdir()) == []


def test_engines_built_for_another_degree_are_refused(tmp_path):
    manifest = Manifest(model=ModelFacts(TINY_DIT, tiny_vae_config()))
    for name, degree in (("one GPU", 1), ("two ranks", 2)):
        built = {dit_graph("bf16", TINY_DIT, degree).stem}
        other = 4
        with pytest.raises(K4TRTError, match=f"this run has {other} ranks.*--sp {other}"):
            choose_dit(manifest, built, None, tmp_path, "engine", other)
        assert choose_dit(manifest, built, None, tmp_path, "engine", degree) == "bf16", name
    with pytest.raises(K4TRTError, match="built for 2 ranks .*this run has one process"):
        choose_dit(manifest, {"dit.sp2.bf16"}, None, tmp_path, "engine", 1)


def test_the_registry_names_the_degree_and_the_manifest_records_it():
    spec = dit_graph("fp8", TINY_DIT, 4)
    assert (spec.stem, spec.degree, spec.input_names) == ("dit.sp4.fp8", 4, ["x", "text", "time", "rope", "order"])
    assert [dit_stem_degree(s) for s in ("dit.fp8", "dit.sp4.bf16", "dit.sp1.bf16", "vae_head", "dit.sp4.int8")] \
        == [1, 4, None, None, None]
    assert folder_graphs("bf16", TINY_DIT, tiny_vae_config(), 2)["vae_head"].degree == 1
    record = EngineRecord("dit", "fp8", {"dit.sp4.fp8.onnx": "sha"}, {}, {}, None, degree=4)
    assert _engine_from_json(_engine_to_json(record)) == record


# ---------------------------------------------------------------- the exported graph


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Float32 twins of one tiny DiT, exported for one process and for 2 ranks, each in a folder with its
    manifest (what `build-engines --onnx-only [--sp 2]` leaves for the DiT)."""
    root = tmp_path_factory.mktemp("sp_onnx")
    dit = random_dit(TINY_DIT, seed=9).bfloat16()
    folders = {}
    for degree in (1, 2):
        folder = root / f"sp{degree}"
        folder.mkdir()
        spec = dit_graph("bf16", TINY_DIT, degree)
        export_dit(dit, spec, folder / spec.onnx)
        write_float32_twin(folder / spec.onnx, folder / spec.twin)
        if degree > 1:
            move_exchange_to_custom_domain(folder / spec.twin)
        manifest = Manifest(model=ModelFacts(TINY_DIT, tiny_vae_config()))
        files = [spec.onnx, spec.onnx + ".data", spec.twin, spec.twin + ".data"]
        manifest.artifacts[spec.stem] = Artifact({}, {f: manifest.file_sha(folder, f) for f in files})
        manifest.save(folder)
        folders[degree] = (folder, spec)
    return folders


def test_the_sp_graph_exchanges_heads_with_distcollective_all_to_all(exported):
    folder, spec = exported[2]
    model = onnx.load(str(folder / spec.onnx), load_external_data=False)
    exchanges = [n for n in model.graph.node if n.op_type == "DistCollective"]
    assert len(exchanges) == 2 * 2 * TINY_DIT.num_blocks  # one there and one back, in both blocks of each pair
    for node in exchanges:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "" and attrs == {"collective_operation": b"all_to_all", "reduce_op": b"none",
                                               "root": -1, "group_size": 0, "nb_rank": 2}
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    assert check_graph(folder / spec.onnx) == []
    twin = onnx.load(str(folder / spec.twin), load_external_data=False)
    assert {n.domain for n in twin.graph.node if n.op_type == "DistCollective"} == {ORT_PY_OP_DOMAIN}
    with placeholder_graph(folder / spec.onnx) as (copy, names):
        assert copy.parent == folder and copy.name.endswith(".partial")  # what a rerun clears after a SIGKILL
        placed = onnx.load(str(copy), load_external_data=False)
        assert not [n for n in placed.graph.node if n.op_type == "DistCollective"]
        assert sorted(names) == sorted(n.output[0] for n in exchanges)
        assert {n.op_type for n in placed.graph.node if n.output[0] in names} == {"Identity"}
    assert not copy.exists()


# ---------------------------------------------------------------- several processes (gloo)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}


def _torchrun(ranks: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("ranks", [2, 4])
def test_over_gloo_the_sequence_parallel_dit_equals_one_process(ranks, tmp_path):
    out = tmp_path / "dit.json"
    _torchrun(ranks, str(WORKER), "dit", str(out), cwd=tmp_path)
    found = json.loads(out.read_text())
    assert found["ranks"] == ranks and len(found["results"]) == 10
    assert any(r["padding"] for r in found["results"]) and any(not r["padding"] for r in found["results"])
    for r in found["results"]:
        assert r["same_shape"], r
        if r["dtype"] == "torch.float32":
            assert r["relative"] <= F32_TOLERANCE, r
        else:
            assert r["ulps"] <= BF16_ULPS, r


def test_k4trt_run_under_torchrun_matches_one_process(tiny_weights, tmp_path, capsys):
    common = ["a red fox running through snow", "--weights", str(tiny_weights), "--size", "64x48", "--duration", "1",
              "--seed", "5", "--device", "cpu", "--no-progress"]
    one = tmp_path / "one"
    one.mkdir()
    assert k4trt_main(["run", *common, "-o", str(one / "v.mp4"), "--save-latents", str(one / "z.npy")]) == 0
    capsys.readouterr()
    two = tmp_path / "two"
    two.mkdir()
    result = _torchrun(2, "-m", "k4trt", "run", *common, "-o", str(two / "v.mp4"), "--save-latents",
                       str(two / "z.npy"), "--report", str(two / "r.json"), cwd=two)
    expected, got = np.load(one / "z.npy"), np.load(two / "z.npy")
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert sorted(p.name for p in two.iterdir()) == ["r.json", "v.mp4", "z.npy"]  # rank 1 wrote nothing
    # rank 0 prints one line per file written, and rank 1 nothing
    assert result.stdout.count(f"wrote {two / 'v.mp4'} (9 frames") == 1 and result.stdout.count("wrote ") == 3
    from test_cli_run import count_frames

    assert count_frames(two / "v.mp4") == count_frames(one / "v.mp4") == 9
    report = json.loads((two / "r.json").read_text())
    assert report["settings"]["sequence_parallel_ranks"] == 2 and report["stages_s"]["dit exchange"] > 0


def test_onnxruntime_sp_graph_over_gloo_matches_one_onnxruntime_run(exported, tmp_path):
    (sp_folder, spec), (single_folder, _) = exported[2], exported[1]
    out = tmp_path / "ort.json"
    _torchrun(2, str(WORKER), "ort", str(out), str(sp_folder), str(single_folder), cwd=tmp_path)
    found = json.loads(out.read_text())
    assert found["graph"] == spec.stem == "dit.sp2.bf16"
    assert found["relative"] <= 1e-4  # four float32 steps of the same graph maths


# ---------------------------------------------------------------- several GPUs (NCCL; skipped without them)

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")


def _tensorrt_with_all_to_all() -> str | None:
    """Why the TensorRT sequence-parallel path cannot run here, or None."""
    try:
        from k4trt.engine.collectives import require_all_to_all
        from k4trt.engine.trt_api import require_tensorrt

        require_tensorrt()
        require_all_to_all()
        import nccl.core  # noqa: F401  (nccl4py)
    except (K4TRTError, ImportError) as e:
        return str(e) or type(e).__name__
    return None


@pytest.mark.gpu
@two_gpus
def test_over_nccl_the_captured_loop_equals_the_eager_one_and_one_gpu(tiny_weights, tmp_path, capsys):
    """The torch backend on 2 GPUs: the 4-step loop replayed as one CUDA graph (collectives captured) gives the
    eager loop's latents, and both track one GPU within bf16 rounding."""
    common = ["a fox", "--weights", str(tiny_weights), "--size", "64x48", "--duration", "1", "--seed", "2",
              "--device", "cuda", "--no-progress", "-o"]
    assert k4trt_main(["run", *common, str(tmp_path / "one.mp4"), "--save-latents", str(tmp_path / "one.npy")]) == 0
    capsys.readouterr()
    for name, extra in (("graph", []), ("eager", ["--no-cuda-graph"])):
        _torchrun(2, "-m", "k4trt", "run", *common, str(tmp_path / f"{name}.mp4"), "--save-latents",
                  str(tmp_path / f"{name}.npy"), *extra, cwd=tmp_path)
    one, graph, eager = (np.load(tmp_path / f"{n}.npy") for n in ("one", "graph", "eager"))
    assert np.array_equal(graph, eager)
    assert np.abs(graph - one).max() <= 2e-2 * np.abs(one).max()  # bf16 DiT, kernels of other shapes


@pytest.mark.gpu
@pytest.mark.tensorrt
@two_gpus
def test_one_tensorrt_plan_serves_both_ranks(tiny_weights, tmp_path, capsys):
    """build-engines --sp 2 makes one dit.sp2 plan; two ranks run it with NCCL and track the torch backend."""
    reason = _tensorrt_with_all_to_all()
    if reason:
        pytest.skip(reason)
    from k4trt.cli.build_engines import main as build_main

    engines = tmp_path / "engines"
    assert build_main(["--weights", str(tiny_weights), "--out", str(engines), "--precision", "bf16", "--sizes", "64x48",
                       "--max-duration", "1", "--sp", "2"]) == 0
    manifest = Manifest.load(engines)
    assert manifest is not None and manifest.engines["dit.sp2.bf16.plan"].degree == 2
    common = ["a fox", "--weights", str(tiny_weights), "--size", "64x48", "--duration", "1", "--seed", "2",
              "--no-progress", "--no-cuda-graph", "-o"]
    for backend in ("trt", "torch"):
        _torchrun(2, "-m", "k4trt", "run", *common, str(tmp_path / f"{backend}.mp4"), "--backend", backend,
                  *(["--engines", str(engines)] if backend == "trt" else []), "--save-latents",
                  str(tmp_path / f"{backend}.npy"), cwd=tmp_path)
    trt_latents, torch_latents = np.load(tmp_path / "trt.npy"), np.load(tmp_path / "torch.npy")
    assert np.abs(trt_latents - torch_latents).max() <= 5e-2 * np.abs(torch_latents).max()
