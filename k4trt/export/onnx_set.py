"""Every ONNX file of an engines folder, exported or reused: the first half of build-engines (all of --onnx-only).

For precision fp8: `dit.fp8.scales.json` (calibration), then `dit.fp8.onnx`; for bf16 `dit.bf16.onnx`; then
`vae_image.onnx`, `vae_head.onnx`, `vae_body.onnx`. Each graph gets its float32 twin `<name>.f32.onnx` for
ONNX Runtime on the CPU, and the manifest's "onnx" section records what each was made from
(`k4trt.export.onnx_manifest`); a graph whose weights and settings are unchanged is reused, `force` exports
it again. The calibration is reused even with `force`: it is deterministic in what it is keyed by, so redoing
it would only repeat the same numbers (delete the file to recalibrate). Every file is written under a
temporary name and renamed, and the record is written after its files, so an interrupted run leaves no
partial .onnx and the next run redoes only what was not finished.

It also lists, for the requested sizes and durations, the concrete shape of every graph input in every case,
from which the engine builder derives its TensorRT profiles (`k4trt.engine.profiles`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from k4trt import config
from k4trt.config import DiTConfig
from k4trt.engine.fingerprint import onnx_files
from k4trt.engine.layout import check_precision, onnx_name
from k4trt.errors import K4TRTError
from k4trt.export.calibration import DEFAULT_PROMPTS, calibrate, calibration_key
from k4trt.export.dit_onnx import dit_input_shapes, export_dit
from k4trt.export.fp8 import FP8Scales
from k4trt.export.onnx_manifest import (
    Artifact,
    OnnxRecord,
    read_onnx_record,
    stamp_files,
    twin_name,
    write_onnx_record,
)
from k4trt.export.opcheck import require_supported
from k4trt.export.twin import write_float32_twin
from k4trt.export.vae_onnx import ROLES, export_vae, graph_name, vae_input_shapes
from k4trt.fsutil import check_writable_dir
from k4trt.models.dit import DiT, infer_dit_config
from k4trt.models.vae import CONFIG_NAME, VAEConfig, VAEDecoder
from k4trt.weights.checkpoint import read_dit_state_dict
from k4trt.weights.layout import WeightsFolder

DEFAULT_SIZE = (672, 384)  # width, height: the released model's default
SCALES_FILE = "dit.fp8.scales.json"
VAE_GRAPHS = tuple(graph_name(role) for role in ROLES)


@dataclass(frozen=True)
class OnnxSet:
    """What the engine builder needs once the ONNX files are in place."""

    engines_dir: Path
    precision: str
    graphs: dict[str, Path]  # graph name (dit, vae_image, vae_head, vae_body) -> the ONNX TensorRT builds from
    cases: list[tuple[int, int, int]]  # (width, height, seconds) of each requested case
    shapes: dict[str, dict[str, list[tuple[int, ...]]]]  # graph -> input -> its shape in each case, in order
    opt_case: int | None  # index of the default case (12 s at 672x384) when requested
    dit_config: DiTConfig
    vae_scaling_factor: float
    weights_files: list[Path]  # the weight files and folders the graphs were exported from
    exported: list[str]  # artifacts written by this run (the others were reused)


def export_onnx(
    weights_dir: Path,
    out_dir: Path,
    *,
    precision: str = "fp8",
    sizes: Sequence[tuple[int, int]] = (DEFAULT_SIZE,),
    max_duration: int = config.MAX_SECONDS,
    calib_prompts: Sequence[str] | None = None,
    force: bool = False,
    fp8_attention: bool = False,
) -> OnnxSet:
    """Export (or reuse) every graph for `precision` into `out_dir`, created if missing. `sizes` are
    (width, height) pairs; cases are every size with every whole duration from 0 to `max_duration` seconds.
    Every check that needs no model work runs first, so bad input fails before anything is written."""
    check_precision(precision)
    if fp8_attention and precision != "fp8":
        raise K4TRTError("--fp8-attention quantizes the DiT's attention to FP8; it needs --precision fp8")
    max_duration = config.check_duration(max_duration)
    prompts = list(DEFAULT_PROMPTS if calib_prompts is None else calib_prompts)
    if not prompts or not all(p.strip() for p in prompts):
        raise K4TRTError("calibration prompts must be non-empty; pass a file with one prompt per line")
    weights = WeightsFolder(weights_dir).require()
    state = read_dit_state_dict(weights.dit)
    dit_config = infer_dit_config(state)
    sizes = list(dict.fromkeys(sizes))
    if not sizes:
        raise K4TRTError("no sizes given; pass --sizes WxH[,WxH...]")
    for width, height in sizes:
        config.check_size(width, height, released=dit_config == config.RELEASED_DIT)
    vae_config = VAEConfig.from_json(weights.vae / CONFIG_NAME)
    out_dir = _prepare_out_dir(Path(out_dir))

    weights_root = str(weights.root.resolve())
    previous = read_onnx_record(out_dir)
    record = OnnxRecord(
        weights_dir=weights_root,
        dit_config=dit_config,
        vae_scaling_factor=vae_config.scaling_factor,
        weights=previous.weights if previous is not None and previous.weights_dir == weights_root else {},
        artifacts=previous.artifacts if previous is not None else {},
    )
    dit_sha = _hash_weights(weights, record, [weights.dit])
    vae_sha = _hash_weights(weights, record, [weights.vae])
    models = _Models(weights, state)
    dit_graph = out_dir / onnx_name("dit", precision)
    total = len(ROLES) + (2 if precision == "fp8" else 1)
    with _quiet_exporter(), _Steps(out_dir, record, force, total) as steps:
        dit_inputs = dict(dit_sha)
        scales = None
        if precision == "fp8":
            scales = scales_file = out_dir / SCALES_FILE
            sources = [weights.text_encoder, weights.tokenizer, weights.scheduler]
            steps.run(SCALES_FILE, dit_sha | _hash_weights(weights, record, sources) | calibration_key(prompts),
                      lambda: [scales_file], lambda: calibrate(weights, state, prompts).save(scales_file),
                      reuse_despite_force=True)
            dit_inputs |= {SCALES_FILE: record.artifacts[SCALES_FILE].files[SCALES_FILE].sha256,
                           "fp8_attention": "yes" if fp8_attention else "no"}
        steps.run(dit_graph.stem, dit_inputs, _graph_and_twin(dit_graph),
                  partial(models.export_dit, dit_graph, scales, fp8_attention))
        for role in ROLES:
            path = out_dir / f"{graph_name(role)}.onnx"
            steps.run(path.stem, vae_sha, _graph_and_twin(path), partial(models.export_vae, role, path))

    graphs = {"dit": dit_graph} | {name: out_dir / f"{name}.onnx" for name in VAE_GRAPHS}
    for path in graphs.values():
        require_supported(path)
    cases = [(w, h, s) for w, h in sizes for s in range(max_duration + 1)]
    default_case = (*DEFAULT_SIZE, config.MAX_SECONDS)
    return OnnxSet(
        engines_dir=out_dir,
        precision=precision,
        graphs=graphs,
        cases=cases,
        shapes=case_shapes(dit_config, vae_config, cases),
        opt_case=cases.index(default_case) if default_case in cases else None,
        dit_config=dit_config,
        vae_scaling_factor=vae_config.scaling_factor,
        weights_files=[weights.dit, weights.vae],
        exported=steps.exported,
    )


def case_shapes(
    dit_config: DiTConfig, vae_config: VAEConfig, cases: Iterable[tuple[int, int, int]]
) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    """{graph: {input: [shape in case i]}} for (width, height, seconds) cases. Every graph lists every case,
    in the same order, as the engine builder expects, including cases that graph does not serve (the VAE
    head for an image): the shape is the one it would get, so the profile box is unchanged by them."""
    shapes: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    for width, height, seconds in cases:
        h, w = height // config.VAE_SPATIAL_FACTOR, width // config.VAE_SPATIAL_FACTOR
        per_graph = {"dit": dit_input_shapes(dit_config, config.latent_frames(seconds), h, w)}
        per_graph |= {graph_name(role): vae_input_shapes(vae_config, role, h, w) for role in ROLES}
        for graph, inputs in per_graph.items():
            for name, shape in inputs.items():
                shapes.setdefault(graph, {}).setdefault(name, []).append(shape)
    return shapes


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what torch.onnx reports on every export without it being actionable here: optional torchvision
    ops it skips, dynamic-axis names it merges (every VAE cache shares "h" and "w"), and its own deprecations."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)`"), category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


class _Steps:
    """Runs each artifact's export unless the record says the files on disk are already it; one progress bar."""

    def __init__(self, out_dir: Path, record: OnnxRecord, force: bool, total: int) -> None:
        self.out_dir = out_dir
        self.record = record
        self.force = force
        self.exported: list[str] = []
        self._bar = tqdm(total=total, desc="ONNX", unit="file")

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def run(self, name: str, inputs: dict[str, str], files: Callable[[], list[Path]], make: Callable[[], None],
            reuse_despite_force: bool = False) -> None:
        """`make` writes the artifact; `files` lists what it wrote, for the record."""
        self._bar.set_postfix_str(name)
        if (not self.force or reuse_despite_force) and self.record.reusable(name, inputs, self.out_dir):
            self._bar.write(f"{name}: up to date, reused")
        else:
            self._bar.write(f"{name}: exporting")
            make()
            stamps = stamp_files(files(), {}, desc=f"hashing {name}")
            self.record.artifacts[name] = Artifact(inputs, {p.name: s for p, s in stamps.items()})
            write_onnx_record(self.out_dir, self.record)
            self.exported.append(name)
        self._bar.update()


