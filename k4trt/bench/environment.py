"""Where and with what a result was measured: without this a number cannot be compared with another."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from k4trt.engine.trt_api import tensorrt_version

REPO = Path(__file__).resolve().parents[2]  # the checkout, when running from one; git then names the commit
_SMI_FIELDS = ("name", "driver_version", "power.limit", "clocks.sm", "clocks.max.sm", "temperature.gpu")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> tuple[str, bool | None]:
    """The checkout's short commit and whether tracked files differ from it (a dirty tree is not that commit);
    ("unknown", None) outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit or "unknown", (bool(status) if status is not None else None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def device_info(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {"kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    info: dict[str, object] = {
        "kind": "cuda",
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 1024**3, 1),
        "multiprocessors": props.multi_processor_count,
    }
    info.update(_nvidia_smi(props.name))
    return info


def software() -> dict[str, str | None]:
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "tensorrt": tensorrt_version(),
    }
    for package in ("transformers", "diffusers", "flash-attn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _nvidia_smi(name: str) -> dict[str, str]:
    """Driver version, power limit, clocks and temperature as the card was found (a throttled card explains
    a slow run). Empty when nvidia-smi is absent."""
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    for line in done.stdout.splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) == len(_SMI_FIELDS) and values[0] == name:
            return {field.replace(".", "_"): value for field, value in zip(_SMI_FIELDS[1:], values[1:], strict=False)}
    return {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
