"""`build-engines --onnx-only` on the tiny model: every file written, reused when current, re-exported when the
weights, prompts or --force say so, interrupted cleanly, bad input refused; and the exported graphs running
through `--backend onnxruntime` agree with `--backend torch`.

Cost: one real fp8 export (calibration, DiT, three VAE graphs) and one real bf16 DiT export, shared by the
module. Each further export would cost 10-30 s per graph on two CPU cores (torch.export and the ONNX
optimizer, not the model size), so the tests of re-export *decisions* replace the PyTorch-to-ONNX step with
a copy of the graphs exported here, still written through the real atomic `save_onnx` and float32 twin.

The model is the tiny one with its DiT and VAE weights rounded to bf16. The graphs carry bf16 weights, so
the PyTorch backend reading this folder in float32 computes with exactly the values the twins hold, and the
bf16 DiT's twin must then match it to float32 rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from safetensors.torch import load_file, save_file

import k4trt.export.onnx_files as onnx_files
import k4trt.export.onnx_set as onnx_set
from k4trt.cli.build_engines import main
from k4trt.cli.main import main as k4trt_main
from k4trt.core.graphs import profile
from k4trt.core.manifest import Manifest
from k4trt.export.fp8 import FP8Scales
from k4trt.models.dit import infer_dit_config
from k4trt.runtime.ort_executor import OnnxRuntimeExecutor
from k4trt.runtime.pipeline import Pipeline
from k4trt.weights.checkpoint import read_dit_state_dict

SMALL = ["--sizes", "64x64", "--max-duration", "2"]
GRAPHS = ("dit.fp8", "vae_image", "vae_head", "vae_body")
ACCEPTANCE_SECONDS = 300  # build-engines --onnx-only on the tiny model, two CPU cores


def _round_to_bf16(weights: Path) -> None:
    dit = weights / "kandinsky4_distil_512.pt"
    torch.save({k: v.to(torch.bfloat16).float() for k, v in torch.load(dit, weights_only=True).items()}, dit)
    vae = weights / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(vae).items()}, str(vae))


@pytest.fixture(scope="module")
def weights(tiny_weights, tmp_path_factory):
    dest = tmp_path_factory.mktemp("rounded") / "weights"
    shutil.copytree(tiny_weights, dest)
    _round_to_bf16(dest)
    return dest


@pytest.fixture(scope="module")
def built(weights, tmp_path_factory):
    """build-engines --onnx-only (fp8, one calibration prompt, small sizes), timed."""
    root = tmp_path_factory.mktemp("build")
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox running through fresh snow\n")
    out = root / "engines"
    start = time.monotonic()
    code = main(["--onnx-only", "--weights", str(weights), "--out", str(out), "--calib-prompts", str(prompts), *SMALL])
    seconds = time.monotonic() - start
    assert code == 0
    print(f"\nbuild-engines --onnx-only on the tiny model took {seconds:.0f} s")
    return SimpleNamespace(out=out, prompts=prompts, seconds=seconds)


@pytest.fixture(scope="module")
def built_bf16(built, weights):
    """The same folder, adding the bf16 DiT: the VAE graphs and the calibration are shared with fp8."""
    code = main(["--onnx-only", "--precision", "bf16", "--weights", str(weights), "--out", str(built.out), *SMALL])
    assert code == 0
    return built.out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name not in ("manifest.json", ".build.lock")}


def test_writes_every_graph_twin_the_calibration_and_the_manifest(built, weights):
    out = built.out
    for name in GRAPHS:
        for suffix in (".onnx", ".onnx.data", ".f32.onnx", ".f32.onnx.data"):
            assert (out / f"{name}{suffix}").is_file(), f"{name}{suffix}"
    assert (out / "dit.fp8.scales.json").is_file()
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".build.lock"], "temporary files left behind"  # the writer lock stays: see core.manifest

    document = json.loads((out / "manifest.json").read_text())
    assert document["format"] == 2 and document["weights_dir"] == str(weights.resolve())
    for rel, digest in document["weights"].items():
        assert digest["sha256"] == _sha256(weights / rel), rel
    assert {"kandinsky4_distil_512.pt", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "tokenizer/spiece.model"} <= set(document["weights"])
    for name, artifact in document["onnx"].items():
        for file, sha in artifact["files"].items():
            assert sha == _sha256(out / file), f"{name}: {file}"
    manifest = Manifest.load(out)
    assert manifest is not None and manifest.model is not None
    assert manifest.model.dit_config == infer_dit_config(read_dit_state_dict(weights / "kandinsky4_distil_512.pt"))
    assert manifest.model.vae_scaling_factor == 0.7
    assert set(manifest.artifacts) == {"dit.fp8.scales.json", *GRAPHS}
    assert manifest.engines == {} and manifest.environment is None
    assert built.seconds < ACCEPTANCE_SECONDS


def test_rerun_reuses_every_file_and_opens_no_onnx_data(built, weights, capsys, monkeypatch):
    """A no-op rerun decides from the stamp cache alone: no graph's external data is opened (an audit hook
    sees every `open` of this process) and no file is hashed (the checkpoint's header is still read, through
    mmap, for the model's dimensions)."""
    before = _mtimes(built.out)
    hashed: list[Path] = []
    monkeypatch.setattr("k4trt.fsutil.sha256_file", lambda path, *a: hashed.append(path) or "0" * 64)
    opened: list[str] = []
    watching = [True]

    def audit(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; `watching` turns this one off
    try:
        code = main(["--onnx-only", "--weights", str(weights), "--out", str(built.out), "--calib-prompts",
                     str(built.prompts), *SMALL])
    finally:
        watching[0] = False
    assert code == 0
    assert "exported nothing (all up to date)" in capsys.readouterr().out
    assert _mtimes(built.out) == before
    assert not [p for p in opened if p.endswith(".data")], "external data read on a no-op rerun"
    assert hashed == []


def test_bf16_adds_its_dit_and_shares_the_vae_graphs(built_bf16):
    manifest = Manifest.load(built_bf16)
    assert manifest is not None and {"dit.bf16", "dit.fp8", "vae_image", "vae_head", "vae_body"} <= set(manifest.artifacts)
    assert (built_bf16 / "dit.bf16.f32.onnx").is_file()
    # the DiT's attention is the ONNX Attention op, in the graph TensorRT builds and in its twin alike
    assert manifest.model is not None
    for name in ("dit.bf16.onnx", "dit.bf16.f32.onnx"):
        ops = [n.op_type for n in onnx.load(built_bf16 / name, load_external_data=False).graph.node]
        assert ops.count("Attention") == 2 * manifest.model.dit_config.num_blocks and "Softmax" not in ops, name


@pytest.mark.parametrize("seconds", [0, 2])  # an image (the image graph); 5 latent frames (head, then body)
def test_onnxruntime_backend_matches_torch(built_bf16, weights, seconds):
    """The bf16 graphs' twins against the PyTorch backend on the same (bf16-representable) float32 weights.

    Tolerance: both sides are float32 on the same values and differ by operation order only. The sampler's 4
    steps and the decoder keep that near 1e-5 of the range; 1e-4 gives margin and still fails on any real
    divergence (a wrong input, cache or weight moves the result by O(1))."""
    torch_pipe = Pipeline.from_pretrained(weights, backend="torch", device="cpu")
    ort_pipe = Pipeline(torch_pipe.text_encoder, OnnxRuntimeExecutor(built_bf16, "cpu", precision="bf16"),
                        torch_pipe.schedule, torch_pipe.released)
    seed = random.randrange(2**31)
    results = [p.generate("a lighthouse in a storm", seed=seed, seconds=seconds, width=64, height=64, keep_frames=True,
                          progress=False) for p in (torch_pipe, ort_pipe)]
    (ref, got) = results
    assert got.frames is not None and ref.frames is not None
    assert got.latents.shape == ref.latents.shape and got.frames.shape == ref.frames.shape
    latent_error = (got.latents - ref.latents).abs().max() / ref.latents.abs().max()
    frame_error = (got.frames - ref.frames).abs().max()  # frames are in [0, 1]
    assert latent_error < 1e-4 and frame_error < 1e-4, f"seed {seed}: latents {latent_error:.1e}, frames {frame_error:.1e}"


def test_k4trt_run_onnxruntime_agrees_with_torch_within_fp8_error(built, weights, tmp_path, capsys):
    """`k4trt run --backend onnxruntime` on the default (fp8) folder, through the CLI and its saved arrays.

    FP8 (E4M3, 3 mantissa bits) rounds every quantized Linear input and weight by up to 2^-4 relative, so the
    results are only close: the bound is 10 % relative RMS on the latents and 0.05 mean absolute on the
    frames (in [0, 1]); an unquantized run or a broken graph lands far outside (unrelated latents are ~140 %)."""
    arrays = {}
    for backend in ("torch", "onnxruntime"):
        latents, frames = tmp_path / f"{backend}.latents.npy", tmp_path / f"{backend}.frames.npy"
        code = k4trt_main(["run", "a sailboat at dawn", "--backend", backend, "--engines", str(built.out), "--weights",
                           str(weights), "--device", "cpu", "--seed", "11", "--duration", "2", "--size", "64x64", "-o",
                           str(tmp_path / f"{backend}.mp4"), "--save-latents", str(latents), "--save-frames", str(frames),
                           "--no-progress"])
        assert code == 0, capsys.readouterr().err
        arrays[backend] = (np.load(latents), np.load(frames))
    (ref_latents, ref_frames), (latents, frames) = arrays["torch"], arrays["onnxruntime"]
    assert latents.shape == ref_latents.shape == (5, 8, 8, 16) and frames.shape == ref_frames.shape == (17, 64, 64, 3)
    rms = np.sqrt(np.mean((latents - ref_latents) ** 2) / np.mean(ref_latents**2))
    assert rms < 0.10, f"latents differ by {rms:.1%} RMS"
    assert np.abs(frames - ref_frames).mean() < 0.05


def test_engine_runs_read_only_the_text_encoder_tokenizer_and_scheduler(built, weights, tmp_path, capsys):
    """The DiT and the VAE are in the graphs: a weights folder without them runs; one whose files differ from
    those the graphs were made from is refused with the rebuild command."""
    partial = tmp_path / "weights"
    shutil.copytree(weights, partial)
    (partial / "kandinsky4_distil_512.pt").unlink()
    shutil.rmtree(partial / "vae")
    run = ["run", "a sailboat at dawn", "--backend", "onnxruntime", "--engines", str(built.out), "--weights",
           str(partial), "--device", "cpu", "--seed", "3", "--duration", "0", "--size", "64x64", "-o",
           str(tmp_path / "image.png"), "--no-progress"]
    assert k4trt_main(run) == 0, capsys.readouterr().err
    assert (tmp_path / "image.png").is_file()
    config = partial / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 0', '"steps_offset": 0 '))  # same meaning, other file
    assert k4trt_main(run) == 2
    err = capsys.readouterr().err
    assert "were made from other weights than" in err and "scheduler/scheduler_config.json" in err
    assert f"build-engines --weights {partial} --out {built.out} --force" in err


# ---- re-export decisions, with the PyTorch-to-ONNX step replaced by a copy of the graphs exported above ----


@pytest.fixture
def copies(built, weights, tmp_path):
    """Private copies of the weights and the engines folder (mtimes kept, so the copy is up to date)."""
    own_weights, own_out = tmp_path / "weights", tmp_path / "engines"
    shutil.copytree(weights, own_weights)
    shutil.copytree(built.out, own_out)
    return SimpleNamespace(weights=own_weights, out=own_out, prompts=built.prompts)


@pytest.fixture
def exports(built, monkeypatch):
    """Record every calibration and export; write the reference graphs through the real `save_onnx`."""
    calls: list[str] = []

    def export_vae(vae, spec, path):
        calls.append(spec.stem)
        onnx_files.save_onnx(ir.load(built.out / path.name), path)

    def export_dit(dit, spec, path, *, weights=None, fp8=None, fp8_scope="all", fp8_attention=False):
        calls.append(spec.stem)
        onnx_files.save_onnx(ir.load(built.out / path.name), path)

    def calibrate(weights, state, prompts, checkpoint_sha256):
        """The reference scales, stretched by the prompt count (1 here), so other prompts give other scales."""
        calls.append("calibrate")
        scales = FP8Scales.load(built.out / "dit.fp8.scales.json")
        return FP8Scales({k: v * len(prompts) for k, v in scales.linear_inputs.items()}, scales.attention_inputs,
                         checkpoint_sha256)

    monkeypatch.setattr(onnx_set, "export_vae", export_vae)
    monkeypatch.setattr(onnx_set, "export_dit", export_dit)
    monkeypatch.setattr(onnx_set, "calibrate", calibrate)
    return calls


def _build(copies, *extra):
    return main(["--onnx-only", "--weights", str(copies.weights), "--out", str(copies.out), "--calib-prompts",
                 str(copies.prompts), *SMALL, *extra])


def test_copied_folders_are_up_to_date(copies, exports):
    assert _build(copies) == 0
    assert exports == []


def test_changed_vae_weights_reexport_only_the_vae_graphs(copies, exports):
    vae = copies.weights / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(vae))
    before = _mtimes(copies.out)
    assert _build(copies) == 0
    assert exports == ["vae_image", "vae_head", "vae_body"]
    after = _mtimes(copies.out)
    changed = {name for name in before if after[name] != before[name]}
    suffixes = (".onnx", ".onnx.data", ".f32.onnx", ".f32.onnx.data")
    assert changed == {f"vae_{r}{s}" for r in ("image", "head", "body") for s in suffixes}
    manifest = Manifest.load(copies.out)
    assert manifest is not None and manifest.weights["vae/diffusion_pytorch_model.safetensors"].sha256 == _sha256(vae)


def test_changed_dit_weights_recalibrate_and_reexport_the_dit(copies, exports):
    dit = copies.weights / "kandinsky4_distil_512.pt"
    state = torch.load(dit, weights_only=True)
    key = next(iter(state))
    state[key] = state[key] * 2
    torch.save(state, dit)
    assert _build(copies) == 0
    assert exports == ["calibrate", "dit.fp8"]


def test_other_prompts_recalibrate_and_new_scales_reexport_the_dit(copies, exports, tmp_path):
    copies.prompts = tmp_path / "other.txt"
    copies.prompts.write_text("a city at night\na forest in autumn\n")
    assert _build(copies) == 0
    assert exports == ["calibrate", "dit.fp8"]


def test_force_reexports_every_graph_and_keeps_the_calibration(copies, exports):
    assert _build(copies, "--force") == 0
    assert exports == ["dit.fp8", "vae_image", "vae_head", "vae_body"]


def test_fp8_attention_is_a_different_dit_graph(copies, exports):
    assert _build(copies, "--fp8-attention") == 0
    assert exports == ["dit.fp8"]


def test_engines_are_built_from_the_exported_set(copies, exports, monkeypatch):
    """Without --onnx-only: the engine builder gets the exported set of the registry's graphs and every requested
    case (TensorRT itself is replaced; it cannot run here; its decisions are test_update_engines.py's)."""
    import k4trt.cli.build_engines as cli
    import k4trt.engine.update as update
    from k4trt.core.gpu import GpuInfo
    from k4trt.core.manifest import BuildEnvironment

    environment = BuildEnvironment("11.4.0.1", GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 1))
    received = {}

    def update_engines(onnx, env, **kwargs):
        received.update(kwargs, onnx=onnx, environment=env)

    monkeypatch.setattr(cli, "_require_engine_builder", lambda: environment)
    monkeypatch.setattr(update, "update_engines", update_engines)
    code = main(["--weights", str(copies.weights), "--out", str(copies.out), "--calib-prompts", str(copies.prompts), *SMALL])
    assert code == 0
    assert exports == []
    onnx = received["onnx"]
    assert received["environment"] == environment and received["force"] is False
    assert onnx.precision == "fp8" and list(onnx.graphs) == ["dit", "vae_image", "vae_head", "vae_body"]
    assert onnx.cases == [(64, 64, 0), (64, 64, 1), (64, 64, 2)]


