"""Every ONNX file of an engines folder, exported or reused: the first half of build-engines (all of --onnx-only).

For precision fp8: `dit.fp8.scales.json` (calibration), then `dit.fp8.onnx`; for bf16 `dit.bf16.onnx`; then
the VAE's chunk graphs. Which graphs, and their names, are the registry's (`k4trt.core.graphs`). With
`twins`, each graph also gets its float32 twin for ONNX Runtime on the CPU (as large again as the graph, in
float32 twice: only `--onnx-only` and `--twins` want them), and the manifest records what each artifact was made
from (`k4trt.core.manifest`); an artifact whose weights and settings are unchanged, and whose files still
hash as recorded, is reused; `force` exports it again. The calibration is reused even with `force`: it is
deterministic in what it is keyed by, so redoing it would only repeat the same numbers (delete the file to
recalibrate). Every file is written under a temporary name and renamed, and the record is written after its
files, so an interrupted run leaves no partial .onnx and the next run redoes only what was not finished.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from k4trt import config
from k4trt.core.graphs import Case, GraphSpec, check_precision, external_data, folder_graphs, request_cases
from k4trt.core.manifest import Artifact, FileDigest, Manifest, ModelFacts, rebuild_command, writing
from k4trt.errors import K4TRTError
from k4trt.export.calibration import DEFAULT_PROMPTS, calibrate, calibration_key
from k4trt.export.dit_onnx import export_dit, move_exchange_to_custom_domain
from k4trt.export.fp8 import SCOPES, FP8Scales
from k4trt.export.onnx_files import graph_files
from k4trt.export.opcheck import require_supported
from k4trt.export.twin import write_float32_twin
from k4trt.export.vae_onnx import export_vae
from k4trt.fsutil import check_writable_dir, remove_stale_partials
from k4trt.models.dit import DiT, infer_dit_config
from k4trt.models.vae import CONFIG_NAME, VAEConfig, VAEDecoder
from k4trt.parallel.degree import check_degree
from k4trt.weights.checkpoint import read_dit_state_dict
from k4trt.weights.layout import WeightsFolder

SCALES_FILE = "dit.fp8.scales.json"
_SHOWN_FROM = 1 << 30  # bytes: hashing less takes about a second, too short for a progress bar


@dataclass(frozen=True)
class OnnxSet:
    """What the engine builder needs once the ONNX files are in place."""

    engines_dir: Path
    precision: str
    graphs: dict[str, GraphSpec]  # by graph name; files in engines_dir
    cases: list[Case]  # (width, height, seconds) of each requested case
    model: ModelFacts
    exported: list[str]  # artifacts written by this run (the others were reused)
    fp8_scope: str | None = None  # which Linears of the DiT run in FP8 (`k4trt.export.fp8.SCOPES`), for fp8


def export_onnx(
    weights_dir: Path,
    out_dir: Path,
    *,
    precision: str = "fp8",
    sizes: Sequence[tuple[int, int]] = (config.DEFAULT_SIZE,),
    max_duration: int = config.MAX_SECONDS,
    calib_prompts: Sequence[str] | None = None,
    force: bool = False,
    fp8_scope: str = "all",
    fp8_attention: bool = False,
    degree: int = 1,
    twins: bool = True,
    log: Callable[[str], None] = print,
    lock: contextlib.ExitStack | None = None,
) -> OnnxSet:
    """Export (or reuse) every graph for `precision` into `out_dir`, created if missing. `sizes` are
    (width, height) pairs; cases are every size with every whole duration from 0 to `max_duration` seconds.
    Every check that needs no model work runs first, so bad input fails before anything is written.

    With `degree` P > 1 the DiT graph is the sequence-parallel one every rank of P runs (`dit.sp{P}.<precision>`).
    The folder's writer lock (`k4trt.core.manifest.writing`) is taken once the folder exists; with `lock`, it
    is entered into that stack, so the caller keeps holding it for the engine build that follows."""
    check_precision(precision)
    if fp8_attention and precision != "fp8":
        raise K4TRTError("--fp8-attention quantizes the DiT's attention to FP8; it needs --precision fp8")
    if fp8_scope not in SCOPES:
        raise K4TRTError(f"--fp8-scope {fp8_scope!r} is not one of {', '.join(SCOPES)}")
    max_duration = config.check_duration(max_duration)
    prompts = list(DEFAULT_PROMPTS if calib_prompts is None else calib_prompts)
    if not prompts or not all(p.strip() for p in prompts):
        raise K4TRTError("calibration prompts must be non-empty; pass a file with one prompt per line")
    weights = WeightsFolder(weights_dir).require()
    state = read_dit_state_dict(weights.dit)
    sizes = list(dict.fromkeys(sizes))
    if not sizes:
        raise K4TRTError("no sizes given; pass --sizes WxH[,WxH...]")
    model = ModelFacts(infer_dit_config(state), VAEConfig.from_json(weights.vae / CONFIG_NAME))
    check_degree(model.dit_config, degree)
    for width, height in sizes:
        config.check_size(width, height, released=config.is_released(model.dit_config))
    out_dir = prepare_out_dir(Path(out_dir))
    with contextlib.ExitStack() as own:
        (lock or own).enter_context(writing(out_dir))
        return _export(weights, state, model, out_dir, precision, sizes, max_duration, prompts, force,
                       _DiTOptions(fp8_scope, fp8_attention, degree), twins, log)


@dataclass(frozen=True)
class _DiTOptions:
    fp8_scope: str
    fp8_attention: bool
    degree: int  # sequence-parallel ranks the graph is for (1: the single-GPU graph)


def _export(weights: WeightsFolder, state: dict[str, torch.Tensor], model: ModelFacts, out_dir: Path, precision: str,
            sizes: list[tuple[int, int]], max_duration: int, prompts: list[str], force: bool, options: _DiTOptions,
            twins: bool, log: Callable[[str], None]) -> OnnxSet:
    manifest, _ = Manifest.load_or_start(out_dir, log)
    calibration_sources = [weights.text_encoder, weights.tokenizer, weights.scheduler] if precision == "fp8" else []
    dit_sha, vae_sha, calibration_sha = (
        _hash_weights(manifest, weights.root, sources) for sources in ([weights.dit], [weights.vae], calibration_sources)
    )
    digests = dit_sha | vae_sha | calibration_sha
    for dropped in manifest.record_weights(digests, str(weights.root.resolve())):
        log(f"{dropped}: made from other weights, dropped from the manifest")
    manifest.model = model
    graphs = folder_graphs(precision, model.dit_config, model.vae_config, options.degree)
    checkpoint = dit_sha[weights.dit.relative_to(weights.root).as_posix()].sha256
    models = _Models(weights, state, checkpoint, twins)
    total = len(graphs) + (precision == "fp8")
    with _quiet_exporter(), _Steps(out_dir, manifest, force, total) as steps:
        dit_inputs = _shas(dit_sha)
        scales = None
        if precision == "fp8":
            scales = scales_file = out_dir / SCALES_FILE
            steps.run(SCALES_FILE, dit_inputs | _shas(calibration_sha) | calibration_key(prompts), lambda: [scales_file],
                      lambda: calibrate(weights, state, prompts, checkpoint).save(scales_file), reuse_despite_force=True)
            dit_inputs |= {SCALES_FILE: manifest.artifacts[SCALES_FILE].files[SCALES_FILE],
                           "fp8_scope": options.fp8_scope, "fp8_attention": "yes" if options.fp8_attention else "no"}
        if options.degree > 1:
            dit_inputs |= {"sp_degree": str(options.degree)}
        for spec in graphs.values():
            path = out_dir / spec.onnx
            make = (partial(models.export_dit, spec, path, scales, options) if spec.is_dit
                    else partial(models.export_vae, spec, path))
            files = partial(_written, spec, out_dir, twins)
            steps.run(spec.stem, dit_inputs if spec.is_dit else _shas(vae_sha), files, make)
            if twins and spec.twin not in manifest.artifacts[spec.stem].files:  # reused from a build without twins
                log(f"{spec.stem}: writing its float32 twin")
                models.twin(spec, path)
                steps.record(spec.stem, manifest.artifacts[spec.stem].inputs, files())

    for spec in graphs.values():
        require_supported(out_dir / spec.onnx)
    return OnnxSet(out_dir, precision, graphs, request_cases(sizes, max_duration), model, steps.exported,
                   options.fp8_scope if precision == "fp8" else None)


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the folder if its parent exists; refuse one that cannot be written, before any work. Temporaries
    a killed run left are removed (`k4trt.fsutil.remove_stale_partials`; a live writer's are kept)."""
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
    remove_stale_partials(out_dir)
    return out_dir


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
    """Runs each artifact's export unless the manifest says the files on disk are already it; one progress bar."""

    def __init__(self, out_dir: Path, manifest: Manifest, force: bool, total: int) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.force = force
        self.exported: list[str] = []
        # disable=None: a bar on a terminal only, so logs and pipes get the per-graph lines and, on failure,
        # the one error line without carriage-return debris
        self._bar = tqdm(total=total, desc="ONNX", unit="file", disable=None)

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def run(self, name: str, inputs: dict[str, str], files: Callable[[], list[Path]], make: Callable[[], None],
            reuse_despite_force: bool = False) -> None:
        """`make` writes the artifact; `files` lists what it wrote, for the record."""
        self._bar.set_postfix_str(name)
        if (not self.force or reuse_despite_force) and self.manifest.artifact_current(name, inputs, self.out_dir):
            self._bar.write(f"{name}: up to date, reused")
        else:
            self._bar.write(f"{name}: exporting")
            make()
            self.record(name, inputs, files())
            self.exported.append(name)
        self._bar.update()

    def record(self, name: str, inputs: dict[str, str], files: list[Path]) -> None:
        shas = {p.name: self.manifest.file_sha(self.out_dir, p.name) for p in files}
        self.manifest.artifacts[name] = Artifact(inputs, shas)
        self.manifest.save(self.out_dir)


