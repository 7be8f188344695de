"""The shared chunk schedule + pixel mapping against diffusers' own chunked `decode` (the original's VAE call)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from k4trt.core.vae_schedule import chunk_bounds, decode_chunks
from k4trt.models.vae import VAEDecoder, tiny_vae_config
from k4trt.runtime.torch_executor import TorchExecutor


def test_chunk_bounds_cover_every_frame_once():
    for t in range(1, 26):
        bounds = chunk_bounds(t)
        assert bounds[0][0] == 0 and bounds[-1][1] == t
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [end - start for start, end in bounds]
        if t % 2:  # every video length is odd: 3 first (1 for an image), then 2s
            assert sizes == ([1] if t == 1 else [3] + [2] * ((t - 3) // 2))


@pytest.mark.parametrize("latent_t", [1, 5])
def test_decode_chunks_equals_diffusers_decode_bf16(latent_t):
    """In bf16, as the original runs the VAE: same ops in the same order, so bit-identical frames."""
    cfg = tiny_vae_config()
    config = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    reference = AutoencoderKLCogVideoX(**config).eval()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    with torch.no_grad():
        for p in reference.decoder.parameters():  # GroupNorm affine params too, so nothing hides
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    ours = VAEDecoder(cfg)
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if k.startswith("decoder.")})
    dtype = torch.bfloat16
    reference, ours = reference.to(dtype), ours.to(dtype)
    executor = TorchExecutor.__new__(TorchExecutor)
    executor.device, executor.dtype, executor.vae_scaling_factor, executor._vae = (
        torch.device("cpu"), dtype, cfg.scaling_factor, ours)

    latents = torch.randn(latent_t, 4, 6, 16, generator=g, dtype=torch.float64)  # the sampler's float64 output
    frames = torch.cat(list(decode_chunks(executor, latents)))

    with torch.no_grad():  # Kandinsky4T2VPipeline.__call__'s VAE lines
        reference.num_latent_frames_batch_size = 1 if latent_t == 1 else 2
        z = 1 / reference.config.scaling_factor * latents.to(dtype)
        expected = reference.decode(z.permute(3, 0, 1, 2).unsqueeze(0)).sample.float()
        expected = torch.clip((expected + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 3, 0)
    assert frames.shape == (4 * (latent_t - 1) + 1, 32, 48, 3)
    assert torch.equal(frames, expected)