def test_fp8_scope_ffn_is_a_different_dit_graph(copies, exports):
    assert _build(copies, "--fp8-scope", "ffn") == 0
    assert exports == ["dit.fp8"]
    manifest = Manifest.load(copies.out)
    assert manifest is not None and manifest.artifacts["dit.fp8"].inputs["fp8_scope"] == "ffn"


def _engine_build(copies, monkeypatch, gpu, *extra):
    """build-engines without --onnx-only on `gpu`, TensorRT replaced (see the test above); returns the exit code
    and the set handed to the engine builder (None when it was never reached)."""
    import k4trt.cli.build_engines as cli
    import k4trt.engine.update as update
    from k4trt.core.manifest import BuildEnvironment

    received = {}
    monkeypatch.setattr(cli, "_require_engine_builder", lambda: BuildEnvironment("11.4.0.1", gpu))
    monkeypatch.setattr(update, "update_engines", lambda onnx, env, **kwargs: received.update(onnx=onnx))
    code = main(["--weights", str(copies.weights), "--out", str(copies.out), "--calib-prompts", str(copies.prompts),
                 *SMALL, *extra])
    return code, received.get("onnx")


def test_a_gpu_without_fp8_builds_the_bf16_dit_and_refuses_an_explicit_fp8(built_bf16, copies, exports, monkeypatch,
                                                                        capsys):
    from k4trt.core.gpu import GpuInfo

    a100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 1)
    code, onnx = _engine_build(copies, monkeypatch, a100, "--precision", "fp8")
    assert code == 2 and onnx is None and exports == []  # refused before any export or calibration
    err = capsys.readouterr().err.strip()
    assert err == ("error: --precision fp8 needs FP8 tensor cores (compute capability 8.9+, Ada or Hopper), which "
                   "NVIDIA A100-SXM4-80GB (compute capability 8.0) lacks; build with --precision bf16")
    code, onnx = _engine_build(copies, monkeypatch, a100)
    assert code == 0 and onnx.precision == "bf16" and onnx.graphs["dit"].stem == "dit.bf16"
    assert set(exports) <= {"dit.bf16"} and (copies.out / "dit.bf16.onnx").is_file()  # reused where already exported
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8 tensor cores (needs 8.9+): building the bf16 DiT" \
        in capsys.readouterr().out


