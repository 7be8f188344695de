"""The one seam between the shared sampler / VAE chunk schedule and a backend (PyTorch, ONNX Runtime, TensorRT).

Everything above this interface (noise, re-noising, x0 update, chunk bounds, scaling, pixel mapping, video
writing) is written once; an executor only evaluates the two networks. Tensors cross it as torch tensors on
`executor.device`, so the TensorRT executor can bind them directly and the sampler's elementwise maths runs on
the GPU (and inside a CUDA graph) whichever backend is used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from k4trt.config import DiTConfig


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU as the original runs; float32 on the CPU, where bf16 matmuls are slow and the reference
    role wants full precision."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Executor(ABC):
    #: where the sampler keeps its tensors
    device: torch.device
    #: dtype the DiT is fed (bf16 on GPU like the original's autocast; float32 on CPU)
    dtype: torch.dtype
    #: what the DiT computes in, for reports: "fp8" or "bf16" (the graph's), or the PyTorch dtype's name
    dit_precision: str
    #: dimensions of the loaded DiT (the sampler needs them for RoPE and shapes)
    dit_config: DiTConfig
    #: the VAE's latent scaling factor (0.7 for CogVideoX-5b)
    vae_scaling_factor: float

    @abstractmethod
    def dit(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Velocity for latents `x` [T, h, w, C] (dtype `self.dtype`), `text` [224, D], `time` [1] float32,
        `rope` as built by `k4trt.models.dit.build_rope`. Returns velocity [T, h, w, C] in `self.dtype`."""

    @abstractmethod
    def vae_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode one causal chunk. `z` [1, C, t, h, w] already divided by the scaling factor, in the VAE
        dtype; `caches` None for the first chunk (the "head"), else the caches the previous chunk returned.
        Returns (pixels [1, 3, f, H, W] in [-1, 1], caches for the next chunk)."""

    def close(self) -> None:  # noqa: B027 (a hook with nothing to release by default, not abstract)
        """Release device memory held by the executor."""
