"""Does an ONNX graph stay within what TensorRT 10.x parses? Checked on the CPU, before any engine build.

The table is onnx-tensorrt's docs/operators.md for TensorRT 10.0/10.1 ("opset 9 to opset 20"): the ops marked
supported and, per op, the input types its "Supported Types" column lists. The project requires TensorRT ≥ 10.8
(pyproject), so what 10.0 parses every supported version parses. Ops the parser gained later are listed apart
with the release that first documents them, and count as unsupported, since an older TensorRT would refuse
the graph only at build time on the GPU machine.

The graph is loaded without its external data: only names, types and attributes are read, so a graph of any
size is checked in well under a second.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx

from k4trt.errors import K4TRTError

MAX_OPSET = 20  # the highest opset every TensorRT 10.x parser reads (10.0's operators.md: "opset 9 to opset 20")
MIN_OPSET = 9

# Element types TensorRT networks carry ("TensorRT supports the following ONNX data types"). FP8 is E4M3FN only;
# the other float8 formats are not TensorRT types. DOUBLE is only cast down to FLOAT on import.
TENSOR_TYPES = frozenset(
    {"DOUBLE", "FLOAT", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL"}
)

_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_F_NO_BF16 = frozenset({"FLOAT", "FLOAT16"})
_NUM = _F | {"INT32", "INT64"}
_ANY = _NUM | {"BOOL"}
_BOOL = frozenset({"BOOL"})
_QUANTIZED = frozenset({"INT8", "FLOAT8E4M3FN", "INT4"})  # DequantizeLinear's column: INT8, FP8, INT4
_SECOND_SIDE = {"QuantizeLinear": _QUANTIZED, "DequantizeLinear": _F}


def _ops(names: str, types: frozenset[str]) -> dict[str, frozenset[str]]:
    return dict.fromkeys(names.split(), types)


# Op -> input element types, transcribed from onnx-tensorrt docs/operators.md at release 10.1 (10.0's table).
SUPPORTED: dict[str, frozenset[str]] = {
    **_ops(
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh "
        "CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization "
        "GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log "
        "LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus Pow "
        "PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize RNN Round "
        "ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample",
        _F,
    ),
    **_ops(
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul "
        "Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
        "ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
        _NUM,
    ),
    **_ops(
        "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop "
        "OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where",
        _ANY,
    ),
    **_ops("DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign", _F_NO_BF16),
    **_ops("And Not Or Xor", _BOOL),
    **_ops("Cast CastLike", _NUM | {"UINT8", "BOOL"}),
    "DequantizeLinear": _QUANTIZED,
    "Gelu": _NUM | {"INT8"},
    "Mean": _NUM | {"FLOAT8E4M3FN"},
}

# Ops the parser gained after 10.0, with the first TensorRT release documenting them: Attention from the 10.14
# parser release notes ("Added support for the Attention operator"); the others first appear in operators.md
# of 10.15. None exist below opset 17, and most need opset 23, above MAX_OPSET anyway.
ADDED_LATER: dict[str, str] = {
    "Attention": "10.14",
    **dict.fromkeys(
        "BlackmanWindow HammingWindow HannWindow RMSNormalization RotaryEmbedding STFT TensorScatter".split(), "10.15"
    ),
}


# Ops the engine build does not hand to the parser: a sequence-parallel graph's DistCollective all-to-all
# nodes become placeholders the build replaces with IDistCollectiveLayers (`k4trt.engine.collectives`), so
# they need TensorRT's network API (all-to-all exists from 11.0), not its ONNX importer.
REPLACED_BY_BUILD = frozenset({"DistCollective"})


def check_graph(path: Path) -> list[str]:
    """Every op (with its domain) and every tensor type of the ONNX graph at `path` that TensorRT 10.x cannot
    parse, one line each with how many nodes or tensors it concerns; empty when the graph is within the table."""
    model = onnx.load(path, load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"opset {opset} is outside {MIN_OPSET}–{MAX_OPSET}, the range every TensorRT 10.x parses")

    types = _element_types(model)
    off_list: dict[str, list[str]] = defaultdict(list)
    for node in _nodes(model.graph.node, {(f.domain, f.name): f for f in model.functions}):
        op = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        if node.domain == "" and node.op_type in REPLACED_BY_BUILD:
            continue
        if node.domain not in ("", "ai.onnx"):
            off_list[f"{op}: not a standard ONNX op"].append(node.name)
        elif node.op_type in ADDED_LATER:
            off_list[f"{op}: needs TensorRT ≥ {ADDED_LATER[node.op_type]}"].append(node.name)
        elif node.op_type not in SUPPORTED:
            off_list[f"{op}: not supported by TensorRT 10.x"].append(node.name)
        elif not onnx.defs.has(node.op_type, opset or MAX_OPSET):
            off_list[f"{op}: not defined in opset {opset}"].append(node.name)
        else:
            for dtype in _offending_types(node, opset or MAX_OPSET, types):
                off_list[f"{op} on {dtype}: TensorRT's {node.op_type} does not take {dtype}"].append(node.name)
    problems += [f"{what} ({_count(names, 'node')})" for what, names in off_list.items()]

    by_type: dict[str, list[str]] = defaultdict(list)
    for name, dtype in types.items():
        if dtype not in TENSOR_TYPES:
            by_type[dtype].append(name)
    problems += [f"tensor type {dtype}: not a TensorRT type ({_count(names, 'tensor')})" for dtype, names in by_type.items()]
    return problems


def require_supported(path: Path) -> None:
    """Raise K4TRTError naming what TensorRT 10.x cannot parse in the graph at `path`."""
    problems = check_graph(path)
    if problems:
        raise K4TRTError(
            f"{path} has what TensorRT 10.x cannot parse: {'; '.join(problems)}; re-export it with "
            "`build-engines --force` (the exporter of another torch version may have written it)"
        )


def _offending_types(node: onnx.NodeProto, opset: int, types: dict[str, str]) -> set[str]:
    """Types outside the op's column among the inputs of the op's data type parameter ("T" where the schema
    has one, else its first input's): the column describes the data, not shapes, axes or indices. Q/DQ also
    have a second side: QuantizeLinear's zero point must be a quantized type, DequantizeLinear's scale a float.
    Cast is checked on its target type too."""
    formals = onnx.defs.get_schema(node.op_type, opset, "").inputs
    params = [formal.type_str for formal in formals]
    primary = "T" if "T" in params else params[0]
    found = set()
    for i, name in enumerate(node.input):
        if name not in types:
            continue
        formal = formals[min(i, len(formals) - 1)]  # a variadic last input repeats
        allowed = SUPPORTED[node.op_type] if formal.type_str == primary else _SECOND_SIDE.get(node.op_type)
        if allowed is not None and types[name] not in allowed:
            found.add(types[name])
    if node.op_type == "Cast":
        to = onnx.TensorProto.DataType.Name(next(a.i for a in node.attribute if a.name == "to"))
        if to not in SUPPORTED["Cast"]:
            found.add(to)
    return found


def _element_types(model: onnx.ModelProto) -> dict[str, str]:
    """Element type of every named tensor: graph inputs, outputs, value infos (completed by type inference,
    which needs no weight data), initializers and Constant outputs."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:
        pass  # the exporter's own value infos still cover most tensors
    graph = model.graph
    types = {}
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                types[node.output[0]] = attr.t.data_type
    return {name: onnx.TensorProto.DataType.Name(t) for name, t in types.items() if t}


def _nodes(nodes: Iterable[onnx.NodeProto], functions: dict[tuple[str, str], onnx.FunctionProto]) -> Iterator[onnx.NodeProto]:
    """`nodes` in order, with calls of model-local functions replaced by the functions' bodies (TensorRT
    inlines local functions, so their bodies are what it parses)."""
    for node in nodes:
        body = functions.get((node.domain, node.op_type))
        if body is None:
            yield node
        else:
            yield from _nodes(body.node, functions)


def _count(names: list[str], what: str) -> str:
    example = next((n for n in names if n), None)
    counted = f"{len(names)} {what}{'s' if len(names) != 1 else ''}"
    return f"{counted}, e.g. {example!r}" if example else counted
