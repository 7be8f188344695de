"""`k4trt weights verify DIR`: read every file of a weights folder and say whether it can be trusted.

Checked, each part on its own so one damaged file does not hide another:
- layout: every file of the released layout present and not empty;
- checksums, where the folder records them: a folder filled by huggingface_hub with `local_dir` (what
  `k4trt weights download` does) keeps, per file, `DIR/.cache/huggingface/download/<file>.metadata` with
  three lines (commit hash, etag, timestamp; the format of huggingface_hub 0.23 to 2.x). The etag of a file
  stored with Git LFS (the weights, spiece.model) is its SHA-256; that of a plain git file (the configs) is
  its git blob SHA-1. Each file is hashed and compared. A folder copied without `.cache/` (the original's
  cache, a make-tiny folder) has no record: the other checks still run, and the summary says so;
- DiT checkpoint: every member of the zip archive read against its CRC-32; its pickle holds only tensors
  (never run: weights_only); its keys and shapes form a Kandinsky 4 DiT; every value is finite;
- VAE: config.json parses, the safetensors file is whole and its decoder tensors are those the config
  describes, every value finite;
- text encoder: config.json parses and agrees with the shards' tensors (num_layers and d_model included),
  the shard index agrees with the shards, every value finite; the tokenizer loads and fits its vocabulary;
- scheduler: its config is one k4trt implements.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from k4trt.errors import K4TRTError, first_line, listed
from k4trt.weights.layout import WeightsFolder

RECORDS = Path(".cache") / "huggingface" / "download"
_REFETCH = "download it again with `k4trt weights download DIR`"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str


@dataclass
class Verification:
    findings: list[Finding]
    hashed: int  # files compared with a recorded checksum
    unrecorded: int  # files without one

    @property
    def problems(self) -> list[str]:
        return [f.text for f in self.findings if not f.ok]


def verify(root: Path | str) -> Verification:
    folder = WeightsFolder(root)
    layout = folder.problems()
    findings = [Finding(False, p) for p in layout]
    if not folder.root.is_dir():
        return Verification(findings, 0, 0)
    records = _records(folder.root)
    findings += _checksums(folder.root, records)
    unrecorded = sum(1 for p in _files(folder.root) if p.relative_to(folder.root).as_posix() not in records)
    parts = ((_dit, folder.dit), (_vae, folder.vae), (_text_encoder, folder.text_encoder),
             (_tokenizer, folder.tokenizer), (_scheduler, folder.scheduler))
    for check, where in parts:
        if any(str(where) in problem for problem in layout):
            continue  # a missing file is named once, by the layout
        try:
            findings.append(Finding(True, check(folder)))
        except K4TRTError as e:
            findings.append(Finding(False, str(e)))
    hashed = sum(1 for name, etag in records.items() if _etag_kind(etag))
    return Verification(findings, hashed, unrecorded)


# --- checksums --------------------------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.relative_to(root).parts]


def _records(root: Path) -> dict[str, str]:
    """{path relative to root: etag} from huggingface_hub's per-file download metadata."""
    base = root / RECORDS
    records = {}
    for meta in sorted(base.rglob("*.metadata")) if base.is_dir() else []:
        try:
            lines = meta.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) >= 2:
            records[meta.relative_to(base).as_posix().removesuffix(".metadata")] = lines[1].strip().strip('"')
    return records


def _etag_kind(etag: str) -> str | None:
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return "SHA-256"
    return "SHA-1" if re.fullmatch(r"[0-9a-f]{40}", etag) else None


