"""Models with random weights for latency-only runs: the released architecture at full size, or a tiny one.

Without the 40 GB of released weights the harness still measures the real shapes: the DiT of `RELEASED_DIT`,
the CogVideoX-5b VAE decoder and a T5-v1.1-XXL-sized encoder. Parameters are created directly on the target
device in the target dtype (default device and default dtype set while the module is built), so the
5.5 B-parameter DiT is never a 22 GB float32 copy on the CPU. Each module keeps its own random
initialisation: non-zero values, since kernels fed zeros can run faster than on real data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.models.dit import DiT
from k4trt.models.vae import VAEConfig, VAEDecoder, tiny_vae_config
from k4trt.weights.tiny import TINY_DIT

if TYPE_CHECKING:
    from transformers import T5EncoderModel

# THUDM/CogVideoX-5b vae/config.json: diffusers' AutoencoderKLCogVideoX defaults except the scaling factor.
COGVIDEOX_5B_VAE = VAEConfig(scaling_factor=0.7)
TINY_VAE = tiny_vae_config()

# The text encoder CogVideoX-5b ships (text_encoder/config.json) is google/t5-v1_1-xxl's encoder.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
}
# A T5 small enough for a CPU, with the d_model the tiny DiT expects.
TINY_T5 = {
    "vocab_size": 612,
    "d_model": TINY_DIT.in_text_dim,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
}


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside get their parameters allocated on `device` in `dtype` from the start."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype) -> DiT:
    with built_on(device, dtype):
        return DiT(cfg).requires_grad_(False).eval()


def random_vae(cfg: VAEConfig, device: torch.device, dtype: torch.dtype) -> VAEDecoder:
    with built_on(device, dtype):
        return VAEDecoder(cfg).requires_grad_(False).eval()


def random_t5(config: dict, device: torch.device, dtype: torch.dtype) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**config, is_encoder_decoder=False, use_cache=False)
    with built_on(device, dtype):
        return T5EncoderModel(cfg).requires_grad_(False).eval()


class RandomTextEncoder:
    """A T5 encoder fed fixed random token ids: the text stage's cost without a tokenizer to load.

    It offers both call shapes the harness needs: `encode(prompt)` like `k4trt.models.text.TextEncoder`, and
    `__call__(text)` with an `llm` attribute like the original's `T5TextEmbedder`. The prompt is ignored.
    """

    def __init__(self, model: T5EncoderModel, seed: int = 0) -> None:
        self.llm = model
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, model.config.vocab_size, (1, TEXT_TOKENS), generator=generator)
        self.ids = ids.to(model.device)

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """[224, d_model], as `TextEncoder.encode`."""
        return self.llm(input_ids=self.ids).last_hidden_state[0]

    def __call__(self, text: str) -> torch.Tensor:
        """[1, 224, d_model], as the original's text embedder returns it."""
        return self.llm(self.ids)[0]
