"""The ONNX Runtime executor's plumbing, on small hand-made graphs: which graph each call runs, how inputs and
caches are named and ordered, lazy sessions, and the errors that name the export command.

The graphs carry the registry's names for the tiny model (`k4trt.core.graphs.folder_graphs`), so they are
what an export writes, and each computes something distinct (x·2 for one DiT, x·3 for the other; z + 1 for the
image, z + 2 for the head, …): a call routed to the wrong graph or a cache fed under the wrong name shows.
The real exported graphs are run end to end against the PyTorch backend in test_build_engines.py.
"""

from __future__ import annotations

import pytest
import torch
from onnx import TensorProto, helper, save

from k4trt.config import DiTConfig
from k4trt.core.graphs import GraphSpec, folder_graphs
from k4trt.core.manifest import Artifact, Manifest, ModelFacts
from k4trt.errors import K4TRTError
from k4trt.models.vae import tiny_vae_config
from k4trt.runtime.ort_executor import OnnxRuntimeExecutor

CONFIG = DiTConfig(in_text_dim=32, time_dim=32, model_dim=128, ff_dim=256, num_blocks=1)
VAE = tiny_vae_config()
GRAPHS = {p: folder_graphs(p, CONFIG, VAE) for p in ("fp8", "bf16")}
CACHES = len(GRAPHS["fp8"]["vae_body"].inputs) - 1


def _graph(folder, spec: GraphSpec, nodes):
    """The float32 twin of `spec` with dynamic shapes; `nodes` are (op, inputs, output) over its tensor names
    and the constants c1..c4."""
    graph = helper.make_graph(
        [helper.make_node(op, ins, [out]) for op, ins, out in nodes],
        spec.stem,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in spec.input_names],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in spec.output_names],
        [helper.make_tensor(f"c{v}", TensorProto.FLOAT, [], [float(v)]) for v in range(1, 5)],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), folder / spec.twin)


@pytest.fixture
def engines(tmp_path):
    folder = tmp_path / "engines"
    folder.mkdir()
    for precision, factor in (("bf16", "c2"), ("fp8", "c3")):
        spec = GRAPHS[precision]["dit"]
        _graph(folder, spec, [("Mul", [spec.input_names[0], factor], spec.output_names[0])])
    image, head, body = (GRAPHS["fp8"][f"vae_{role}"] for role in ("image", "head", "body"))
    _graph(folder, image, [("Add", ["z", "c1"], "frames")])
    # head: caches z·3 and z·4 alternately; body: frames = cache 0 - cache 1, each cache k -> cache k + 1
    _graph(folder, head, [("Add", ["z", "c2"], "frames")]
           + [("Mul", ["z", "c3" if k % 2 == 0 else "c4"], name) for k, name in enumerate(head.output_names[1:])])
    cache_in, cache_out = body.input_names[1:], body.output_names[1:]
    _graph(folder, body, [("Sub", cache_in[:2], "frames")]
           + [("Add", [i, "c1"], o) for i, o in zip(cache_in, cache_out, strict=True)])
    _record(folder, ["dit.bf16", "dit.fp8", "vae_image", "vae_head", "vae_body"])
    return folder


def _record(folder, artifacts):
    """A manifest listing each artifact's twin (no stamps: sizes are not checked)."""
    twins = {spec.stem: spec.twin for graphs in GRAPHS.values() for spec in graphs.values()}
    Manifest(weights_dir="/w", model=ModelFacts(CONFIG, VAE),
             artifacts={name: Artifact({}, {twins[name]: "0" * 64}) for name in artifacts}).save(folder)


def test_model_facts_come_from_the_manifest(engines):
    executor = OnnxRuntimeExecutor(engines, "cpu")
    assert executor.dit_config == CONFIG
    assert executor.vae_scaling_factor == VAE.scaling_factor
    assert executor.dtype == torch.float32
    assert executor.device == torch.device("cpu")


