"""The PyTorch executor: the reference every other backend is checked against, and the fallback without TensorRT.

On CUDA it runs the DiT and the VAE in bf16 (the DiT casts like the original's autocast; SDPA picks
FlashAttention); on the CPU everything is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k4trt.core.executor import Executor
from k4trt.models.dit import DiT
from k4trt.models.vae import VAEDecoder
from k4trt.parallel.dit import SequenceParallelDiT
from k4trt.parallel.exchange import ProcessGroupExchange
from k4trt.weights.checkpoint import read_dit_state_dict
from k4trt.weights.layout import WeightsFolder


class TorchExecutor(Executor):
    def __init__(self, dit: DiT, vae: VAEDecoder, device: torch.device, dtype: torch.dtype,
                 exchange: ProcessGroupExchange | None = None) -> None:
        """With `exchange`, also one rank's DiT of a sequence-parallel run (`dit_rows`)."""
        self.device = device
        self.dtype = dtype
        self.dit_precision = str(dtype).removeprefix("torch.")
        self.dit_config = dit.cfg
        self.vae_scaling_factor = vae.scaling_factor
        self._dit = dit.eval()
        self._vae = vae.eval()
        self._rows = None if exchange is None else SequenceParallelDiT(dit, exchange.all_to_all, exchange.degree).eval()

    @classmethod
    def from_weights(cls, weights: WeightsFolder, device: torch.device, dtype: torch.dtype,
                     exchange: ProcessGroupExchange | None = None) -> TorchExecutor:
        dit = DiT.from_state_dict(read_dit_state_dict(weights.dit), dtype=dtype, device=device)
        vae = VAEDecoder.from_pretrained(weights.vae, dtype=dtype, device=device)
        return cls(dit, vae, device, dtype, exchange)

    @torch.inference_mode()
    def dit(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self._dit(x, text, time, rope)

    @torch.inference_mode()
    def dit_rows(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor,
                 order: torch.Tensor) -> torch.Tensor:
        """One rank's rows of a sequence-parallel DiT call (`k4trt.parallel.dit.SequenceParallelDiT`)."""
        if self._rows is None:
            raise RuntimeError("this TorchExecutor was made for one process (no exchange)")
        return self._rows(x, text, time, rope, order)

    @torch.inference_mode()
    def vae_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._vae.decode_chunk(z, caches)

    def close(self) -> None:
        del self._dit, self._vae, self._rows
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
