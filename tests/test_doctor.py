"""`k4trt doctor` prints only OK/FIX lines, never raises, and its exit code says whether anything needs fixing."""

from __future__ import annotations

import hashlib
import sys

import pytest

from k4trt.cli import doctor as doctor_mod
from k4trt.cli.doctor import doctor
from k4trt.config import DiTConfig
from k4trt.core.gpu import GpuInfo
from k4trt.core.manifest import Artifact, BuildEnvironment, EngineRecord, FileDigest, Manifest, ModelFacts
from k4trt.core.profiles import ShapeRange
from k4trt.models.vae import tiny_vae_config


def run(weights, engines) -> tuple[int, list[str]]:
    lines: list[str] = []
    return doctor(weights, engines, out=lines.append), lines


def test_runs_without_tensorrt_and_prints_only_ok_or_fix_lines(tmp_path):
    code, lines = run(tmp_path / "weights", tmp_path / "engines")
    assert lines and all(line.startswith(("OK ", "FIX ")) for line in lines)
    assert any(line.startswith("OK Python ") for line in lines)
    assert code == (1 if any(line.startswith("FIX") for line in lines) else 0)
    fixes = [line for line in lines if line.startswith("FIX")]
    weights, engines = tmp_path / "weights", tmp_path / "engines"
    assert f"FIX no engines in {engines} (no manifest.json): build-engines --weights {weights} --out {engines}" in lines
    assert any("k4trt weights download" in line for line in fixes)
    assert all(": " in line for line in fixes)  # every FIX says what to run


def test_without_tensorrt_the_fix_is_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr("k4trt.engine.trt_api.tensorrt_version", lambda: None)
    _, lines = run(tmp_path, tmp_path)
    assert ("FIX TensorRT is not installed: pip install 'k4trt[trt-cu12]' (a CUDA 12 torch, driver r535+) or "
            "'k4trt[trt-cu13]' (a CUDA 13 torch, driver r580+); `k4trt doctor` says which fits") in lines


@pytest.mark.parametrize(("variant", "torch_cuda", "driver", "expected"), [
    (13, "13.0", (13, 0), ["OK TensorRT's CUDA 13 build matches PyTorch's CUDA 13.0",
                           "OK the driver (CUDA 13.0) runs TensorRT's CUDA 13 build"]),
    (13, "12.8", (12, 8), ["FIX TensorRT is the CUDA 13 build but PyTorch uses CUDA 12.8: pip uninstall -y tensorrt "
                           "tensorrt-cu13 tensorrt-cu13-libs tensorrt-cu13-bindings && pip install 'k4trt[trt-cu12]'",
                           "FIX TensorRT's CUDA 13 build needs a driver for CUDA 13.0+ (r580 or newer), this one supports "
                           "CUDA 12.8: update the NVIDIA driver, or pip install 'k4trt[trt-cu12]' with a CUDA 12 torch"]),
    (12, "12.4", (12, 4), ["OK TensorRT's CUDA 12 build matches PyTorch's CUDA 12.4",
                           "OK the driver (CUDA 12.4) runs TensorRT's CUDA 12 build"]),
    (12, "12.1", (12, 0), ["OK TensorRT's CUDA 12 build matches PyTorch's CUDA 12.1",
                           "FIX TensorRT's CUDA 12 build needs a driver for CUDA 12.2+ (r535 or newer), this one supports "
                           "CUDA 12.0: update the NVIDIA driver, or pip install 'k4trt[trt-cu12]' with a CUDA 12 torch"]),
    (12, None, None, ["FIX PyTorch is a CPU build, and the TensorRT backend runs on CUDA tensors: install a CUDA 12.x "
                      "build of torch (https://pytorch.org/get-started/locally) to match TensorRT's CUDA 12 build"]),
    (None, "12.8", (12, 8), []),
])
def test_tensorrt_cuda_build_torch_and_driver_fit(variant, torch_cuda, driver, expected):
    lines = [f"{'OK' if ok else 'FIX'} {text}" for ok, text in doctor_mod.tensorrt_fit(variant, torch_cuda, driver)]
    assert lines == expected


def test_tensorrt_lines_name_version_and_cuda_build(tmp_path, monkeypatch):
    monkeypatch.setattr("k4trt.engine.trt_api.tensorrt_version", lambda: "11.4.0.106")
    monkeypatch.setattr("k4trt.engine.trt_api.cuda_variant", lambda: 13)
    monkeypatch.setattr(doctor_mod, "_driver_cuda", lambda: (13, 1))
    _, lines = run(tmp_path, tmp_path)
    assert "OK TensorRT 11.4.0.106, the CUDA 13 build" in lines
    assert "OK the driver (CUDA 13.1) runs TensorRT's CUDA 13 build" in lines


