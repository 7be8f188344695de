"""Does an ONNX graph stay within what TensorRT 11 parses? Checked on the CPU, in the tests and at the end of
every export and build, before any engine build can fail on it.

The table is onnx-tensorrt's docs/operators.md of the 11.x parser line: the ops marked supported, per op the
input types its "Supported Types" column lists, and the "Restrictions" that apply to the ops our graphs use.
Its last full text read here is 10.15's ("opset 9 to opset 24"), which the 11.x parser extends (11.0 added
Swish and TensorRT's own TRT_* ops, which no standard exporter writes; 11.5 added opset 25) without
removing anything. The project needs TensorRT 10.14 or later (the first parser of `Attention`, see
`k4trt.engine.trt_api.MIN_VERSION`); where 10.14's table was stricter (Pad's and Slice's `axes` had to be
initializers) the stricter rule is checked, so a graph that passes here parses with every supported release.

Restrictions checked (the column's wording): Attention: "`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`,
`past_value` and `nonpad_kv_seqlen` inputs are unsupported. `present_key`, `present_value` and
`qk_matmul_output` outputs are unsupported. `qk_matmul_output_mode` and `softcap` attributes are
unsupported."; QuantizeLinear / DequantizeLinear: the zero point "must be 0"; LayerNormalization: "Only the
first output `Y` is supported."; Pad, Slice: `axes` an initializer; Resize: its supported transformation,
resize and nearest modes, aspect-ratio policy "stretch", no antialiasing.

The graph is loaded without its external data: only names, types, shapes and attributes are read (and small
inline constants such as zero points), so a graph of any size is checked in about a second.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from k4trt.errors import K4TRTError

TENSORRT = "TensorRT 11"
MIN_OPSET, MAX_OPSET = 9, 24  # "supports operators in the inclusive range of opset 9 to opset 24"

# Element types TensorRT networks carry ("TensorRT supports the following ONNX data types"). FP8 is E4M3FN only;
# the other float8 formats are not TensorRT types. DOUBLE is only cast down to FLOAT on import.
TENSOR_TYPES = frozenset({"DOUBLE", "FLOAT", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT4E2M1", "INT32", "INT64",
                          "INT8", "INT4", "UINT8", "BOOL"})

_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_F_NO_BF16 = frozenset({"FLOAT", "FLOAT16"})
_NUM = _F | {"INT32", "INT64"}
_ANY = _NUM | {"BOOL"}
_BOOL = frozenset({"BOOL"})
_QUANTIZED = frozenset({"INT8", "FLOAT8E4M3FN", "FLOAT4E2M1", "INT4"})


def _ops(names: str, types: frozenset[str]) -> dict[str, frozenset[str]]:
    return dict.fromkeys(names.split(), types)


# Op -> input element types, transcribed from onnx-tensorrt docs/operators.md (10.15, the 11.x line; see above).
SUPPORTED: dict[str, frozenset[str]] = {
    **_ops(
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh "
        "CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization "
        "GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log "
        "LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
        "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization "
        "RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Swish Tan Tanh "
        "ThresholdedRelu Upsample",
        _F,
    ),
    **_ops(
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul "
        "Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
        "ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
        _NUM,
    ),
    **_ops(
        "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape ReverseSequence "
        "Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where",
        _ANY,
    ),
    **_ops("BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero RoiAlign",
           _F_NO_BF16),
    **_ops("And Not Or Xor", _BOOL),
    **_ops("Cast CastLike", _NUM | {"UINT8", "BOOL"}),
    **_ops("Constant ConstantOfShape", _ANY | {"FLOAT8E4M3FN", "FLOAT4E2M1", "INT4"}),
    "Attention": _F | {"INT8", "FLOAT8E4M3FN"},
    "DequantizeLinear": _QUANTIZED,
    "Gelu": _NUM | {"INT8"},
    "Mean": _NUM | {"FLOAT8E4M3FN"},
    "STFT": frozenset({"FLOAT"}),
    "TensorScatter": _F | {"INT32"},
}
#: Q/DQ are typed per input (value, scale, zero point), the scale in the value's float type
_BY_INPUT = {"QuantizeLinear": (_F, _F, _QUANTIZED), "DequantizeLinear": (_QUANTIZED, _F, _QUANTIZED)}

_RESIZE = {
    "coordinate_transformation_mode": ("half_pixel", {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                      "asymmetric", "align_corners"}),
    "mode": ("nearest", {"nearest", "linear"}),
    "nearest_mode": ("round_prefer_floor", {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}),
    "keep_aspect_ratio_policy": ("stretch", {"stretch"}),
}


class _Graph:
    """What the checks read of a graph: element types, ranks, constant values and the consumers of each tensor."""

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except onnx.shape_inference.InferenceError:
            pass  # the exporter's own value infos still cover most tensors
        graph = model.graph
        self.types: dict[str, str] = {}
        self.ranks: dict[str, int] = {}
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type"):
                tensor_type = info.type.tensor_type
                if tensor_type.elem_type:
                    self.types[info.name] = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
                if tensor_type.HasField("shape"):
                    self.ranks[info.name] = len(tensor_type.shape.dim)
        self.constants: dict[str, onnx.TensorProto] = {}
        for tensor in graph.initializer:
            self.constants[tensor.name] = tensor
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                    self.constants[node.output[0]] = attr.t
        for name, tensor in self.constants.items():
            self.types[name] = onnx.TensorProto.DataType.Name(tensor.data_type)
            self.ranks[name] = len(tensor.dims)
        self.types = {name: t for name, t in self.types.items() if t != "UNDEFINED"}
        self.used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}

    def all_zero(self, name: str) -> bool | None:
        """Whether the constant `name` is all zeros; None where its value is not known here (external data)."""
        tensor = self.constants.get(name)
        if tensor is None or uses_external_data(tensor):
            return None
        return not numpy_helper.to_array(tensor).astype(float).any()


# Ops the engine build does not hand to the parser: a sequence-parallel graph's DistCollective all-to-all
# nodes become placeholders the build replaces with IDistCollectiveLayers (`k4trt.engine.collectives`), so
# they need TensorRT's network API (all-to-all exists from 11.0), not its ONNX importer.
REPLACED_BY_BUILD = frozenset({"DistCollective"})


def check_graph(path: Path) -> list[str]:
    """Every op (with its domain), tensor type and restriction of the ONNX graph at `path` that TensorRT 11
    cannot parse, one line each with how many nodes or tensors it concerns; empty when the graph is within
    the table."""
    model = onnx.load(path, load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"opset {opset} is outside {MIN_OPSET}–{MAX_OPSET}, the range {TENSORRT} parses")
    opset = opset or MAX_OPSET
    graph = _Graph(model)
    off_list: dict[str, list[str]] = defaultdict(list)
    for node in _nodes(model.graph.node, {(f.domain, f.name): f for f in model.functions}):
        op = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        if node.domain == "" and node.op_type in REPLACED_BY_BUILD:
            continue
        if node.domain not in ("", "ai.onnx"):
            off_list[f"{op}: not a standard ONNX op"].append(node.name)
        elif node.op_type not in SUPPORTED:
            off_list[f"{op}: not supported by {TENSORRT}"].append(node.name)
        elif not onnx.defs.has(node.op_type, opset):
            off_list[f"{op}: not defined in opset {opset}"].append(node.name)
        else:
            for dtype in _offending_types(node, opset, graph.types):
                off_list[f"{op} on {dtype}: TensorRT's {node.op_type} does not take {dtype}"].append(node.name)
            for restriction in RESTRICTIONS.get(node.op_type, _none)(node, graph):
                off_list[f"{op}: {restriction}"].append(node.name)
    problems += [f"{what} ({_count(names, 'node')})" for what, names in off_list.items()]

    by_type: dict[str, list[str]] = defaultdict(list)
    for name, dtype in graph.types.items():
        if dtype not in TENSOR_TYPES:
            by_type[dtype].append(name)
    problems += [f"tensor type {dtype}: not a TensorRT type ({_count(names, 'tensor')})" for dtype, names in by_type.items()]
    return problems


def require_supported(path: Path) -> None:
    """Raise K4TRTError naming what TensorRT 11 cannot parse in the graph at `path`."""
    problems = check_graph(path)
    if problems:
        raise K4TRTError(
            f"{path} has what {TENSORRT} cannot parse: {'; '.join(problems)}; re-export it with "
            "`build-engines --force` (the exporter of another torch version may have written it)"
        )


# ---------------------------------------------------------------- the Restrictions column

Check = Callable[[onnx.NodeProto, _Graph], list[str]]


def _none(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    return []


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _given(names: Iterable[str], index: int) -> str | None:
    names = list(names)
    return names[index] if index < len(names) and names[index] else None


def _attention(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    found = []
    ranks = [graph.ranks.get(name) for name in (*node.input[:3], _given(node.input, 3)) if name]
    if any(rank is not None and rank != 4 for rank in ranks):
        found.append("Q, K, V and attn_mask must be 4-D")
    if any(_given(node.input, i) for i in (4, 5, 6)):
        found.append("past_key, past_value and nonpad_kv_seqlen inputs are unsupported")
    if any(name in graph.used for name in node.output[1:] if name):
        found.append("present_key, present_value and qk_matmul_output outputs are unsupported")
    attributes = _attributes(node)
    found += [f"attribute {a} is unsupported" for a in ("qk_matmul_output_mode", "softcap") if a in attributes]
    return found


def _zero_point(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    zero = _given(node.input, 2)
    return ["the zero point must be 0"] if zero is not None and graph.all_zero(zero) is False else []


def _layer_norm(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    extra = [name for name in node.output[1:] if name and name in graph.used]
    return ["only the first output Y is supported"] if extra else []


def _constant_axes(index: int) -> Check:
    def check(node: onnx.NodeProto, graph: _Graph) -> list[str]:
        axes = _given(node.input, index)
        return ["axes must be an initializer"] if axes is not None and axes not in graph.constants else []

    return check


def _resize(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    attributes = _attributes(node)
    found = []
    for name, (default, allowed) in _RESIZE.items():
        value = attributes.get(name, default)
        value = value.decode() if isinstance(value, bytes) else value
        if value not in allowed:
            found.append(f"{name} {value!r} is unsupported (supported: {', '.join(sorted(allowed))})")
    if attributes.get("antialias", 0):
        found.append("antialiasing is unsupported")
    axes = attributes.get("axes")
    rank = graph.ranks.get(node.input[0])
    scales = _given(node.input, 2)
    dynamic_scales = scales is not None and scales not in graph.constants
    if isinstance(axes, list) and dynamic_scales and rank is not None and axes != list(range(rank)):
        found.append("with scales as a tensor input, axes must be 0..rank-1")
    return found


RESTRICTIONS: dict[str, Check] = {
    "Attention": _attention,
    "QuantizeLinear": _zero_point,
    "DequantizeLinear": _zero_point,
    "LayerNormalization": _layer_norm,
    "Pad": _constant_axes(3),
    "Slice": _constant_axes(3),
    "Resize": _resize,
}


# ---------------------------------------------------------------- types and traversal


def _offending_types(node: onnx.NodeProto, opset: int, types: dict[str, str]) -> set[str]:
    """Types outside the op's column among the inputs of the op's data type parameter ("T" where the schema
    has one, else its first input's): the column describes the data, not shapes, axes or indices. Q/DQ are
    checked input by input. Cast is checked on its target type too."""
    formals = onnx.defs.get_schema(node.op_type, opset, "").inputs
    params = [formal.type_str for formal in formals]
    primary = "T" if "T" in params else params[0]
    found = set()
    for i, name in enumerate(node.input):
        if name not in types:
            continue
        if node.op_type in _BY_INPUT:
            allowed: frozenset[str] | None = _BY_INPUT[node.op_type][min(i, 2)]
        else:
            formal = formals[min(i, len(formals) - 1)]  # a variadic last input repeats
            allowed = SUPPORTED[node.op_type] if formal.type_str == primary else None
        if allowed is not None and types[name] not in allowed:
            found.add(types[name])
    if node.op_type == "Cast":
        to = onnx.TensorProto.DataType.Name(next(a.i for a in node.attribute if a.name == "to"))
        if to not in SUPPORTED["Cast"]:
            found.add(to)
    return found


def _nodes(nodes: Iterable[onnx.NodeProto],
           functions: dict[tuple[str, str], onnx.FunctionProto]) -> Iterator[onnx.NodeProto]:
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
