"""manifest.json: what every file of an engines folder was made from, with and for — one schema, one writer.

```
{"format": 2,
 "weights_dir": "/abs/weights",                       quoted in rebuild commands only
 "weights": {"kandinsky4_distil_512.pt": {"size": …, "sha256": …}, "vae/config.json": {…}, …},
 "model": {"dit_config": {…}, "vae_config": {…}},     what the executors need without opening any weights
 "onnx": {"dit.fp8": {"inputs": {"kandinsky4_distil_512.pt": sha, "dit.fp8.scales.json": sha, …},
                      "files": {"dit.fp8.onnx": sha, "dit.fp8.onnx.data": sha, "dit.fp8.f32.onnx": sha, …}},
          "dit.fp8.scales.json": {…}, "vae_image": {…}, "vae_head": {…}, "vae_body": {…}},
 "build": {"tensorrt_version": "11.4.0", "gpu": {"name": …, "compute_capability": [9, 0], …}},
 "engines": {"dit.fp8.plan": {"graph": "dit", "precision": "fp8", "fp8_scope": "all", "onnx": {file: sha},
                              "profile": {…}, "options": {…}, "degree": 1, "plan": {"size": …, "sha256": …},
                              "inspection": {"tensorrt_version": …, "shapes": {…}, "layers": …,
                                             "attention_layers": […], "fp8_gemm_layers": …,
                                             "largest_activation": {"layer", "tensor", "shape", "bytes"}}}, …},
 "stamps": {"dit.fp8.onnx.data": {"size": …, "mtime_ns": …, "inode": …, "sha256": …},
            "/abs/weights/kandinsky4_distil_512.pt": {…}, …}}
```

The export stage writes "weights", "model" and "onnx"; the engine stage "build" and "engines"; both read
and extend one stamp cache, so a file is hashed once and again only after it changed: a no-op rerun, `k4trt
doctor` and `k4trt run` read no large file that has not changed. An artifact (a graph with its external
data and twin, or the calibration file) is current when its recorded inputs equal today's and its files
still hash as recorded; an engine when its graph's files, profile, options and the build environment are as
recorded. Writers hold the folder's lock (`writing`), so two builds into one folder never interleave.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k4trt.config import DiTConfig
from k4trt.core.gpu import GpuInfo
from k4trt.core.profiles import ShapeRange
from k4trt.errors import K4TRTError
from k4trt.fsutil import StampCache, atomic_path, exclusive_lock
from k4trt.models.vae import VAEConfig

MANIFEST = "manifest.json"
FORMAT = 2
_LOCK = ".build.lock"
#: below this size a weight file is hashed to compare it with the recorded one; above, its size is compared
SMALL_FILE = 64 << 20


class ManifestError(K4TRTError):
    """manifest.json exists but cannot be used (unreadable, damaged, or written by another format)."""


@dataclass(frozen=True)
class FileDigest:
    """A file's size and SHA-256: a weight file as an export read it, a plan as its build wrote it (a size
    that differs later means truncated or replaced)."""

    size: int
    sha256: str


@dataclass(frozen=True)
class ModelFacts:
    """The model facts an executor needs that a graph or plan does not carry."""

    dit_config: DiTConfig
    vae_config: VAEConfig

    @property
    def vae_scaling_factor(self) -> float:
        return self.vae_config.scaling_factor


@dataclass(frozen=True)
class Artifact:
    inputs: dict[str, str]  # what it was made from: weight file or setting -> SHA-256 or value
    files: dict[str, str]  # file name in the folder -> SHA-256


@dataclass(frozen=True)
class BuildEnvironment:
    """What a plan (and the timing cache) is only valid with: TensorRT version and GPU model (Developer Guide,
    "Version Compatibility" and "Hardware Compatibility": we build neither kind of portable plan, both of
    which cost speed)."""

    tensorrt_version: str
    gpu: GpuInfo

    def changes_to(self, other: BuildEnvironment) -> list[str]:
        changes = []
        if self.tensorrt_version != other.tensorrt_version:
            changes.append(f"TensorRT {self.tensorrt_version} -> {other.tensorrt_version}")
        if not self.gpu.same_model(other.gpu):
            changes.append(f"GPU {self.gpu.describe()} -> {other.gpu.describe()}")
        return changes


@dataclass(frozen=True)
class Activation:
    """One tensor of a built engine: the layer that writes it, its name, shape and size in bytes."""

    layer: str
    tensor: str
    shape: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class Inspection:
    """What TensorRT's engine inspector showed of a built plan (`k4trt.engine.inspect`), at the input `shapes`
    it was inspected at (the profile's largest)."""

    tensorrt_version: str
    shapes: dict[str, tuple[int, ...]]
    layers: int
    attention_layers: tuple[str, ...]  # layers that run a whole attention (one fused kernel each)
    fp8_gemm_layers: int  # matrix multiplies (GEMM, convolution) with FP8 inputs
    largest_activation: Activation | None


@dataclass(frozen=True)
class EngineRecord:
    graph: str  # dit | vae_image | vae_head | vae_body
    precision: str  # fp8 | bf16 (the VAE engines are always bf16)
    onnx: dict[str, str]  # {file name: SHA-256} of the graph and its external data
    profile: dict[str, ShapeRange]  # per input
    options: dict[str, int | None]  # builder settings that change the plan (optimization level, workspace)
    plan: FileDigest | None = None  # None until built
    degree: int = 1  # sequence-parallel ranks the plan runs on (one plan serves them all); 1: one GPU
    fp8_scope: str | None = None  # which Linears run in FP8 (`k4trt.export.fp8.SCOPES`); None for bf16 graphs
    inspection: Inspection | None = None  # recorded once the built plan passed the inspector check


@dataclass
class Manifest:
    weights_dir: str | None = None
    weights: dict[str, FileDigest] = field(default_factory=dict)  # by path relative to weights_dir
    model: ModelFacts | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    environment: BuildEnvironment | None = None
    engines: dict[str, EngineRecord] = field(default_factory=dict)  # by plan file name
    stamps: StampCache = field(default_factory=StampCache)

    # ------------------------------------------------------------ reading and writing

    @classmethod
    def load(cls, engines_dir: Path) -> Manifest | None:
        """The folder's manifest; None where it has none. A damaged one, or one of another format, is a
        ManifestError naming the rebuild."""
        path = engines_dir / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                found = data.get("format") if isinstance(data, dict) else None
                raise ManifestError(f"{path} has format {found!r}, not {FORMAT} (an older k4trt wrote it); rebuild "
                                    f"the folder: {rebuild_command(engines_dir, extra='--force')}")
            return _from_json(data)
        except ManifestError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{path} is unreadable ({type(e).__name__}: {e}); rebuild the folder: "
                                f"{rebuild_command(engines_dir, extra='--force')}") from None

    @classmethod
    def load_or_start(cls, engines_dir: Path, log: Any = print) -> tuple[Manifest, bool]:
        """(manifest, trusted) for a writer: a damaged or foreign manifest is reported and replaced by an empty
        one, and `trusted` is False, since nothing it says (the timing cache's origin included) holds."""
        try:
            found = cls.load(engines_dir)
        except ManifestError as e:
            log(f"starting a new manifest: {e}")
            return cls(), False
        return (found, True) if found is not None else (cls(), False)

    def save(self, engines_dir: Path) -> None:
        with atomic_path(engines_dir / MANIFEST) as tmp:
            tmp.write_text(json.dumps(_to_json(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ------------------------------------------------------------ fingerprints through the stamp cache

    def file_sha(self, engines_dir: Path, name: str) -> str:
        """SHA-256 of a file of the folder, keyed by its name so the folder may move."""
        return self.stamps.sha256(engines_dir / name, name)

    def weights_sha(self, path: Path, on_bytes: Callable[[int], object] | None = None) -> str:
        """SHA-256 of a weight file, keyed by its absolute path (a weights folder is shared, not moved)."""
        return self.stamps.sha256(path, str(path.resolve()), on_bytes)

    def artifact_current(self, name: str, inputs: Mapping[str, str], engines_dir: Path) -> bool:
        artifact = self.artifacts.get(name)
        if artifact is None or artifact.inputs != dict(inputs):
            return False
        return all((engines_dir / f).is_file() and self.file_sha(engines_dir, f) == sha for f, sha in artifact.files.items())

    def record_weights(self, digests: Mapping[str, FileDigest], weights_dir: str) -> list[str]:
        """Adopt the current weights' digests; artifacts made from other versions of a file (and the engines
        built from them) are dropped, so nothing made from two sets of weights lives on in one folder.
        Returns the names dropped."""
        changed = {k for k, d in digests.items() if k in self.weights and self.weights[k].sha256 != d.sha256}
        self.weights |= dict(digests)
        self.weights_dir = weights_dir
        stale = [name for name, a in self.artifacts.items() if changed & a.inputs.keys()]
        for name in stale:
            del self.artifacts[name]
        # an engine is keyed by its plan's file name, the stem of the graph it is built from plus .plan
        orphans = [plan for plan in self.engines if plan.removesuffix(".plan") not in self.artifacts]
        for plan in orphans:
            del self.engines[plan]
        return stale + orphans

    def foreign_weights(self, weights_root: Path) -> list[str]:
        """Files under `weights_root` that are certainly not the ones this folder was made from: another size,
        or, for small files and files the stamp cache knows, another SHA-256. Large unknown files of the same
        size cannot be told apart without reading gigabytes, so they pass."""
        foreign = []
        for rel, digest in self.weights.items():
            path = weights_root / rel
            if not path.is_file():
                continue  # a run with engines does not need the DiT or VAE weights at all
            key = str(path.resolve())
            size = path.stat().st_size
            if size != digest.size:
                foreign.append(f"{rel} has {size} bytes, not {digest.size}")
            elif (size <= SMALL_FILE or not self.stamps.stale(path, key)) and self.weights_sha(path) != digest.sha256:
                foreign.append(f"{rel} differs (SHA-256)")
        return foreign

    # ------------------------------------------------------------ what the executors ask

    def require_model(self, engines_dir: Path) -> ModelFacts:
        if self.model is None:
            raise K4TRTError(f"{engines_dir / MANIFEST} records no exported model; export it: "
                             f"{rebuild_command(engines_dir, self.weights_dir, extra='--onnx-only')}")
        return self.model

    def rebuild_command(self, engines_dir: Path, extra: str = "--force") -> str:
        return rebuild_command(engines_dir, self.weights_dir, extra)


def rebuild_command(engines_dir: Path, weights_dir: str | None = None, extra: str = "--force") -> str:
    """`build-engines --weights W --out DIR ...`: the one fix for every stale, missing or foreign file."""
    weights = f"--weights {weights_dir} " if weights_dir else ""
    return f"build-engines {weights}--out {engines_dir} {extra}".rstrip()


@contextlib.contextmanager
def writing(engines_dir: Path) -> Iterator[None]:
    """The folder's writer lock, held for a whole build: a second build into the same folder stops at once
    with one line instead of interleaving its manifest writes with the first one's."""
    with exclusive_lock(engines_dir / _LOCK, "build-engines"):
        yield


def plan_problem(engines_dir: Path, plan: str, record: EngineRecord) -> str | None:
    """Why the plan file cannot be the one recorded (never built, missing, truncated), or None. Only the size
    is compared: it is free and catches the interrupted copy that truncates a multi-GB file; TensorRT's own
    deserialization checks catch the rest."""
    path = engines_dir / plan
    if record.plan is None:
        return f"{plan} was never built"
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record.plan.size:
        return f"{path} has {size} bytes but was written with {record.plan.size} (truncated or replaced)"
    return None


# ---------------------------------------------------------------- JSON


def _to_json(m: Manifest) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "weights_dir": m.weights_dir,
        "weights": {k: dataclasses.asdict(d) for k, d in sorted(m.weights.items())},
        "model": None if m.model is None else {"dit_config": dataclasses.asdict(m.model.dit_config),
                                                "vae_config": dataclasses.asdict(m.model.vae_config)},
        "onnx": {name: {"inputs": a.inputs, "files": a.files} for name, a in m.artifacts.items()},
        "build": None if m.environment is None else {"tensorrt_version": m.environment.tensorrt_version,
                                                      "gpu": dataclasses.asdict(m.environment.gpu)},
        "engines": {name: _engine_to_json(r) for name, r in m.engines.items()},
        "stamps": m.stamps.to_json(),
    }


def _from_json(data: Mapping[str, Any]) -> Manifest:
    model, build = data["model"], data["build"]
    return Manifest(
        weights_dir=None if data["weights_dir"] is None else str(data["weights_dir"]),
        weights={str(k): FileDigest(int(d["size"]), str(d["sha256"])) for k, d in data["weights"].items()},
        model=None if model is None else ModelFacts(DiTConfig(**_tuples(model["dit_config"])),
                                                    VAEConfig(**_tuples(model["vae_config"]))),
        artifacts={str(n): Artifact(dict(a["inputs"]), dict(a["files"])) for n, a in data["onnx"].items()},
        environment=None if build is None else BuildEnvironment(str(build["tensorrt_version"]), _gpu(build["gpu"])),
        engines={str(n): _engine_from_json(r) for n, r in data["engines"].items()},
        stamps=StampCache.from_json(data["stamps"]),
    )


def _tuples(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _gpu(data: Mapping[str, Any]) -> GpuInfo:
    major, minor = data["compute_capability"]
    return GpuInfo(str(data["name"]), (int(major), int(minor)), int(data["memory_bytes"]))


def _engine_to_json(r: EngineRecord) -> dict[str, Any]:
    return {
        "graph": r.graph,
        "precision": r.precision,
        "onnx": r.onnx,
        "profile": {name: s.to_json() for name, s in r.profile.items()},
        "options": r.options,
        "degree": r.degree,
        "plan": dataclasses.asdict(r.plan) if r.plan is not None else None,
        "fp8_scope": r.fp8_scope,
        "inspection": dataclasses.asdict(r.inspection) if r.inspection is not None else None,
    }


def _engine_from_json(data: Mapping[str, Any]) -> EngineRecord:
    plan = data["plan"]
    return EngineRecord(
        graph=str(data["graph"]),
        precision=str(data["precision"]),
        onnx=dict(data["onnx"]),
        profile={name: ShapeRange.from_json(s) for name, s in data["profile"].items()},
        options=dict(data["options"]),
        plan=FileDigest(int(plan["size"]), str(plan["sha256"])) if plan is not None else None,
        degree=int(data["degree"]),
        fp8_scope=None if data["fp8_scope"] is None else str(data["fp8_scope"]),
        inspection=None if data["inspection"] is None else _inspection(data["inspection"]),
    )


def _inspection(data: Mapping[str, Any]) -> Inspection:
    largest = data["largest_activation"]
    return Inspection(
        tensorrt_version=str(data["tensorrt_version"]),
        shapes={str(name): tuple(int(d) for d in shape) for name, shape in data["shapes"].items()},
        layers=int(data["layers"]),
        attention_layers=tuple(str(n) for n in data["attention_layers"]),
        fp8_gemm_layers=int(data["fp8_gemm_layers"]),
        largest_activation=None if largest is None else Activation(
            str(largest["layer"]), str(largest["tensor"]), tuple(int(d) for d in largest["shape"]), int(largest["bytes"])),
    )
