"""Prompt -> video: T5, the shared sampler over an executor, the shared VAE chunk schedule, the video writer.

The backend only chooses the executor; every other step is this one code path. Under an initialised process
group of P > 1 ranks (torchrun, or the caller's `init_process_group`) the pipeline is one rank of a
sequence-parallel run (`k4trt.parallel`): rank 0 alone loads T5 and encodes the prompt, broadcasting the
embedding and the seed; every rank runs the sampler with the DiT split over the ranks; rank 0 alone decodes
and writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from k4trt import config
from k4trt.config import TEXT_TOKENS
from k4trt.core.executor import Executor
from k4trt.core.manifest import ModelFacts
from k4trt.core.sampler import draw_noises, sample
from k4trt.core.vae_schedule import chunk_bounds, decode_chunks
from k4trt.errors import K4TRTError, RequestValueError
from k4trt.fsutil import atomic_file
from k4trt.models.dit import DiT, build_rope
from k4trt.models.files import safetensors_shapes
from k4trt.models.scheduler import Schedule
from k4trt.models.text import TextEncoder, t5_weight_files
from k4trt.models.vae import VAEConfig, VAEDecoder
from k4trt.parallel import world as parallel
from k4trt.parallel.degree import check_degree
from k4trt.parallel.exchange import ProcessGroupExchange
from k4trt.parallel.executor import SequenceParallelExecutor
from k4trt.runtime import memory
from k4trt.runtime.cuda_graph import CudaGraphRunner
from k4trt.runtime.report import Recorder
from k4trt.runtime.request import as_path, check_backend, check_request
from k4trt.runtime.video import FrameWriter
from k4trt.weights.layout import WeightsFolder


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise RequestValueError(f"device {device!r} is not a device name; use cuda or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise K4TRTError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise RequestValueError(f"device {device} is not supported; use cuda or cpu")
    return device


def make_executor(
    backend: str, weights: WeightsFolder, engines: Path | None, device: torch.device, dit_precision: str | None = None,
    world: parallel.World | None = None,
) -> Executor:
    """Imports each backend only when chosen, so a machine without TensorRT or ONNX Runtime can still run.
    `dit_precision` chooses among the DiT graphs of an engines folder (default: fp8 where built). With `world`,
    the executor of this rank of a sequence-parallel run."""
    check_backend(backend, dit_precision)
    exchange = ProcessGroupExchange(world.size, device) if world is not None else None
    if backend == "torch":
        from k4trt.core.executor import default_dtype
        from k4trt.runtime.torch_executor import TorchExecutor

        executor: Executor = TorchExecutor.from_weights(weights, device, default_dtype(device), exchange)
    else:
        engines = _require_engines(backend, engines)
        if backend == "onnxruntime":
            from k4trt.runtime.ort_executor import OnnxRuntimeExecutor

            executor = OnnxRuntimeExecutor(engines, device, dit_precision, weights_dir=weights.root, exchange=exchange)
        else:
            from k4trt.runtime.trt_executor import TensorRTExecutor

            executor = TensorRTExecutor(engines, dit_precision, device=device, weights_dir=weights.root, world=world)
    if world is None or exchange is None:
        return executor
    return SequenceParallelExecutor(executor, world, exchange)


def model_facts(weights: Path, backend: str, engines: Path | None) -> ModelFacts:
    """The DiT and VAE a run would use, known before anything loads: from the engines' manifest for the engine
    backends (which never open the checkpoint), else from the checkpoint's tensor shapes (memory-mapped) and
    the VAE's config.json."""
    if backend != "torch":
        from k4trt.runtime.engines_folder import open_engines

        engines = _require_engines(backend, engines)
        return open_engines(engines, None, "engines").require_model(engines)
    from k4trt.models.dit import infer_dit_config
    from k4trt.models.vae import CONFIG_NAME, VAEConfig
    from k4trt.weights.checkpoint import read_dit_state_dict

    folder = WeightsFolder(weights).require()
    return ModelFacts(infer_dit_config(read_dit_state_dict(folder.dit)), VAEConfig.from_json(folder.vae / CONFIG_NAME))