class _Models:
    """Exports from the PyTorch modules in bf16, the precision the graphs carry. The DiT is traced weightless
    (`k4trt.export.dit_onnx`) with its weights streamed from the memory-mapped checkpoint; the VAE is loaded on
    first use (a run that reuses every graph loads nothing). With `twins`, each graph is followed by its
    float32 twin; without, a twin left by an earlier export of other weights is removed."""

    def __init__(self, weights: WeightsFolder, state: dict[str, torch.Tensor], checkpoint_sha256: str, twins: bool) -> None:
        self._weights = weights
        self._state = state
        self._checkpoint = checkpoint_sha256
        self._twins = twins
        self._vae: VAEDecoder | None = None

    def export_dit(self, spec: GraphSpec, path: Path, scales: Path | None, options: _DiTOptions) -> None:
        with torch.device("meta"):
            dit = DiT(infer_dit_config(self._state)).to(torch.bfloat16)
        fp8 = FP8Scales.load(scales, self._checkpoint) if scales else None
        export_dit(dit, spec, path, weights=self._state, fp8=fp8, fp8_scope=options.fp8_scope,
                   fp8_attention=options.fp8_attention)
        self.twin(spec, path)

    def export_vae(self, spec: GraphSpec, path: Path) -> None:
        if self._vae is None:
            self._vae = VAEDecoder.from_pretrained(self._weights.vae, dtype=torch.bfloat16)
        export_vae(self._vae, spec, path)
        self.twin(spec, path)

    def twin(self, spec: GraphSpec, path: Path) -> None:
        """The graph's float32 twin where twins are wanted; where not, no stale one is left to mislead."""
        twin = path.with_name(spec.twin)
        if self._twins:
            write_float32_twin(path, twin)
            if spec.degree > 1:
                move_exchange_to_custom_domain(twin)
        else:
            for stale in (twin, twin.with_name(external_data(twin.name))):
                stale.unlink(missing_ok=True)


