"""The original implementation (ai-forever/Kandinsky-4) as a subject, measured in the same run as k4trt.

Its `kandinsky` package is imported from the checkout given with `--original DIR` and driven through its own
pipeline object and `__call__`; nothing of it is copied here. Stages are marked from outside with forward
hooks: after the T5 forward, before the first DiT forward ("prep"), after each DiT forward, after each VAE
decoder call, and when `__call__` returns. `__call__` runs with `return_frames=True` (its cheapest output
path: frames as PIL images, no video file); that conversion is reported as its own stage "output".

Without `--weights` the original's own classes are built at full size with random weights on the GPU, as
k4trt's are; every Linear is re-initialised at random because the original zero-initialises its modulations,
and zero modulations would make it a different (degenerate) workload from k4trt's random one.
"""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path
from typing import cast

import torch

from k4trt.bench import flash_attn_shim, models
from k4trt.bench.settings import Settings
from k4trt.bench.subjects import Subject, Unavailable
from k4trt.bench.timing import Recorder, timed
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG
from k4trt.weights.layout import WeightsFolder

_NEEDS = "pip install omegaconf einops diffusers torchvision (torchvision built for the installed torch)"


def load_original(settings: Settings) -> Subject:
    if settings.device.type != "cuda":
        raise Unavailable("the original implementation runs on CUDA only (it moves tensors to cuda:0 and autocasts on CUDA)")
    if settings.tiny:
        raise Unavailable("the original builds the full-size model; drop --tiny to measure it")
    notes = []
    if flash_attn_shim.install_if_absent():
        notes.append("flash_attn is not installed: the original's attention runs through an SDPA shim "
                     "(PyTorch's FlashAttention-2 kernels)")
    assert settings.original is not None  # the original is measured only when --original is given
    kandinsky = _import_kandinsky(settings.original)
    device = settings.device
    if settings.weights is not None:
        folder = WeightsFolder(settings.weights)
        pipe, seconds = timed(lambda: kandinsky.get_T2V_pipeline(
            device_map=str(device), cache_dir=str(folder.root), dit_path=str(folder.dit),
            text_encoder_path=str(folder.text_encoder), tokenizer_path=str(folder.tokenizer),
            vae_path=str(folder.vae), scheduler_path=str(folder.scheduler)), device)
        load_s = {"pipeline": seconds}
    else:
        pipe, load_s = _random_pipeline(kandinsky, device)
        notes.append("random weights, every Linear re-initialised (the original zero-initialises its modulations); "
                     "T5 fed fixed random token ids (no tokenizer)")
    notes.append("total is the original's __call__ with return_frames=True: it ends with frames as PIL images")
    marks = _Marks(pipe)

    def run(rec: Recorder) -> None:
        marks.begin(rec)
        pipe(settings.prompt, time_length=settings.seconds, width=settings.width, height=settings.height,
             seed=settings.seed, return_frames=True)
        rec.lap("output")

    def close() -> None:
        marks.remove()
        nonlocal pipe
        del pipe
        gc.collect()
        torch.cuda.empty_cache()

    return Subject(run, close, load_s, notes)


def _import_kandinsky(root: Path):
    root = root.resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("kandinsky")
    except ImportError as e:
        raise Unavailable(f"cannot import the original's kandinsky package from {root} ({e}); {_NEEDS}") from None
    if Path(module.__file__ or "").resolve().parent != root / "kandinsky":
        raise Unavailable(f"`import kandinsky` found {module.__file__}, not {root / 'kandinsky'}; "
                          "uninstall that package or run from another folder")
    return module


def _random_pipeline(kandinsky, device: torch.device):
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import AutoencoderKLCogVideoX
    from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler
    from kandinsky.model.dit import DiffusionTransformer3D  # pyright: ignore[reportMissingImports]  # from --original

    dtype = torch.bfloat16
    params = kandinsky.get_default_conf("", "", "", "", "").dit.params  # the released DiT's constructor arguments

    def build_dit() -> torch.nn.Module:
        with models.built_on(device, dtype):
            dit = DiffusionTransformer3D(**params)
            for module in dit.modules():
                if isinstance(module, torch.nn.Linear):
                    module.reset_parameters()
        return dit.to(dtype=dtype, device=device)  # as get_T2V_pipeline does (it casts the RoPE buffers too)

    def build_vae() -> torch.nn.Module:
        # from_config, not the constructor: it drops the config keys an older diffusers (the original pins
        # 0.30.3) does not know, as loading the released vae/config.json would.
        with models.built_on(device, dtype):
            vae = AutoencoderKLCogVideoX.from_config(models.COGVIDEOX_5B_VAE.to_diffusers_config())
        return cast(torch.nn.Module, vae).eval()

    dit, dit_s = timed(build_dit, device)
    vae, vae_s = timed(build_vae, device)
    text, text_s = timed(lambda: models.RandomTextEncoder(models.random_t5(models.T5_XXL, device, dtype)), device)
    pipe = kandinsky.Kandinsky4T2VPipeline(
        device_map={"dit": device, "vae": device, "text_embedder": device},
        dit=dit,
        text_embedder=text,
        vae=vae,
        noise_scheduler=CogVideoXDDIMScheduler.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG),
        resolution=512,
    )
    return pipe, {"text encoder": text_s, "dit": dit_s, "vae": vae_s}


class _Marks:
    """Forward hooks that lap the current recorder at the original's stage boundaries."""

    def __init__(self, pipe) -> None:
        self.rec: Recorder | None = None
        self.steps = 0
        self.handles = [
            pipe.text_embedder.llm.register_forward_hook(lambda *_: self._lap("text encoder")),
            pipe.dit.register_forward_pre_hook(self._dit_start),
            pipe.dit.register_forward_hook(self._dit_end),
            pipe.vae.decoder.register_forward_hook(lambda *_: self._lap("vae decode")),
        ]

    def begin(self, rec: Recorder) -> None:
        self.rec, self.steps = rec, 0
        rec.start()

    def _lap(self, stage: str) -> None:
        if self.rec is not None:
            self.rec.lap(stage)

    def _dit_start(self, *_) -> None:
        if self.steps == 0:
            self._lap("prep")

    def _dit_end(self, *_) -> None:
        self.steps += 1
        self._lap(f"dit step {self.steps}")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
