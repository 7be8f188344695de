"""opcheck: the FP8 DiT graph without FP8 attention passes it, graphs crafted off TensorRT 11's table or its
restrictions fail it."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.core.graphs import dit_graph
from k4trt.errors import K4TRTError
from k4trt.export.dit_onnx import export_dit
from k4trt.export.fp8 import calibrate_dit
from k4trt.export.opcheck import check_graph, require_supported
from k4trt.export.twin import write_float32_twin
from k4trt.models.dit import DiT, build_rope

TINY = DiTConfig(in_text_dim=32, time_dim=32, model_dim=128, ff_dim=256, num_blocks=1)


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """dit.fp8.onnx with FP8 Linears only (fp8_attention=False) and its twin, from a random tiny DiT."""
    g = torch.Generator().manual_seed(0)
    dit = DiT(TINY).requires_grad_(False).eval()
    for p in dit.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    size = (2, 4, 4)
    batch = (torch.randn(*size, 16, generator=g), torch.randn(TEXT_TOKENS, 32, generator=g), torch.tensor([500.0]),
             build_rope(TINY, *size, dtype=torch.float32))
    scales = calibrate_dit(dit, [batch])
    folder = tmp_path_factory.mktemp("engines")
    export_dit(dit.bfloat16(), dit_graph("fp8", dit.cfg), folder / "dit.fp8.onnx", fp8=scales)
    write_float32_twin(folder / "dit.fp8.onnx", folder / "dit.fp8.f32.onnx")
    return folder


def test_fp8_graph_and_twin_pass(fp8_folder):
    assert check_graph(fp8_folder / "dit.fp8.onnx") == []
    assert check_graph(fp8_folder / "dit.fp8.f32.onnx") == []
    require_supported(fp8_folder / "dit.fp8.onnx")


def test_without_fp8_attention_only_the_linears_are_quantized(fp8_folder):
    graph = onnx.load(fp8_folder / "dit.fp8.onnx", load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    fp8_weights = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8_weights) == 4 * 2 * TINY.num_blocks
    for node in graph.node:
        if node.op_type == "MatMul" or node.op_type == "Softmax":
            assert all(producer.get(i) != "DequantizeLinear" for i in node.input), node.name
        if node.op_type == "Softmax":
            assert all(n.op_type != "QuantizeLinear" for n in graph.node if node.output[0] in n.input)


def save(tmp_path, nodes, inputs, outputs, initializers=(), opset=20, functions=(), name="crafted.onnx"):
    graph = helper.make_graph(nodes, "crafted", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(f.domain, 1) for f in functions)]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    path = tmp_path / name
    onnx.save(model, path)
    return path


def tensor(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_foreign_and_unsupported_ops_are_named_with_their_domain(tmp_path):
    path = save(
        tmp_path,
        [helper.make_node("FusedMatMul", ["a", "b"], ["c"], domain="com.microsoft", name="fused"),
         helper.make_node("Unique", ["c"], ["d"], name="unique")],
        [tensor("a", TensorProto.FLOAT, [2, 2]), tensor("b", TensorProto.FLOAT, [2, 2])],
        [tensor("d", TensorProto.FLOAT, [None])],
    )
    problems = check_graph(path)
    assert problems == [
        "com.microsoft::FusedMatMul: not a standard ONNX op (1 node, e.g. 'fused')",
        "ai.onnx::Unique: not supported by TensorRT 11 (1 node, e.g. 'unique')",
    ]
    with pytest.raises(K4TRTError, match=r"com.microsoft::FusedMatMul.*ai.onnx::Unique.*build-engines --force") as e:
        require_supported(path)
    assert "\n" not in str(e.value)


def test_opset_23_attention_passes_and_newer_opsets_do_not(tmp_path):
    q = tensor("q", TensorProto.FLOAT, [1, 2, 4, 8])
    y = tensor("y", TensorProto.FLOAT, [1, 2, 4, 8])
    path = save(tmp_path, [helper.make_node("Attention", ["q", "q", "q"], ["y"], name="attention", scale=0.125)],
                [q], [y], opset=23)
    assert check_graph(path) == []
    path = save(tmp_path, [helper.make_node("Relu", ["q"], ["y"])], [q], [y], opset=25)
    assert check_graph(path) == ["opset 25 is outside 9–24, the range TensorRT 11 parses"]
    path = save(tmp_path, [helper.make_node("Gelu", ["x"], ["y"])], [tensor("x", TensorProto.FLOAT, [2])],
                [tensor("y", TensorProto.FLOAT, [2])], opset=19)
    assert check_graph(path) == ["ai.onnx::Gelu: not defined in opset 19 (1 node)"]


def test_attention_restrictions_of_the_table(tmp_path):
    """TensorRT's importer: 4-D Q/K/V, no softcap or qk_matmul_output_mode, no KV-cache inputs or outputs."""
    q3 = tensor("q3", TensorProto.FLOAT, [2, 4, 16])
    q4 = tensor("q4", TensorProto.FLOAT, [1, 2, 4, 8])
    nodes = [
        helper.make_node("Attention", ["q3", "q3", "q3"], ["y3"], name="three_d", q_num_heads=2, kv_num_heads=2),
        helper.make_node("Attention", ["q4", "q4", "q4"], ["y4"], name="softcapped", softcap=30.0),
        helper.make_node("Attention", ["q4", "q4", "q4", "", "q4", "q4"], ["y5", "present_k", "present_v"],
                         name="cached"),
    ]
    outputs = [tensor("y3", TensorProto.FLOAT, [2, 4, 16]), tensor("y4", TensorProto.FLOAT, [1, 2, 4, 8]),
               tensor("y5", TensorProto.FLOAT, [1, 2, 4, 8]), tensor("present_k", TensorProto.FLOAT, None)]
    problems = check_graph(save(tmp_path, nodes, [q3, q4], outputs, opset=23))
    assert problems == [
        "ai.onnx::Attention: Q, K, V and attn_mask must be 4-D (1 node, e.g. 'three_d')",
        "ai.onnx::Attention: attribute softcap is unsupported (1 node, e.g. 'softcapped')",
        "ai.onnx::Attention: past_key, past_value and nonpad_kv_seqlen inputs are unsupported (1 node, e.g. 'cached')",
        "ai.onnx::Attention: present_key, present_value and qk_matmul_output outputs are unsupported "
        "(1 node, e.g. 'cached')",
    ]


