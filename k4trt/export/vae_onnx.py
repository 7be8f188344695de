"""VAE decoder → ONNX: the three chunk graphs TensorRT builds the VAE engines from.

`vae_head.onnx` decodes the first chunk of a video (3 latent frames, no caches in), `vae_body.onnx` every later
chunk (2 latent frames, caches in and out), and `vae_image.onnx` the single latent frame of an image.

Why a third graph for images: a chunk's frame count picks the code path (the temporal upsamplers keep a lone
frame but split an odd count into the causal first frame plus doubled pairs; the spatial norms' latent resize
splits the same way), and torch.export fixes that choice at trace time. A head traced at t=3 fed t=1 would run
its "doubled pairs" branch on a zero-frame tensor, which TensorRT's Resize and Conv layers are not guaranteed
to accept. The alternative that needs no third graph, decoding the image as a head chunk of the frame repeated
three times, gives the same pixels only up to GroupNorm's reduction order and decodes nine frames to keep one.
The image graph is the decoder with no cache outputs, so it costs one more small engine (the decoder is a few
hundred MB in bf16) and decodes exactly what the original does.

Every graph keeps the decoder's dtype (bf16 weights, as the original runs it), the frame count is fixed per
graph and the latent height and width are dynamic ("h", "w"; caches and frames are multiples of them), so one
graph per role serves every size. Names, roles and dynamic axes are the registry's (`k4trt.core.graphs`);
opset and exporter are the DiT's (see `k4trt.export.dit_onnx`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from k4trt.core.graphs import GraphSpec, vae_input_shapes
from k4trt.export.dit_onnx import dynamic_shapes
from k4trt.export.onnx_files import OPSET, save_onnx
from k4trt.models.vae import VAEDecoder

# An arbitrary example grid for tracing: not 0 or 1 (torch.export would specialize them) and h != w (it
# could tie them).
_EXAMPLE_HW = (6, 10)


def export_vae(vae: VAEDecoder, spec: GraphSpec, path: Path) -> None:
    """Write the VAE chunk graph `spec` of `vae` at `path` (weights in `<name>.data` beside it, both
    atomically), in the decoder's dtype, with dynamic latent height and width."""
    role = spec.name.removeprefix("vae_")
    weight = next(vae.parameters())
    shapes = vae_input_shapes(vae.cfg, role, *_EXAMPLE_HW)
    z, *caches = (torch.randn(s, dtype=weight.dtype, device=weight.device) for s in shapes.values())
    z_dims, *cache_dims = dynamic_shapes(spec)
    program = torch.onnx.export(
        _Chunk(vae, spec).eval(),
        (z, caches) if caches else (z,),
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_shapes=(z_dims, cache_dims) if caches else (z_dims,),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    save_onnx(program.model, path)


class _Chunk(nn.Module):
    """`decode_chunk` as a function of tensors: (z, caches) -> (frames, *caches), or frames alone for a graph
    with no cache outputs (an image has no next chunk)."""

    def __init__(self, vae: VAEDecoder, spec: GraphSpec) -> None:
        super().__init__()
        self.vae = vae
        self.frames_only = len(spec.outputs) == 1

    def forward(self, z: torch.Tensor, caches: list[torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        frames, new = self.vae.decode_chunk(z, caches)
        return frames if self.frames_only else (frames, *new)
