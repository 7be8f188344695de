"""The shared sampler against the original's loop written out with diffusers' scheduler (the test oracle)."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from k4trt.config import RELEASED_DIT
from k4trt.core.executor import Executor
from k4trt.core.sampler import draw_noises, sample
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG, Schedule

SHAPE = (3, 6, 10, 16)


class FakeDiT(Executor):
    """A fixed random nonlinear map standing in for the DiT: the sampler only needs *some* velocity field,
    and a nonlinear one makes every rounding difference in x visible in v."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.dit_config = RELEASED_DIT
        self.vae_scaling_factor = 0.7
        g = torch.Generator().manual_seed(1234)
        self.weight = torch.randn(16, 16, generator=g).to(dtype) / 4
        self.calls: list[tuple[torch.dtype, float]] = []

    def dit(self, x, text, time, rope):
        self.calls.append((x.dtype, float(time)))
        return torch.tanh(x @ self.weight + time.to(x.dtype) / 1000)

    def vae_chunk(self, z, caches):  # pragma: no cover - not used here
        raise NotImplementedError


def original_loop(model: FakeDiT, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """`diffusion_generate_renoise` + `predict_x_0` of ai-forever/Kandinsky-4, step for step."""
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_5B_SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(*SHAPE, generator=generator).to(dtype)
    scheduler.set_timesteps(4)
    for time in scheduler.timesteps:
        model_time = time.unsqueeze(0)
        noise = torch.randn(img.shape, generator=generator).to(dtype)
        img = scheduler.add_noise(img, noise, time)
        velocity = model.dit(img.to(dtype), None, model_time.float(), None)
        alpha = scheduler.alphas_cumprod[model_time][:, None, None, None]
        img = alpha**0.5 * img - (1 - alpha) ** 0.5 * velocity
    return img


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_reproduces_original_loop_bit_for_bit(dtype):
    # Same ops in the same dtypes on the same device: nothing may differ, not even the last bit.
    seed = int(torch.randint(0, 2**31, (1,)))
    schedule = Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG)
    ours_model, ref_model = FakeDiT(dtype), FakeDiT(dtype)
    noises = [n.to(dtype) for n in draw_noises(seed, SHAPE, 4)]
    ours = sample(ours_model, torch.empty(0), torch.empty(0), noises, schedule.timesteps(4), schedule.alphas_cumprod_f64)
    ref = original_loop(ref_model, seed, dtype)
    assert ours.dtype == ref.dtype == torch.float64
    assert torch.equal(ours, ref)
    # The DiT saw the same inputs: its dtype and the timesteps 999, 749, 499, 249.
    assert ours_model.calls == ref_model.calls == [(dtype, t) for t in (999.0, 749.0, 499.0, 249.0)]


def test_same_seed_same_latents_other_seed_other_latents():
    schedule = Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG)

    def run(seed):
        noises = draw_noises(seed, SHAPE, 4)
        return sample(FakeDiT(torch.float32), torch.empty(0), torch.empty(0), noises, schedule.timesteps(4),
                      schedule.alphas_cumprod_f64)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_noise_count_is_checked():
    schedule = Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="need 5 noise tensors"):
        sample(FakeDiT(torch.float32), torch.empty(0), torch.empty(0), draw_noises(0, SHAPE, 3),
               schedule.timesteps(4), schedule.alphas_cumprod_f64)
