"""The exporter's part of an engines folder's manifest.json: the "onnx" section.

It records what each exported file was made from, so `build-engines` re-exports exactly when that changed,
and the model facts every executor needs without loading weights:

```
"onnx": {
  "format": 1,
  "weights_dir": "/abs/weights",
  "weights": {"kandinsky4_distil_512.pt": {"size": …, "mtime_ns": …, "sha256": …}, "vae/config.json": {…}, …},
  "dit_config": {"model_dim": 3072, …},          (k4trt.config.DiTConfig's fields)
  "vae_scaling_factor": 0.7,
  "artifacts": {
    "vae_head": {"inputs": {"vae/config.json": sha256, …},
                 "files": {"vae_head.onnx": {"size": …, "mtime_ns": …, "sha256": …}, "vae_head.onnx.data": {…},
                           "vae_head.f32.onnx": {…}, "vae_head.f32.onnx.data": {…}}},
    "dit.fp8": {"inputs": {"kandinsky4_distil_512.pt": sha256, "dit.fp8.scales.json": sha256, "fp8_attention": "no"}, …},
    "dit.fp8.scales.json": …, "vae_image": …, "vae_body": …
  }
}
```

An artifact is what is written or reused as a whole: a graph with its external data and float32 twin, or the
calibration file. It is reused when its recorded inputs equal the current ones and each of its files still
has the recorded size and modification time (anything that rewrites a file changes them).

The weights' SHA-256 are a cache: a file is hashed again only when its size or modification time changed,
so a 22 GB checkpoint is read once, not on every run. The engine builder owns the manifest's other keys;
this module rewrites only "onnx" and keeps the rest as it finds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from k4trt.config import DiTConfig
from k4trt.engine.layout import MANIFEST
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path

SECTION = "onnx"
FORMAT = 1
_CHUNK = 16 << 20
_SHOWN_FROM = 1 << 30  # bytes: hashing less takes about a second, too short for a progress bar


def twin_name(graph_file: str) -> str:
    """`vae_head.onnx` -> `vae_head.f32.onnx`: the graph's float32 twin, which ONNX Runtime runs on the CPU."""
    return graph_file.removesuffix(".onnx") + ".f32.onnx"


@dataclass(frozen=True)
class FileStamp:
    """A file's SHA-256 with the size and modification time it had when hashed."""

    size: int
    mtime_ns: int
    sha256: str

    def matches(self, path: Path) -> bool:
        """Whether `path` still has this size and modification time (cheap: no read)."""
        try:
            stat = path.stat()
        except OSError:
            return False
        return stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns


@dataclass(frozen=True)
class Artifact:
    inputs: dict[str, str]  # what it was made from: weight file or setting -> SHA-256 or value
    files: dict[str, FileStamp]  # by name in the engines folder


@dataclass
class OnnxRecord:
    weights_dir: str
    dit_config: DiTConfig
    vae_scaling_factor: float
    weights: dict[str, FileStamp] = field(default_factory=dict)  # by path relative to weights_dir
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    def reusable(self, name: str, inputs: Mapping[str, str], folder: Path) -> bool:
        """Whether artifact `name` was made from `inputs` and its files in `folder` are as written."""
        artifact = self.artifacts.get(name)
        return (
            artifact is not None
            and artifact.inputs == dict(inputs)
            and all(stamp.matches(folder / file) for file, stamp in artifact.files.items())
        )


def read_onnx_record(engines_dir: Path) -> OnnxRecord | None:
    """The folder's "onnx" section, or None where there is none (no manifest, an ONNX-less one, an older
    format, or an unreadable file: all mean "nothing can be reused")."""
    data = _read_manifest_json(engines_dir)
    section = data.get(SECTION) if data is not None else None
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        return None
    try:
        return OnnxRecord(
            weights_dir=str(section["weights_dir"]),
            dit_config=_dit_config_from_json(section["dit_config"]),
            vae_scaling_factor=float(section["vae_scaling_factor"]),
            weights={k: FileStamp(**v) for k, v in section["weights"].items()},
            artifacts={
                name: Artifact(dict(a["inputs"]), {f: FileStamp(**s) for f, s in a["files"].items()})
                for name, a in section["artifacts"].items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def write_onnx_record(engines_dir: Path, record: OnnxRecord) -> None:
    """Replace the "onnx" section of manifest.json, atomically, keeping every other key."""
    data = _read_manifest_json(engines_dir) or {}
    data[SECTION] = {
        "format": FORMAT,
        "weights_dir": record.weights_dir,
        "weights": {k: dataclasses.asdict(v) for k, v in sorted(record.weights.items())},
        "dit_config": dataclasses.asdict(record.dit_config),
        "vae_scaling_factor": record.vae_scaling_factor,
        "artifacts": {
            name: {"inputs": a.inputs, "files": {f: dataclasses.asdict(s) for f, s in a.files.items()}}
            for name, a in record.artifacts.items()
        },
    }
    with atomic_path(engines_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def stamp_files(paths: Iterable[Path], known: Mapping[Path, FileStamp], desc: str) -> dict[Path, FileStamp]:
    """A stamp for each of `paths`: the `known` one where size and modification time still match, else a
    fresh SHA-256, read with one progress bar (in bytes) over every file that needs it."""
    paths = list(paths)
    stale = [p for p in paths if p not in known or not known[p].matches(p)]
    try:
        total = sum(p.stat().st_size for p in stale)
        stamps = {p: known[p] for p in paths if p not in stale}
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=total < _SHOWN_FROM, leave=False) as bar:
            for path in stale:
                stamps[path] = _stamp(path, bar)
    except OSError as e:
        raise K4TRTError(f"cannot read {e.filename} to fingerprint it ({e.strerror}); check it exists and is readable") from None
    return {p: stamps[p] for p in paths}


def _stamp(path: Path, bar: tqdm) -> FileStamp:
    """Hash with the stat taken before reading, so a file changed while it is read looks stale next time."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return FileStamp(size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=digest.hexdigest())


def _read_manifest_json(engines_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((engines_dir / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _dit_config_from_json(data: Mapping[str, Any]) -> DiTConfig:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return DiTConfig(**fields)
