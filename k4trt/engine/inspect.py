"""After every build: what TensorRT made of the graph, read back through its engine inspector.

TensorRT Developer Guide, "Engine Inspector": `engine.create_engine_inspector()`, optionally given an execution
context whose input shapes are set (then dynamic dimensions are concrete), returns with
`get_engine_information(LayerInformationFormat.JSON)` `{"Layers": [...], ...}`; at DETAILED profiling
verbosity every layer is an object with "Name", "LayerType", "Inputs" and "Outputs" (each tensor with "Name",
"Dimensions" and its type), "ParameterType", "TacticValue", "Metadata". TensorRT 10 writes a tensor's type as
one "Format/Datatype" string ("Row major linear BF16 format (kLINEAR)"); TensorRT 11 splits it into "Format"
and "DataType" and replaces the engine-level "Bindings" by "I/O Tensors" (Migration Guide, "Migrating
IEngineInspector Usage from TensorRT 10.x to 11.x"). Both forms are read.

Recorded per plan (`k4trt.core.manifest.Inspection`): the layers that run a whole attention, the number of
FP8 GEMM layers and the largest activation, at the profile's largest input shapes. The DiT's plan is refused
when its attention did not fuse: a layer that holds a score tensor (two trailing dimensions equal to the
joint sequence length) or a stand-alone softmax (the DiT has no other) means TensorRT decomposed attention
into BMM-Softmax-BMM, which at 12 s of 672x384 materialises 48·25 424² bf16 scores, 62 GB, per block.
The rule is structural (shapes and layer kinds), not a kernel-name list: kernel names change between releases.

Tested on the CPU with inspector JSON in the documented forms; no real engine's JSON has been read yet
(TensorRT cannot be installed where this was written).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from k4trt.core.manifest import Activation, Inspection
from k4trt.errors import K4TRTError

if TYPE_CHECKING:
    import tensorrt as trt

Shape = tuple[int, ...]

# Element sizes by the names TensorRT's inspector gives types (checked in this order: "BFloat16" contains
# "float", "Int8" is in "UInt8").
_SIZES = (("fp8", 1.0), ("e4m3", 1.0), ("bf16", 2.0), ("bfloat16", 2.0), ("fp16", 2.0), ("half", 2.0),
          ("fp32", 4.0), ("float", 4.0), ("int64", 8.0), ("int32", 4.0), ("uint8", 1.0), ("int8", 1.0),
          ("bool", 1.0), ("fp4", 0.5), ("int4", 0.5))
_GEMM = ("gemm", "matrixmultiply", "matmul", "convolution", "fullyconnected")
_ATTENTION = ("attention", "mha")


class AttentionNotFused(K4TRTError):
    """The DiT's plan computes attention in several layers instead of one fused kernel."""


def inspect_engine(engine: trt.ICudaEngine, shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """The engine inspector's JSON for `engine` with its inputs at `shapes`. The context exists only to fix
    those shapes: it gets no device memory (USER_MANAGED) and never runs."""
    import tensorrt as trt

    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise K4TRTError("TensorRT could not create an execution context to inspect the engine")
    for name, shape in shapes.items():
        context.set_input_shape(name, shape)
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def summarize(info: Mapping[str, Any], version: str, shapes: Mapping[str, Shape]) -> Inspection:
    """The record of one plan from the inspector's JSON `info` (either TensorRT's form)."""
    layers = _layers(info)
    largest: Activation | None = None
    for layer in layers:
        for tensor in layer.get("Outputs", []):
            size = _bytes(tensor)
            if size is not None and (largest is None or size > largest.bytes):
                largest = Activation(str(layer["Name"]), str(tensor.get("Name", "")), _dims(tensor), size)
    return Inspection(
        tensorrt_version=version,
        shapes={name: tuple(shape) for name, shape in shapes.items()},
        layers=len(layers),
        attention_layers=tuple(str(layer["Name"]) for layer in layers if _kind_has(layer, _ATTENTION)),
        fp8_gemm_layers=sum(1 for layer in layers if _kind_has(layer, _GEMM) and _has_fp8_input(layer)),
        largest_activation=largest,
    )


def require_fused_attention(info: Mapping[str, Any], sequence: int, plan: str, version: str) -> None:
    """Raise AttentionNotFused, naming the first offending layer and the TensorRT version, where `info` shows
    attention decomposed for a joint sequence of `sequence` tokens."""
    for layer in _layers(info):
        name = str(layer["Name"])
        if _kind_has(layer, ("softmax",)):
            why = "is a stand-alone softmax"
        else:
            scores = next((t for t in _tensors(layer) if _is_score(_dims(t), sequence)), None)
            if scores is None:
                continue
            why = f"holds a {list(_dims(scores))} score tensor ({_gib(_bytes(scores))})"
        raise AttentionNotFused(
            f"{plan}: TensorRT {version} did not fuse the DiT's attention: layer {name!r} {why}; this TensorRT has "
            "no fused attention kernel for this graph on this GPU (head dim 64, bf16): build with another TensorRT "
            "release, or report the layer above")


def _layers(info: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    layers = info.get("Layers")
    if not isinstance(layers, list):
        raise K4TRTError("the engine inspector returned no layer list; rebuild the engine")
    if layers and not all(isinstance(layer, Mapping) for layer in layers):
        raise K4TRTError("the engine carries layer names only (built without DETAILED profiling verbosity); rebuild "
                         "it with this k4trt")
    return layers


def _tensors(layer: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield from layer.get("Inputs", [])
    yield from layer.get("Outputs", [])


def _kind_has(layer: Mapping[str, Any], words: Sequence[str]) -> bool:
    kind = f"{layer.get('LayerType', '')} {layer.get('ParameterType', '')}".lower()
    return any(word in kind for word in words)


def _type_name(tensor: Mapping[str, Any]) -> str:
    return str(tensor.get("DataType") or tensor.get("Format/Datatype") or "").lower()


def _has_fp8_input(layer: Mapping[str, Any]) -> bool:
    return any(_element_size(t) == 1.0 and ("fp8" in _type_name(t) or "e4m3" in _type_name(t))
               for t in layer.get("Inputs", []))


def _element_size(tensor: Mapping[str, Any]) -> float | None:
    name = _type_name(tensor)
    return next((size for word, size in _SIZES if word in name), None)


def _dims(tensor: Mapping[str, Any]) -> Shape:
    return tuple(int(d) for d in tensor.get("Dimensions", []))


def _bytes(tensor: Mapping[str, Any]) -> int | None:
    dims, size = _dims(tensor), _element_size(tensor)
    if size is None or any(d < 0 for d in dims):
        return None  # a type the table does not know, or a dynamic dimension the inspector left open
    return math.ceil(math.prod(dims) * size)


def _is_score(dims: Shape, sequence: int) -> bool:
    return len(dims) >= 2 and dims[-1] == dims[-2] == sequence


def _gib(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 2**30:.1f} GiB"