def element_bytes(backend: str, device: torch.device) -> int:
    """Bytes per element the DiT and VAE compute in: torch's dtype for the device, the float32 twins on ONNX
    Runtime, bf16 in TensorRT engines."""
    if backend == "torch":
        from k4trt.core.executor import default_dtype

        return default_dtype(device).itemsize
    return 4 if backend == "onnxruntime" else 2


def check_memory_before_loading(weights: WeightsFolder, model: ModelFacts, backend: str, device: torch.device,
                                seconds: int, width: int, height: int, keep_frames: bool) -> None:
    """The memory check of `generate`, made before anything is loaded, counting the weights too: the DiT's and
    the VAE's from their configs (a weightless model on the meta device), T5's from its files' headers."""
    with torch.device("meta"):
        parameters = sum(p.numel() for m in (DiT(model.dit_config), VAEDecoder(model.vae_config)) for p in m.parameters())
    t5_files, _ = t5_weight_files(weights.text_encoder)
    parameters += sum(math.prod(shape) for path in t5_files for shape in safetensors_shapes(path).values())
    need = memory.estimate(model.dit_config, model.vae_config, seconds, width, height, element_bytes(backend, device),
                           attention_scores=backend == "onnxruntime", keep_frames=keep_frames, parameters=parameters)
    memory.check_fits(need, device, width, height, seconds)


def _require_engines(backend: str, engines: Path | None) -> Path:
    if engines is None:
        raise K4TRTError(f"--backend {backend} needs --engines DIR; build it with: build-engines --out DIR")
    return engines


@dataclass
class Generation:
    seed: int
    latents: torch.Tensor  # float64 [T, H/8, W/8, 16] on the CPU, as the original's sampler leaves them
    frames: torch.Tensor | None  # float32 [F, H, W, 3] in [0, 1], when asked for
    stages: dict[str, float]  # seconds per stage, and total
    path: Path | None
    frames_written: int | None = None  # frames read back from the finished file at `path`


