"""Float32 twins of bf16 ONNX graphs.

ONNX Runtime's CPU provider has kernels for few bf16 ops, so the bf16 graphs sent to TensorRT cannot run there.
Their twin is the same graph, node for node, with bf16 replaced by float32: bf16 initializers and constant
attributes are widened (exactly: every bf16 value is a float32 value), Cast(to=bf16) becomes Cast(to=float32),
and every bf16 graph input, output and intermediate type becomes float32. FP8 QuantizeLinear/DequantizeLinear
stay; their bf16 scales widen like any initializer, so they quantize with the same scale values. Running the
twin therefore checks the exact file TensorRT builds from, except for the rounding of intermediates to bf16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from k4trt.export.onnx_files import save_onnx

_BF16, _F32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT


def write_float32_twin(src: Path, dst: Path) -> None:
    """Write the float32 twin of the ONNX graph `src` to `dst` (weights in `dst`'s own `.data` file).

    Weights are widened one tensor at a time while `dst` is written, so a 22 GB twin of an 11 GB graph never
    has to fit in memory."""
    model = ir.load(src)
    graph = model.graph
    if model.functions or next(graph.subgraphs(), None) is not None:
        raise ValueError(f"{src}: graphs with local functions or subgraphs have no float32 twin here")
    for value in (*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)):
        if value.dtype == _BF16:
            value.type = ir.TensorType(_F32)
        if value.const_value is not None and value.const_value.dtype == _BF16:
            value.const_value = _widened(value.const_value)
    for node in graph:
        _widen_attributes(node)
    save_onnx(model, dst)


def _widened(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    def load() -> ir.Tensor:
        return ir.Tensor(tensor.numpy().astype(np.float32), name=tensor.name)

    return ir.LazyTensor(load, dtype=_F32, shape=ir.Shape(tensor.shape.numpy()), name=tensor.name)


def _widen_attributes(node: ir.Node) -> None:
    """Cast(to=bf16) → Cast(to=float32); bf16 tensor attributes (Constant, ConstantOfShape values) widened."""
    for name, attr in list(node.attributes.items()):
        if node.op_type == "Cast" and node.domain == "" and name == "to" and attr.as_int() == _BF16:
            node.attributes[name] = ir.AttrInt64(name, _F32)
        elif attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == _BF16:
            widened = ir.Tensor(attr.as_tensor().numpy().astype(np.float32), name=attr.as_tensor().name)
            node.attributes[name] = ir.AttrTensor(name, widened)
