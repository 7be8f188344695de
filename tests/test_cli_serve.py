"""`k4trt serve`'s own failures: each one line, found before Ray starts (these tests start none)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from k4trt.cli.main import main
from k4trt.cli.serve import _cause


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(args, capsys):
    code = main(["serve", *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, fragment):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err


def fails(args, capsys, fragment):
    code, _, err = serve(args, capsys)
    one_line_error(code, err, fragment)


def test_help_is_instant_and_imports_no_ray():
    code = ("import sys\nfrom k4trt.cli.main import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('ray', 'fastapi', 'torch') if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "k4trt", "serve", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for flag in ("--weights", "--engines", "--backend", "--device", "--host", "--port", "--replicas", "--store",
                 "--ray-address", "--token-env", "SIGTERM"):
        assert flag in helped.stdout


def test_missing_extra_is_one_line_with_the_install_command(monkeypatch, capsys, tiny_weights):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    fails(["--weights", str(tiny_weights)], capsys, "pip install 'k4trt[serve]'")


def test_bad_settings_fail_before_anything_starts(tiny_weights, tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    base = ["--weights", str(tiny_weights), "--store", str(store), "--device", "cpu"]
    fails(["--weights", str(tmp_path / "none")], capsys, "k4trt weights download")
    fails([*base, "--replicas", "0"], capsys, "at least one replica")
    monkeypatch.delenv("K4TRT_NO_SUCH_TOKEN", raising=False)
    fails([*base, "--token-env", "K4TRT_NO_SUCH_TOKEN"], capsys, "empty or not set")
    (tmp_path / "file").write_text("x")
    fails([*base[:2], "--store", str(tmp_path / "file")], capsys, "is a file")
    for port in ("70000", "0"):  # 0 too: Ray Serve's proxy needs a fixed port, to say where the server is
        fails([*base, "--port", port], capsys, "not a port number")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fails([*base, "--port", str(taken.getsockname()[1])], capsys, "cannot listen there")
    assert not store.exists()  # nothing was made on the way


def test_a_store_in_use_is_refused(tiny_weights, tmp_path, capsys):
    lifecycle = pytest.importorskip("k4trt.serve.lifecycle", reason="the [serve] extra is not installed")
    store = tmp_path / "store"
    with lifecycle.store_lock(store):
        code, _, err = serve(["--weights", str(tiny_weights), "--store", str(store), "--device", "cpu", "--port",
                              str(free_port())], capsys)
    one_line_error(code, err, f"{store} is being written by process {os.getpid()}")


def test_a_replica_that_cannot_load_is_reported_by_its_own_message():
    """What Ray Serve reports when a replica's constructor raised: a generic line, the traceback in the
    deployment's status message (the shape `serve.status()` has)."""
    traceback = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
                 "  File \"replica.py\", line 1, in __init__\nk4trt.errors.K4TRTError: --backend onnxruntime needs "
                 "--engines DIR; build it with: build-engines --out DIR\n")
    status = SimpleNamespace(applications={"k4trt": SimpleNamespace(deployments={
        "VideoAPI": SimpleNamespace(message=""), "Worker": SimpleNamespace(message=traceback)})})
    error = RuntimeError("Deploying application k4trt failed: Failed to update the deployments ['Worker'].")
    assert _cause(error, status) == "--backend onnxruntime needs --engines DIR; build it with: build-engines --out DIR"
    assert _cause(error, SimpleNamespace(applications={})) == str(error)
