"""Bring an engines folder up to date after export: build exactly the plans whose inputs changed, then record
them in manifest.json. This is the one call `build-engines` makes once the ONNX files are written."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from k4trt.config import DiTConfig
from k4trt.engine.build import build_engine
from k4trt.engine.fingerprint import hash_onnx, hash_tree
from k4trt.engine.gpu import current_gpu
from k4trt.engine.layout import GRAPHS, TIMING_CACHE, check_precision, onnx_name, plan_name
from k4trt.engine.manifest import (
    EngineRecord,
    Manifest,
    environment_changes,
    needs_rebuild,
    plan_problem,
    read_manifest,
    write_manifest,
)
from k4trt.engine.profiles import derive_ranges
from k4trt.engine.trt_api import require_tensorrt, tensorrt_version
from k4trt.errors import K4TRTError


def update_engines(
    engines_dir: Path,
    precision: str,
    shapes: Mapping[str, Mapping[str, Sequence[Sequence[int]]]],
    *,
    weights_dir: Path,
    weights_files: Sequence[Path],
    dit_config: DiTConfig,
    vae_scaling_factor: float,
    opt_case: int | None = None,
    force: bool = False,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Build `dit.<precision>.plan` and the `vae_image`, `vae_head`, `vae_body` plans in `engines_dir` where needed.

    `shapes[graph][input]` lists that input's shape in every requested case, all inputs and graphs in the same
    case order; `opt_case` indexes the default case (see `profiles.derive_ranges`). `weights_files` are the
    files or folders below `weights_dir` the ONNX files were exported from; their SHA-256 go in the manifest.
    The manifest is rewritten after every plan, so an interrupted run keeps the plans it finished.
    """
    require_tensorrt()
    check_precision(precision)
    gpu = current_gpu()
    version = tensorrt_version()
    if gpu is None or version is None:
        raise K4TRTError("building TensorRT engines needs a CUDA GPU visible to PyTorch; run build-engines on the GPU "
                         "machine that will run the engines")
    try:
        existing = read_manifest(engines_dir)
    except K4TRTError as e:
        log(f"ignoring the old manifest: {e}")
        existing = None
    options: dict[str, int | None] = {"optimization_level": optimization_level, "workspace_bytes": workspace_bytes}
    records = {
        plan_name(graph, precision): EngineRecord(
            graph=graph,
            precision=precision if graph == "dit" else "bf16",
            onnx=hash_onnx(engines_dir / onnx_name(graph, precision)),
            profile=derive_ranges(shapes[graph], opt_case),
            options=options,
        )
        for graph in GRAPHS
    }
    wanted = Manifest(
        tensorrt_version=version,
        gpu=gpu,
        weights_dir=str(weights_dir),
        weights=hash_tree(weights_dir, weights_files),
        dit_config=dit_config,
        vae_scaling_factor=vae_scaling_factor,
        engines={},
    )
    timing_cache = engines_dir / TIMING_CACHE
    done: dict[str, EngineRecord] = {}
    if existing is not None and not environment_changes(existing, wanted):
        # Plans for other precisions stay valid while TensorRT, GPU and weights are unchanged.
        done = {name: r for name, r in existing.engines.items()
                if name not in records and not plan_problem(engines_dir, name, r)}
    elif existing is not None and timing_cache.exists():
        # Tactic timings measured with another TensorRT or GPU are not valid here.
        log(f"discarding {timing_cache}: {'; '.join(environment_changes(existing, wanted))}")
        timing_cache.unlink()

    for graph in GRAPHS:
        name = plan_name(graph, precision)
        record = records[name]
        reasons = needs_rebuild(existing, dataclasses.replace(wanted, engines={name: record}), name, engines_dir)
        old = existing.engines.get(name) if existing is not None else None
        if old is not None and not reasons and not force:
            log(f"{name} is up to date")
            plan = old.plan
        else:
            log(f"building {name}: {'; '.join(reasons) if reasons else '--force'}")
            plan = build_engine(
                engines_dir / onnx_name(graph, precision),
                engines_dir / name,
                shapes[graph],
                timing_cache,
                record.precision,
                opt_case=opt_case,
                optimization_level=optimization_level,
                workspace_bytes=workspace_bytes,
            )
        done[name] = dataclasses.replace(record, plan=plan)
        write_manifest(engines_dir, dataclasses.replace(wanted, engines=dict(done)))
    return dataclasses.replace(wanted, engines=done)
