"""Read the DiT checkpoint (a plain torch.save'd state dict) safely."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from k4trt.errors import K4TRTError, first_line

_REFETCH = "download it again with `k4trt weights download DIR`"
_ZIP_MAGIC = b"PK\x03\x04"
# The original's RoPE3D registers its angle tables as buffers, so a state dict saved from its model may carry
# them; it loads with strict=False and recomputes them anyway. k4trt recomputes them too (build_rope), so
# they are dropped here and every other key is still checked strictly.
_RECOMPUTED_PREFIX = "rope_embeddings."


def read_dit_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Load `path` on the CPU as {name: tensor}.

    weights_only=True so a checkpoint cannot run code; mmap=True so 11 GB of bf16 weights are paged in
    lazily instead of copied (only torch.save's zip format supports mmap; the legacy format is read whole).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise K4TRTError(f"DiT checkpoint {path} {what}; {_REFETCH}")
    try:
        with path.open("rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except PermissionError:
        raise K4TRTError(f"DiT checkpoint {path} is not readable; fix its permissions (chmod +r)") from None
    except Exception as e:  # torch reports damage as RuntimeError, OSError, EOFError, KeyError, UnpicklingError…
        # The safe unpickler names a global (a function or class) it refused to import: the file holds code.
        # torch's message goes on to suggest weights_only=False, i.e. running that code; it is not passed on.
        code = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if code:
            raise K4TRTError(f"DiT checkpoint {path} is not plain weights: its pickle calls {code[1]}, code that would "
                             f"run when it is loaded, so k4trt does not load it; replace it with the released file "
                             f"({_REFETCH})") from None
        raise K4TRTError(f"DiT checkpoint {path} is truncated or corrupt ({_reason(e)}); {_REFETCH}") from None
    if not isinstance(state, dict):
        raise K4TRTError(f"DiT checkpoint {path} holds a {type(state).__name__}, not a state dict; {_REFETCH}")
    if not state:
        raise K4TRTError(f"DiT checkpoint {path} is an empty state dict; {_REFETCH}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise K4TRTError(
            f"DiT checkpoint {path} is not a plain state dict ({len(bad)} entries are not name → tensor, "
            f"e.g. {bad[0]!r}); {_REFETCH}"
        )
    return {k: v for k, v in state.items() if not k.startswith(_RECOMPUTED_PREFIX)}


def _reason(error: Exception) -> str:
    """The error's first line; for torch's safe unpickler, the paragraph that says what it met, not the one
    that advises weights_only=False."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "weights_only" not in text:
        return first_line(error)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    detail = next((p for p in paragraphs[1:] if "weights_only" not in p), "not a pickle of tensors")
    return f"{type(error).__name__}: {detail.splitlines()[0]}"
