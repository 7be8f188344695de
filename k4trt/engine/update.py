"""Bring an engines folder up to date after export: build exactly the plans whose inputs changed, then record
them in manifest.json. This is the one call `build-engines` makes once the ONNX files are written.

A plan is rebuilt when its graph's files hash differently, its profile (sizes, durations) or builder options
changed, it is missing or truncated, was never inspected, or the build environment (TensorRT version, GPU
model) is not the one its folder was built with. Every plan built is inspected (`k4trt.engine.inspect`) and
the result recorded with it; a DiT plan whose attention did not fuse is deleted and refused. The timing cache
is kept only while the manifest vouches for it: missing, unreadable or foreign manifest, another
environment, or a cache file other than the one the last build recorded, and its measured tactics would be
someone else's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from k4trt.config import DiTConfig
from k4trt.core.gpu import FP8_COMPUTE_CAPABILITY, current_gpu
from k4trt.core.graphs import GraphSpec, dit_sequence, profile
from k4trt.core.manifest import (
    BuildEnvironment,
    EngineRecord,
    FileDigest,
    Inspection,
    Manifest,
    plan_problem,
    rebuild_command,
)
from k4trt.core.profiles import ShapeRange
from k4trt.engine.build import build_engine
from k4trt.engine.trt_api import describe_errors, error_recorder, recorded_errors, require_tensorrt, tensorrt_version
from k4trt.errors import K4TRTError
from k4trt.export.onnx_files import graph_files
from k4trt.export.onnx_set import OnnxSet

TIMING_CACHE = "timing.cache"


class Builder(Protocol):
    """`k4trt.engine.build.build_engine`'s signature; tests pass a fake that writes a plan and records calls."""

    def __call__(self, onnx_path: Path, plan_path: Path, ranges: Mapping[str, ShapeRange], timing_cache: Path,
                 precision: str, *, optimization_level: int, workspace_bytes: int | None, degree: int) -> FileDigest: ...


class Inspector(Protocol):
    """`inspect_plan`'s signature; tests pass a fake that returns a record (or raises) without TensorRT."""

    def __call__(self, plan_path: Path, spec: GraphSpec, ranges: Mapping[str, ShapeRange], dit: DiTConfig,
                 version: str) -> Inspection: ...


def inspect_plan(plan_path: Path, spec: GraphSpec, ranges: Mapping[str, ShapeRange], dit: DiTConfig,
                 version: str) -> Inspection:
    """Load the plan just built (streamed, `k4trt.engine.plan_io`), inspect it at the profile's largest shapes
    and, for the DiT, refuse unfused attention (`k4trt.engine.inspect`)."""
    require_tensorrt()
    import tensorrt as trt

    from k4trt.engine.inspect import inspect_engine, require_fused_attention, summarize
    from k4trt.engine.plan_io import deserialize

    recorder = error_recorder()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    runtime.error_recorder = recorder
    engine = deserialize(runtime, plan_path)
    if engine is None:
        raise K4TRTError(f"TensorRT {version} cannot load the plan it just built, {plan_path} "
                         f"({describe_errors(recorded_errors(recorder))})")
    shapes = {name: r.max for name, r in ranges.items()}
    info = inspect_engine(engine, shapes)
    if spec.is_dit:
        require_fused_attention(info, dit_sequence(dit, shapes["x"]), plan_path.name, version)
    return summarize(info, version, shapes)


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
    inspect: Inspector = inspect_plan,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Build the plans of `onnx.graphs` in `onnx.engines_dir` where needed, for every case of `onnx.cases`.

    The manifest is rewritten after every plan, so an interrupted run keeps the plans it finished. The caller
    holds the folder's writer lock (`k4trt.core.manifest.writing`)."""
    folder = onnx.engines_dir
    fp8 = [spec.onnx for spec in onnx.graphs.values() if spec.precision == "fp8"]
    if fp8 and not environment.gpu.has_fp8:
        need = ".".join(map(str, FP8_COMPUTE_CAPABILITY))
        raise K4TRTError(f"{', '.join(fp8)} needs FP8 tensor cores (compute capability {need}+), which "
                         f"{environment.gpu.describe()} lacks; build the bf16 DiT: "
                         f"{rebuild_command(folder, extra='--precision bf16')}")
    manifest, trusted = Manifest.load_or_start(folder, log)
    timing_cache = folder / TIMING_CACHE
    changes = manifest.environment.changes_to(environment) if manifest.environment is not None else []
    if changes and manifest.engines:
        log(f"rebuilding every engine: {'; '.join(changes)}")
        manifest.engines.clear()
    if timing_cache.exists():
        why = _distrust(trusted, manifest, changes, timing_cache)
        if why:
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
            fp8_scope=onnx.fp8_scope if spec.precision == "fp8" else None,
        )
        reasons = needs_rebuild(manifest.engines.get(spec.plan), wanted, folder, spec.plan)
        if not reasons and not force:
            log(f"{spec.plan} is up to date")
            continue
        log(f"building {spec.plan}: {'; '.join(reasons) if reasons else '--force'}")
        manifest.engines.pop(spec.plan, None)  # until the new plan is built and inspected
        plan = build(folder / spec.onnx, folder / spec.plan, wanted.profile, timing_cache, spec.precision,
                     optimization_level=optimization_level, workspace_bytes=workspace_bytes, degree=spec.degree)
        manifest.stamps.record(folder / spec.plan, spec.plan, plan.sha256)
        if timing_cache.is_file():
            manifest.file_sha(folder, TIMING_CACHE)  # stamps the cache this build wrote, see _distrust
        try:
            inspection = inspect(folder / spec.plan, spec, wanted.profile, onnx.model.dit_config,
                                 environment.tensorrt_version)
        except K4TRTError:
            (folder / spec.plan).unlink(missing_ok=True)
            manifest.save(folder)
            raise
        _log_inspection(log, spec.plan, inspection)
        manifest.engines[spec.plan] = dataclasses.replace(wanted, plan=plan, inspection=inspection)
        manifest.save(folder)
    manifest.save(folder)
    return manifest


def _distrust(trusted: bool, manifest: Manifest, changes: list[str], timing_cache: Path) -> str | None:
    """Why the timing cache on disk cannot be reused, or None when the manifest vouches for it."""
    if not trusted or manifest.environment is None:
        return f"no trustworthy record of where {TIMING_CACHE} was measured"
    if changes:
        return "; ".join(changes)
    if manifest.stamps.stale(timing_cache, TIMING_CACHE):
        return f"it is not the {TIMING_CACHE} the last build recorded"
    return None


def _log_inspection(log: Callable[[str], None], plan: str, inspection: Inspection) -> None:
    largest = inspection.largest_activation
    biggest = (f"; largest activation {largest.tensor} {list(largest.shape)} ({largest.bytes / 2**20:.0f} MiB)"
               if largest else "")
    log(f"{plan}: {inspection.layers} layers, {len(inspection.attention_layers)} fused attention, "
        f"{inspection.fp8_gemm_layers} FP8 GEMM{biggest}")


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
    if old.fp8_scope != wanted.fp8_scope:
        reasons.append(f"FP8 scope {old.fp8_scope} -> {wanted.fp8_scope}")
    problem = plan_problem(folder, plan, old)
    if problem:
        reasons.append(problem)
    elif old.inspection is None:
        reasons.append(f"{plan} was never inspected")
    return reasons
