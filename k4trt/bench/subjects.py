"""The k4trt backends as benchmark subjects: load once, then run whole generations with stage marks.

A run is the product's own `Pipeline.generate` with the harness's recorder, so only the executor differs
between backends. It stops at decoded frames on the device (no video file is written). Under torchrun each
rank loads the backend as one rank of a sequence-parallel run (`k4trt.parallel`); rank 0's stages are the
ones reported, with the time its DiT spent in collectives ("dit exchange").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from k4trt import config
from k4trt.bench import models
from k4trt.core.executor import Executor
from k4trt.engine.trt_api import require_tensorrt
from k4trt.errors import K4TRTError
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG, Schedule
from k4trt.parallel import world as parallel
from k4trt.parallel.exchange import ProcessGroupExchange
from k4trt.parallel.executor import SequenceParallelExecutor
from k4trt.runtime.pipeline import Pipeline
from k4trt.weights.layout import WeightsFolder

if TYPE_CHECKING:
    from k4trt.models.text import TextEncoder
from k4trt.bench.settings import Settings
from k4trt.bench.timing import Recorder, timed

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
    from k4trt.core.executor import default_dtype

    device = settings.device
    dtype = default_dtype(device)
    world = parallel.current(device)
    executor, executor_s = timed(lambda: _executor(backend, settings, dtype, world), device)
    text_encoder, text_s = (timed(lambda: _text_encoder(settings, executor.dtype), device)
                            if world is None or world.main else (None, 0.0))
    generation = _Generation(settings, text_encoder, executor, graphs=backend in GRAPH_BACKENDS, world=world)
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


def _executor(backend: str, settings: Settings, dtype: torch.dtype, world: parallel.World | None) -> Executor:
    """The backend's executor; on a rank of a sequence-parallel run, wrapped for it."""
    exchange = ProcessGroupExchange(world.size, settings.device) if world is not None else None
    executor = _backend(backend, settings, dtype, world, exchange)
    if world is None or exchange is None:
        return executor
    return SequenceParallelExecutor(executor, world, exchange)


def _backend(backend: str, settings: Settings, dtype: torch.dtype, world: parallel.World | None,
             exchange: ProcessGroupExchange | None) -> Executor:
    from k4trt.runtime.torch_executor import TorchExecutor

    device = settings.device
    if backend.startswith("trt-"):
        from k4trt.runtime.trt_executor import TensorRTExecutor

        precision = backend.removeprefix("trt-")
        if settings.engines is None:
            raise Unavailable(f"{backend} needs --engines DIR; build them with: build-engines --weights WEIGHTS "
                              f"--out DIR --precision {precision}")
        return TensorRTExecutor(settings.engines, precision=precision, device=device, world=world)
    if settings.weights is not None:
        return TorchExecutor.from_weights(WeightsFolder(settings.weights), device, dtype, exchange)
    dit_cfg, vae_cfg = ((models.TINY_DIT, models.TINY_VAE) if settings.tiny
                        else (config.RELEASED_DIT, models.COGVIDEOX_5B_VAE))
    return TorchExecutor(models.random_dit(dit_cfg, device, dtype), models.random_vae(vae_cfg, device, dtype), device, dtype,
                         exchange)


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
    """One whole generation through `Pipeline.generate` — T5, the shared sampler over the executor, the shared
    VAE chunk schedule, CUDA graphs where the backend uses them — stopping at decoded frames (no file)."""

    def __init__(self, settings: Settings, text_encoder: TextEncoder | models.RandomTextEncoder | None,
                 executor: Executor, graphs: bool, world: parallel.World | None = None) -> None:
        self.settings = settings
        released = config.is_released(executor.dit_config)
        self.pipeline = Pipeline(text_encoder, executor, _schedule(settings), released, cuda_graph=graphs,  # type: ignore[arg-type]
                                 world=world)
        self.notes: list[str] = []
        if graphs:
            self.notes.append("CUDA graphs: the 4-step DiT loop as one (steps not separable), VAE chunks after "
                              "the first by replaying one")

    def run(self, rec: Recorder) -> None:
        s = self.settings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            self.pipeline.generate(s.prompt, seed=s.seed, seconds=s.seconds, width=s.width, height=s.height,
                                   progress=False, recorder=rec)
        self._note_failed_capture(caught)

    def _note_failed_capture(self, caught: list[warnings.WarningMessage]) -> None:
        """The runner warns once when capture fails and runs eagerly from then on: say so in the result."""
        for warning in caught:
            note = f"measured eagerly: {warning.message}"
            if "CUDA graph" in str(warning.message) and note not in self.notes:
                self.notes.append(note)

    def close(self) -> None:
        self.pipeline.close()
