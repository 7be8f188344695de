"""Same seed, same latents and frames as ai-forever/Kandinsky-4's own code, run side by side on the CPU.

The original is not vendored: point K4TRT_ORIGINAL at a checkout of ai-forever/Kandinsky-4 to run this
(skipped otherwise). Its CUDA-only pieces are replaced by the smallest faithful stand-ins:
- flash_attn's varlen call by the benchmark harness's SDPA shim, laid out [1, heads, S, d] like k4trt's own
  call, so both sides hit the same CPU kernel and any difference left is ours, not the attention kernel's;
- CUDA autocast by CPU autocast plus float32 LayerNorms, which is CUDA autocast's policy for the ops the
  DiT uses (CPU autocast alone would keep layer_norm in bf16);
- torchvision (only used there to write files) by an empty module.
Everything else — the DiT, `diffusion_generate_renoise`, `predict_x_0`, diffusers' scheduler and VAE, the
T5 embedder — is the original's code on our tiny weights.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from k4trt.bench import flash_attn_shim
from k4trt.models.dit import DiT
from k4trt.models.scheduler import Schedule
from k4trt.models.text import TextEncoder
from k4trt.models.vae import VAEDecoder
from k4trt.runtime.pipeline import Pipeline
from k4trt.runtime.torch_executor import TorchExecutor
from k4trt.weights.checkpoint import read_dit_state_dict
from k4trt.weights.layout import WeightsFolder

ORIGINAL = os.environ.get("K4TRT_ORIGINAL")
pytestmark = pytest.mark.skipif(
    not ORIGINAL or not (Path(ORIGINAL) / "kandinsky" / "model" / "nn.py").is_file(),
    reason="set K4TRT_ORIGINAL to a checkout of ai-forever/Kandinsky-4 to compare against the original code",
)


def _layer_norm_fp32(self, x):
    """CUDA autocast runs layer_norm in float32 (inputs and weights upcast, float32 out)."""
    weight = None if self.weight is None else self.weight.float()
    bias = None if self.bias is None else self.bias.float()
    return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


@pytest.fixture
def original(monkeypatch):
    root = Path(ORIGINAL) / "kandinsky"
    package = types.ModuleType("kandinsky")
    package.__path__ = [str(root)]
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_varlen_qkvpacked_func = flash_attn_shim.flash_attn_varlen_qkvpacked_func
    # Import the real libraries before the stand-ins go in: both probe for torchvision and flash_attn.
    import transformers.modeling_utils  # noqa: F401
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler  # noqa: F401

    torchvision = types.ModuleType("torchvision")
    torchvision.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToPILImage = object
    torchvision.transforms = transforms
    for name, module in {"kandinsky": package, "flash_attn": flash, "torchvision": torchvision,
                         "torchvision.transforms": transforms}.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.startswith("kandinsky.")]:
        monkeypatch.delitem(sys.modules, name)
    import kandinsky.model.dit as dit
    import kandinsky.t2v_pipeline as pipeline

    return types.SimpleNamespace(dit=dit, pipeline=pipeline)


def _original_dit(original, weights: WeightsFolder, cfg, dtype):
    model = original.dit.DiffusionTransformer3D(
        in_visual_dim=cfg.in_visual_dim, in_text_dim=cfg.in_text_dim, out_visual_dim=cfg.out_visual_dim,
        time_dim=cfg.time_dim, patch_size=list(cfg.patch_size), model_dim=cfg.model_dim, ff_dim=cfg.ff_dim,
        num_blocks=cfg.num_blocks, axes_dims=list(cfg.axes_dims),
    )
    result = model.load_state_dict(read_dit_state_dict(weights.dit), strict=False)
    # The original loads non-strictly; only its RoPE buffers may be absent from the checkpoint.
    assert not result.unexpected_keys and all(k.startswith("rope_embeddings.") for k in result.missing_keys)
    return model.to(dtype).eval()


def test_dit_forward_matches_original_float32(original, tiny_weights):
    weights = WeightsFolder(tiny_weights)
    ours = DiT.from_state_dict(read_dit_state_dict(weights.dit))
    theirs = _original_dit(original, weights, ours.cfg, torch.float32)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    t, h, w = 3, 6, 10
    x = torch.randn(t, h, w, 16, generator=g)
    text = torch.randn(224, ours.cfg.in_text_dim, generator=g)
    from k4trt.models.dit import build_rope

    with torch.no_grad():
        mine = ours(x, text, torch.tensor([749.0]), build_rope(ours.cfg, t, h, w, torch.float32))
        ref = theirs(x, text, torch.tensor([749]), torch.tensor([0, t], dtype=torch.int32),
                     torch.tensor([0, 224], dtype=torch.int32))
    # float32 throughout, the same attention kernel: identical to the last bit.
    assert torch.equal(mine, ref)


def test_whole_generation_matches_original_bf16(original, tiny_weights, monkeypatch):
    """Prompt -> latents -> frames with the original's functions vs our Pipeline, both in bf16 on the CPU."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    weights = WeightsFolder(tiny_weights)
    prompt, seed, seconds, width, height = "a red fox running through deep snow", 1234, 1, 80, 48
    latent_shape = (2 * seconds + 1, height // 8, width // 8, 16)

    # ---- ours: the product code path, bf16 executor on the CPU
    dtype = torch.bfloat16
    dit = DiT.from_state_dict(read_dit_state_dict(weights.dit), dtype=dtype)
    vae = VAEDecoder.from_pretrained(weights.vae, dtype=dtype)
    executor = TorchExecutor(dit, vae, torch.device("cpu"), dtype)
    text_encoder = TextEncoder.from_pretrained(weights.text_encoder, weights.tokenizer, "cpu", dtype)
    pipe = Pipeline(text_encoder, executor, Schedule.from_config_dir(weights.scheduler), released=False)
    ours = pipe.generate(prompt, seed=seed, seconds=seconds, width=width, height=height, keep_frames=True,
                         progress=False)

    # ---- theirs: the original's text embedder, sampler and VAE call
    import kandinsky.model.text_embedders as embedders
    from omegaconf import OmegaConf

    conf = OmegaConf.create({"text_embedder": {"tokens_lenght": 224, "params": {
        "checkpoint_path": str(weights.text_encoder), "tokenizer_path": str(weights.tokenizer)}}})
    embedder = embedders.T5TextEmbedder(conf).to("cpu", dtype)
    with torch.no_grad():
        text_embed = embedder(prompt).squeeze(0).to(dtype)
    model = _original_dit(original, weights, dit.cfg, dtype)
    scheduler = CogVideoXDDIMScheduler.from_pretrained(weights.scheduler)
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", _layer_norm_fp32)
    cu_visual = torch.tensor([0, latent_shape[0]], dtype=torch.int32)
    cu_text = torch.tensor([0, 224], dtype=torch.int32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = original.pipeline.diffusion_generate_renoise(
            model, scheduler, latent_shape, "cpu", 4, text_embed, cu_visual, cu_text, seed=seed)
    monkeypatch.undo()
    config = {k: v for k, v in vae.cfg.to_diffusers_config().items() if not k.startswith("_")}
    reference_vae = AutoencoderKLCogVideoX(**config)
    missing, unexpected = reference_vae.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("encoder.", "quant_conv.")) for k in missing)
    reference_vae = reference_vae.to(dtype).eval()
    reference_vae.num_latent_frames_batch_size = 2
    def decode(latents):  # the original's VAE call, as in Kandinsky4T2VPipeline.__call__
        with torch.no_grad():
            z = 1 / reference_vae.config.scaling_factor * latents.to(dtype)
            frames = reference_vae.decode(z.permute(3, 0, 1, 2).unsqueeze(0)).sample.float()
            return torch.clip((frames + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 3, 0)

    frames = decode(latents)
    # Same ops, same dtypes, same order, same attention kernel: nothing may differ, not even the last bit.
    assert latents.dtype == ours.latents.dtype == torch.float64
    assert torch.equal(ours.latents, latents)
    assert ours.frames is not None and torch.equal(ours.frames, frames)
