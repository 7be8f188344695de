"""One rank's DiT: its rows of the joint sequence in, its rows of the output patches out.

The same module serves the PyTorch backend (its all-to-all a process-group collective) and the ONNX export
(its all-to-all a `DistCollective` node), so the exported graph is the code the CPU tests run; ONNX Runtime
runs its exchanges as a custom op over gloo, and the TensorRT build (not yet run) swaps them for all-to-all layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from k4trt.models.dit import DiT
from k4trt.parallel.attention import AllToAll, ulysses_attention


class SequenceParallelDiT(DiT):
    """`dit`'s modules adopted (shared, not copied, under the same names, so an export's initializers keep the
    checkpoint's keys), with `forward` taking one rank's rows (`k4trt.core.graphs.dit_graph` with a degree)."""

    def __init__(self, dit: DiT, all_to_all: AllToAll, degree: int) -> None:
        nn.Module.__init__(self)  # adopts `dit`'s modules below instead of building new ones
        self.cfg = dit.cfg
        for name, child in dit.named_children():
            self.add_module(name, child)
        self.attention = dit.attention
        self.all_to_all = all_to_all
        self.degree = degree
        self.train(dit.training)

    def forward(self, x: Tensor, text: Tensor, time: Tensor, rope: Tensor, order: Tensor) -> Tensor:  # type: ignore[override]
        """x [n, patch] visual patch rows, text [L/P, D], time [1], rope [n, head_dim/2, 2, 2], order [N + L]
        (`TokenLayout.order`) -> this rank's output patch rows [n, C·prod(patch)]."""
        attention = ulysses_attention(self.attention, self.all_to_all, self.degree, order)
        model = self.with_attention(attention)
        return model.tokens(model.visual_embeddings(x), text, time, rope)
