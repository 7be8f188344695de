"""The 4-step re-noise sampler of Kandinsky 4.0 T2V Flash, written once for every executor.

Each step re-noises the running estimate to the step's noise level, asks the DiT for the velocity and takes
the model's x0 estimate, exactly as the original's `diffusion_generate_renoise` does:
    x = √ᾱ_t·x + √(1-ᾱ_t)·n        (diffusers' add_noise: ᾱ cast to x's dtype)
    x = √ᾱ_t·x − √(1-ᾱ_t)·v        (float64: diffusers keeps ᾱ in float64, so the result promotes)
The dtypes follow the original step by step, so the bf16 path reproduces its rounding: the start latent and
the first re-noise are in the DiT dtype, every later update is float64, and the DiT always sees `x` cast to
its dtype. All noise is drawn up front from one seeded CPU generator (the original's order: the start
latent, then one tensor per step), which makes the device-side loop free of host work and capturable in a
CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from k4trt.core.executor import Executor


def draw_noises(seed: int, shape: Sequence[int], num_steps: int) -> list[torch.Tensor]:
    """The start latent and one re-noise tensor per step, float32 on the CPU, in the original's draw order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(num_steps + 1)]


def sample(
    executor: Executor,
    text: torch.Tensor,
    rope: torch.Tensor,
    noises: Sequence[torch.Tensor],
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the steps on `executor.device`; returns the final latents [T, h, w, C] in `alphas_cumprod`'s dtype.

    `noises` are `draw_noises`' tensors already on the device in the DiT dtype (the original casts each
    draw to bf16 before use); `alphas_cumprod` is the schedule on the device, float64 like diffusers'. The
    result is not rounded here: the VAE casts it straight to its dtype, as the original does.
    """
    if len(noises) != len(timesteps) + 1:
        raise ValueError(f"need {len(timesteps) + 1} noise tensors for {len(timesteps)} steps, got {len(noises)}")
    x = noises[0]
    for step, t in enumerate(timesteps):
        alpha = alphas_cumprod[t : t + 1]
        alpha_x = alpha.to(x.dtype)
        x = alpha_x**0.5 * x + (1 - alpha_x) ** 0.5 * noises[step + 1]
        time = torch.full((1,), float(t), dtype=torch.float32, device=x.device)
        velocity = executor.dit(x.to(executor.dtype), text, time, rope)
        x = alpha**0.5 * x - (1 - alpha) ** 0.5 * velocity
        if on_step is not None:
            on_step(step)
    return x
