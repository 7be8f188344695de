"""The sampler's `Executor` for one rank of a sequence-parallel run, over any backend's per-rank DiT.

The shared sampler hands every rank the full latents; this executor patchifies them, feeds the backend its
rows (`k4trt.parallel.layout`), all-gathers the velocity rows, drops the padding and unpatchifies, so the
sampler sees exactly what a single-GPU executor returns. The VAE calls go to the backend unchanged (only rank
0 decodes). Only `dit_rows` differs between backends: PyTorch modules, an ONNX Runtime session, a TensorRT plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

from torch import Tensor

from k4trt.config import TEXT_TOKENS
from k4trt.core.executor import Executor
from k4trt.models.dit import patchify, unpatchify
from k4trt.parallel.exchange import ProcessGroupExchange
from k4trt.parallel.layout import TokenLayout
from k4trt.parallel.world import World


class RowsBackend(Protocol):
    """A backend executor that also runs one rank's DiT graph (`k4trt.core.graphs.dit_graph` with a degree)."""

    def dit_rows(self, x: Tensor, text: Tensor, time: Tensor, rope: Tensor, order: Tensor) -> Tensor: ...


class SequenceParallelExecutor(Executor):
    def __init__(self, backend: Executor, world: World, exchange: ProcessGroupExchange) -> None:
        if not hasattr(backend, "dit_rows"):
            raise TypeError(f"{type(backend).__name__} cannot run a sequence-parallel DiT")
        self.backend = backend
        self._rows = cast(RowsBackend, backend).dit_rows
        self.world = world
        self.exchange = exchange
        self.device, self.dtype = backend.device, backend.dtype
        self.dit_precision = backend.dit_precision
        self.dit_config = backend.dit_config
        self.vae_scaling_factor = backend.vae_scaling_factor
        self._layouts: dict[tuple[int, int, int], tuple[TokenLayout, Tensor]] = {}

    def dit(self, x: Tensor, text: Tensor, time: Tensor, rope: Tensor) -> Tensor:
        patch = self.dit_config.patch_size
        grid = (int(rope.shape[0]), int(rope.shape[1]), int(rope.shape[2]))
        layout, order = self._layout(grid)
        rank = self.world.rank
        patches = patchify(x, patch).flatten(0, 2)
        rows = self._rows(layout.visual_rows(patches, rank), layout.text_block(text, rank), time,
                          layout.visual_rows(rope.flatten(0, 2), rank), order)
        gathered = self.exchange.all_gather(rows.to(self.dtype))
        return unpatchify(layout.visual_tokens(gathered), grid, patch)

    def vae_chunk(self, z: Tensor, caches: Sequence[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        return self.backend.vae_chunk(z, caches)

    def close(self) -> None:
        self._layouts.clear()
        self.backend.close()

    def _layout(self, grid: tuple[int, int, int]) -> tuple[TokenLayout, Tensor]:
        """Per latent grid, built at the first (eager) call and kept, so a captured CUDA graph copies nothing
        from the host."""
        if grid not in self._layouts:
            layout = TokenLayout(self.world.size, grid[0] * grid[1] * grid[2], TEXT_TOKENS)
            self._layouts[grid] = (layout, layout.order(self.device))
        return self._layouts[grid]
