"""The engine inspector check on the CPU, fed inspector JSON in the form the TensorRT documentation shows.

Layers are objects as `get_engine_information(LayerInformationFormat.JSON)` prints them at DETAILED profiling
verbosity (Developer Guide, "Engine Inspector": "Name", "LayerType", "Inputs"/"Outputs" with "Name",
"Location", "Dimensions" and "Format/Datatype", "ParameterType", "TacticValue", "StreamId", "Metadata"), and in
TensorRT 11's form, where a tensor's "Format/Datatype" is split into "Format" and "DataType" and "Bindings"
became "I/O Tensors" (Migration Guide, "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x").
The sequence length and layer counts are drawn at random per run; the expected values are computed here from
the same numbers, independently of the module's parsing.
"""

from __future__ import annotations

import json
import random

import pytest

from k4trt.engine.inspect import AttentionNotFused, require_fused_attention, summarize

TYPES_10 = {"bf16": "Row major linear BF16 format (kLINEAR)", "fp8": "Row major linear FP8 format (kLINEAR)",
            "fp32": "Row major linear FP32 format (kLINEAR)"}
TYPES_11 = {"bf16": ("BFloat16", "Row major linear BF16 format (kLINEAR)"),
            "fp8": ("FP8", "Row major linear FP8 format (kLINEAR)"),
            "fp32": ("Float", "Row major linear FP32 format (kLINEAR)")}


def tensor(form: int, name: str, dims: list[int], dtype: str) -> dict:
    if form == 10:
        return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": TYPES_10[dtype]}
    data_type, layout = TYPES_11[dtype]
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format": layout, "DataType": data_type}


def layer(form: int, name: str, kind: str, inputs: list[dict], outputs: list[dict], parameter: str = "") -> dict:
    return {"Name": name, "LayerType": kind, "Inputs": inputs, "Outputs": outputs, "ParameterType": parameter,
            "TacticValue": "0x0000000000000000", "StreamId": 0, "Metadata": f"[ONNX Layer: {name}]"}


def engine(form: int, layers: list[dict]) -> dict:
    io = "Bindings" if form == 10 else "I/O Tensors"
    return json.loads(json.dumps({"Layers": layers, io: []}))  # exactly what json.loads of the inspector gives


def dit_layers(form: int, sequence: int, blocks: int, fp8_gemms: int, fused: bool) -> list[dict]:
    """A DiT-like plan: per block FP8 or bf16 GEMMs, then attention fused into one layer or decomposed."""
    heads, dim = 48, 3072
    tokens = [sequence, dim]
    layers = []
    for b in range(blocks):
        for g in range(4):
            kind = "fp8" if b * 4 + g < fp8_gemms else "bf16"
            layers.append(layer(form, f"/blocks.{b}/gemm{g}", "CaskGemmMatrixMultiply",
                                [tensor(form, f"b{b}g{g}_in", tokens, kind), tensor(form, f"b{b}g{g}_w", [dim, dim], kind)],
                                [tensor(form, f"b{b}g{g}_out", tokens, "bf16")], "Matrix multiply"))
        qkv = [tensor(form, f"b{b}_{n}", [1, heads, sequence, 64], "bf16") for n in "qkv"]
        out = tensor(form, f"b{b}_attn", [1, heads, sequence, 64], "bf16")
        if fused:
            layers.append(layer(form, f"/blocks.{b}/Attention", "Attention", qkv, [out], "Attention"))
        else:
            scores = tensor(form, f"b{b}_scores", [1, heads, sequence, sequence], "bf16")
            probabilities = tensor(form, f"b{b}_probs", [1, heads, sequence, sequence], "bf16")
            layers += [layer(form, f"/blocks.{b}/MatMul", "CaskGemmMatrixMultiply", qkv[:2], [scores], "Matrix multiply"),
                       layer(form, f"/blocks.{b}/Softmax", "SoftMax", [scores], [probabilities], "SoftMax"),
                       layer(form, f"/blocks.{b}/MatMul_1", "CaskGemmMatrixMultiply", [probabilities, qkv[2]], [out],
                             "Matrix multiply")]
    return layers


@pytest.mark.parametrize("form", [10, 11])
def test_a_fused_plan_is_recorded_with_its_attention_layers_fp8_gemms_and_largest_activation(form):
    rng = random.Random()
    sequence, blocks = rng.randrange(300, 26_000), rng.randrange(1, 5)
    fp8_gemms = rng.randrange(0, 4 * blocks + 1)
    info = engine(form, dit_layers(form, sequence, blocks, fp8_gemms, fused=True))
    shapes = {"x": (25, 48, 84, 16)}
    require_fused_attention(info, sequence, "dit.fp8.plan", "11.4.0.106")  # does not raise
    record = summarize(info, "11.4.0.106", shapes)
    assert record.layers == 5 * blocks and record.tensorrt_version == "11.4.0.106" and record.shapes == shapes
    assert record.attention_layers == tuple(f"/blocks.{b}/Attention" for b in range(blocks))
    assert record.fp8_gemm_layers == fp8_gemms
    largest = record.largest_activation
    # the largest output: [1, 48, S, 64] bf16 (attention) against [S, 3072] bf16 (a GEMM): 48·64 = 3072, a tie
    # the first one written wins, which is block 0's first GEMM
    assert largest is not None and largest.bytes == sequence * 3072 * 2
    assert (largest.layer, largest.tensor, largest.shape) == ("/blocks.0/gemm0", "b0g0_out", (sequence, 3072))


@pytest.mark.parametrize("form", [10, 11])
def test_a_decomposed_attention_is_refused_naming_the_layer_and_the_tensorrt_version(form):
    sequence = random.randrange(300, 26_000)
    info = engine(form, dit_layers(form, sequence, 2, 0, fused=False))
    with pytest.raises(AttentionNotFused) as refused:
        require_fused_attention(info, sequence, "dit.bf16.plan", "11.4.0.106")
    message = str(refused.value)
    gib = 48 * sequence * sequence * 2 / 2**30
    assert message.startswith(f"dit.bf16.plan: TensorRT 11.4.0.106 did not fuse the DiT's attention: layer "
                              f"'/blocks.0/MatMul' holds a [1, 48, {sequence}, {sequence}] score tensor ({gib:.1f} GiB)")
    assert "\n" not in message
    record = summarize(info, "11.4.0.106", {})
    assert record.attention_layers == () and record.largest_activation is not None
    assert record.largest_activation.bytes == 48 * sequence * sequence * 2


def test_a_stand_alone_softmax_is_refused_even_when_its_shapes_are_unknown():
    info = engine(11, [layer(11, "/blocks.0/Softmax", "SoftMax", [tensor(11, "s", [-1, 48, -1, -1], "bf16")],
                             [tensor(11, "p", [-1, 48, -1, -1], "bf16")], "SoftMax")])
    with pytest.raises(AttentionNotFused, match=r"layer '/blocks.0/Softmax' is a stand-alone softmax"):
        require_fused_attention(info, 1000, "dit.bf16.plan", "11.4.0.106")
    assert summarize(info, "11.4.0.106", {}).largest_activation is None  # dynamic dims: size unknown, not guessed


def test_a_plan_with_layer_names_only_is_named_as_such():
    with pytest.raises(Exception, match="layer names only"):
        summarize({"Layers": ["a + b", "c"], "Bindings": ["x", "velocity"]}, "10.14.1", {})
