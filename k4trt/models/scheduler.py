"""The CogVideoX DDIM noise schedule, without diffusers.

The sampler needs only ᾱ_t (the cumulative signal fraction) at four timesteps, so this module computes
exactly that, in the same arithmetic as diffusers' `CogVideoXDDIMScheduler` (which the original used),
and refuses any scheduler config whose other settings would make that maths wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from k4trt.errors import K4TRTError

# CogVideoX-5b's scheduler/scheduler_config.json (THUDM/CogVideoX-5b, the scheduler the original loads).
# CogVideoX-2b's differs only in snr_shift_scale = 3.0.
COGVIDEOX_5B_SCHEDULER_CONFIG: dict[str, object] = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# Settings whose value the sampler's maths depends on, and the one value it implements.
_REQUIRED = {
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
}


@dataclass(frozen=True)
class Schedule:
    """ᾱ_t for t in [0, num_train_timesteps) and the trailing timestep spacing.

    `alphas_cumprod_f64` is kept because diffusers computes (and the original sampled with) float64 ᾱ;
    casting to the sampling dtype at the point of use reproduces the original's rounding exactly.
    """

    alphas_cumprod_f64: torch.Tensor
    num_train_timesteps: int

    @classmethod
    def from_config_dir(cls, scheduler_dir: Path | str) -> Schedule:
        path = Path(scheduler_dir) / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise K4TRTError(f"{path} is missing; fill the weights folder with `k4trt weights download DIR`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise K4TRTError(
                f"{path} is not readable JSON ({e}); download it again with `k4trt weights download DIR`"
            ) from None
        if not isinstance(config, dict):
            raise K4TRTError(f"{path} is not a JSON object; download it again with `k4trt weights download DIR`")
        return cls.from_config(config, source=str(path))

    @classmethod
    def from_config(cls, config: Mapping[str, object], source: str = "scheduler config") -> Schedule:
        for key, wanted in _REQUIRED.items():
            if config.get(key, wanted) != wanted:
                raise K4TRTError(
                    f"{source}: {key} = {config[key]!r} is not supported (k4trt implements {wanted!r} only, as "
                    f"CogVideoX-5b's scheduler); use CogVideoX-5b's scheduler/ folder"
                )
        if config.get("trained_betas") is not None:
            raise K4TRTError(f"{source}: trained_betas is not supported; use CogVideoX-5b's scheduler/ folder")
        # Defaults are diffusers' CogVideoXDDIMScheduler defaults, so a sparse config means what it means there.
        n = int(_number(config, "num_train_timesteps", 1000, source))
        beta_start = _number(config, "beta_start", 0.00085, source)
        beta_end = _number(config, "beta_end", 0.012, source)
        shift = _number(config, "snr_shift_scale", 3.0, source)
        rescale = config.get("rescale_betas_zero_snr", False)
        if not isinstance(rescale, bool):
            raise K4TRTError(f"{source}: rescale_betas_zero_snr = {rescale!r} is not true or false; "
                             "use CogVideoX-5b's scheduler/ folder")
        if n < 2 or not 0 < beta_start < beta_end < 1 or shift <= 0:
            raise K4TRTError(
                f"{source}: num_train_timesteps={n}, beta_start={beta_start}, beta_end={beta_end}, "
                f"snr_shift_scale={shift} are out of range; use CogVideoX-5b's scheduler/ folder"
            )
        return cls(_alphas_cumprod(n, beta_start, beta_end, shift, rescale), n)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ as float32 [num_train_timesteps]."""
        return self.alphas_cumprod_f64.float()

    def timesteps(self, num_steps: int = 4) -> list[int]:
        """Trailing spacing: evenly spaced from the last training step down, e.g. 4 → [999, 749, 499, 249]."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise K4TRTError(f"number of steps {num_steps} must be between 1 and {self.num_train_timesteps}")
        ratio = self.num_train_timesteps / num_steps
        return [int(t) - 1 for t in np.round(np.arange(self.num_train_timesteps, 0, -ratio)).astype(np.int64)]


def _number(config: Mapping[str, object], key: str, default: float, source: str) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise K4TRTError(f"{source}: {key} = {value!r} is not a number; use CogVideoX-5b's scheduler/ folder")
    return float(value)


def _alphas_cumprod(n: int, beta_start: float, beta_end: float, shift: float, rescale: bool) -> torch.Tensor:
    """Same operations in the same order and dtype (float64) as diffusers, so the values agree bit for bit."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    # SNR shift: SNR' = SNR / shift, i.e. ᾱ' = ᾱ / (shift + (1 - shift)·ᾱ).
    abar = abar / (shift + (1 - shift) * abar)
    if rescale:
        # Zero terminal SNR (Lin et al. 2023, Algorithm 1): make √ᾱ hit 0 at the last step, keep √ᾱ_0.
        root = abar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        abar = root**2
    return abar
