"""Our chunked CogVideoX VAE decoder against diffusers' `AutoencoderKLCogVideoX`, on a tiny random model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from k4trt.errors import K4TRTError
from k4trt.models.vae import CONFIG_NAME, WEIGHTS_NAME, VAEConfig, VAEDecoder, tiny_vae_config

diffusers = pytest.importorskip("diffusers")

# Latent (h, w): non-square and odd, so a swapped axis or an off-by-one resize cannot go unnoticed.
H, W = 3, 5


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random, norm affines included, at a scale that keeps activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            else:
                centre = 1.0 if name.endswith("norm_layer.weight") else 0.0
                p.copy_(centre + 0.5 * torch.randn(p.shape, generator=generator))


def _pair(cfg: VAEConfig, seed: int):
    """diffusers' autoencoder built from our config, its decoder randomised, and our decoder loaded from it."""
    ref = diffusers.AutoencoderKLCogVideoX.from_config(cfg.to_diffusers_config()).eval()
    _randomise(ref.decoder, torch.Generator().manual_seed(seed))
    if ref.post_quant_conv is not None:
        _randomise(ref.post_quant_conv, torch.Generator().manual_seed(seed + 1))
    ours = VAEDecoder(cfg).eval()
    decoder_keys = {k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    ours.load_state_dict(decoder_keys, strict=True)
    return ref, ours


def _decode_chunked(model: VAEDecoder, z: torch.Tensor) -> torch.Tensor:
    """The product's schedule: 3 latent frames first (1 for an image), then 2 at a time, caches chained."""
    t = z.shape[2]
    bounds = [(0, 1)] if t == 1 else [(0, 3)] + [(s, s + 2) for s in range(3, t, 2)]
    caches, frames = None, []
    for start, end in bounds:
        pixels, caches = model.decode_chunk(z[:, :, start:end], caches)
        frames.append(pixels)
    return torch.cat(frames, dim=2)


def _latents(t: int, channels: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, channels, t, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def pair():
    return _pair(tiny_vae_config(), seed=0)


@pytest.mark.parametrize("t", [1, 3, 5, 7])
def test_matches_diffusers(pair, t: int) -> None:
    ref, ours = pair
    z = _latents(t, ours.cfg.latent_channels, seed=100 + t)
    with torch.no_grad():
        expected = ref.decode(z).sample  # its default num_latent_frames_batch_size is 2
        got = _decode_chunked(ours, z)
    assert got.shape == (1, 3, 4 * (t - 1) + 1, 8 * H, 8 * W)
    # Same operations in the same order save the upsampler's 2D conv, which we run as a 3D conv: float32
    # rounding (2^-24) over ~25 layers of sums of a few hundred terms stays below 1e-6 of the output's range;
    # a wrong cache frame or resize changes outputs by O(1).
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-5


def test_post_quant_conv_matches_diffusers() -> None:
    # diffusers sizes post_quant_conv by out_channels, so it only runs where latent_channels equals that.
    ref, ours = _pair(replace(tiny_vae_config(), latent_channels=3, use_post_quant_conv=True), seed=1)
    z = _latents(5, 3, seed=2)
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = _decode_chunked(ours, z)
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-5  # as in test_matches_diffusers


def test_cache_names_and_shapes_match_decode(pair) -> None:
    _, ours = pair
    called: list[str] = []
    modules = dict(ours.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: called.append(n)) for n in ours.cache_names]
    try:
        with torch.no_grad():
            _, head = ours.decode_chunk(_latents(3, 16, seed=3), None)
    finally:
        for hook in hooks:
            hook.remove()
    assert called == ours.cache_names
    # conv_in, 2 mid resnets × 2 convs, 4 up blocks × 2 resnets × 2 convs, conv_out
    assert len(ours.cache_names) == 1 + 4 + 16 + 1
    shapes = ours.cache_shapes(H, W)
    assert [tuple(c.shape) for c in head] == shapes
    assert shapes[0] == (1, 16, 2, H, W) and shapes[-1] == (1, 8, 2, 8 * H, 8 * W)
    with torch.no_grad():
        _, image = ours.decode_chunk(_latents(1, 16, seed=4), None)
        pixels, body = ours.decode_chunk(_latents(2, 16, seed=5), head)
        flat = ours(_latents(2, 16, seed=5), *head)
    assert [tuple(c.shape) for c in image] == shapes and [tuple(c.shape) for c in body] == shapes
    assert pixels.shape == (1, 3, 8, 8 * H, 8 * W)
    assert len(flat) == 1 + len(shapes) and torch.equal(flat[0], pixels)


def test_bf16_close_to_float32(pair) -> None:
    _, ours = pair
    low = VAEDecoder(ours.cfg).to(torch.bfloat16).eval()
    low.load_state_dict(ours.state_dict())
    z = _latents(5, 16, seed=6)
    with torch.no_grad():
        expected = _decode_chunked(ours, z)
        got = _decode_chunked(low, z.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and low.cache_shapes(H, W) == ours.cache_shapes(H, W)
    # bf16 keeps 8 mantissa bits: each rounding of weights and activations is off by up to 2^-9 ≈ 2e-3
    # relative. ~25 layers with 2-3 roundings each, adding like independent errors, give about 1e-2 of
    # RMS error (measured 0.009-0.011 over seeds); 0.05 leaves headroom yet fails a decoder that mixes
    # dtypes wrongly or loses a cache.
    assert ((got.float() - expected).norm() / expected.norm()).item() <= 0.05


def _write_vae(folder: Path, cfg: VAEConfig, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg.to_diffusers_config()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS_NAME)
    return folder


def test_from_pretrained_round_trip(pair, tmp_path: Path) -> None:
    ref, ours = pair
    ref.save_pretrained(tmp_path / "vae")  # the real layout: diffusers' own config.json, encoder weights too
    assert VAEConfig.from_json(tmp_path / "vae" / CONFIG_NAME) == ours.cfg
    loaded = VAEDecoder.from_pretrained(tmp_path / "vae")
    assert loaded.scaling_factor == 0.7
    z = _latents(3, 16, seed=7)
    with torch.no_grad():
        assert torch.equal(_decode_chunked(loaded, z), _decode_chunked(ours, z))
    low = VAEDecoder.from_pretrained(tmp_path / "vae", dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    # What we write, diffusers reads back as the same config.
    written = _write_vae(tmp_path / "ours", ours.cfg, ours.state_dict())
    assert VAEConfig.from_json(written / CONFIG_NAME) == ours.cfg
    assert diffusers.AutoencoderKLCogVideoX.load_config(written)["scaling_factor"] == 0.7


def test_missing_files(pair, tmp_path: Path) -> None:
    _, ours = pair
    with pytest.raises(K4TRTError, match="config.json is missing"):
        VAEDecoder.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(ours.cfg.to_diffusers_config()))
    with pytest.raises(K4TRTError, match=f"{WEIGHTS_NAME} is missing"):
        VAEDecoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "JSON object"),
        ('{"block_out_channels": [8, 12]}', "multiples"),
        ('{"up_block_types": ["UpDecoderBlock2D"]}', "not a CogVideoX VAE"),
    ],
)
def test_bad_config(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(K4TRTError, match=message):
        VAEConfig.from_json(tmp_path / CONFIG_NAME)


def test_corrupt_weights(pair, tmp_path: Path) -> None:
    _, ours = pair
    folder = _write_vae(tmp_path, ours.cfg, ours.state_dict())
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(K4TRTError, match="corrupt or truncated.*download"):
        VAEDecoder.from_pretrained(folder)


def test_wrong_weights(pair, tmp_path: Path) -> None:
    _, ours = pair
    good = ours.state_dict()
    key = "decoder.up_blocks.1.resnets.0.conv1.conv.weight"
    cases = {
        "missing": ({k: v for k, v in good.items() if k != key}, f"missing {key}"),
        "unexpected": ({**good, "decoder.extra.weight": torch.ones(2)}, "unexpected decoder.extra.weight"),
        "shape": ({**good, key: good[key][:, :1]}, rf"wrong shapes for {key} \(16, 1, 3, 3, 3\) \(expected"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(K4TRTError, match=message):
            VAEDecoder.from_pretrained(_write_vae(tmp_path / name, ours.cfg, tensors))
    # Encoder weights in the file are expected and skipped.
    full = {**good, "encoder.conv_in.conv.weight": torch.ones(1), "quant_conv.weight": torch.ones(1)}
    VAEDecoder.from_pretrained(_write_vae(tmp_path / "full", ours.cfg, full))