def _written(spec: GraphSpec, out_dir: Path, twins: bool) -> list[Path]:
    """The graph's files, and its twin's where twins are written (external data named by the graphs themselves)."""
    again = rebuild_command(out_dir, extra="--onnx-only --force")
    files = graph_files(out_dir / spec.onnx, again)
    return files + graph_files(out_dir / spec.twin, again) if twins else files


def _hash_weights(manifest: Manifest, root: Path, sources: Sequence[Path]) -> dict[str, FileDigest]:
    """{path relative to the weights folder: size and SHA-256} of every file in `sources` (files or folders),
    through the manifest's stamp cache: only files that changed since they were last hashed are read, under
    one progress bar (in bytes) when that is more than a moment's work."""
    files = [f for source in sources
             for f in (sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source])]
    total = sum(f.stat().st_size for f in files if manifest.stamps.stale(f, str(f.resolve())))
    digests = {}
    with tqdm(total=total, desc="hashing weights", unit="B", unit_scale=True, disable=None if total >= _SHOWN_FROM else True,
              leave=False) as bar:
        for f in files:
            digests[f.relative_to(root).as_posix()] = FileDigest(f.stat().st_size, manifest.weights_sha(f, bar.update))
    return digests


def _shas(digests: dict[str, FileDigest]) -> dict[str, str]:
    return {rel: d.sha256 for rel, d in digests.items()}
