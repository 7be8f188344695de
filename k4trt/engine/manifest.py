"""manifest.json: what the engines in a folder were built from, with and for.

It decides two things. At build time, `needs_rebuild` compares what a build would use now (TensorRT version,
GPU model, weights, each ONNX, shape profile, builder options) with what the existing plan was built from,
so `build-engines` rebuilds only when something changed. At load time, `check_compatible` refuses plans
built for another GPU model or TensorRT version (they either fail to deserialize or run with tactics tuned
for other hardware) with the command that rebuilds them. It also carries the model facts the TensorRT
executor cannot read from a plan (DiT dimensions, VAE scaling factor).

Engines are keyed by plan file name, so `dit.fp8.plan` and `dit.bf16.plan` can live side by side.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k4trt.config import DiTConfig
from k4trt.engine.gpu import GpuInfo
from k4trt.engine.layout import MANIFEST, rebuild_command
from k4trt.engine.profiles import ShapeRange
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path

FORMAT = 1
OTHER_RECORDS = "onnx"  # the export's record (k4trt.export.onnx_manifest), shared file, kept on rewrite


@dataclass(frozen=True)
class PlanFile:
    """What a finished plan looked like when written; a size mismatch means truncated or replaced."""

    size: int
    sha256: str


@dataclass(frozen=True)
class EngineRecord:
    graph: str  # dit | vae_image | vae_head | vae_body
    precision: str  # fp8 | bf16 (the VAE engines are always bf16)
    onnx: dict[str, str]  # {file name: SHA-256} of the graph and its external data
    profile: dict[str, ShapeRange]  # per input
    options: dict[str, int | None]  # builder settings that change the plan (optimization level, workspace)
    plan: PlanFile | None = None  # None until built


@dataclass(frozen=True)
class Manifest:
    tensorrt_version: str
    gpu: GpuInfo
    weights_dir: str  # only quoted in rebuild commands; moving the weights does not force a rebuild
    weights: dict[str, str]  # {path relative to weights_dir: SHA-256}
    dit_config: DiTConfig
    vae_scaling_factor: float
    engines: dict[str, EngineRecord]  # by plan file name

    def rebuild_command(self, engines_dir: Path) -> str:
        return rebuild_command(engines_dir, self.weights_dir)


def environment_changes(old: Manifest, new: Manifest) -> list[str]:
    """Differences that invalidate every engine in the folder."""
    changes = []
    if old.tensorrt_version != new.tensorrt_version:
        changes.append(f"TensorRT {old.tensorrt_version} -> {new.tensorrt_version}")
    if not old.gpu.same_model(new.gpu):
        changes.append(f"GPU {old.gpu.describe()} -> {new.gpu.describe()}")
    if old.weights != new.weights:
        changed = sorted(k for k in old.weights.keys() | new.weights.keys() if old.weights.get(k) != new.weights.get(k))
        changes.append(f"weights changed: {', '.join(changed)}")
    if old.dit_config != new.dit_config or old.vae_scaling_factor != new.vae_scaling_factor:
        changes.append("model configuration changed")
    return changes


def plan_problem(engines_dir: Path, plan_name: str, record: EngineRecord) -> str | None:
    """Why the plan file cannot be the one the manifest describes (missing, truncated, replaced), or None.

    Only the size is compared: it is free, and it catches the interrupted copy or download that truncates a
    multi-GB file; TensorRT's own deserialization checks catch the rest.
    """
    path = engines_dir / plan_name
    if record.plan is None:
        return f"{plan_name} was never built"
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record.plan.size:
        return f"{path} has {size} bytes but was written with {record.plan.size} (truncated or replaced)"
    return None


def needs_rebuild(existing: Manifest | None, wanted: Manifest, plan_name: str, engines_dir: Path) -> list[str]:
    """Reasons to (re)build `plan_name`; empty when the plan on disk is what `wanted` describes.

    `wanted` is the manifest a build would write now; the `plan` fields of its records are ignored.
    """
    if existing is None:
        return [f"no {MANIFEST} in {engines_dir}"]
    reasons = environment_changes(existing, wanted)
    old = existing.engines.get(plan_name)
    new = wanted.engines[plan_name]
    if old is None:
        return reasons + [f"{plan_name} is not in {MANIFEST}"]
    if old.onnx != new.onnx:
        changed = sorted(k for k in old.onnx.keys() | new.onnx.keys() if old.onnx.get(k) != new.onnx.get(k))
        reasons.append(f"ONNX changed: {', '.join(changed)}")
    if old.profile != new.profile:
        reasons.append("shape profile changed (other sizes or durations)")
    if old.options != new.options:
        reasons.append(f"build options changed: {old.options} -> {new.options}")
    if old.precision != new.precision:
        reasons.append(f"precision {old.precision} -> {new.precision}")
    problem = plan_problem(engines_dir, plan_name, old)
    if problem:
        reasons.append(problem)
    return reasons


def check_compatible(manifest: Manifest, current_trt_version: str, current_gpu: GpuInfo, engines_dir: Path) -> None:
    """Refuse engines built for another GPU model or TensorRT version, naming the command that rebuilds them.

    TensorRT plans are specific to the TensorRT version and GPU model they were built with (Developer Guide,
    "Version Compatibility" and "Hardware Compatibility": we build neither kind of compatible plan, both of
    which cost speed).
    """
    if manifest.tensorrt_version == current_trt_version and manifest.gpu.same_model(current_gpu):
        return
    raise K4TRTError(
        f"engines in {engines_dir} were built for {manifest.gpu.describe()} with TensorRT {manifest.tensorrt_version}, "
        f"but this machine has {current_gpu.describe()} with TensorRT {current_trt_version}; "
        f"rebuild them: {manifest.rebuild_command(engines_dir)}"
    )


def read_manifest(engines_dir: Path) -> Manifest | None:
    """The folder's engine manifest, None if it has none (no file, or only the ONNX export's record, as
    `build-engines --onnx-only` leaves it); an unreadable one is a K4TRTError naming the rebuild."""
    path = engines_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and set(data) <= {OTHER_RECORDS}:
            return None
        return manifest_from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise K4TRTError(
            f"{path} is unreadable ({type(e).__name__}: {e}); rebuild the engines: {rebuild_command(engines_dir)}"
        ) from None


def write_manifest(engines_dir: Path, manifest: Manifest) -> None:
    """Write the engine part; other top-level keys (the ONNX export's "onnx" record) are kept as they are."""
    path = engines_dir / MANIFEST
    try:
        document = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        document = {}
    document = {k: v for k, v in document.items() if k == OTHER_RECORDS} | manifest_to_json(manifest)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def manifest_to_json(m: Manifest) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tensorrt_version": m.tensorrt_version,
        "gpu": {
            "name": m.gpu.name,
            "compute_capability": list(m.gpu.compute_capability),
            "memory_bytes": m.gpu.memory_bytes,
        },
        "weights_dir": m.weights_dir,
        "weights": m.weights,
        "dit_config": dataclasses.asdict(m.dit_config),
        "vae_scaling_factor": m.vae_scaling_factor,
        "engines": {name: _record_to_json(r) for name, r in m.engines.items()},
    }


