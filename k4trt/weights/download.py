"""`k4trt weights download DIR`: fetch the released files into the original's layout (about 40 GB).

The DiT comes from ai-forever/kandinsky-4-t2v-flash; VAE, T5, tokenizer and scheduler from
THUDM/CogVideoX-5b, exactly the files the original implementation downloads. huggingface_hub resumes
interrupted downloads and skips files already present, so running the command again is the fix for a
partial folder.

Downloading with `local_dir` makes huggingface_hub keep each file's etag (the SHA-256 of a weight file) under
`DIR/.cache/huggingface/download/`; that folder is left in place, and every downloaded file is checked
against it (`k4trt weights verify`) before the download is called done.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from k4trt.errors import K4TRTError, first_line
from k4trt.weights.layout import DIT_FILE, WeightsFolder

DIT_REPO = "ai-forever/kandinsky-4-t2v-flash"
COGVIDEOX_REPO = "THUDM/CogVideoX-5b"
COGVIDEOX_PATTERNS = ["vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]


def download(dest: Path | str) -> WeightsFolder:
    """Download into `dest` (created if needed) and check the result is complete."""
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError


    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise K4TRTError(f"{dest} is a file; pass a folder to download the weights into")
    network = (HfHubHTTPError, EntryNotFoundError, ConnectionError, TimeoutError, *_transport_errors())
    try:
        dest.mkdir(parents=True, exist_ok=True)
        hub.hf_hub_download(DIT_REPO, DIT_FILE, local_dir=dest)
        hub.snapshot_download(COGVIDEOX_REPO, allow_patterns=COGVIDEOX_PATTERNS, local_dir=dest)
    except network as e:
        raise K4TRTError(
            f"could not reach Hugging Face ({first_line(e)}); check your connection and run "
            f"`k4trt weights download {dest}` again, or copy an existing weights folder to {dest}"
        ) from None
    except OSError as e:
        raise K4TRTError(f"could not write the weights to {dest} ({first_line(e)}); free disk space "
                         "(about 40 GB is needed) or choose another folder") from None
    # Offline, snapshot_download returns an existing folder without error, so check what actually arrived.
    folder = WeightsFolder(dest)
    problems = folder.problems()
    if problems:
        raise K4TRTError(
            f"the download into {dest} is incomplete ({'; '.join(problems)}); check your connection and run "
            f"`k4trt weights download {dest}` again (it resumes)"
        )
    from k4trt.weights.verify import verify

    problems = verify(dest).problems
    if problems:
        raise K4TRTError(f"the download into {dest} is not usable: {'; '.join(problems)}")
    return folder


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's error base, whichever client this huggingface_hub talks through (requests before
    1.0, httpx, now httpx2); a connection that fails mid-transfer surfaces as one of these."""
    found = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)
