"""benchmarks/gpu_check.sh --dry-run: the GPU check's three steps at tiny size on this CPU, so the script a GPU
session runs in one command is known to work before the GPU is lent."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_writes_its_results(tmp_path):
    start = time.monotonic()
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [line for line in (tmp_path / "log.txt").read_text().splitlines() if line.startswith("== ")] == [
        "== 1/3 pytest -m gpu", "== 2/3 k4trt bench", "== 3/3 attention and GEMM micro-benchmarks"]
    bench = json.loads((tmp_path / "bench" / "result.json").read_text())
    assert bench["backends"]["torch"]["status"] == "ok" and bench["settings"]["weights"] == "tiny random"
    micro = json.loads((tmp_path / "micro.json").read_text())
    assert set(micro["attention"]) >= {"flash", "cudnn", "efficient"}
    assert set(micro["gemm"]) == {"qkv", "attention_out", "ff_in", "ff_out"}
    assert all(micro["gemm"][name]["bf16"]["status"] == "ok" for name in micro["gemm"])
    print(f"gpu_check.sh --dry-run took {time.monotonic() - start:.0f} s")