def test_an_engine_build_writes_no_twins_and_onnx_only_adds_them_without_reexporting(copies, exports, monkeypatch):
    from k4trt.core.gpu import GpuInfo

    code, onnx = _engine_build(copies, monkeypatch, GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 1), "--force")
    assert code == 0 and onnx.precision == "fp8" and onnx.fp8_scope == "all"
    twins = [f"{name}.f32.onnx" for name in GRAPHS]
    assert not any((copies.out / twin).exists() or (copies.out / f"{twin}.data").exists() for twin in twins)
    manifest = Manifest.load(copies.out)
    assert manifest is not None and not any(".f32." in f for name in GRAPHS for f in manifest.artifacts[name].files)
    exports.clear()
    assert _build(copies) == 0  # --onnx-only: the twins again, from the graphs on disk
    assert exports == [] and all((copies.out / twin).is_file() for twin in twins)
    manifest = Manifest.load(copies.out)
    assert manifest is not None and all(f"{name}.f32.onnx" in manifest.artifacts[name].files for name in GRAPHS)


def test_a_second_build_into_the_same_folder_stops_with_one_line(copies, exports, capsys):
    holder = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from k4trt.core.manifest import writing\n"
        "with writing(Path(sys.argv[1])):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(copies.out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        before = (copies.out / "manifest.json").read_bytes()
        err = _refused(["--onnx-only", "--weights", str(copies.weights), "--out", str(copies.out), "--calib-prompts",
                        str(copies.prompts), *SMALL], capsys)
        assert f"is being written by process {proc.pid}" in err
        assert (copies.out / "manifest.json").read_bytes() == before and exports == []
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_interrupted_export_leaves_no_onnx(built, weights, exports, monkeypatch, tmp_path, capsys):
    """Ctrl-C while the first graph is being written: its temporary files go, no .onnx appears."""
    real_save = onnx_files.ir.save

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_files.ir, "save", save_then_interrupt)
    out = tmp_path / "engines"
    code = main(["--onnx-only", "--weights", str(weights), "--out", str(out), "--calib-prompts", str(built.prompts), *SMALL])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert exports == ["calibrate", "dit.fp8"]
    left = sorted(p.name for p in out.rglob("*"))
    assert not [n for n in left if ".onnx" in n or n.endswith(".partial")], left