class _Models:
    """Exports from the PyTorch modules, loaded on first use (a run that reuses every graph loads nothing) in
    bf16, the precision the graphs carry. Each graph is followed by its float32 twin."""

    def __init__(self, weights: WeightsFolder, state: dict[str, torch.Tensor]) -> None:
        self._weights = weights
        self._state = state
        self._dit: DiT | None = None
        self._vae: VAEDecoder | None = None

    def export_dit(self, path: Path, scales: Path | None, fp8_attention: bool) -> None:
        if self._dit is None:
            self._dit = DiT.from_state_dict(self._state, dtype=torch.bfloat16)
        export_dit(self._dit, path, fp8=FP8Scales.load(scales) if scales else None, fp8_attention=fp8_attention)
        write_float32_twin(path, path.with_name(twin_name(path.name)))

    def export_vae(self, role: str, path: Path) -> None:
        if self._vae is None:
            self._vae = VAEDecoder.from_pretrained(self._weights.vae, dtype=torch.bfloat16)
        export_vae(self._vae, role, path)
        write_float32_twin(path, path.with_name(twin_name(path.name)))


def _graph_and_twin(path: Path) -> Callable[[], list[Path]]:
    """The graph's files and its twin's, as written (external data named by the graphs themselves)."""
    return lambda: onnx_files(path) + onnx_files(path.with_name(twin_name(path.name)))