class Pipeline:
    """Kandinsky 4.0 T2V Flash. `Pipeline.from_pretrained("weights/", backend="torch")(text="a cat")`."""

    def __init__(
        self,
        text_encoder: TextEncoder | None,
        executor: Executor,
        schedule: Schedule,
        released: bool,
        cuda_graph: bool = True,
        world: parallel.World | None = None,
        *,
        vae_config: VAEConfig | None = None,
        attention_scores: bool = False,
    ) -> None:
        """`text_encoder` is None on the ranks of a sequence-parallel `world` other than 0. `vae_config` and
        `attention_scores` (whether the executor's attention keeps its scores in memory) feed the memory check
        of `generate`, which is skipped without a VAE config."""
        if text_encoder is None and (world is None or world.main):
            raise ValueError("a pipeline that encodes prompts needs a text encoder")
        self.text_encoder = text_encoder
        self.world = world
        self.executor = executor
        self.schedule = schedule
        self.released = released
        self.vae_config = vae_config
        self.attention_scores = attention_scores
        self._closed = False
        self._timesteps = schedule.timesteps(config.NUM_STEPS)
        self._alphas = schedule.alphas_cumprod_f64.to(executor.device)
        # One graph for the whole 4-step loop and one for a VAE body chunk (every chunk after the first has
        # the same shapes, so a single video already replays it). CPU executors always run eagerly.
        self._loop = CudaGraphRunner(self._denoise, enabled=cuda_graph)
        self._vae_body = CudaGraphRunner(self._decode_body, enabled=cuda_graph)
        self._on_step: Callable[[int], None] | None = None

    def _denoise(self, text: torch.Tensor, rope: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        return sample(self.executor, text, rope, noises, self._timesteps, self._alphas, self._on_step)

    def _decode_body(self, z: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames, caches_out = self.executor.vae_chunk(z, caches)
        return (frames, *caches_out)

    @property
    def dit_precision(self) -> str:
        """What the DiT computes in, for the user and the report: the engines' graph, or torch's dtype."""
        return self.executor.dit_precision

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike[str],
        backend: str = "torch",
        device: str | torch.device | None = None,
        engines: str | os.PathLike[str] | None = None,
        cuda_graph: bool = True,
        dit_precision: str | None = None,
    ) -> Pipeline:
        """`weights` is the original's cache layout; with `engines` (backend trt or onnxruntime) only its text
        encoder, tokenizer and scheduler are read, the DiT and VAE being compiled into the engines.
        `dit_precision` ("fp8" or "bf16") picks the engines' DiT graph (default: fp8 where built)."""
        folder = WeightsFolder(as_path("weights", weights))
        engines_dir = None if engines is None else as_path("engines", engines)
        check_backend(backend, dit_precision)
        folder.require(dit_and_vae=backend == "torch")
        schedule = Schedule.from_config_dir(folder.scheduler)
        device = resolve_device(device)
        if backend == "trt" and device.type != "cuda":
            raise K4TRTError("--backend trt needs a CUDA GPU; use --backend torch or onnxruntime on the CPU")
        model = model_facts(folder.root, backend, engines_dir)
        world = parallel.current(device)
        if world is not None:
            check_degree(model.dit_config, world.size)
        executor = make_executor(backend, folder, engines_dir, device, dit_precision, world)
        text_encoder = (TextEncoder.from_pretrained(folder.text_encoder, folder.tokenizer, device, executor.dtype)
                        if world is None or world.main else None)
        return cls(text_encoder, executor, schedule, config.is_released(executor.dit_config), cuda_graph, world,
                   vae_config=model.vae_config, attention_scores=backend == "onnxruntime")


    def generate(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        seconds: int = config.DEFAULT_SECONDS,
        width: int = config.DEFAULT_SIZE[0],
        height: int = config.DEFAULT_SIZE[1],
        output: str | Path | None = None,
        keep_frames: bool = False,
        progress: bool = True,
        recorder: Recorder | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """`recorder` marks the stages (the benchmark harness passes its own, to keep the raw marks);
        `on_progress(done, total)` follows the work units, 4 DiT steps then the VAE chunks (a server reports it).
        On the ranks of a sequence-parallel run other than 0, nothing is decoded, written or shown, and the result
        has the latents only.

        Every argument is checked before any model work (types, ranges, the output path, the memory the
        request needs); latents that are not finite (damaged DiT weights, an overflow) stop the run before
        anything is written."""
        if self._closed:
            raise K4TRTError("this Pipeline was closed; load a new one with Pipeline.from_pretrained")
        request = check_request(prompt, seconds, width, height, output, released=self.released, seed=seed)
        seed, seconds, width, height, output = request
        main = self.world is None or self.world.main
        if not main:
            output, keep_frames, progress = None, False, False
        elif seed is None:
            seed = random.randrange(config.SEED_RANGE.stop)
        ex = self.executor
        if self.vae_config is not None:
            need = memory.estimate(ex.dit_config, self.vae_config, seconds, width, height, ex.dtype.itemsize,
                                   attention_scores=self.attention_scores, keep_frames=keep_frames)
            memory.check_fits(need, ex.device, width, height, seconds)
        clock = recorder or Recorder(ex.device)
        latent_t = config.latent_frames(seconds)
        shape = (latent_t, height // config.VAE_SPATIAL_FACTOR, width // config.VAE_SPATIAL_FACTOR, config.LATENT_CHANNELS)

        clock.start()
        text = self.text_encoder.encode(prompt).to(ex.dtype) if self.text_encoder is not None else None
        if self.world is not None:
            text, seed = parallel.broadcast_prompt(self.world, text, seed, (TEXT_TOKENS, ex.dit_config.in_text_dim),
                                                   ex.dtype)
            if isinstance(ex, SequenceParallelExecutor):
                ex.exchange.reset()
        assert text is not None and seed is not None
        clock.lap("text encoder")
        rope = build_rope(ex.dit_config, *shape[:3], dtype=ex.dtype, device=ex.device)
        noises = [n.to(ex.dtype).to(ex.device) for n in draw_noises(seed, shape, config.NUM_STEPS)]
        clock.lap("prep")
        units = config.NUM_STEPS + len(chunk_bounds(latent_t))
        report = on_progress or (lambda done, total: None)

        with tqdm(total=config.NUM_STEPS, desc="DiT", unit="step", disable=not progress) as steps:
            if self._loop.enabled and ex.device.type == "cuda":
                # Inside a CUDA graph nothing on the host runs per step: one bar update, one stage.
                self._on_step = None
                latents = self._loop(text, rope, *noises).clone()
                clock.lap("dit")
                steps.update(config.NUM_STEPS)
                report(config.NUM_STEPS, units)
            else:
                def on_step(step: int) -> None:
                    clock.lap(f"dit step {step + 1}")
                    steps.update()
                    report(step + 1, units)

                self._on_step = on_step
                latents = self._loop(text, rope, *noises)
        # One reduction over the final latents is the cheapest place that catches, for every backend, non-finite
        # DiT or T5 weights (any one reaches every latent through attention) and an engine's overflow.
        _require_finite(latents, "the DiT produced NaN or infinite latents", "or the DiT engine overflowed (build "
                        "it with --precision bf16)")

        exchange = ex.exchange.seconds() if isinstance(ex, SequenceParallelExecutor) else None
        if exchange is not None:
            clock.note("dit exchange", exchange)
        frames: list[torch.Tensor] = []
        chunks = tqdm(total=len(chunk_bounds(latent_t)), desc="VAE", unit="chunk", disable=not progress)
        with _writer(output, width, height) as writer, chunks:
            for done, pixels in enumerate(decode_chunks(ex, latents, self._vae_body) if main else (),
                                          config.NUM_STEPS + 1):
                clock.lap("vae decode")
                chunks.update()
                _require_finite(pixels, "the VAE decoded NaN or infinite pixels")
                if keep_frames:
                    frames.append(pixels.cpu())
                if writer is not None:
                    writer.write(pixels)
                    clock.lap("video encode")
                report(done, units)
        if writer is not None:
            clock.lap("video encode")  # ffmpeg finishing the file and the frame count read back
        return Generation(
            seed=seed,
            latents=latents.cpu(),
            frames=torch.cat(frames) if keep_frames else None,
            stages=clock.stages(),
            path=output,
            frames_written=writer.frames_written if writer is not None else None,
        )

    def close(self) -> None:
        """Release the captured graphs and the executor's device memory; closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        self._loop.reset()
        self._vae_body.reset()
        self.executor.close()

    def __call__(
        self,
        text: str,
        save_path: str | Path | None = "./test.mp4",
        time_length: int = 12,
        width: int = 512,
        height: int = 512,
        seed: int | None = None,
    ) -> Generation:
        """Shaped like the original's `Kandinsky4T2VPipeline.__call__` so existing callers port directly."""
        return self.generate(text, seed=seed, seconds=time_length, width=width, height=height, output=save_path)


def _require_finite(tensor: torch.Tensor, what: str, or_else: str = "") -> None:
    """Refuse what would decode to a blank video (NaN pixels become black) before anything is written."""
    if not bool(torch.isfinite(tensor).all()):
        raise K4TRTError(f"{what}, so the video would be blank; a weight file is damaged (find it with "
                         f"`k4trt weights verify DIR`){' ' + or_else if or_else else ''}")


def _writer(output: Path | None, width: int, height: int) -> contextlib.AbstractContextManager[FrameWriter | None]:
    return FrameWriter(output, width, height) if output is not None else contextlib.nullcontext()


def save_array(path: Path, array: torch.Tensor) -> None:
    """`--save-latents` / `--save-frames`: float32 .npy, written atomically."""
    with atomic_file(path) as f:
        np.save(f, array.float().numpy())
