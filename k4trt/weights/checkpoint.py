"""Read the DiT checkpoint (a plain torch.save'd state dict) safely."""

from __future__ import annotations

from pathlib import Path

import torch

from k4trt.errors import K4TRTError

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
        raise K4TRTError(f"DiT checkpoint {path} does not exist; {_REFETCH}")
    try:
        with path.open("rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except PermissionError:
        raise K4TRTError(f"DiT checkpoint {path} is not readable; fix its permissions (chmod +r)") from None
    except Exception as e:  # torch reports damage as RuntimeError, OSError, EOFError, KeyError, UnpicklingError…
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise K4TRTError(f"DiT checkpoint {path} is truncated or corrupt ({reason}); {_REFETCH}") from None
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
