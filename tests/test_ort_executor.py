"""The ONNX Runtime executor's plumbing, on small hand-made graphs: which graph each call runs, how inputs and
caches are named and ordered, lazy sessions, and the errors that name the export command.

Each hand-made graph computes something distinct (x·2 for one DiT, x·3 for the other; z + 1 for the image,
z + 2 for the head, …), so a call routed to the wrong graph or a cache fed under the wrong name shows. The
real exported graphs are run end to end against the PyTorch backend in test_build_engines.py.
"""

from __future__ import annotations

import pytest
import torch
from onnx import TensorProto, helper, save

from k4trt.config import DiTConfig
from k4trt.errors import K4TRTError
from k4trt.export.onnx_manifest import Artifact, OnnxRecord, write_onnx_record
from k4trt.runtime.ort_executor import OnnxRuntimeExecutor

CONFIG = DiTConfig(in_text_dim=32, time_dim=32, model_dim=128, ff_dim=256, num_blocks=1)
CACHES = 2


def _graph(path, inputs, outputs, nodes):
    """Float32 graph with dynamic shapes; `nodes` are (op, inputs, output) over the named tensors."""
    graph = helper.make_graph(
        [helper.make_node(op, ins, [out]) for op, ins, out in nodes],
        path.stem,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [helper.make_tensor(f"c{v}", TensorProto.FLOAT, [], [float(v)]) for v in range(1, 5)],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


@pytest.fixture
def engines(tmp_path):
    folder = tmp_path / "engines"
    folder.mkdir()
    _graph(folder / "dit.bf16.f32.onnx", ["x", "text", "time", "rope"], ["velocity"], [("Mul", ["x", "c2"], "velocity")])
    _graph(folder / "dit.fp8.f32.onnx", ["x", "text", "time", "rope"], ["velocity"], [("Mul", ["x", "c3"], "velocity")])
    _graph(folder / "vae_image.f32.onnx", ["z"], ["frames"], [("Add", ["z", "c1"], "frames")])
    _graph(folder / "vae_head.f32.onnx", ["z"], ["frames", "cache_out_0", "cache_out_1"],
           [("Add", ["z", "c2"], "frames"), ("Mul", ["z", "c3"], "cache_out_0"), ("Mul", ["z", "c4"], "cache_out_1")])
    _graph(folder / "vae_body.f32.onnx", ["z", "cache_in_0", "cache_in_1"], ["frames", "cache_out_0", "cache_out_1"],
           [("Sub", ["cache_in_0", "cache_in_1"], "frames"), ("Add", ["cache_in_0", "c1"], "cache_out_0"),
            ("Mul", ["cache_in_1", "c2"], "cache_out_1")])
    _record(folder, ["dit.bf16", "dit.fp8", "vae_image", "vae_head", "vae_body"])
    return folder


def _record(folder, artifacts):
    write_onnx_record(folder, OnnxRecord(weights_dir="/w", dit_config=CONFIG, vae_scaling_factor=0.7,
                                         artifacts={name: Artifact({}, {}) for name in artifacts}))


def test_model_facts_come_from_the_manifest(engines):
    executor = OnnxRuntimeExecutor(engines, "cpu")
    assert executor.dit_config == CONFIG
    assert executor.vae_scaling_factor == 0.7
    assert executor.dtype == torch.float32
    assert executor.device == torch.device("cpu")


def test_dit_defaults_to_fp8_and_takes_the_precision_asked_for(engines):
    x = torch.randn(3, 4, 6, 16)
    args = (torch.randn(224, 32), torch.tensor([999.0]), torch.randn(3, 2, 3, 32, 2, 2))
    assert torch.equal(OnnxRuntimeExecutor(engines, "cpu").dit(x, *args), x * 3)
    assert torch.equal(OnnxRuntimeExecutor(engines, "cpu", precision="bf16").dit(x, *args), x * 2)


def test_chunks_go_to_the_image_head_and_body_graphs_with_caches_in_order(engines):
    executor = OnnxRuntimeExecutor(engines, "cpu")
    image = torch.randn(1, 16, 1, 4, 6)
    frames, caches = executor.vae_chunk(image, None)
    assert torch.equal(frames, image + 1) and caches == []

    head = torch.randn(1, 16, 3, 4, 6)
    frames, caches = executor.vae_chunk(head, None)
    assert torch.equal(frames, head + 2)
    assert [c.shape for c in caches] == [head.shape] * CACHES
    assert torch.equal(caches[0], head * 3) and torch.equal(caches[1], head * 4)

    body = torch.randn(1, 16, 2, 4, 6)
    frames, new = executor.vae_chunk(body, caches)
    assert torch.equal(frames, caches[0] - caches[1])
    assert torch.equal(new[0], caches[0] + 1) and torch.equal(new[1], caches[1] * 2)


def test_sessions_open_on_first_use(engines):
    """An image needs neither the head nor the body; a missing body shows only when a body chunk runs."""
    (engines / "vae_body.f32.onnx").unlink()
    executor = OnnxRuntimeExecutor(engines, "cpu")
    executor.vae_chunk(torch.randn(1, 16, 1, 4, 6), None)
    with pytest.raises(K4TRTError, match=r"vae_body\.f32\.onnx is missing; .*build-engines --onnx-only --weights /w --out"):
        executor.vae_chunk(torch.randn(1, 16, 2, 4, 6), [torch.randn(1, 16, 2, 4, 6)] * CACHES)


def test_missing_folder_names_the_export_command(tmp_path):
    with pytest.raises(K4TRTError, match=r"does not exist; export the graphs with: build-engines --onnx-only --weights W --out"):
        OnnxRuntimeExecutor(tmp_path / "nowhere", "cpu")


def test_folder_without_exported_graphs_names_the_export_command(tmp_path):
    with pytest.raises(K4TRTError, match=r"holds no exported graphs .*build-engines --onnx-only"):
        OnnxRuntimeExecutor(tmp_path, "cpu")
    (tmp_path / "manifest.json").write_text('{"format": 1, "engines": {}}')  # an engine manifest without "onnx"
    with pytest.raises(K4TRTError, match=r"holds no exported graphs"):
        OnnxRuntimeExecutor(tmp_path, "cpu")


def test_a_precision_that_was_not_exported_names_the_flag(engines):
    _record(engines, ["dit.bf16", "vae_image", "vae_head", "vae_body"])
    with pytest.raises(K4TRTError, match=r"has no fp8 DiT graph; .*--precision fp8$"):
        OnnxRuntimeExecutor(engines, "cpu", precision="fp8")
    _record(engines, ["vae_image", "vae_head", "vae_body"])
    with pytest.raises(K4TRTError, match=r"has no DiT graph; .*build-engines --onnx-only --weights /w"):
        OnnxRuntimeExecutor(engines, "cpu")

