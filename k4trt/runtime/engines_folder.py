"""Opening an engines folder for a run: its manifest, the model facts it records, and the refusal of engines
made from other weights than the run's. Shared by the ONNX Runtime and TensorRT executors."""

from __future__ import annotations

from pathlib import Path

from k4trt.core.graphs import PRECISIONS, dit_graph, dit_stem_degree
from k4trt.core.manifest import MANIFEST, Manifest, rebuild_command
from k4trt.errors import K4TRTError


def open_engines(engines_dir: Path, weights_dir: Path | None, what: str, build_flags: str = "") -> Manifest:
    """The folder's manifest, which must record an exported model; `what` names the files the caller needs
    ("exported graphs", "engines") and `build_flags` the build-engines flags that make them, for a folder
    without them. With `weights_dir`, refuse a folder made from other weights (as far as
    `Manifest.foreign_weights` can tell without reading gigabytes)."""
    weights = str(weights_dir) if weights_dir is not None else None
    if not engines_dir.is_dir():
        raise K4TRTError(f"engines folder {engines_dir} does not exist; build it: "
                         f"{rebuild_command(engines_dir, weights, extra=build_flags)}")
    manifest = Manifest.load(engines_dir)
    if manifest is None or manifest.model is None:
        raise K4TRTError(f"{engines_dir} holds no {what} (no {MANIFEST} records them); build them: "
                         f"{rebuild_command(engines_dir, weights, extra=build_flags)}")
    if weights_dir is not None:
        foreign = manifest.foreign_weights(weights_dir)
        if foreign:
            raise K4TRTError(f"the engines in {engines_dir} were made from other weights than {weights_dir} "
                             f"({'; '.join(foreign[:3])}); rebuild them from these: "
                             f"{rebuild_command(engines_dir, weights)}")
    return manifest


def choose_dit(manifest: Manifest, available: set[str], precision: str | None, engines_dir: Path, kind: str,
               degree: int = 1) -> str:
    """The DiT precision to run: the one asked for, else fp8 where present, else bf16. `available` holds the
    DiT graph stems (`dit.fp8`, `dit.sp4.bf16`, …) of the kind the caller runs; `kind` names them in messages.
    Only graphs for `degree` ranks count; a folder built for another degree is refused as such."""
    model = manifest.require_model(engines_dir)
    have = [p for p in PRECISIONS if dit_graph(p, model.dit_config, degree).stem in available]
    chosen = precision if precision is not None else next(iter(have), None)
    onnx_only = " --onnx-only" if kind == "ONNX graph" else ""
    if not have:
        other = sorted({d for stem in available if (d := dit_stem_degree(stem)) is not None})
        if other:
            built = ", ".join("one process" if d == 1 else f"{d} ranks (--sp {d})" for d in other)
            ranks = "one process" if degree == 1 else f"{degree} ranks"
            sp = f" --sp {degree}" if degree > 1 else ""
            raise K4TRTError(f"the DiT {kind}s in {engines_dir} were built for {built}, but this run has {ranks}; "
                             f"build them for it: {manifest.rebuild_command(engines_dir, extra=(sp + onnx_only).strip())}")
    if chosen is None or chosen not in have:
        listed = f"it has {', '.join(have)}" if have else "it has none"
        wanted = f"{chosen} " if chosen else ""
        extra = (f"--precision {chosen}" if chosen else "") + (f" --sp {degree}" if degree > 1 else "") + onnx_only
        raise K4TRTError(f"{engines_dir} has no {wanted}DiT {kind} ({listed}); build it: "
                         f"{manifest.rebuild_command(engines_dir, extra=extra.strip())}")
    return chosen