def _checksums(root: Path, records: dict[str, str]) -> list[Finding]:
    findings = []
    for name, etag in records.items():
        path, kind = root / name, _etag_kind(etag)
        if kind is None:
            continue
        if not path.is_file():
            findings.append(Finding(False, f"{path} was downloaded but is gone; {_REFETCH}"))
            continue
        # git hashes a plain file as the blob "blob <size>\0<content>"; LFS names it by its SHA-256
        digest = _digest(path, hashlib.sha256() if kind == "SHA-256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size))
        if digest != etag:
            # huggingface_hub trusts its record over the file, so the file must go before it is fetched again
            findings.append(Finding(False, f"{path} differs from the file Hugging Face served ({kind} {digest[:12]}… "
                                           f"instead of {etag[:12]}…); delete it, then run `k4trt weights download "
                                           f"{root}` (it fetches only what is missing)"))
        else:
            findings.append(Finding(True, f"{kind} of {path} matches the download record"))
    return findings


def _digest(path: Path, digest: hashlib._Hash) -> str:
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise K4TRTError(f"cannot read {path} ({e.strerror or e}); check it is readable") from None
    return digest.hexdigest()


# --- contents ---------------------------------------------------------------------------------------


def _dit(folder: WeightsFolder) -> str:
    from k4trt.models.dit import DiT, check_keys, infer_dit_config
    from k4trt.weights.checkpoint import read_dit_state_dict

    crc = "CRC-32 of every archive member"
    if zipfile.is_zipfile(folder.dit):
        try:
            with zipfile.ZipFile(folder.dit) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise K4TRTError(f"DiT checkpoint {folder.dit} is a damaged zip archive ({first_line(e)}); {_REFETCH}"
                             ) from None
        if bad is not None:
            raise K4TRTError(f"DiT checkpoint {folder.dit} is damaged: {bad} fails its CRC-32 check; {_REFETCH}")
    else:
        crc = "no CRCs (a legacy torch.save file)"
    state = read_dit_state_dict(folder.dit)
    cfg = infer_dit_config(state)
    with torch.device("meta"):
        check_keys(DiT(cfg).state_dict(), state)
    _finite(folder.dit, state.items())
    return f"{folder.dit}: {len(state)} tensors, {crc}, finite, a DiT of model dim {cfg.model_dim}"


def _vae(folder: WeightsFolder) -> str:
    from k4trt.models.vae import VAEDecoder

    model = VAEDecoder.from_pretrained(folder.vae)
    _finite(folder.vae, model.state_dict().items())
    return f"{folder.vae}: the decoder its config.json describes, finite"


def _text_encoder(folder: WeightsFolder) -> str:
    from safetensors import SafetensorError, safe_open

    from k4trt.models.text import check_text_encoder, t5_weight_files

    check_text_encoder(folder.text_encoder)
    files, _ = t5_weight_files(folder.text_encoder)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    try:
        _finite(folder.text_encoder, tensors())
    except SafetensorError as e:
        raise K4TRTError(f"{folder.text_encoder} holds a damaged file ({first_line(e)}); {_REFETCH}") from None
    return f"{folder.text_encoder}: {len(files)} file(s) agreeing with config.json and the shard index, finite"


def _tokenizer(folder: WeightsFolder) -> str:
    from transformers import T5Config

    from k4trt.models.text import load_tokenizer, quiet_transformers

    tokenizer = load_tokenizer(folder.tokenizer)
    try:
        with quiet_transformers():
            vocab = T5Config.from_pretrained(str(folder.text_encoder)).vocab_size
    except Exception:
        vocab = None  # the text encoder's finding already names its config
    if vocab is not None and vocab < len(tokenizer):
        raise K4TRTError(f"tokenizer {folder.tokenizer} has {len(tokenizer)} tokens but the text encoder embeds only "
                         f"{vocab}; use the tokenizer/ and text_encoder/ of one model")
    return f"{folder.tokenizer}: loads, {len(tokenizer)} tokens"


def _scheduler(folder: WeightsFolder) -> str:
    from k4trt.models.scheduler import Schedule

    Schedule.from_config_dir(folder.scheduler)
    return f"{folder.scheduler}: a schedule k4trt implements"


def _finite(where: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every value of every tensor finite: a NaN or infinity in a weight gives a blank video, not an error."""
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise K4TRTError(f"{where} holds NaN or infinite values in {listed(bad)}; {_REFETCH}")
