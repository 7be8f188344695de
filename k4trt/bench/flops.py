"""How much arithmetic each stage must do, so every measured time can be read against its floor.

The DiT's count is written out from the config and the shape (it is what DESIGN.md's budget is made of and is
unit-tested against its 575 TFLOP per step). The VAE's 3D convolutions are too irregular to write out by hand,
so they are counted by running the decoder's chunk schedule on the meta device under PyTorch's FLOP counter:
shapes only, no memory, no weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.core.vae_schedule import chunk_bounds
from k4trt.models.vae import VAEConfig, VAEDecoder

# H100 SXM rates from an earlier DESIGN.md "Performance budget" (its current text: bf16 GEMM ≈ 780 reachable);
# published figures, not measured by this project.
BF16_GEMM_PEAK = 798e12  # FLOP/s, a large bf16 matrix product
FA3_BF16_RATE = 500e12  # FLOP/s, FlashAttention-3 at head dim 64, bf16


@dataclass(frozen=True)
class DiTStepFlops:
    """One DiT evaluation: `linear` counts every Linear (2·tokens·in·out, modulations and embeddings included),
    `attention` the two attention matmuls (4·N²·model_dim per block); elementwise work is not counted."""

    tokens: int
    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def floor_s(self, peak: float = BF16_GEMM_PEAK) -> float:
        """Every FLOP at the GEMM peak: no implementation of this step can be faster on that card."""
        return self.total / peak

    def floor_fa3_s(self) -> float:
        """Linears at the GEMM peak and attention at FlashAttention-3's rate: the floor a bf16 build can reach."""
        return self.linear / BF16_GEMM_PEAK + self.attention / FA3_BF16_RATE


def dit_step_flops(cfg: DiTConfig, t: int, h: int, w: int, text_tokens: int = TEXT_TOKENS) -> DiTStepFlops:
    """FLOPs of one DiT step on latents [t, h, w] (h, w = pixels / 8) with `text_tokens` text tokens."""
    pt, ph, pw = cfg.patch_size
    visual = (t // pt) * (h // ph) * (w // pw)
    tokens = visual + text_tokens
    d, patch = cfg.model_dim, math.prod(cfg.patch_size)
    blocks = 2 * cfg.num_blocks  # (local, global) pairs
    # Per block: the fused q/k/v projection, the output projection, the two feed-forward layers over every
    # token (visual and text share them), and the visual and text modulations over the one time embedding.
    per_token = 2 * (d * 3 * d + d * d + 2 * d * cfg.ff_dim)
    modulations = 2 * (2 * cfg.time_dim * 6 * d)
    embeddings = (
        2 * (d * cfg.time_dim + cfg.time_dim * cfg.time_dim)  # time: sinusoid(model_dim) -> time_dim -> time_dim
        + 2 * text_tokens * cfg.in_text_dim * d
        + 2 * visual * patch * cfg.in_visual_dim * d
        + 2 * cfg.time_dim * 2 * d  # out layer's modulation
        + 2 * visual * d * patch * cfg.out_visual_dim
    )
    linear = blocks * (tokens * per_token + modulations) + embeddings
    attention = blocks * 4 * tokens * tokens * d
    return DiTStepFlops(tokens=tokens, linear=float(linear), attention=float(attention))


def vae_decode_flops(cfg: VAEConfig, t: int, h: int, w: int) -> float:
    """FLOPs of decoding latents [t, h, w] with the causal chunk schedule (convolutions and matmuls)."""
    with torch.device("meta"):
        decoder = VAEDecoder(cfg)
    caches = None
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        for start, end in chunk_bounds(t):
            _, caches = decoder.decode_chunk(torch.empty(1, cfg.latent_channels, end - start, h, w), caches)
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Workload:
    """The arithmetic of one run's shapes: one DiT step and the whole VAE decode."""

    dit_step: DiTStepFlops
    vae_decode: float

    @classmethod
    def of(cls, dit: DiTConfig, vae: VAEConfig, t: int, h: int, w: int) -> Workload:
        return cls(dit_step_flops(dit, t, h, w), vae_decode_flops(vae, t, h, w))


def roofline(flops: float, seconds: float, peak: float = BF16_GEMM_PEAK) -> dict[str, float]:
    """Achieved rate, its share of the peak, the floor latency and how many floors the measurement is."""
    floor = flops / peak
    return {
        "flops": flops,
        "seconds": seconds,
        "achieved_tflops": flops / seconds / 1e12,
        "percent_of_peak": 100.0 * flops / seconds / peak,
        "floor_s": floor,
        "times_floor": seconds / floor,
    }