def _hash_weights(weights: WeightsFolder, record: OnnxRecord, sources: Sequence[Path]) -> dict[str, str]:
    """{path relative to the weights folder: SHA-256} of every file in `sources` (files or folders), through
    the record's cache, which this updates."""
    files = [f for source in sources for f in (sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source])]
    root = weights.root
    known = {root / rel: stamp for rel, stamp in record.weights.items()}
    stamps = stamp_files(files, known, desc="hashing weights")
    record.weights |= {p.relative_to(root).as_posix(): s for p, s in stamps.items()}
    return {p.relative_to(root).as_posix(): s.sha256 for p, s in stamps.items()}


def _prepare_out_dir(out_dir: Path) -> Path:
    """Create the folder if its parent exists; refuse one that cannot be written, before any work. Temporary
    files a killed run left (`.*.partial`, see `k4trt.fsutil.atomic_path`) are removed."""
    what = f"engines folder {out_dir}"
    if out_dir.exists() and not out_dir.is_dir():
        raise K4TRTError(f"{what} is a file; pass a folder")
    if not out_dir.exists():
        parent = out_dir.parent.resolve()
        if not parent.is_dir():
            raise K4TRTError(f"cannot create {what}: {parent} is not an existing folder; create it or choose another")
        check_writable_dir(parent, f"cannot create {what}")
        out_dir.mkdir()
    check_writable_dir(out_dir, what)
    for leftover in out_dir.glob(".*.partial"):
        if leftover.is_file():
            leftover.unlink()
    return out_dir
