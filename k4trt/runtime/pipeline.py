"""Prompt -> video: T5, the shared sampler over an executor, the shared VAE chunk schedule, the video writer.

The backend only chooses the executor; every other step is this one code path. Under an initialised process
group of P > 1 ranks (torchrun, or the caller's `init_process_group`) the pipeline is one rank of a
sequence-parallel run (`k4trt.parallel`): rank 0 alone loads T5 and encodes the prompt, broadcasting the
embedding and the seed; every rank runs the sampler with the DiT split over the ranks; rank 0 alone decodes
and writes.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from k4trt import config
from k4trt.config import TEXT_TOKENS, DiTConfig
from k4trt.core.executor import Executor
from k4trt.core.sampler import draw_noises, sample
from k4trt.core.vae_schedule import chunk_bounds, decode_chunks
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path
from k4trt.models.dit import build_rope
from k4trt.models.scheduler import Schedule
from k4trt.models.text import TextEncoder
from k4trt.parallel import world as parallel
from k4trt.parallel.degree import check_degree
from k4trt.parallel.exchange import ProcessGroupExchange
from k4trt.parallel.executor import SequenceParallelExecutor
from k4trt.runtime import BACKENDS
from k4trt.runtime.cuda_graph import CudaGraphRunner
from k4trt.runtime.report import Recorder
from k4trt.runtime.video import FrameWriter, check_output_path
from k4trt.weights.layout import WeightsFolder


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise K4TRTError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise K4TRTError(f"device {device} is not supported; use cuda or cpu")
    return device


def make_executor(
    backend: str, weights: WeightsFolder, engines: Path | None, device: torch.device, dit_precision: str | None = None,
    world: parallel.World | None = None,
) -> Executor:
    """Imports each backend only when chosen, so a machine without TensorRT or ONNX Runtime can still run.
    `dit_precision` chooses among the DiT graphs of an engines folder (default: fp8 where built). With `world`,
    the executor of this rank of a sequence-parallel run."""
    if backend not in BACKENDS:
        raise K4TRTError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    exchange = ProcessGroupExchange(world.size, device) if world is not None else None
    if backend == "torch":
        from k4trt.core.executor import default_dtype
        from k4trt.runtime.torch_executor import TorchExecutor

        if dit_precision is not None:
            raise K4TRTError("a DiT precision applies to engines (--backend trt or onnxruntime); --backend torch "
                             "runs bf16 on a GPU and float32 on the CPU")
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


def model_dit_config(weights: Path, backend: str, engines: Path | None) -> DiTConfig:
    """The DiT a run would use, known before anything loads: from the engines' manifest for the engine
    backends (which never open the checkpoint), else from the checkpoint's tensor shapes (memory-mapped)."""
    if backend != "torch":
        from k4trt.runtime.engines_folder import open_engines

        engines = _require_engines(backend, engines)
        return open_engines(engines, None, "engines").require_model(engines).dit_config
    from k4trt.models.dit import infer_dit_config
    from k4trt.weights.checkpoint import read_dit_state_dict

    return infer_dit_config(read_dit_state_dict(WeightsFolder(weights).require().dit))


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
    ) -> None:
        """`text_encoder` is None on the ranks of a sequence-parallel `world` other than 0."""
        if text_encoder is None and (world is None or world.main):
            raise ValueError("a pipeline that encodes prompts needs a text encoder")
        self.text_encoder = text_encoder
        self.world = world
        self.executor = executor
        self.schedule = schedule
        self.released = released
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

    @classmethod
    def from_pretrained(
        cls,
        weights: str | Path,
        backend: str = "torch",
        device: str | torch.device | None = None,
        engines: str | Path | None = None,
        cuda_graph: bool = True,
        dit_precision: str | None = None,
    ) -> Pipeline:
        """`weights` is the original's cache layout; with `engines` (backend trt or onnxruntime) only its text
        encoder, tokenizer and scheduler are read, the DiT and VAE being compiled into the engines."""
        if backend not in BACKENDS:
            raise K4TRTError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        folder = WeightsFolder(weights).require(dit_and_vae=backend == "torch")
        schedule = Schedule.from_config_dir(folder.scheduler)
        device = resolve_device(device)
        if backend == "trt" and device.type != "cuda":
            raise K4TRTError("--backend trt needs a CUDA GPU; use --backend torch or onnxruntime on the CPU")
        engines_dir = Path(engines) if engines is not None else None
        world = parallel.current(device)
        if world is not None:
            check_degree(model_dit_config(folder.root, backend, engines_dir), world.size)
        executor = make_executor(backend, folder, engines_dir, device, dit_precision, world)
        text_encoder = (TextEncoder.from_pretrained(folder.text_encoder, folder.tokenizer, device, executor.dtype)
                        if world is None or world.main else None)
        return cls(text_encoder, executor, schedule, config.is_released(executor.dit_config), cuda_graph, world)


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
        has the latents only."""
        output = Path(output) if output is not None else None
        seconds = check_request(prompt, seconds, width, height, output, released=self.released, seed=seed)
        main = self.world is None or self.world.main
        if not main:
            output, keep_frames, progress = None, False, False
        elif seed is None:
            seed = random.randrange(2**63 - 1)
        ex = self.executor
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
                if keep_frames:
                    frames.append(pixels.cpu())
                if writer is not None:
                    writer.write(pixels)
                    clock.lap("video encode")
                report(done, units)
        return Generation(
            seed=seed,
            latents=latents.cpu(),
            frames=torch.cat(frames) if keep_frames else None,
            stages=clock.stages(),
            path=output,
        )

    def close(self) -> None:
        """Release the captured graphs and the executor's device memory."""
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


def check_request(
    prompt: str, seconds: object, width: int, height: int, output: Path | None, *, released: bool,
    seed: object = None,
) -> int:
    """Every check that needs no model work, so bad input fails before anything runs or is written; returns
    the duration as whole seconds. The CLI and the server call it before loading or queueing anything,
    `generate` on every call."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise K4TRTError("the prompt is empty; describe the video to generate")
    seconds = config.check_duration(seconds)
    config.check_size(width, height, released=released)
    if seed is not None:
        config.check_seed(seed)
    if output is not None:
        check_output_path(output, single_frame=seconds == 0)
    return seconds


def _writer(output: Path | None, width: int, height: int) -> contextlib.AbstractContextManager[FrameWriter | None]:
    return FrameWriter(output, width, height) if output is not None else contextlib.nullcontext()


def save_array(path: Path, array: torch.Tensor) -> None:
    """`--save-latents` / `--save-frames`: float32 .npy, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array.float().numpy())
