"""Which sequence-parallel degrees a DiT allows, checked before any model work.

Each rank attends with H/P of the heads over the whole sequence and holds 224/P of the text tokens, so P
must divide both (and cannot exceed the heads). For the released DiT (48 heads) that leaves 1, 2, 4, 8 and 16.
"""

from __future__ import annotations

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.errors import K4TRTError


def check_degree(cfg: DiTConfig, degree: int) -> int:
    """`degree` when the DiT of `cfg` splits over that many ranks; else one line saying why not and what to run."""
    heads = cfg.num_heads
    if degree < 1:
        raise K4TRTError(f"sequence-parallel degree {degree} is not a positive number of ranks")
    if degree > heads:
        raise K4TRTError(f"{degree} ranks are more than the DiT's {heads} attention heads (each rank attends with "
                         f"at least one); start at most {heads} processes (torchrun --nproc-per-node)")
    if heads % degree:
        raise K4TRTError(f"the DiT's {heads} attention heads do not split evenly over {degree} ranks; start a number "
                         f"of processes that divides {heads} (torchrun --nproc-per-node)")
    if TEXT_TOKENS % degree:
        raise K4TRTError(f"the {TEXT_TOKENS} text tokens do not split evenly over {degree} ranks; start a number of "
                         f"processes that divides {TEXT_TOKENS} (torchrun --nproc-per-node)")
    return degree
