"""k4trt's schedule maths against diffusers' CogVideoXDDIMScheduler (the original's scheduler).

The comparisons are exact: ours performs the same float64 operations in the same order, so any difference
at all means the formula or its order changed, which would shift every step of every video.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler

from k4trt.errors import K4TRTError
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG, Schedule

# CogVideoX-2b's scheduler_config.json differs from 5b's only in the SNR shift; it exercises that path
# (5b's shift of 1.0 is the identity).
COGVIDEOX_2B_SCHEDULER_CONFIG = {**COGVIDEOX_5B_SCHEDULER_CONFIG, "snr_shift_scale": 3.0}
CONFIGS = {"5b": COGVIDEOX_5B_SCHEDULER_CONFIG, "2b": COGVIDEOX_2B_SCHEDULER_CONFIG}


def reference(config: dict) -> CogVideoXDDIMScheduler:
    return CogVideoXDDIMScheduler(**config)


def test_5b_config_is_the_released_one():
    # Values of THUDM/CogVideoX-5b/scheduler/scheduler_config.json, as diffusers reads them.
    cfg = reference(COGVIDEOX_5B_SCHEDULER_CONFIG).config
    assert cfg["snr_shift_scale"] == 1.0
    assert (cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert cfg["beta_schedule"] == "scaled_linear"
    assert (cfg["timestep_spacing"], cfg["prediction_type"]) == ("trailing", "v_prediction")
    assert cfg["rescale_betas_zero_snr"] is True


@pytest.mark.parametrize("name", CONFIGS)
def test_alphas_cumprod_match_diffusers_exactly(name):
    ours = Schedule.from_config(CONFIGS[name])
    theirs = reference(CONFIGS[name]).alphas_cumprod
    assert theirs.dtype == torch.float64 and ours.alphas_cumprod_f64.dtype == torch.float64
    assert torch.equal(ours.alphas_cumprod_f64, theirs)
    assert ours.alphas_cumprod.dtype == torch.float32 and ours.alphas_cumprod.shape == (1000,)
    assert torch.equal(ours.alphas_cumprod, theirs.float())
    # Zero terminal SNR: the last step is pure noise.
    assert ours.alphas_cumprod_f64[-1] == 0


def test_snr_shift_changes_the_schedule():
    """Guards the test above against both configs silently producing the same numbers."""
    a5 = Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG).alphas_cumprod_f64
    a2 = Schedule.from_config(COGVIDEOX_2B_SCHEDULER_CONFIG).alphas_cumprod_f64
    assert (a5[1:-1] > a2[1:-1]).all()  # dividing the SNR by 3 lowers every interior ᾱ


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 3, 4, 7, 50])
def test_timesteps_match_diffusers(name, steps):
    theirs = reference(CONFIGS[name])
    theirs.set_timesteps(steps)
    assert Schedule.from_config(CONFIGS[name]).timesteps(steps) == theirs.timesteps.tolist()


def test_four_steps_are_the_released_ones():
    assert Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG).timesteps(4) == [999, 749, 499, 249]
    assert Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG).timesteps() == [999, 749, 499, 249]


@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_count(steps):
    with pytest.raises(K4TRTError, match="number of steps"):
        Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG).timesteps(steps)


@pytest.mark.parametrize("name", CONFIGS)
def test_renoise_equals_diffusers_add_noise(name):
    """x_t = √ᾱ_t·x + √(1-ᾱ_t)·n with ᾱ as a float32 tensor: bit-identical to add_noise on float32 input
    (add_noise casts its float64 ᾱ to the sample's dtype first, which is what `alphas_cumprod` holds)."""
    schedule, theirs = Schedule.from_config(CONFIGS[name]), reference(CONFIGS[name])
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(3, 6, 10, 16, generator=generator)
    noise = torch.randn(3, 6, 10, 16, generator=generator)
    for t in schedule.timesteps(4):
        alpha = schedule.alphas_cumprod[t : t + 1]
        ours = alpha**0.5 * x + (1 - alpha) ** 0.5 * noise
        expected = theirs.add_noise(x, noise, torch.IntTensor([t]))
        assert ours.dtype == expected.dtype == torch.float32
        assert torch.equal(ours, expected), t


def test_from_config_dir_reads_the_json(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(COGVIDEOX_2B_SCHEDULER_CONFIG))
    loaded = Schedule.from_config_dir(tmp_path)
    expected = Schedule.from_config(COGVIDEOX_2B_SCHEDULER_CONFIG).alphas_cumprod_f64
    assert torch.equal(loaded.alphas_cumprod_f64, expected)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta_schedule", "linear"),
        ("timestep_spacing", "leading"),
        ("prediction_type", "epsilon"),
        ("trained_betas", [0.1] * 1000),
        ("beta_end", 2.0),
        ("snr_shift_scale", "three"),
        ("rescale_betas_zero_snr", "yes"),
    ],
)
def test_unsupported_values_are_refused(key, value):
    with pytest.raises(K4TRTError, match=key) as info:
        Schedule.from_config({**COGVIDEOX_5B_SCHEDULER_CONFIG, key: value})
    assert "\n" not in str(info.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(K4TRTError, match="scheduler_config.json is missing.*k4trt weights download"):
        Schedule.from_config_dir(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(K4TRTError, match="not readable JSON"):
        Schedule.from_config_dir(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(K4TRTError, match="not a JSON object"):
        Schedule.from_config_dir(tmp_path)
