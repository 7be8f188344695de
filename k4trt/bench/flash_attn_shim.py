"""A stand-in for the one flash-attn function the original implementation calls, over PyTorch's SDPA.

flash-attn is a long CUDA build and often absent; the original imports `flash_attn_varlen_qkvpacked_func`
at module level, so without it nothing of the original can run. PyTorch's SDPA dispatches to its own
FlashAttention-2 kernels on a GPU, so timings stay comparable, but every result measured through this shim
is labelled as such.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

VERSION = "sdpa-shim"


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_attn_probs: bool = False,
):
    """qkv [total, 3, heads, head_dim] holding sequences at offsets `cu_seqlens`; attention within each.
    Returns out [total, heads, head_dim], plus (None, None) in place of the log-sum-exp and probabilities
    when `return_attn_probs` (the original asks for them and drops them)."""
    if dropout_p:
        raise NotImplementedError("the SDPA shim of flash_attn supports inference only (dropout_p=0)")
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # [1, heads, n, head_dim], the layout k4trt's DiT uses: 4-D is what SDPA's flash kernels take, and the
        # parity test relies on both sides hitting the same kernel.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv[start:end].unbind(1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
        outs.append(out.squeeze(0).transpose(0, 1))
    out = torch.cat(outs)
    return (out, None, None) if return_attn_probs else out


def install_if_absent() -> bool:
    """Register this shim as the `flash_attn` module unless the real one can be imported; True if installed."""
    if "flash_attn" in sys.modules or importlib.util.find_spec("flash_attn") is not None:
        return False
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.__dict__.update(__version__=VERSION, flash_attn_varlen_qkvpacked_func=flash_attn_varlen_qkvpacked_func)
    sys.modules["flash_attn"] = module
    return True
