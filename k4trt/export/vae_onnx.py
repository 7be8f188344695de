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
graph per role serves every size. Opset and exporter are the DiT's (see `k4trt.export.dit_onnx`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from k4trt.export.dit_onnx import OPSET
from k4trt.export.twin import save_onnx
from k4trt.models.vae import VAEConfig, VAEDecoder

#: latent frames per chunk of each graph; chunk order follows `k4trt.runtime.vae_schedule.chunk_bounds`
ROLES = {"image": 1, "head": 3, "body": 2}
# An arbitrary example grid for tracing: not 0 or 1 (torch.export would specialize them) and h != w (it
# could tie them).
_EXAMPLE_HW = (6, 10)


def graph_name(role: str) -> str:
    """`vae_image`, `vae_head` or `vae_body`: the graph's file stem in an engines folder."""
    _check_role(role)
    return f"vae_{role}"


def cache_inputs(count: int) -> list[str]:
    """Graph input names of the caches, in `VAEDecoder.cache_names` order."""
    return [f"cache_in_{k}" for k in range(count)]


def cache_outputs(count: int) -> list[str]:
    """Graph output names of the caches the next chunk reads, in `VAEDecoder.cache_names` order."""
    return [f"cache_out_{k}" for k in range(count)]


def vae_input_shapes(cfg: VAEConfig, role: str, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """The graph's input shapes for latents of spatial size (h, w) (what a TensorRT profile is built from)."""
    _check_role(role)
    shapes = {"z": (1, cfg.latent_channels, ROLES[role], h, w)}
    if role == "body":
        caches = _shadow(cfg).cache_shapes(h, w)
        shapes |= dict(zip(cache_inputs(len(caches)), caches))
    return shapes


def export_vae(vae: VAEDecoder, role: str, path: Path) -> None:
    """Write the `role` graph of `vae` at `path` (weights in `<name>.data` beside it, both atomically), in the
    decoder's dtype, with dynamic latent height and width."""
    _check_role(role)
    h, w = _EXAMPLE_HW
    weight = next(vae.parameters())
    shapes = vae_input_shapes(vae.cfg, role, h, w)
    z, *caches = (torch.randn(s, dtype=weight.dtype, device=weight.device) for s in shapes.values())
    height, width = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    z_dims, *cache_dims = ({3: _scaled(height, s[3] // h), 4: _scaled(width, s[4] // w)} for s in shapes.values())
    count = len(vae.cache_names)
    program = torch.onnx.export(
        _Chunk(vae, role).eval(),
        (z, caches) if caches else (z,),
        input_names=list(shapes),
        output_names=["frames"] if role == "image" else ["frames", *cache_outputs(count)],
        dynamic_shapes=(z_dims, cache_dims) if caches else (z_dims,),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    save_onnx(program.model, path)


class _Chunk(nn.Module):
    """`decode_chunk` as a function of tensors: (z, caches) -> (frames, *caches), or frames alone for an image,
    which has no next chunk."""

    def __init__(self, vae: VAEDecoder, role: str) -> None:
        super().__init__()
        self.vae = vae
        self.role = role

    def forward(self, z: torch.Tensor, caches: list[torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        frames, new = self.vae.decode_chunk(z, caches)
        return frames if self.role == "image" else (frames, *new)


def _scaled(dim: torch.export.Dim, factor: int) -> torch.export.Dim:
    return dim * factor if factor > 1 else dim


def _shadow(cfg: VAEConfig) -> VAEDecoder:
    """A weightless decoder of this config, for its cache names and shapes."""
    with torch.device("meta"):
        return VAEDecoder(cfg)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown VAE graph role {role!r}; expected one of {', '.join(ROLES)}")
