"""DiT → ONNX: the graphs TensorRT builds the DiT engines from (`dit.bf16.onnx`, `dit.fp8.onnx`).

Exporter: torch.onnx's torch.export-based ("dynamo") exporter. It takes T, h and w as symbols with their
relations (x's height is twice the rope's), so torch.export proves one graph right for every size instead of
tracing one example; it keeps the model's dtype flow (bf16 weights, the explicit Casts of `k4trt.models.dit`,
LayerNorms in float32) as it is; parameters keep their state-dict names as initializer names, which the FP8
pass relies on; and its optimizer folds the shape arithmetic away. The TorchScript exporter is deprecated
since torch 2.9 and leaves hundreds of Constant and shape nodes in the same graph.

Opset 20: FP8 QuantizeLinear/DequantizeLinear need ≥ 19, and 20 is the highest every TensorRT 10.x parser
reads (onnx-tensorrt operators.md for 10.0: opsets 9–20). It also has LayerNormalization and Gelu as single ops.

Attention is exported in the model's "explicit" form: q·(1/√d) → MatMul(·, kᵀ) → Softmax → MatMul(·, v), the
pattern TensorRT's multi-head-attention fusion turns into one flash-attention kernel (it asks for the scale on
Q or K, or √scale on both, before the first MatMul; the model puts the exact 1/8 on q). ONNX's own Attention
op (opset 23) is not used: TensorRT's parser reads it only from 10.14 on (onnx-tensorrt 10.14 release notes),
and this project supports TensorRT from 10.8.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.errors import K4TRTError
from k4trt.export.fp8 import FP8Scales, quantize_dit_graph
from k4trt.export.twin import save_onnx
from k4trt.models.dit import DiT, build_rope

OPSET = 20
INPUT_NAMES = ("x", "text", "time", "rope")
OUTPUT_NAME = "velocity"


def dit_input_shapes(cfg: DiTConfig, latent_t: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """The DiT graph's input shapes for latents [latent_t, h, w] (what a TensorRT profile is built from)."""
    pt, ph, pw = cfg.patch_size
    if min(latent_t, h, w) <= 0 or latent_t % pt or h % ph or w % pw:
        raise K4TRTError(
            f"latent shape {latent_t}x{h}x{w} is not a positive multiple of the DiT patch {cfg.patch_size}; "
            "use a video size that is a multiple of 16"
        )
    return {
        "x": (latent_t, h, w, cfg.in_visual_dim),
        "text": (TEXT_TOKENS, cfg.in_text_dim),
        "time": (1,),
        "rope": (latent_t // pt, h // ph, w // pw, cfg.head_dim // 2, 2, 2),
    }


def export_dit(dit: DiT, path: Path, *, fp8: FP8Scales | None = None, fp8_attention: bool = False) -> None:
    """Write the DiT as an ONNX graph at `path` (weights in `<name>.data` beside it), in the dtype of its weights.

    With `fp8`, every block's four Linears get FP8 Q/DQ from those calibrated scales (`k4trt.export.fp8`); with
    `fp8_attention` too, so do the attention matmuls. One graph serves every (T, h, w)."""
    if fp8_attention and fp8 is None:
        raise ValueError("fp8_attention needs fp8 scales")
    model = _to_onnx(dit)
    if fp8 is not None:
        quantize_dit_graph(model, dit, fp8, attention=fp8_attention)
    save_onnx(model, path)


def _to_onnx(dit: DiT) -> ir.Model:
    """Export with the explicit attention form; the example size (2, 3, 5 patches) is arbitrary, kept away
    from 0 and 1, which torch.export would specialize, and from repeated values, which it could tie."""
    cfg, weight = dit.cfg, next(dit.parameters())
    grid = (2, 3, 5)
    shapes = dit_input_shapes(cfg, *(n * p for n, p in zip(grid, cfg.patch_size)))
    example = (
        torch.randn(shapes["x"], dtype=weight.dtype, device=weight.device),
        torch.randn(shapes["text"], dtype=weight.dtype, device=weight.device),
        torch.full(shapes["time"], 999.0, device=weight.device),
        build_rope(cfg, *shapes["x"][:3], dtype=weight.dtype, device=weight.device),
    )
    dims = [torch.export.Dim(name, min=1) for name in ("T", "h_patches", "w_patches")]
    latent_dims = {axis: dim * p if p > 1 else dim for axis, (dim, p) in enumerate(zip(dims, cfg.patch_size))}
    dynamic_shapes = {"x": latent_dims, "text": None, "time": None, "rope": dict(enumerate(dims))}

    form = dit.attention
    dit.attention = "explicit"
    try:
        program = torch.onnx.export(
            dit,
            example,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    finally:
        dit.attention = form
    assert program is not None  # the dynamo exporter always returns its program
    return program.model