def test_a_crashing_check_becomes_a_fix_line(tmp_path, monkeypatch):
    def broken() -> list:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor_mod, "_gpu", broken)
    code, lines = run(tmp_path, tmp_path)
    assert code == 1
    assert "FIX the GPU check itself failed (RuntimeError: boom): please report this as a bug" in lines


def test_weights_check_survives_a_missing_weights_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "k4trt.weights.layout", None)  # import now raises ImportError
    _, lines = run(tmp_path, tmp_path)
    assert any(line.startswith("FIX cannot check weights") and "pip install -e ." in line for line in lines)


def _engines_folder(folder, plans: dict[str, bytes], stamped: bool = False) -> None:
    """A manifest with `plans` built; `stamped` as build-engines leaves it (each plan's stamp recorded)."""
    profile = {"x": ShapeRange((1, 8, 8, 16), (3, 8, 8, 16), (3, 8, 16, 16))}
    manifest = Manifest(weights_dir="/w", model=ModelFacts(DiTConfig(), tiny_vae_config()),
                        environment=BuildEnvironment("10.13.0.35", GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 1)))
    for name, data in plans.items():
        (folder / name).write_bytes(data)
        graph = name.split(".")[0]
        sha = hashlib.sha256(data).hexdigest()
        manifest.engines[name] = EngineRecord(graph, "fp8" if graph == "dit" else "bf16", {}, profile, {},
                                              FileDigest(len(data), sha))
        if stamped:
            manifest.stamps.record(folder / name, name, sha)
    manifest.save(folder)


def test_engines_are_checked_against_the_manifest(tmp_path):
    _engines_folder(tmp_path, {"dit.fp8.plan": b"plan-a", "vae_head.plan": b"plan-b", "vae_body.plan": b"plan-c"})
    _, lines = run(tmp_path, tmp_path)
    assert any(line.startswith("OK dit.fp8.plan (fp8, built with TensorRT 10.13.0.35 for NVIDIA H100 80GB HBM3; "
                               "x (1, 8, 8, 16)..(3, 8, 16, 16))") for line in lines)
    (tmp_path / "vae_head.plan").write_bytes(b"plan-B")  # same size, other content
    (tmp_path / "vae_body.plan").write_bytes(b"pl")  # truncated
    _, lines = run(tmp_path, tmp_path)
    assert any("vae_head.plan differs from the plan that was built (SHA-256 mismatch): "
               "build-engines --weights /w --out" in line for line in lines)
    assert any("vae_body.plan has 2 bytes but was written with 6 (truncated or replaced)" in line for line in lines)


def test_missing_engines_in_the_manifest_are_named(tmp_path):
    _engines_folder(tmp_path, {"vae_head.plan": b"h"})
    _, lines = run(tmp_path, tmp_path)
    assert any(line.startswith(f"FIX {tmp_path} lacks a DiT plan, vae_image.plan, vae_body.plan: build-engines")
               for line in lines)


def test_plans_the_stamp_cache_vouches_for_are_not_read(tmp_path, monkeypatch):
    _engines_folder(tmp_path, {"dit.fp8.plan": b"plan-a", "vae_head.plan": b"plan-b"}, stamped=True)
    read = []
    monkeypatch.setattr("k4trt.fsutil.sha256_file", lambda path, *a: read.append(path) or "0" * 64)
    _, lines = run(tmp_path, tmp_path)
    assert read == [] and any(line.startswith("OK dit.fp8.plan") for line in lines)
    (tmp_path / "vae_head.plan").write_bytes(b"plan-B")  # rewritten: its stamp no longer holds, so it is read
    _, lines = run(tmp_path, tmp_path)
    assert read == [tmp_path / "vae_head.plan"]


def test_an_onnx_only_folder_is_named_as_such(tmp_path):
    Manifest(weights_dir="/w", artifacts={"dit.bf16": Artifact({}, {}), "vae_head": Artifact({}, {})}).save(tmp_path)
    _, lines = run(tmp_path, tmp_path)
    assert f"FIX {tmp_path} holds exported ONNX graphs (dit.bf16, vae_head) but no TensorRT engines yet: " \
           f"build-engines --weights {tmp_path} --out {tmp_path}" in lines


def test_broken_manifest_is_a_fix_line(tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    _, lines = run(tmp_path, tmp_path)
    assert any(line.startswith("FIX ") and "manifest.json is unreadable" in line for line in lines)


@pytest.mark.parametrize("argv", [["doctor"], ["doctor", "--weights", "w", "--engines", "e"]])
def test_cli_parser_wires_doctor(argv, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    doctor_mod.add_parser(parser.add_subparsers(dest="name"))
    seen = {}
    monkeypatch.setattr(doctor_mod, "doctor", lambda w, e: seen.update(w=str(w), e=str(e)) or 0)
    args = parser.parse_args(argv)
    assert args.command(args) == 0
    assert seen == ({"w": "weights", "e": "engines"} if len(argv) == 1 else {"w": "w", "e": "e"})
