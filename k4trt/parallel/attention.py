"""The Ulysses head exchange around attention, as an attention callable the DiT takes (`DiT.with_attention`).

A rank's q, k and v hold its S rows with every head. One all-to-all of the three stacked sends head group j
(H/P heads) of all S rows to rank j, so each rank then holds its H/P heads over all P·S rows; `order` picks
the real tokens in the single-GPU order (`k4trt.parallel.layout`), the inner attention runs on exactly what
one GPU would give those heads, and one all-to-all sends each rank's rows of the result back. Pad rows get
zeros. The exchange is dim-0 all-to-all: block j of the input to rank j, block i of the output from rank i
(torch's all_to_all_single, NCCL's and TensorRT's ALL_TO_ALL alike).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from k4trt.models.dit import Attention

AllToAll = Callable[[Tensor], Tensor]


def ulysses_attention(attention: Attention, all_to_all: AllToAll, degree: int, order: Tensor) -> Attention:
    """`attention` (q, k, v [S, H, d] -> [S, H·d]) computed with H/P heads per rank over the whole sequence."""

    def exchanged(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        local, heads, head_dim = q.shape
        qkv = torch.stack([q, k, v]).unflatten(2, (degree, heads // degree))  # [3, S, P, H/P, d]
        received = all_to_all(qkv.permute(2, 0, 1, 3, 4).contiguous())  # [P (from rank), 3, S, H/P, d]
        q, k, v = received.transpose(0, 1).flatten(1, 2).index_select(1, order).unbind(0)  # [N+L, H/P, d]
        out = attention(q, k, v)  # [N+L, H/P·d]
        rows = out.new_zeros(degree * local, out.shape[-1]).index_copy(0, order, out)
        back = all_to_all(rows.unflatten(0, (degree, local)))  # [P (head group), S, H/P·d]
        return back.transpose(0, 1).flatten(1)  # [S, H·d], heads in their original order

    return exchanged