def manifest_from_json(data: Mapping[str, Any]) -> Manifest:
    if data["format"] != FORMAT:
        raise ValueError(f"format {data['format']} is not {FORMAT}")
    gpu = data["gpu"]
    major, minor = gpu["compute_capability"]
    dit: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["dit_config"].items()}
    return Manifest(
        tensorrt_version=str(data["tensorrt_version"]),
        gpu=GpuInfo(str(gpu["name"]), (int(major), int(minor)), int(gpu["memory_bytes"])),
        weights_dir=str(data["weights_dir"]),
        weights=dict(data["weights"]),
        dit_config=DiTConfig(**dit),
        vae_scaling_factor=float(data["vae_scaling_factor"]),
        engines={name: _record_from_json(r) for name, r in data["engines"].items()},
    )


def _record_to_json(r: EngineRecord) -> dict[str, Any]:
    return {
        "graph": r.graph,
        "precision": r.precision,
        "onnx": r.onnx,
        "profile": {name: s.to_json() for name, s in r.profile.items()},
        "options": r.options,
        "plan": dataclasses.asdict(r.plan) if r.plan is not None else None,
    }


def _record_from_json(data: Mapping[str, Any]) -> EngineRecord:
    plan = data["plan"]
    return EngineRecord(
        graph=str(data["graph"]),
        precision=str(data["precision"]),
        onnx=dict(data["onnx"]),
        profile={name: ShapeRange.from_json(s) for name, s in data["profile"].items()},
        options=dict(data["options"]),
        plan=PlanFile(int(plan["size"]), str(plan["sha256"])) if plan is not None else None,
    )
