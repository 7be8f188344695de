"""FP8 calibration for build-engines: which prompts and shape, and running them through the real sampler.

Calibration records the largest activations the DiT produces while sampling (see `k4trt.export.fp8`); what
moves them is content and noise level, so a few varied prompts over the 4 steps matter more than many sizes.
One fixed latent shape (2 s at 672x384, 5 latent frames) keeps the scales independent of `--sizes`, so
building for other sizes reuses them; it costs 4 DiT calls per prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from k4trt import config
from k4trt.core.executor import default_dtype
from k4trt.errors import K4TRTError
from k4trt.export.fp8 import FP8Scales, calibrate_with_sampler
from k4trt.models.dit import DiT
from k4trt.models.scheduler import Schedule
from k4trt.models.text import TextEncoder
from k4trt.weights.layout import WeightsFolder

DEFAULT_PROMPTS = (
    "A red fox runs through fresh snow in a pine forest at sunrise, cinematic lighting.",
    "Close-up of ocean waves crashing on black volcanic rocks, slow motion, overcast sky.",
    "A busy night street in Tokyo with neon signs reflecting on wet asphalt, people with umbrellas.",
    "An astronaut floating inside a space station, Earth visible through the window, soft light.",
    "A watercolor painting of a village by a river coming to life, birds flying over rooftops.",
    "A chef slicing vegetables on a wooden board in a sunlit kitchen, shallow depth of field.",
)
CALIBRATION_SIZE = config.DEFAULT_SIZE  # width, height
CALIBRATION_SECONDS = 2
SEED = 0


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file, one per non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise K4TRTError(f"--calib-prompts {path} does not exist; pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise K4TRTError(f"--calib-prompts {path} is not a readable UTF-8 text file ({e}); pass one prompt per "
                         "line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise K4TRTError(f"--calib-prompts {path} holds no prompts; write one prompt per line")
    return prompts


def calibration_key(prompts: Sequence[str]) -> dict[str, str]:
    """What, besides the weights, the scales depend on (recorded so a change recalibrates)."""
    width, height = CALIBRATION_SIZE
    return {
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "calibration": f"{width}x{height}, {CALIBRATION_SECONDS} s, seed {SEED}",
    }


def calibrate(weights: WeightsFolder, state_dict: dict[str, torch.Tensor], prompts: Sequence[str],
              checkpoint_sha256: str) -> FP8Scales:
    """Encode `prompts`, then run the 4-step sampler with the DiT in the dtype it runs in on this machine (bf16
    on a GPU, float32 on the CPU) and return the recorded activation ranges, stamped with the SHA-256 of the
    checkpoint `state_dict` was read from."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    encoder = TextEncoder.from_pretrained(weights.text_encoder, weights.tokenizer, device, dtype)
    texts = [encoder.encode(p) for p in prompts]
    del encoder
    dit = DiT.from_state_dict(state_dict, dtype=dtype, device=device)
    width, height = CALIBRATION_SIZE
    shape = (config.latent_frames(CALIBRATION_SECONDS), height // config.VAE_SPATIAL_FACTOR,
             width // config.VAE_SPATIAL_FACTOR)
    return calibrate_with_sampler(dit, texts, [shape], Schedule.from_config_dir(weights.scheduler), SEED,
                                  checkpoint_sha256)
