"""How much memory a request needs, checked against what is free before anything is loaded or run, so a size
the machine cannot hold is one line with the estimate instead of a kill by the kernel's out-of-memory killer.

The estimate, in bytes. T latent frames on an h×w latent grid (h = H/8, w = W/8), C = 16 latent channels,
e = bytes per element of the DiT/VAE dtype (2 for bf16, 4 for float32), D and F the DiT's model and
feed-forward dims, N = T·(h/2)·(w/2) visual tokens, S = N + 224 tokens, heads = D/64:

    latents   T·h·w·C·(5·(4 + e) + 3·8)
              the start latent and four re-noise draws in float32 on the host and in the DiT dtype on the
              device; the running x, its re-noised copy and the update in float64
    dit step  S·D·8 + max(S·D·(20 + 8e), S·D·(4 + e) + 2·S·F·e) [+ 2·heads·S²·4]
              the text and visual residual streams in float32 (8 per S·D), then the larger of attention
              (modulated input 4, q/k/v 3e, normed q and k in float32 8, rotated q and k in float32 8,
              joined q/k/v 3e, output and its layout copy 2e) and feed-forward (modulated input 4, output e,
              hidden and its GELU 2·F·e); plus the scores and their softmax in float32 where attention is not
              fused (the exported graphs on ONNX Runtime: --backend onnxruntime)
    vae chunk 6·(f + 2)·H·W·c·e
              the largest chunk's f video frames (1 for an image, 9 for a video's first chunk, 8 after) and
              the 2 past frames of each causal conv, at full resolution with c = the widest full-resolution
              channel count (max of block_out_channels[0] and [1]), about six such feature maps alive at once
    frames    F·H·W·3·4, F = 4(T−1)+1, when every frame is kept (--save-frames), on the host
    weights   parameters·e of the DiT, the VAE decoder and T5, when they are not loaded yet

The DiT's activations are gone before the VAE runs, so the peak is
weights + latents + frames + max(dit step, vae chunk). It is an estimate of the peak, not a bound: it is
meant to tell a request that cannot fit (10⁵×10⁵ pixels, or the real model on a small host) from one that
can, and is checked against the tiny model's measured peak in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from k4trt import config
from k4trt.core.vae_schedule import chunk_bounds
from k4trt.errors import RequestValueError
from k4trt.models.vae import VAEConfig

GIB = 1 << 30
_FLOAT32, _FLOAT64 = 4, 8
_LIVE_VAE_MAPS = 6
_PAST_FRAMES = 2


@dataclass(frozen=True)
class MemoryEstimate:
    latents: int
    dit_step: int
    vae_chunk: int
    frames: int
    weights: int

    @property
    def peak(self) -> int:
        return self.weights + self.latents + self.frames + max(self.dit_step, self.vae_chunk)

    def describe(self) -> str:
        parts = [("weights", self.weights), ("latents", self.latents), ("one DiT step", self.dit_step),
                 ("the VAE's largest chunk", self.vae_chunk), ("kept frames", self.frames)]
        return ", ".join(f"{name} {_gib(size)}" for name, size in parts if size)


def estimate(
    dit: config.DiTConfig,
    vae: VAEConfig,
    seconds: int,
    width: int,
    height: int,
    element_bytes: int,
    *,
    attention_scores: bool = False,
    keep_frames: bool = False,
    parameters: int = 0,
) -> MemoryEstimate:
    """The module docstring's formula for one request; `parameters` counts weights still to be loaded."""
    e = element_bytes
    t = config.latent_frames(seconds)
    h, w = height // config.VAE_SPATIAL_FACTOR, width // config.VAE_SPATIAL_FACTOR
    _, ph, pw = dit.patch_size
    s = t * (h // ph) * (w // pw) + config.TEXT_TOKENS
    d, f = dit.model_dim, dit.ff_dim
    attention = s * d * (20 + 8 * e)
    feed_forward = s * d * (4 + e) + 2 * s * f * e
    scores = 2 * dit.num_heads * s * s * _FLOAT32 if attention_scores else 0
    frames_per_chunk = max(_video_frames(first, end) for first, end in chunk_bounds(t))
    channels = max(vae.block_out_channels[:2])
    return MemoryEstimate(
        latents=t * h * w * config.LATENT_CHANNELS * (5 * (_FLOAT32 + e) + 3 * _FLOAT64),
        dit_step=s * d * 2 * _FLOAT32 + max(attention, feed_forward) + scores,
        vae_chunk=_LIVE_VAE_MAPS * (frames_per_chunk + _PAST_FRAMES) * height * width * channels * e,
        frames=config.video_frames(t) * height * width * 3 * _FLOAT32 if keep_frames else 0,
        weights=parameters * e,
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this request on `device`: the GPU's free memory plus what PyTorch holds cached but
    unused; on the CPU the kernel's MemAvailable. None where it cannot be told (then nothing is refused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(need: MemoryEstimate, device: torch.device, width: int, height: int, seconds: int) -> None:
    """One line with the estimate when the request cannot fit in what `device` has free."""
    free = available_bytes(device)
    if free is None or need.peak <= free:
        return
    where = "GPU" if device.type == "cuda" else "host"
    raise RequestValueError(
        f"{width}x{height} for {seconds} s needs about {_gib(need.peak)} ({need.describe()}) but only {_gib(free)} "
        f"of {where} memory is free; choose a smaller --size or a shorter --duration"
    )


def _video_frames(start: int, end: int) -> int:
    """Video frames a chunk of latent frames [start, end) decodes to: 4t−3 for the first chunk, 4t after."""
    t = end - start
    return config.VAE_TEMPORAL_FACTOR * t - (config.VAE_TEMPORAL_FACTOR - 1 if start == 0 else 0)


def _gib(size: int) -> str:
    return f"{size / GIB:,.1f} GiB" if size >= GIB / 10 else f"{size / (1 << 20):,.0f} MiB"
