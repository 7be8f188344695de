"""manifest.json and the file utilities under it: one schema round-tripped, the stamp cache reading a file only
after it changed, weights adopted and foreign weights told apart, the writer lock across processes, and the
files one ONNX graph is made of."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from k4trt.config import DiTConfig
from k4trt.core.gpu import GpuInfo
from k4trt.core.manifest import (
    Artifact,
    BuildEnvironment,
    EngineRecord,
    FileDigest,
    Manifest,
    ManifestError,
    ModelFacts,
    plan_problem,
    rebuild_command,
    writing,
)
from k4trt.core.profiles import ShapeRange
from k4trt.errors import K4TRTError
from k4trt.export.onnx_files import graph_files
from k4trt.fsutil import StampCache, sha256_file
from k4trt.models.vae import tiny_vae_config

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 85_000_000_000)


def _full_manifest() -> Manifest:
    m = Manifest(
        weights_dir="/data/weights",
        weights={"kandinsky4_distil_512.pt": FileDigest(10, "aa"), "vae/config.json": FileDigest(2, "bb")},
        model=ModelFacts(DiTConfig(), tiny_vae_config()),
        artifacts={"dit.fp8": Artifact({"kandinsky4_distil_512.pt": "aa", "fp8_attention": "no"}, {"dit.fp8.onnx": "11"})},
        environment=BuildEnvironment("11.4.0.1", H100),
        engines={"dit.fp8.plan": EngineRecord("dit", "fp8", {"dit.fp8.onnx": "11"},
                                              {"x": ShapeRange((1, 2), (3, 4), (5, 6))},
                                              {"optimization_level": 3, "workspace_bytes": None}, FileDigest(5, "ab"))},
    )
    m.stamps = StampCache.from_json({"dit.fp8.onnx": {"size": 1, "mtime_ns": 2, "inode": 3, "sha256": "11"}})
    return m


def test_round_trip_keeps_every_field_and_tuples(tmp_path):
    m = _full_manifest()
    m.save(tmp_path)
    back = Manifest.load(tmp_path)
    assert back is not None
    assert (back.weights_dir, back.weights, back.model, back.artifacts, back.environment, back.engines) == (
        m.weights_dir, m.weights, m.model, m.artifacts, m.environment, m.engines)
    assert back.stamps.stamps == m.stamps.stamps
    assert back.model is not None and back.model.dit_config.axes_dims == (16, 24, 24)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_is_none_and_damaged_or_foreign_names_the_rebuild(tmp_path):
    assert Manifest.load(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"format": 2, "weights": ')
    with pytest.raises(ManifestError, match=r"manifest.json is unreadable .*build-engines --out .* --force"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 1, "onnx": {}}')
    with pytest.raises(ManifestError, match="format 1, not 2"):
        Manifest.load(tmp_path)
    logged: list[str] = []
    fresh, trusted = Manifest.load_or_start(tmp_path, logged.append)
    assert fresh.artifacts == {} and not trusted and "starting a new manifest" in logged[0]


def test_stamp_cache_reads_a_file_once_and_again_only_after_it_changed(tmp_path, monkeypatch):
    data = tmp_path / "big.data"
    data.write_bytes(os.urandom(4096))
    reads: list[Path] = []
    real = sha256_file
    monkeypatch.setattr("k4trt.fsutil.sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    cache = StampCache()
    first = cache.sha256(data, "big.data")
    assert first == hashlib.sha256(data.read_bytes()).hexdigest()
    again = StampCache.from_json(json.loads(json.dumps(cache.to_json())))  # as a later run reads it back
    assert again.sha256(data, "big.data") == first and len(reads) == 1
    data.write_bytes(os.urandom(4096))  # same size, new content and mtime
    assert again.sha256(data, "big.data") != first and len(reads) == 2
    copy = tmp_path / "copy.data"
    copy.write_bytes(data.read_bytes())
    os.utime(copy, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns))  # same size and mtime, other inode
    again.stamps["big.data"] = again.stamps["big.data"]
    assert again.stale(copy, "big.data")


def test_sha256_file_names_an_unreadable_file(tmp_path):
    with pytest.raises(K4TRTError, match="cannot read .*missing"):
        sha256_file(tmp_path / "missing")


def test_adopting_changed_weights_drops_what_was_made_from_the_old_ones():
    m = _full_manifest()
    m.artifacts["vae_head"] = Artifact({"vae/config.json": "bb"}, {})
    m.engines["vae_head.plan"] = EngineRecord("vae_head", "bf16", {}, {}, {})
    m.artifacts["dit.sp4.bf16"] = Artifact({"vae/config.json": "bb"}, {})  # a sequence-parallel DiT, degree 4
    m.engines["dit.sp4.bf16.plan"] = EngineRecord("dit", "bf16", {}, {}, {}, degree=4)
    dropped = m.record_weights({"kandinsky4_distil_512.pt": FileDigest(10, "cc")}, "/data/weights")
    assert dropped == ["dit.fp8", "dit.fp8.plan"]
    assert set(m.artifacts) == {"vae_head", "dit.sp4.bf16"} and set(m.engines) == {"vae_head.plan", "dit.sp4.bf16.plan"}
    assert m.weights["kandinsky4_distil_512.pt"].sha256 == "cc"


def test_foreign_weights_are_found_by_size_or_by_hash_of_small_files(tmp_path, monkeypatch):
    monkeypatch.setattr("k4trt.core.manifest.SMALL_FILE", 4)  # so the 10-byte "checkpoint" counts as large
    weights = tmp_path / "w"
    (weights / "vae").mkdir(parents=True)
    (weights / "vae" / "config.json").write_text("{}")
    (weights / "kandinsky4_distil_512.pt").write_bytes(b"0" * 10)
    m = Manifest(weights={"vae/config.json": FileDigest(2, hashlib.sha256(b"{}").hexdigest()),
                          "kandinsky4_distil_512.pt": FileDigest(10, "not hashed: too big to check by content"),
                          "text_encoder/model.safetensors": FileDigest(7, "absent here")})
    assert m.foreign_weights(weights) == []  # the big file is not read; the absent one is not needed
    (weights / "vae" / "config.json").write_text("[]")
    (weights / "kandinsky4_distil_512.pt").write_bytes(b"0" * 11)
    assert sorted(m.foreign_weights(weights)) == ["kandinsky4_distil_512.pt has 11 bytes, not 10",
                                                  "vae/config.json differs (SHA-256)"]


def test_plan_problem_names_a_truncated_or_missing_plan(tmp_path):
    record = EngineRecord("dit", "fp8", {}, {}, {}, FileDigest(5, "ab"))
    (tmp_path / "dit.fp8.plan").write_bytes(b"x" * 5)
    assert plan_problem(tmp_path, "dit.fp8.plan", record) is None
    (tmp_path / "dit.fp8.plan").write_bytes(b"xx")
    assert "has 2 bytes but was written with 5 (truncated or replaced)" in plan_problem(tmp_path, "dit.fp8.plan", record)
    (tmp_path / "dit.fp8.plan").unlink()
    assert "is missing" in plan_problem(tmp_path, "dit.fp8.plan", record)
    assert "never built" in plan_problem(tmp_path, "dit.fp8.plan", EngineRecord("dit", "fp8", {}, {}, {}))


def test_rebuild_command_shapes():
    assert rebuild_command(Path("e")) == "build-engines --out e --force"
    assert rebuild_command(Path("e"), "w", extra="") == "build-engines --weights w --out e"


def test_a_second_writer_of_a_folder_stops_with_one_line_and_the_lock_dies_with_its_holder(tmp_path):
    holder = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from k4trt.core.manifest import writing
        with writing(Path(sys.argv[1])):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(K4TRTError) as error, writing(tmp_path):
            pass
        assert f"is being written by process {proc.pid}; wait for it to finish" in str(error.value)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    with writing(tmp_path):  # a killed holder leaves no stale lock
        pass


def _matmul_onnx(path: Path, external: bool) -> Path:
    w = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(16, 16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save_model(model, str(path), save_as_external_data=external, location=path.name + ".data", size_threshold=0)
    return path


def test_graph_files_are_the_onnx_and_the_data_it_names(tmp_path):
    path = _matmul_onnx(tmp_path / "vae_head.onnx", external=True)
    assert graph_files(path, "AGAIN") == [path, tmp_path / "vae_head.onnx.data"]
    assert graph_files(_matmul_onnx(tmp_path / "inline.onnx", external=False), "AGAIN") == [tmp_path / "inline.onnx"]
    (tmp_path / "vae_head.onnx.data").unlink()
    with pytest.raises(K4TRTError, match="missing external data .*; export it again: AGAIN"):
        graph_files(path, "AGAIN")
    (tmp_path / "vae_body.onnx").write_bytes(b"\x08\x07garbage\xff\xff")
    with pytest.raises(K4TRTError, match="not a valid ONNX file; export it again: AGAIN"):
        graph_files(tmp_path / "vae_body.onnx", "AGAIN")
