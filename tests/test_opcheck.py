"""opcheck: the FP8 DiT graph without FP8 attention passes it, graphs crafted off TensorRT's table fail it."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.errors import K4TRTError
from k4trt.core.graphs import dit_graph
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
        "ai.onnx::Unique: not supported by TensorRT 10.x (1 node, e.g. 'unique')",
    ]
    with pytest.raises(K4TRTError, match=r"com.microsoft::FusedMatMul.*ai.onnx::Unique.*build-engines --force") as e:
        require_supported(path)
    assert "\n" not in str(e.value)


def test_newer_ops_and_opsets_need_a_newer_tensorrt(tmp_path):
    q = tensor("q", TensorProto.FLOAT, [1, 2, 4, 8])
    path = save(tmp_path, [helper.make_node("Attention", ["q", "q", "q"], ["y"], name="attention")],
                [q], [tensor("y", TensorProto.FLOAT, [1, 2, 4, 8])], opset=23)
    assert check_graph(path) == [
        "opset 23 is outside 9–20, the range every TensorRT 10.x parses",
        "ai.onnx::Attention: needs TensorRT ≥ 10.14 (1 node, e.g. 'attention')",
    ]
    path = save(tmp_path, [helper.make_node("Gelu", ["x"], ["y"])], [tensor("x", TensorProto.FLOAT, [2])],
                [tensor("y", TensorProto.FLOAT, [2])], opset=19)
    assert check_graph(path) == ["ai.onnx::Gelu: not defined in opset 19 (1 node)"]


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
        "ai.onnx::QuantizeLinear on FLOAT8E5M2: TensorRT's QuantizeLinear does not take FLOAT8E5M2 (1 node, e.g. 'quantize')",
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

    for op, expected in (("Relu", []), ("Unique", ["ai.onnx::Unique: not supported by TensorRT 10.x (1 node)"])):
        path = save(tmp_path, [helper.make_node(f"With{op}", ["x"], ["y"], domain="local")],
                    [tensor("x", TensorProto.FLOAT, [3])], [tensor("y", TensorProto.FLOAT, [None])],
                    functions=[function(op)])
        assert check_graph(path) == expected
