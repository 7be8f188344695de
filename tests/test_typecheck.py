"""Type-check the TensorRT code against tensorrt-stubs, so a misspelt or removed TensorRT call fails on a CPU.

TensorRT cannot be installed where CI runs, so without this a typo such as `execute_async_v4` would only
surface on a GPU machine. The configuration is basedpyright's "standard" mode: it reports real errors
(unknown attributes and imports, wrong call signatures and argument types) and none of the style rules of
basedpyright's default "all" mode.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["k4trt/engine", "k4trt/runtime/trt_executor.py", "k4trt/runtime/trt_bindings.py", "k4trt/runtime/nccl.py",
           "k4trt/runtime/cuda_graph.py",
           "k4trt/cli/doctor.py"]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("basedpyright") is None and shutil.which("basedpyright") is None,
                       reason="basedpyright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_stubs") is None,
                       reason="tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)"),
]


def basedpyright(tmp_path: Path, *paths: str | Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "pyrightconfig.json"
    config.write_text(json.dumps({"typeCheckingMode": "standard", "pythonVersion": "3.10", "extraPaths": [str(ROOT)]}))
    return subprocess.run(
        [sys.executable, "-m", "basedpyright", "--project", str(config), *map(str, paths)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_tensorrt_code_type_checks_against_the_stubs(tmp_path):
    result = basedpyright(tmp_path, *CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_catches_a_misspelt_tensorrt_call(tmp_path):
    """Guards the guard: if the stubs stopped resolving, the test above would pass vacuously."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import tensorrt as trt\n\n\n"
        "def run(context: trt.IExecutionContext, engine: trt.ICudaEngine) -> None:\n"
        "    context.execute_async_v3(0)\n"
        "    context.execute_async_v4(0)\n"
        "    engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)\n"
    )
    result = basedpyright(tmp_path, probe)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and "execute_async_v4" in errors[0], result.stdout
    assert "reportAttributeAccessIssue" in result.stdout
