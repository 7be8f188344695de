"""Tiny DiTs, graph inputs and comparison measures shared by the export, FP8 and parallel tests: random
everywhere, bf16-representable."""

from __future__ import annotations

import math

import torch

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.models.dit import DiT, build_rope
from k4trt.weights.tiny import TINY_DIT

# head_dim 64 = 16 + 24 + 24 as released, so 2 heads; every other width small (make-tiny's DiT).
TINY = TINY_DIT


def random_dit(cfg: DiTConfig, seed: int) -> DiT:
    """Every tensor random, modulations included (zero-initialised they would hide their use), then rounded to
    bf16 and held in float32: Linear weights ~ N(0, 1/fan_in), norm weights 1 ± 0.3, biases ~ N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    dit = DiT(cfg).requires_grad_(False).eval()
    for name, p in dit.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 2:
            value = noise / math.sqrt(p.shape[1])
        elif "norm" in name and name.endswith("weight"):
            value = 1 + 0.3 * noise
        else:
            value = 0.3 * noise
        p.copy_(value.bfloat16().float())
    return dit


def random_inputs(cfg: DiTConfig, size: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    """Graph inputs in float32 holding bf16 values, as the bf16 graph would receive them."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(*size, cfg.in_visual_dim, generator=g).bfloat16().float(),
        "text": torch.randn(TEXT_TOKENS, cfg.in_text_dim, generator=g).bfloat16().float(),
        "time": torch.randint(1, 1000, (1,), generator=g).float(),
        "rope": build_rope(cfg, *size, dtype=torch.bfloat16).float(),
    }


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of b's last place (bf16: 7 explicit mantissa bits)."""
    b64 = b.double()
    spacing = torch.exp2(torch.floor(torch.log2(b64.abs().clamp_min(2.0**-126))) - 7)
    return ((a.double() - b64).abs() / spacing).max().item()
