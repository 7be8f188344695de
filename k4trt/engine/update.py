"""Bring an engines folder up to date after export: build exactly the plans whose inputs changed, then record
them in manifest.json. This is the one call `build-engines` makes once the ONNX files are written.

A plan is rebuilt when its graph's files hash differently, its profile (sizes, durations) or builder options
changed, it is missing or truncated, or the build environment (TensorRT version, GPU model) is not the one
its folder was built with. The timing cache is kept only while the manifest vouches for it: after another
environment, or with no trustworthy manifest, its measured tactics would be someone else's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from k4trt.core.graphs import profile
from k4trt.core.gpu import current_gpu
from k4trt.core.manifest import BuildEnvironment, EngineRecord, Manifest, PlanFile, plan_problem, rebuild_command
from k4trt.core.profiles import ShapeRange
from k4trt.engine.build import build_engine
from k4trt.engine.trt_api import require_tensorrt, tensorrt_version
from k4trt.errors import K4TRTError
from k4trt.export.onnx_files import graph_files
from k4trt.export.onnx_set import OnnxSet

TIMING_CACHE = "timing.cache"


class Builder(Protocol):
    """`k4trt.engine.build.build_engine`'s signature; tests pass a fake that writes a plan and records calls."""

    def __call__(self, onnx_path: Path, plan_path: Path, ranges: Mapping[str, ShapeRange], timing_cache: Path,
                 precision: str, *, optimization_level: int, workspace_bytes: int | None, degree: int) -> PlanFile: ...


def current_environment() -> BuildEnvironment:
    """The TensorRT and GPU a build here would use; one line when either is missing."""
    require_tensorrt()
    gpu, version = current_gpu(), tensorrt_version()
    if gpu is None or version is None:
        raise K4TRTError("building TensorRT engines needs a CUDA GPU visible to PyTorch; run build-engines on the GPU "
                         "machine that will run the engines")
    return BuildEnvironment(version, gpu)


def update_engines(
    onnx: OnnxSet,
    environment: BuildEnvironment,
    *,
    force: bool = False,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    build: Builder = build_engine,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Build the plans of `onnx.graphs` in `onnx.engines_dir` where needed, for every case of `onnx.cases`.

    The manifest is rewritten after every plan, so an interrupted run keeps the plans it finished. The caller
    holds the folder's writer lock (`k4trt.core.manifest.writing`)."""
    folder = onnx.engines_dir
    manifest, trusted = Manifest.load_or_start(folder, log)
    timing_cache = folder / TIMING_CACHE
    changes = manifest.environment.changes_to(environment) if manifest.environment is not None else []
    if changes and manifest.engines:
        log(f"rebuilding every engine: {'; '.join(changes)}")
        manifest.engines.clear()
    if timing_cache.exists() and (not trusted or manifest.environment is None or changes):
        why = "; ".join(changes) if changes else f"no trustworthy record of where {TIMING_CACHE} was measured"
        log(f"discarding {timing_cache}: {why}")
        timing_cache.unlink()
    manifest.environment = environment
    options: dict[str, int | None] = {"optimization_level": optimization_level, "workspace_bytes": workspace_bytes}

    for name, spec in onnx.graphs.items():
        again = rebuild_command(folder, manifest.weights_dir, extra="--force")
        wanted = EngineRecord(
            graph=name,
            precision=spec.precision,
            onnx={p.name: manifest.file_sha(folder, p.name) for p in graph_files(folder / spec.onnx, again)},
            profile=profile(spec, onnx.model.dit_config, onnx.model.vae_config, onnx.cases),
            options=options,
            degree=spec.degree,
        )
        reasons = needs_rebuild(manifest.engines.get(spec.plan), wanted, folder, spec.plan)
        if not reasons and not force:
            log(f"{spec.plan} is up to date")
            continue
        log(f"building {spec.plan}: {'; '.join(reasons) if reasons else '--force'}")
        plan = build(folder / spec.onnx, folder / spec.plan, wanted.profile, timing_cache, spec.precision,
                     optimization_level=optimization_level, workspace_bytes=workspace_bytes, degree=spec.degree)
        manifest.stamps.record(folder / spec.plan, spec.plan, plan.sha256)
        manifest.engines[spec.plan] = dataclasses.replace(wanted, plan=plan)
        manifest.save(folder)
    manifest.save(folder)
    return manifest


def needs_rebuild(old: EngineRecord | None, wanted: EngineRecord, folder: Path, plan: str) -> list[str]:
    """Reasons to (re)build `plan`; empty when the plan on disk is what `wanted` describes (whose `plan` field
    is ignored). Environment changes are handled before: they clear every record."""
    if old is None:
        return [f"{plan} is not built yet"]
    reasons = []
    if old.onnx != wanted.onnx:
        changed = sorted(k for k in old.onnx.keys() | wanted.onnx.keys() if old.onnx.get(k) != wanted.onnx.get(k))
        reasons.append(f"ONNX changed: {', '.join(changed)}")
    if old.profile != wanted.profile:
        reasons.append("shape profile changed (other sizes or durations)")
    if old.options != wanted.options:
        reasons.append(f"build options changed: {old.options} -> {wanted.options}")
    if old.precision != wanted.precision:
        reasons.append(f"precision {old.precision} -> {wanted.precision}")
    problem = plan_problem(folder, plan, old)
    if problem:
        reasons.append(problem)
    return reasons
