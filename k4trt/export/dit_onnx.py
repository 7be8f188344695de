"""DiT → ONNX: the graphs TensorRT builds the DiT engines from (`dit.bf16.onnx`, `dit.fp8.onnx`).

Exporter: torch.onnx's torch.export-based ("dynamo") exporter. It takes T, h and w as symbols with their
relations (x's height is twice the rope's), so torch.export proves one graph right for every size instead of
tracing one example; it keeps the model's dtype flow (bf16 weights, the explicit Casts of `k4trt.models.dit`,
LayerNorms in float32) as it is; parameters keep their state-dict names as initializer names, which the FP8
pass relies on; and its optimizer folds the shape arithmetic away. The TorchScript exporter is deprecated
since torch 2.9 and leaves hundreds of Constant and shape nodes in the same graph.

The graph's names, dtypes and dynamic axes are the registry's (`k4trt.core.graphs.dit_graph`).

Opset 20: FP8 QuantizeLinear/DequantizeLinear need ≥ 19, and 20 is the highest every TensorRT 10.x parser
reads (onnx-tensorrt operators.md for 10.0: opsets 9–20). It also has LayerNormalization and Gelu as single ops.

Attention is exported in the model's "explicit" form: q·(1/√d) → MatMul(·, kᵀ) → Softmax → MatMul(·, v), the
pattern TensorRT's multi-head-attention fusion turns into one flash-attention kernel (it asks for the scale on
Q or K, or √scale on both, before the first MatMul; the model puts the exact 1/8 on q). ONNX's own Attention
op (opset 23) is not used: TensorRT's parser reads it only from 10.14 on (onnx-tensorrt 10.14 release notes),
and this project supports TensorRT from 10.8.

A sequence-parallel graph (`dit.sp{P}.<precision>`, a spec with a degree) is the same DiT with one rank's rows
in and out (`k4trt.parallel.dit.SequenceParallelDiT`), the same attention form, and its two head exchanges
as TensorRT `DistCollective` all-to-all nodes (`k4trt.parallel.collective`); its float32 twin carries them in
onnxruntime-extensions' custom-op domain, where ONNX Runtime runs them over the process group.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from k4trt.config import TEXT_TOKENS
from k4trt.core.graphs import GraphSpec, dit_input_shapes
from k4trt.export.fp8 import FP8Scales, quantize_dit_graph
from k4trt.export.onnx_files import OPSET, save_onnx
from k4trt.fsutil import atomic_path
from k4trt.models.dit import DiT, build_rope, explicit_attention, patchify
from k4trt.parallel.collective import OP_TYPE, ORT_PY_OP_DOMAIN, onnx_all_to_all
from k4trt.parallel.dit import SequenceParallelDiT
from k4trt.parallel.layout import TokenLayout


def export_dit(dit: DiT, spec: GraphSpec, path: Path, *, fp8: FP8Scales | None = None, fp8_attention: bool = False) -> None:
    """Write the DiT as the graph `spec` at `path` (weights in `<name>.data` beside it), in the dtype of its weights.

    With `fp8`, every block's four Linears get FP8 Q/DQ from those calibrated scales (`k4trt.export.fp8`); with
    `fp8_attention` too, so do the attention matmuls. One graph serves every (T, h, w)."""
    if fp8_attention and fp8 is None:
        raise ValueError("fp8_attention needs fp8 scales")
    model = _to_onnx(dit, spec)
    if fp8 is not None:
        quantize_dit_graph(model, dit, fp8, attention=fp8_attention)
    save_onnx(model, path)


def _to_onnx(dit: DiT, spec: GraphSpec) -> ir.Model:
    """Export with the explicit attention form; the example size (2, 3, 5 patches) is arbitrary, kept away
    from 0 and 1, which torch.export would specialize, and from repeated values, which it could tie."""
    module: nn.Module = dit.with_attention(explicit_attention)
    example = _example(dit, spec, (2, 3, 5))
    if spec.degree > 1:
        module = SequenceParallelDiT(module, onnx_all_to_all(spec.degree), spec.degree)  # type: ignore[arg-type]
    program = torch.onnx.export(
        module,
        example,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_shapes=dynamic_shapes(spec),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    return program.model


def _example(dit: DiT, spec: GraphSpec, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Inputs of `spec` for latents of `grid` patches: the whole latents, or rank 0's rows of them."""
    cfg, weight = dit.cfg, next(dit.parameters())
    latent = tuple(n * p for n, p in zip(grid, cfg.patch_size))
    shapes = dit_input_shapes(cfg, *latent)
    x = torch.randn(shapes["x"], dtype=weight.dtype, device=weight.device)
    text = torch.randn(shapes["text"], dtype=weight.dtype, device=weight.device)
    time = torch.full(shapes["time"], 999.0, device=weight.device)
    rope = build_rope(cfg, *latent, dtype=weight.dtype, device=weight.device)
    if spec.degree == 1:
        return x, text, time, rope
    layout = TokenLayout(spec.degree, grid[0] * grid[1] * grid[2], TEXT_TOKENS)
    rows = patchify(x, cfg.patch_size).flatten(0, 2)
    return (layout.visual_rows(rows, 0), layout.text_block(text, 0), time,
            layout.visual_rows(rope.flatten(0, 2), 0), layout.order(weight.device))


def move_exchange_to_custom_domain(twin: Path) -> None:
    """In the float32 twin of a sequence-parallel graph, put the DistCollective nodes into onnxruntime-
    extensions' custom-op domain, where ONNX Runtime finds the Python op that carries them. Only the .onnx
    is rewritten; its external data stays as written."""
    model = onnx.load(str(twin), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == "":
            node.domain = ORT_PY_OP_DOMAIN
    if not any(o.domain == ORT_PY_OP_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(ORT_PY_OP_DOMAIN, 1))
    with atomic_path(twin) as tmp:
        tmp.write_bytes(model.SerializeToString())


def dynamic_shapes(spec: GraphSpec) -> list[dict[int, torch.export.Dim] | None]:
    """torch.export's form of the registry's dynamic axes, one Dim per symbol, in input order."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(symbol: str, factor: int) -> torch.export.Dim:
        base = dims.setdefault(symbol, torch.export.Dim(symbol, min=1))
        return base * factor if factor > 1 else base

    return [{axis: dim(a.symbol, a.factor) for axis, a in t.dynamic.items()} or None for t in spec.inputs]
