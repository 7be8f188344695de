"""The DiT's ONNX export, run through its float32 twin in ONNX Runtime against the torch model.

What is exported is the bf16 graph, because that is the file TensorRT receives; a float32 export would test a
graph nobody builds. Its twin computes in float32 with the bf16 weights widened exactly, so the reference is
the same DiT in float32 with its weights rounded to bf16: every Cast of the model's dtype flow is then a no-op
on both sides and both compute the same function, differing only in float32 rounding order.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dit_cases import TINY, random_dit, random_inputs

from k4trt.config import TEXT_TOKENS
from k4trt.core.graphs import dit_graph, dit_input_shapes
from k4trt.errors import K4TRTError
from k4trt.export.dit_onnx import export_dit
from k4trt.export.opcheck import check_graph
from k4trt.export.twin import write_float32_twin
from k4trt.models.dit import DiT, build_rope, sdpa_attention

SIZES = [(1, 4, 6), (3, 6, 2)]  # an image and a clip, different in every axis, through one graph


def relative_error(out, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, the graph-vs-torch measure used throughout."""
    expected = ref.numpy()
    return float(np.abs(np.asarray(out) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The bf16 graph and its twin, written into one folder that is then moved: every later use reads the
    files from a path they were not written at, so only relative external-data references work."""
    dit32 = random_dit(TINY, seed=0)
    dit16 = DiT(TINY).requires_grad_(False).eval()
    dit16.load_state_dict(dit32.state_dict())
    dit16 = dit16.bfloat16()
    written = tmp_path_factory.mktemp("engines") / "written"
    written.mkdir()
    export_dit(dit16, dit_graph("bf16", TINY), written / "dit.bf16.onnx")
    write_float32_twin(written / "dit.bf16.onnx", written / "dit.bf16.f32.onnx")
    moved = written.parent / "moved"
    shutil.move(written, moved)
    return dit32, dit16, moved


def test_twin_matches_torch_at_two_sizes_on_one_graph(exported):
    dit32, dit16, folder = exported
    session = ort.InferenceSession(str(folder / "dit.bf16.f32.onnx"), providers=["CPUExecutionProvider"])
    for seed, size in enumerate(SIZES):
        inputs = random_inputs(TINY, size, seed=seed + 1)
        out = np.asarray(session.run(None, {name: t.numpy() for name, t in inputs.items()})[0])
        with torch.inference_mode():
            ref = dit32(**inputs)
        assert out.shape == tuple(ref.shape) == (*size, TINY.out_visual_dim)
        # Same float32 function on both sides; the order of float32 roundings differs (ORT's Gemm, LayerNorm
        # and Softmax kernels vs torch's), ~1e-6 relative per op over two blocks, so 1e-4 leaves 100x margin.
        assert relative_error(out, ref) <= 1e-4, size
    assert dit16.attention is sdpa_attention  # the export did not change the model it was given


def test_graph_carries_the_contract_and_the_precision(exported):
    _, _, folder = exported
    model = onnx.shape_inference.infer_shapes(onnx.load(folder / "dit.bf16.onnx", load_external_data=False))
    graph = model.graph
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT

    def signature(info):
        dims = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
        return info.name, info.type.tensor_type.elem_type, dims

    # Names, dtypes and dynamic axes as the registry states them; the static axes from the model's dims.
    spec = dit_graph("bf16", TINY)
    static = {"x": [TINY.in_visual_dim], "text": [TEXT_TOKENS, TINY.in_text_dim], "time": [1],
              "rope": [TINY.head_dim // 2, 2, 2], "velocity": [TINY.out_visual_dim]}
    dtype = {torch.bfloat16: bf16, torch.float32: f32}

    def expected(tensor):
        dims = [a.symbol if a.factor == 1 else f"{a.factor}*{a.symbol}" for _, a in sorted(tensor.dynamic.items())]
        return tensor.name, dtype[tensor.dtype], dims + static[tensor.name]

    assert [signature(i) for i in graph.input] == [expected(t) for t in spec.inputs]
    assert [signature(o) for o in graph.output] == [expected(t) for t in spec.outputs]
    assert signature(graph.input[0])[2][:3] == ["t", "2*h", "2*w"]  # the registry's form, spelled out once

    # Strongly typed as the model's dtype flow says: weights and matmuls in bf16, LayerNorms in float32,
    # attention as one ONNX Attention node per block (two blocks per pair), in TensorRT's importable form.
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    weights = [t for t in graph.initializer if t.name.endswith(".weight") and len(t.dims) == 2]
    assert weights and all(t.data_type == bf16 for t in weights)
    for node in graph.node:
        if node.op_type in ("Gemm", "MatMul"):
            assert {types[i] for i in node.input} == {bf16}, node.name
        if node.op_type == "LayerNormalization":
            assert {types[i] for i in node.input} == {f32}, node.name
    attentions = [node for node in graph.node if node.op_type == "Attention"]
    assert len(attentions) == 2 * TINY.num_blocks
    assert "Softmax" not in {node.op_type for node in graph.node}  # no decomposed attention left
    weight_names = {t.name for t in graph.initializer}
    assert all(node.input[1] in weight_names for node in graph.node if node.op_type == "MatMul")  # Linears only
    assert {o.domain or "" for o in model.opset_import} >= {""} and model.opset_import[0].version == 23
    shapes = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info}
    for node in attentions:
        assert len(node.input) == 3 and all(shapes[i] == 4 for i in node.input), node.name  # TensorRT: 4-D Q, K, V
        assert len([o for o in node.output if o]) == 1  # no present_key/value or qk_matmul_output
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"scale": TINY.head_dim**-0.5}  # softcap, qk_matmul_output_mode: unsupported by TensorRT
        assert {types[i] for i in node.input} == {bf16}


def test_external_data_is_found_from_the_final_path_in_a_fresh_process(exported):
    _, dit16, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "dit.bf16.f32.onnx", "dit.bf16.f32.onnx.data", "dit.bf16.onnx", "dit.bf16.onnx.data",
    ]  # no temporary file left behind
    header = onnx.load(folder / "dit.bf16.onnx", load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"dit.bf16.onnx.data"}

    name = "transformer_blocks.0.1.feed_forward.in_layer.weight"
    expected = hashlib.sha256(dit16.get_parameter(name).view(torch.int16).numpy().tobytes()).hexdigest()
    code = (
        "import hashlib, sys, onnx\n"
        "m = onnx.load(sys.argv[1])\n"
        "t = next(t for t in m.graph.initializer if t.name == sys.argv[2])\n"
        "print(hashlib.sha256(t.raw_data).hexdigest())\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(folder / "dit.bf16.onnx"), name],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == expected


def test_opcheck_passes_on_the_graph_and_its_twin(exported):
    _, _, folder = exported
    assert check_graph(folder / "dit.bf16.onnx") == []
    assert check_graph(folder / "dit.bf16.f32.onnx") == []


def test_registry_input_shapes_match_what_the_graph_and_the_sampler_use():
    shapes = dit_input_shapes(TINY, 3, 6, 2)
    assert shapes == {"x": (3, 6, 2, 16), "text": (TEXT_TOKENS, 32), "time": (1,), "rope": (3, 3, 1, 32, 2, 2)}
    assert tuple(build_rope(TINY, 3, 6, 2, dtype=torch.bfloat16).shape) == shapes["rope"]
    with pytest.raises(K4TRTError, match="multiple of 16"):
        dit_input_shapes(TINY, 3, 5, 2)