def test_default_cases_are_every_duration_at_the_default_size(copies, exports):
    """Default sizes and durations: 13 cases (0-12 s at 672x384), the default case the profile's opt point."""
    result = onnx_set.export_onnx(copies.weights, copies.out, calib_prompts=[copies.prompts.read_text().strip()])
    assert exports == []
    assert result.cases == [(672, 384, s) for s in range(13)]
    dit = profile(result.graphs["dit"], result.model.dit_config, result.model.vae_config, result.cases)
    assert dit["x"].opt == dit["x"].max == (25, 48, 84, 16) and dit["x"].min == (1, 48, 84, 16)
    body = profile(result.graphs["vae_body"], result.model.dit_config, result.model.vae_config, result.cases)
    assert body["z"].min == body["z"].max == (1, 16, 2, 48, 84) and len(body) > 1


# ---- bad input: one line, exit code 2, nothing written ----


def _refused(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_weights(tmp_path, capsys):
    err = _refused(["--onnx-only", "--weights", str(tmp_path / "none"), "--out", str(tmp_path / "out")], capsys)
    assert "does not exist" in err and "k4trt weights download" in err
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_calibration_prompts(weights, tmp_path, capsys):
    out = tmp_path / "out"
    err = _refused(["--onnx-only", "--weights", str(weights), "--out", str(out), "--calib-prompts",
                    str(tmp_path / "no.txt")], capsys)
    assert "--calib-prompts" in err and "does not exist" in err
    (tmp_path / "empty.txt").write_text("\n  \n")
    err = _refused(["--onnx-only", "--weights", str(weights), "--out", str(out), "--calib-prompts",
                    str(tmp_path / "empty.txt")], capsys)
    assert "holds no prompts" in err
    assert not out.exists()


def test_unwritable_output_folder(weights, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _refused(["--onnx-only", "--weights", str(weights), "--out", str(blocker / "engines")], capsys)
    assert "is not an existing folder" in err
    err = _refused(["--onnx-only", "--weights", str(weights), "--out", str(blocker)], capsys)
    assert "is a file" in err
    if os.geteuid() == 0:
        return  # root writes through any permission bits; the file-as-parent cases above stand in
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        err = _refused(["--onnx-only", "--weights", str(weights), "--out", str(locked / "engines")], capsys)
        assert "not writable" in err
        assert not (locked / "engines").exists()
    finally:
        locked.chmod(0o700)


def test_building_engines_without_tensorrt_says_how_to_get_it(weights, tmp_path, capsys):
    from k4trt.engine.trt_api import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    err = _refused(["--weights", str(weights), "--out", str(tmp_path / "out")], capsys)
    assert "pip install 'k4trt[trt-cu12]'" in err and "--onnx-only" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--precision", "bf16", "--fp8-attention"], "needs --precision fp8"),
    (["--sizes", "100x100"], "multiples of 16"),
    (["--sizes", "wide"], "is not WIDTHxHEIGHT"),
    (["--max-duration", "13"], "--max-duration: duration 13 s is outside 0–12 s"),
])
def test_bad_settings(weights, tmp_path, capsys, args, message):
    err = _refused(["--onnx-only", "--weights", str(weights), "--out", str(tmp_path / "out"), *args], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_precision_follows_the_gpu_fp8_support():
    from k4trt.cli.build_engines import choose_precision
    from k4trt.core.gpu import GpuInfo

    said: list[str] = []
    h100, a10 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 1), GpuInfo("NVIDIA A10", (8, 6), 1)
    assert choose_precision(None, h100, said.append) == "fp8" and choose_precision("bf16", h100, said.append) == "bf16"
    assert choose_precision(None, None, said.append) == "fp8"  # --onnx-only without a GPU: the engine build checks
    assert said == []
    assert choose_precision(None, a10, said.append) == "bf16" and choose_precision("bf16", a10, said.append) == "bf16"
    assert said == ["NVIDIA A10 (compute capability 8.6) has no FP8 tensor cores (needs 8.9+): building the bf16 DiT"]
