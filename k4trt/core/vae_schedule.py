"""The causal chunk schedule of the CogVideoX VAE decoder, written once for every executor.

diffusers (and so the original) decodes latents in batches of two frames, the odd remainder going to the
first batch: 3 latent frames first (1 for an image), then 2 at a time, each chunk handing its causal-conv
caches to the next. Chunking changes the result (GroupNorm statistics are per chunk), so this exact split is
part of being faithful, not just a memory saving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from k4trt.core.executor import Executor

CHUNK = 2  # latent frames per chunk
FIRST_CHUNK = CHUNK + 1  # a video has 2·seconds + 1 latent frames: the odd one goes to the first chunk


def chunk_bounds(latent_t: int) -> list[tuple[int, int]]:
    """[(start, end)] latent-frame ranges per chunk, as diffusers' `_decode` splits them."""
    if latent_t < 1:
        raise ValueError(f"need at least one latent frame, got {latent_t}")
    remainder = latent_t % CHUNK
    batches = max(latent_t // CHUNK, 1)
    return [
        (CHUNK * i + (0 if i == 0 else remainder), min(CHUNK * (i + 1) + remainder, latent_t)) for i in range(batches)
    ]


def latents_to_vae_input(latents: torch.Tensor, scaling_factor: float, dtype: torch.dtype) -> torch.Tensor:
    """[T, h, w, C] sampler latents -> [1, C, T, h, w] decoder input; cast before scaling, as the original."""
    return (1 / scaling_factor * latents.to(dtype)).permute(3, 0, 1, 2).unsqueeze(0)


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, f, H, W] in [-1, 1] -> float32 [f, H, W, 3] in [0, 1]."""
    return torch.clip((frames.float() + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 3, 0)


def decode_chunks(
    executor: Executor,
    latents: torch.Tensor,
    body: Callable[..., Sequence[torch.Tensor]] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield float32 pixel frames [f, H, W, 3] chunk by chunk, so the video writer can stream them.

    `body(z, *caches) -> (frames, *caches)` decodes every chunk after the first; the pipeline passes a CUDA
    graph of `executor.vae_chunk` there (all body chunks share one shape). Default: the executor itself.
    """
    z = latents_to_vae_input(latents, executor.vae_scaling_factor, executor.dtype)
    frames, caches = None, None
    for start, end in chunk_bounds(z.shape[2]):
        chunk = z[:, :, start:end]
        if caches is None:
            frames, caches = executor.vae_chunk(chunk, None)
        elif body is None:
            frames, caches = executor.vae_chunk(chunk, caches)
        else:
            frames, *caches = body(chunk, *caches)
        yield to_pixels(frames)
