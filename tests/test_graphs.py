"""The graph registry against what it describes: the models' shapes, the chunk schedule, the file contract.

The references are independent of the registry: the DiT's RoPE table and the VAE decoder's own caches for
shapes, `chunk_bounds` (checked against diffusers elsewhere) for which graph decodes which chunk, and
DESIGN.md's engines-folder contract for file names.
"""

from __future__ import annotations

import pytest
import torch

from k4trt import config
from k4trt.config import RELEASED_DIT
from k4trt.core.graphs import (
    GRAPH_NAMES,
    VAE_ROLES,
    dit_graph,
    external_data,
    folder_graphs,
    input_shapes,
    profile,
    request_cases,
    vae_role,
)
from k4trt.core.vae_schedule import chunk_bounds
from k4trt.errors import K4TRTError
from k4trt.models.dit import build_rope
from k4trt.models.vae import VAEConfig, VAEDecoder, tiny_vae_config
from k4trt.weights.tiny import TINY_DIT

COGVIDEOX_VAE = VAEConfig(scaling_factor=0.7)  # CogVideoX-5b's decoder structure


def test_file_names_follow_the_engines_folder_contract():
    graphs = folder_graphs("fp8", RELEASED_DIT, COGVIDEOX_VAE)
    assert list(graphs) == list(GRAPH_NAMES) == ["dit", "vae_image", "vae_head", "vae_body"]
    dit = graphs["dit"]
    assert (dit.onnx, dit.twin, dit.plan, external_data(dit.onnx)) == (
        "dit.fp8.onnx", "dit.fp8.f32.onnx", "dit.fp8.plan", "dit.fp8.onnx.data")
    assert folder_graphs("bf16", RELEASED_DIT, COGVIDEOX_VAE)["dit"].plan == "dit.bf16.plan"
    assert graphs["vae_body"].onnx == "vae_body.onnx" and graphs["vae_body"].precision == "bf16"
    with pytest.raises(K4TRTError, match="fp8 or bf16"):
        dit_graph("fp16", RELEASED_DIT)


def test_dit_shapes_for_the_default_request_are_the_samplers():
    spec = dit_graph("bf16", RELEASED_DIT)
    shapes = input_shapes(spec, RELEASED_DIT, COGVIDEOX_VAE, (*config.DEFAULT_SIZE, config.DEFAULT_SECONDS))
    assert shapes == {"x": (25, 48, 84, 16), "text": (224, 4096), "time": (1,), "rope": (25, 24, 42, 32, 2, 2)}
    assert tuple(build_rope(RELEASED_DIT, 25, 48, 84, torch.float32).shape) == shapes["rope"]
    # the dynamic axes say how each dynamic size follows from the request
    for tensor in spec.inputs:
        for axis, a in tensor.dynamic.items():
            grid = {"t": 25, "h": 24, "w": 42}[a.symbol]
            assert shapes[tensor.name][axis] == a.factor * grid, (tensor.name, axis)


def test_vae_caches_are_the_decoders_own():
    cfg = tiny_vae_config()
    with torch.device("meta"):
        decoder = VAEDecoder(cfg)
    body = folder_graphs("fp8", TINY_DIT, cfg)["vae_body"]
    assert len(body.inputs) == 1 + len(decoder.cache_names) == len(body.outputs)
    shapes = input_shapes(body, TINY_DIT, cfg, (64, 48, 2))
    assert list(shapes.values())[1:] == decoder.cache_shapes(6, 8)
    for tensor in body.inputs[1:]:
        assert shapes[tensor.name][3:] == (tensor.dynamic[3].factor * 6, tensor.dynamic[4].factor * 8)


@pytest.mark.parametrize("seconds", [0, 1, 2, 7, 12])
def test_each_chunk_of_the_schedule_has_a_graph_of_its_frame_count(seconds):
    bounds = chunk_bounds(config.latent_frames(seconds))
    roles = [vae_role(i == 0, end - start) for i, (start, end) in enumerate(bounds)]
    assert roles[0] == ("image" if seconds == 0 else "head") and set(roles[1:]) <= {"body"}
    assert [VAE_ROLES[r] for r in roles] == [end - start for start, end in bounds]


def test_profile_boxes_every_case_and_optimizes_for_the_default_one():
    cases = request_cases([(672, 384), (384, 672)], 12)
    assert len(cases) == 26 and cases[0] == (672, 384, 0)
    ranges = profile(dit_graph("fp8", RELEASED_DIT), RELEASED_DIT, COGVIDEOX_VAE, cases)
    assert ranges["x"].min == (1, 48, 48, 16) and ranges["x"].max == (25, 84, 84, 16)
    assert ranges["x"].opt == (25, 48, 84, 16)  # 12 s at 672x384
    portrait = profile(dit_graph("fp8", RELEASED_DIT), RELEASED_DIT, COGVIDEOX_VAE, request_cases([(384, 672)], 2))
    assert portrait["x"].opt == (5, 84, 48, 16)  # no default case: the largest one
