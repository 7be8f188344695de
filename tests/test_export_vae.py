"""The VAE chunk graphs (image, head, body) through ONNX Runtime, chunk by chunk, against the PyTorch decoder.

Precision: the graphs are exported as shipped, with bf16 weights, and run through their float32 twins (ONNX
Runtime's CPU provider has no bf16 convolutions). The reference is the PyTorch decoder in float32 holding the
same bf16-rounded weights. The twin widens every bf16 value exactly and turns bf16 casts into float32 ones,
so both sides evaluate the same float32 function and differ only in operation order: ~1e-6 of the output's
range. The bound, 1e-4 of the range, leaves two orders of magnitude of margin and still catches a wrong
cache, frame or weight, which moves the output by O(1).
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from k4trt.core.graphs import VAE_ROLES, vae_graph, vae_input_shapes, vae_role
from k4trt.core.vae_schedule import chunk_bounds
from k4trt.export.opcheck import check_graph
from k4trt.export.twin import write_float32_twin
from k4trt.export.vae_onnx import export_vae
from k4trt.models.vae import VAEDecoder

RELATIVE_TOLERANCE = 1e-4
# torch.onnx merges the caches' "h"/"w" axis names and says so once per cache
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


@pytest.fixture(scope="module")
def vae_bf16(tiny_weights):
    return VAEDecoder.from_pretrained(tiny_weights / "vae", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def reference(vae_bf16):
    """float32 decoder with the bf16-rounded weights the graphs carry."""
    model = VAEDecoder(vae_bf16.cfg).eval()
    model.load_state_dict({k: v.float() for k, v in vae_bf16.state_dict().items()})
    return model


@pytest.fixture(scope="module")
def graphs(vae_bf16, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_graphs")
    paths = {}
    for role in VAE_ROLES:
        spec = vae_graph(role, vae_bf16.cfg)
        export_vae(vae_bf16, spec, folder / spec.onnx)
        write_float32_twin(folder / spec.onnx, folder / spec.twin)
        paths[role] = folder / spec.onnx
    return paths


@pytest.fixture(scope="module")
def sessions(graphs, vae_bf16):
    return {role: ort.InferenceSession(str(path.with_name(vae_graph(role, vae_bf16.cfg).twin)),
                                       providers=["CPUExecutionProvider"])
            for role, path in graphs.items()}


# Latent sizes differ from the export's example grid (6x10), so the dynamic height and width are exercised.
@pytest.mark.parametrize("latent_t, h, w", [(1, 4, 6), (3, 5, 7), (7, 6, 4)])
def test_chunked_decode_matches_pytorch(sessions, reference, vae_bf16, latent_t, h, w):
    seed = random.randrange(2**31)
    z = torch.randn(1, reference.cfg.latent_channels, latent_t, h, w, generator=torch.Generator().manual_seed(seed))
    caches, ort_caches = None, None
    for start, end in chunk_bounds(latent_t):
        chunk = z[:, :, start:end]
        with torch.inference_mode():
            expected, caches = reference.decode_chunk(chunk, caches)
        role = vae_role(ort_caches is None, end - start)
        spec = vae_graph(role, vae_bf16.cfg)
        feeds = dict(zip(spec.input_names, [chunk.numpy(), *(ort_caches or [])], strict=True))
        frames, *ort_caches = sessions[role].run(spec.output_names, feeds)
        scale = expected.abs().max().item()
        error = np.abs(frames - expected.numpy()).max() / scale
        assert frames.shape == tuple(expected.shape), f"seed {seed}, chunk {start}:{end}"
        assert error <= RELATIVE_TOLERANCE, f"seed {seed}, chunk {start}:{end} ({role}): relative error {error:.2e}"
        if role != "image":
            assert len(ort_caches) == len(caches)
            for k, (got, want) in enumerate(zip(ort_caches, caches, strict=True)):
                cache_error = np.abs(got - want.numpy()).max() / want.abs().max().item()
                assert cache_error <= RELATIVE_TOLERANCE, f"seed {seed}, cache {k} after chunk {start}:{end}"


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graphs_have_the_registry_names_fixed_frames_and_dynamic_size(graphs, vae_bf16):
    count = len(vae_bf16.cache_names)
    channels = vae_bf16.cfg.latent_channels
    for role, frames_out in (("image", 1), ("head", 9), ("body", 8)):
        spec = vae_graph(role, vae_bf16.cfg)
        graph = onnx.load(graphs[role], load_external_data=False).graph
        assert [i.name for i in graph.input] == spec.input_names
        assert [o.name for o in graph.output] == spec.output_names
        assert len(spec.inputs) == 1 + (count if role == "body" else 0)
        assert len(spec.outputs) == 1 + (0 if role == "image" else count)
        assert _dims(graph.input[0]) == [1, channels, VAE_ROLES[role], "h", "w"]
        assert _dims(graph.output[0]) == [1, 3, frames_out, "8*h", "8*w"]
        for value, tensor in zip((*graph.input, *graph.output), (*spec.inputs, *spec.outputs), strict=True):
            factor = tensor.dynamic[3].factor  # each cache is a fixed multiple of the latent size, as registered
            assert _dims(value)[3:] == (["h", "w"] if factor == 1 else [f"{factor}*h", f"{factor}*w"]), value.name
        assert {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)} == {onnx.TensorProto.BFLOAT16}


def test_input_shapes_list_the_caches_the_decoder_makes(vae_bf16):
    h, w = 48, 84
    assert vae_input_shapes(vae_bf16.cfg, "image", h, w) == {"z": (1, 16, 1, h, w)}
    assert vae_input_shapes(vae_bf16.cfg, "head", h, w) == {"z": (1, 16, 3, h, w)}
    body = vae_input_shapes(vae_bf16.cfg, "body", h, w)
    assert list(body) == vae_graph("body", vae_bf16.cfg).input_names
    assert list(body.values())[1:] == vae_bf16.cache_shapes(h, w)
    with pytest.raises(ValueError, match="unknown VAE graph role"):
        vae_input_shapes(vae_bf16.cfg, "tail", h, w)


def test_every_graph_is_within_what_tensorrt_parses(graphs):
    for path in graphs.values():
        assert check_graph(path) == []
