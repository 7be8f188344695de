"""The k4trt backends as benchmark subjects: load once, then run whole generations with stage marks.

A run is the product's path — T5, the shared sampler over the executor, the shared VAE chunk schedule —
composed from the same functions `Pipeline.generate` uses, so only the executor differs between backends.
It stops at decoded frames on the device (no video encoding). `Pipeline.generate` itself is not called
because it times with a synchronise at every boundary and cannot mark each step with a device event.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from k4trt import config
from k4trt.engine.trt_api import require_tensorrt
from k4trt.errors import K4TRTError
from k4trt.models.dit import build_rope
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG, Schedule
from k4trt.runtime.executor import Executor
from k4trt.runtime.sampler import draw_noises, sample
from k4trt.runtime.vae_schedule import decode_chunks
from k4trt.weights.layout import WeightsFolder

from benchmarks import models

if TYPE_CHECKING:
    from k4trt.models.text import TextEncoder
from benchmarks.settings import Settings
from benchmarks.timing import Recorder, timed

GRAPH_BACKENDS = ("trt-fp8", "trt-bf16", "torch-graph")


class Unavailable(Exception):
    """This backend cannot run here; the message says why and is reported as the skip reason."""


@dataclass
class Subject:
    """A loaded backend: `run(recorder)` does one generation, marking its stages."""

    run: Callable[[Recorder], None]
    close: Callable[[], None]
    load_s: dict[str, float]
    notes: list[str] = field(default_factory=list)


def load_k4trt(backend: str, settings: Settings) -> Subject:
    _check_available(backend, settings)
    from k4trt.runtime.torch_executor import default_dtype

    device = settings.device
    dtype = default_dtype(device)
    executor, executor_s = timed(lambda: _executor(backend, settings, dtype), device)
    text_encoder, text_s = timed(lambda: _text_encoder(settings, executor.dtype), device)
    generation = _Generation(settings, text_encoder, executor, graphs=backend in GRAPH_BACKENDS)
    part = "engines" if backend.startswith("trt-") else "dit + vae"
    return Subject(generation.run, generation.close, {"text encoder": text_s, part: executor_s}, generation.notes)


def _check_available(backend: str, settings: Settings) -> None:
    """Everything that can be known before loading gigabytes."""
    if backend in GRAPH_BACKENDS and settings.device.type != "cuda":
        needs = "TensorRT and CUDA graphs" if backend.startswith("trt-") else "CUDA graphs"
        raise Unavailable(f"{backend} needs a CUDA GPU ({needs}); this run is on {settings.device}")
    if backend.startswith("trt-"):
        try:
            require_tensorrt()
        except K4TRTError as e:
            raise Unavailable(str(e)) from None
        if settings.tiny:
            raise Unavailable(f"{backend} runs the engines in --engines, not the tiny model; drop --tiny")


def _executor(backend: str, settings: Settings, dtype: torch.dtype) -> Executor:
    from k4trt.runtime.torch_executor import TorchExecutor

    device = settings.device
    if backend.startswith("trt-"):
        from k4trt.runtime.trt_executor import TensorRTExecutor

        precision = backend.removeprefix("trt-")
        if settings.engines is None:
            raise Unavailable(f"{backend} needs --engines DIR; build them with: build-engines --weights WEIGHTS "
                              f"--out DIR --precision {precision}")
        return TensorRTExecutor(settings.engines, precision=precision, device=device)
    if settings.weights is not None:
        return TorchExecutor.from_weights(WeightsFolder(settings.weights), device, dtype)
    dit_cfg, vae_cfg = (models.TINY_DIT, models.TINY_VAE) if settings.tiny else (config.RELEASED_DIT, models.COGVIDEOX_5B_VAE)
    return TorchExecutor(models.random_dit(dit_cfg, device, dtype), models.random_vae(vae_cfg, device, dtype), device, dtype)


def _text_encoder(settings: Settings, dtype: torch.dtype) -> TextEncoder | models.RandomTextEncoder:
    if settings.weights is not None:
        from k4trt.models.text import TextEncoder

        folder = WeightsFolder(settings.weights)
        return TextEncoder.from_pretrained(folder.text_encoder, folder.tokenizer, settings.device, dtype)
    t5 = models.TINY_T5 if settings.tiny else models.T5_XXL
    return models.RandomTextEncoder(models.random_t5(t5, settings.device, dtype), settings.seed)


def _schedule(settings: Settings) -> Schedule:
    if settings.weights is not None:
        return Schedule.from_config_dir(WeightsFolder(settings.weights).scheduler)
    return Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG)


class _Generation:
    """Prompt -> decoded frames on the device, with a lap at the end of every stage.

    Graph backends are driven as `Pipeline` drives them: the whole 4-step loop as one graph (its output
    cloned out of the graph's buffer), the first VAE chunk eagerly, every later chunk by replaying one
    graph of a body chunk.
    """

    def __init__(self, settings: Settings, text_encoder: TextEncoder | models.RandomTextEncoder, executor: Executor,
                 graphs: bool) -> None:
        from k4trt.runtime.cuda_graph import CudaGraphRunner

        self.settings, self.text_encoder, self.executor = settings, text_encoder, executor
        schedule = _schedule(settings)
        self.timesteps = schedule.timesteps(config.NUM_STEPS)
        self.alphas = schedule.alphas_cumprod_f64.to(executor.device)
        self.shape = (*settings.latent_shape, config.LATENT_CHANNELS)
        self.graphs = graphs
        self.loop = CudaGraphRunner(self._denoise, enabled=graphs)
        self.vae_body = CudaGraphRunner(self._decode_body, enabled=graphs)
        self.notes: list[str] = []
        if graphs:
            self.notes.append("CUDA graphs: the 4-step DiT loop as one (steps not separable), VAE chunks after "
                              "the first by replaying one")

    def _denoise(self, text: torch.Tensor, rope: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        return sample(self.executor, text, rope, noises, self.timesteps, self.alphas)

    def _decode_body(self, z: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames, caches_out = self.executor.vae_chunk(z, caches)
        return (frames, *caches_out)

    def run(self, rec: Recorder) -> None:
        ex, s = self.executor, self.settings
        rec.start()
        text = self.text_encoder.encode(s.prompt).to(ex.dtype)
        rec.lap("text encoder")
        rope = build_rope(ex.dit_config, *self.shape[:3], dtype=ex.dtype, device=ex.device)
        noises = [n.to(ex.dtype).to(ex.device) for n in draw_noises(s.seed, self.shape, config.NUM_STEPS)]
        rec.lap("prep")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            if self.graphs:
                latents = self.loop(text, rope, *noises).clone()
                rec.lap("dit")
            else:
                latents = sample(ex, text, rope, noises, self.timesteps, self.alphas,
                                 on_step=lambda step: rec.lap(f"dit step {step + 1}"))
            for _ in decode_chunks(ex, latents, self.vae_body if self.graphs else None):
                rec.lap("vae decode")
        self._note_failed_capture(caught)

    def _note_failed_capture(self, caught: list[warnings.WarningMessage]) -> None:
        """The runner warns once when capture fails and runs eagerly from then on: say so in the result."""
        for warning in caught:
            note = f"measured eagerly: {warning.message}"
            if "CUDA graph" in str(warning.message) and note not in self.notes:
                self.notes.append(note)

    def close(self) -> None:
        self.loop.reset()
        self.vae_body.reset()
        self.executor.close()
