"""DiT → ONNX: the graphs TensorRT builds the DiT engines from (`dit.bf16.onnx`, `dit.fp8.onnx`).

Exporter: torch.onnx's torch.export-based ("dynamo") exporter. It takes T, h and w as symbols with their
relations (x's height is twice the rope's), so torch.export proves one graph right for every size instead of
tracing one example; it keeps the model's dtype flow (bf16 weights, the explicit Casts of `k4trt.models.dit`,
LayerNorms in float32) as it is; parameters keep their state-dict names as initializer names, which the FP8
pass and the weight attachment below rely on. The TorchScript exporter is deprecated since torch 2.9.

Weights. The graph is traced from a weightless copy of the model on the meta device, and the real weights are
attached afterwards as lazy initializers, each read from the (memory-mapped) checkpoint and cast when the file
is written, one tensor at a time: the export's host memory stays near one tensor plus what the exporter
itself holds, instead of the model plus a second, serialized copy of it. The onnxscript optimizer (constant
folding, shape arithmetic) then runs on the real graph.

The graph's names, dtypes and dynamic axes are the registry's (`k4trt.core.graphs.dit_graph`).

Opset 23, for ONNX's `Attention` op: every block's attention is one `Attention` node (`onnx_attention`), which
TensorRT's parser reads from 10.14 on as a non-decomposable IAttention. With `fp8_attention` the attention
is written out (`explicit_attention`) instead, the only form in which FP8 Q/DQ can sit between its matmuls.

A sequence-parallel graph (`dit.sp{P}.<precision>`, a spec with a degree) is the same DiT with one rank's rows
in and out (`k4trt.parallel.dit.SequenceParallelDiT`), the same attention form, and its two head exchanges
as TensorRT `DistCollective` all-to-all nodes (`k4trt.parallel.collective`); its float32 twin carries them in
onnxruntime-extensions' custom-op domain, where ONNX Runtime runs them over the process group.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype
from torch import nn

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.core.graphs import GraphSpec, dit_input_shapes
from k4trt.export.fp8 import FP8Scales, quantize_dit_graph
from k4trt.export.onnx_files import OPSET, save_onnx
from k4trt.fsutil import atomic_path
from k4trt.models.dit import DiT, explicit_attention, onnx_attention, patchify
from k4trt.parallel.collective import OP_TYPE, ORT_PY_OP_DOMAIN, onnx_all_to_all
from k4trt.parallel.dit import SequenceParallelDiT
from k4trt.parallel.layout import TokenLayout


def export_dit(
    dit: DiT,
    spec: GraphSpec,
    path: Path,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    fp8: FP8Scales | None = None,
    fp8_scope: str = "all",
    fp8_attention: bool = False,
) -> None:
    """Write the DiT as the graph `spec` at `path` (weights in `<name>.data` beside it), in the dtype of `dit`'s
    parameters. `dit` may be on the meta device; `weights` (default: `dit`'s own) holds the values by state-dict
    name, in any dtype.

    With `fp8`, the block Linears of `fp8_scope` get FP8 Q/DQ from those calibrated scales
    (`k4trt.export.fp8`); with `fp8_attention` too, so do the attention matmuls. One graph serves every
    (T, h, w)."""
    if fp8_attention and fp8 is None:
        raise ValueError("fp8_attention needs fp8 scales")
    dtype = next(dit.parameters()).dtype
    values = dict(weights) if weights is not None else {k: v.detach() for k, v in dit.state_dict().items()}
    model = _to_onnx(dit, spec, explicit=fp8_attention)
    _attach(model, values, dtype)
    onnxscript.optimizer.optimize_ir(model)
    if fp8 is not None:
        quantize_dit_graph(model, dit, lambda name: values[name].to(dtype), fp8, scope=fp8_scope,
                           attention=fp8_attention)
    save_onnx(model, path)


def _to_onnx(dit: DiT, spec: GraphSpec, *, explicit: bool) -> ir.Model:
    """Trace a weightless copy; the example size (2, 3, 5 patches) is arbitrary, kept away from 0 and 1,
    which torch.export would specialize, and from repeated values, which it could tie.

    Weightless is the meta device, except for a sequence-parallel graph: the fake output of its exchange node
    (`torch.onnx.ops.symbolic`) is made on the CPU, so that copy lives on the CPU in untouched `empty` memory,
    which costs address space, not host memory."""
    cfg, dtype = dit.cfg, next(dit.parameters()).dtype
    device = torch.device("meta" if spec.degree == 1 else "cpu")
    with torch.device("meta"):
        weightless = DiT(cfg).to(dtype)
    traced: nn.Module = weightless.to_empty(device=device).with_attention(explicit_attention if explicit else onnx_attention)
    with torch.device(device):
        example = _example(cfg, dtype, spec, (2, 3, 5))
    if spec.degree > 1:
        traced = SequenceParallelDiT(traced, onnx_all_to_all(spec.degree), spec.degree)  # type: ignore[arg-type]
    program = torch.onnx.export(
        traced.requires_grad_(False).eval(),
        example,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_shapes=dynamic_shapes(spec),
        opset_version=OPSET,
        dynamo=True,
        optimize=False,  # the optimizer folds constants, which needs the real weights attached first
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    return program.model


def _example(cfg: DiTConfig, dtype: torch.dtype, spec: GraphSpec, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Inputs of `spec` (on the current device, their values unset) for latents of `grid` patches: the whole
    latents, or rank 0's rows of them."""
    latent = tuple(n * p for n, p in zip(grid, cfg.patch_size, strict=True))
    shapes = dit_input_shapes(cfg, *latent)
    x, text = torch.empty(shapes["x"], dtype=dtype), torch.empty(shapes["text"], dtype=dtype)
    time, rope = torch.empty(shapes["time"]), torch.empty(shapes["rope"], dtype=dtype)
    if spec.degree == 1:
        return x, text, time, rope
    layout = TokenLayout(spec.degree, grid[0] * grid[1] * grid[2], TEXT_TOKENS)
    rows = patchify(x, cfg.patch_size).flatten(0, 2)
    return (layout.visual_rows(rows, 0), layout.text_block(text, 0), time,
            layout.visual_rows(rope.flatten(0, 2), 0), layout.order(x.device))


def _attach(model: ir.Model, weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Give every initializer that names a weight its value, loaded (and cast) only when it is read."""
    for name, value in model.graph.initializers.items():
        if name not in weights:
            continue
        source = weights[name]
        if value.shape is None or tuple(source.shape) != tuple(value.shape.numpy()):
            raise ValueError(f"{name} has shape {tuple(source.shape)}, the graph expects {value.shape}")
        value.const_value = ir.LazyTensor(partial(_cast, source, dtype, name), dtype=from_torch_dtype(dtype),
                                          shape=ir.Shape(source.shape), name=name)


def _cast(source: torch.Tensor, dtype: torch.dtype, name: str) -> ir.TensorProtocol:
    return TorchTensor(source.detach().to(dtype), name=name)


def dynamic_shapes(spec: GraphSpec) -> list[dict[int, torch.export.Dim] | None]:
    """torch.export's form of the registry's dynamic axes, one Dim per symbol, in input order."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(symbol: str, factor: int) -> torch.export.Dim:
        base = dims.setdefault(symbol, torch.export.Dim(symbol, min=1))
        return base * factor if factor > 1 else base

    return [{axis: dim(a.symbol, a.factor) for axis, a in t.dynamic.items()} or None for t in spec.inputs]


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