def test_dit_defaults_to_fp8_and_takes_the_precision_asked_for(engines):
    x = torch.randn(3, 4, 6, 16)
    args = (torch.randn(224, 32), torch.tensor([999.0]), torch.randn(3, 2, 3, 32, 2, 2))
    default = OnnxRuntimeExecutor(engines, "cpu")
    assert default.dit_precision == "fp8" and torch.equal(default.dit(x, *args), x * 3)
    bf16 = OnnxRuntimeExecutor(engines, "cpu", precision="bf16")
    assert bf16.dit_precision == "bf16" and torch.equal(bf16.dit(x, *args), x * 2)


def test_chunks_go_to_the_image_head_and_body_graphs_with_caches_in_order(engines):
    executor = OnnxRuntimeExecutor(engines, "cpu")
    image = torch.randn(1, 16, 1, 4, 6)
    frames, caches = executor.vae_chunk(image, None)
    assert torch.equal(frames, image + 1) and caches == []

    head = torch.randn(1, 16, 3, 4, 6)
    frames, caches = executor.vae_chunk(head, None)
    assert torch.equal(frames, head + 2)
    assert len(caches) == CACHES and all(c.shape == head.shape for c in caches)
    assert torch.equal(caches[0], head * 3) and torch.equal(caches[1], head * 4)

    body = torch.randn(1, 16, 2, 4, 6)
    frames, new = executor.vae_chunk(body, caches)
    assert torch.equal(frames, caches[0] - caches[1])
    assert all(torch.equal(n, c + 1) for n, c in zip(new, caches, strict=True))


def test_sessions_open_on_first_use(engines):
    """An image needs neither the head nor the body; a missing body shows only when a body chunk runs."""
    (engines / "vae_body.f32.onnx").unlink()
    executor = OnnxRuntimeExecutor(engines, "cpu")
    executor.vae_chunk(torch.randn(1, 16, 1, 4, 6), None)
    with pytest.raises(K4TRTError, match=r"vae_body\.f32\.onnx is missing; export it again: build-engines --weights /w "
                                         r"--out .* --onnx-only --force"):
        executor.vae_chunk(torch.randn(1, 16, 2, 4, 6), [torch.randn(1, 16, 2, 4, 6)] * CACHES)


def test_a_graph_onnx_runtime_cannot_load_is_one_line(engines):
    (engines / "vae_image.f32.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(K4TRTError, match=r"ONNX Runtime cannot load .*vae_image\.f32\.onnx \(.*\); export it again"):
        OnnxRuntimeExecutor(engines, "cpu").vae_chunk(torch.randn(1, 16, 1, 4, 6), None)


def test_missing_folder_names_the_export_command(tmp_path):
    with pytest.raises(K4TRTError, match=r"does not exist; build it: build-engines --out .* --onnx-only"):
        OnnxRuntimeExecutor(tmp_path / "nowhere", "cpu")


def test_folder_without_exported_graphs_names_the_export_command(tmp_path):
    with pytest.raises(K4TRTError, match=r"holds no exported graphs .*build-engines --out .* --onnx-only"):
        OnnxRuntimeExecutor(tmp_path, "cpu")
    (tmp_path / "manifest.json").write_text('{"format": 1, "engines": {}}')  # written by an older k4trt
    with pytest.raises(K4TRTError, match=r"has format 1, not 2 .*; rebuild the folder: build-engines"):
        OnnxRuntimeExecutor(tmp_path, "cpu")


def test_a_precision_that_was_not_exported_names_the_flag(engines):
    _record(engines, ["dit.bf16", "vae_image", "vae_head", "vae_body"])
    with pytest.raises(K4TRTError, match=r"has no fp8 DiT ONNX graph \(it has bf16\); .*--precision fp8 --onnx-only$"):
        OnnxRuntimeExecutor(engines, "cpu", precision="fp8")
    _record(engines, ["vae_image", "vae_head", "vae_body"])
    with pytest.raises(K4TRTError, match=r"has no DiT ONNX graph \(it has none\); build it: build-engines --weights /w"):
        OnnxRuntimeExecutor(engines, "cpu")