def test_pad_slice_and_resize_restrictions(tmp_path):
    x = tensor("x", TensorProto.FLOAT, [1, 1, 4, 4])
    axes_in = tensor("axes_in", TensorProto.INT64, [1])
    const = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 2), ("a", 3), ("p", 1))]
    pads = helper.make_tensor("pads", TensorProto.INT64, [2], [1, 1])
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 1, 8, 8])
    nodes = [
        helper.make_node("Slice", ["x", "s", "e", "a"], ["ok_slice"], name="slice_ok"),
        helper.make_node("Slice", ["x", "s", "e", "axes_in"], ["bad_slice"], name="slice_dynamic_axes"),
        helper.make_node("Pad", ["x", "pads", "", "axes_in"], ["bad_pad"], name="pad_dynamic_axes"),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["ok_resize"], name="resize_ok", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["bad_resize"], name="resize_cubic", mode="cubic",
                         antialias=1),
    ]
    outputs = [tensor(n, TensorProto.FLOAT, None) for n in ("ok_slice", "bad_slice", "bad_pad", "ok_resize", "bad_resize")]
    problems = check_graph(save(tmp_path, nodes, [x, axes_in], outputs, [*const, pads, sizes], opset=23))
    assert problems == [
        "ai.onnx::Slice: axes must be an initializer (1 node, e.g. 'slice_dynamic_axes')",
        "ai.onnx::Pad: axes must be an initializer (1 node, e.g. 'pad_dynamic_axes')",
        "ai.onnx::Resize: mode 'cubic' is unsupported (supported: linear, nearest) (1 node, e.g. 'resize_cubic')",
        "ai.onnx::Resize: antialiasing is unsupported (1 node, e.g. 'resize_cubic')",
    ]


def test_quantize_zero_points_must_be_zero(tmp_path):
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])
    zero = helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0])
    two = helper.make_tensor("two", TensorProto.FLOAT8E4M3FN, [], [2])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="zero_ok"),
             helper.make_node("DequantizeLinear", ["q", "scale", "two"], ["y"], name="zero_two")]
    path = save(tmp_path, nodes, [tensor("x", TensorProto.FLOAT, [4])], [tensor("y", TensorProto.FLOAT, [4])],
                [scale, zero, two], opset=23)
    assert check_graph(path) == ["ai.onnx::DequantizeLinear: the zero point must be 0 (1 node, e.g. 'zero_two')"]


def test_types_off_the_table_are_named(tmp_path):
    zero = helper.make_tensor("zero", TensorProto.FLOAT8E5M2, [], [0])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0])
    path = save(
        tmp_path,
        [helper.make_node("Softmax", ["x64"], ["s64"], name="softmax"),
         helper.make_node("Cast", ["s64"], ["s32"], to=TensorProto.FLOAT, name="cast"),
         helper.make_node("QuantizeLinear", ["s32", "scale", "zero"], ["q"], name="quantize")],
        [tensor("x64", TensorProto.DOUBLE, [4])],
        [tensor("q", TensorProto.FLOAT8E5M2, [4])],
        [zero, scale],
    )
    assert check_graph(path) == [
        "ai.onnx::Softmax on DOUBLE: TensorRT's Softmax does not take DOUBLE (1 node, e.g. 'softmax')",
        "ai.onnx::Cast on DOUBLE: TensorRT's Cast does not take DOUBLE (1 node, e.g. 'cast')",
        "ai.onnx::QuantizeLinear on FLOAT8E5M2: TensorRT's QuantizeLinear does not take FLOAT8E5M2 "
        "(1 node, e.g. 'quantize')",
        "tensor type FLOAT8E5M2: not a TensorRT type (2 tensors, e.g. 'q')",
    ]


def test_shape_and_index_inputs_are_not_held_to_the_data_types(tmp_path):
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 1, 8, 8])
    zero = helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0])
    scale = helper.make_tensor("scale", TensorProto.BFLOAT16, [], [1.0])
    path = save(
        tmp_path,
        [helper.make_node("Resize", ["x", "", "", "sizes"], ["r"], mode="nearest"),
         helper.make_node("QuantizeLinear", ["r", "scale", "zero"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])],
        [tensor("x", TensorProto.BFLOAT16, [1, 1, 4, 4])],
        [tensor("y", TensorProto.BFLOAT16, [1, 1, 8, 8])],
        [sizes, zero, scale],
    )
    assert check_graph(path) == []


def test_local_functions_are_checked_by_their_bodies(tmp_path):
    def function(op):
        return helper.make_function("local", f"With{op}", ["x"], ["y"], [helper.make_node(op, ["x"], ["y"])],
                                    [helper.make_opsetid("", 20)])

    for op, expected in (("Relu", []), ("Unique", ["ai.onnx::Unique: not supported by TensorRT 11 (1 node)"])):
        path = save(tmp_path, [helper.make_node(f"With{op}", ["x"], ["y"], domain="local")],
                    [tensor("x", TensorProto.FLOAT, [3])], [tensor("y", TensorProto.FLOAT, [None])],
                    functions=[function(op)])
        assert check_graph(path) == expected
