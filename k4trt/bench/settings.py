"""What one benchmark run measures, checked before anything is loaded so a bad flag fails in a second."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt import config
from k4trt.errors import K4TRTError

if TYPE_CHECKING:
    import torch

BACKENDS = ("trt-fp8", "trt-bf16", "torch", "torch-graph")
ORIGINAL = "original"
DEFAULT_PROMPT = "Several giant wooly mammoths approach treading through a snowy meadow"
# The case DESIGN.md's budget and the original's 11 s are stated for.
REFERENCE_SIZE = config.DEFAULT_SIZE
REFERENCE_SECONDS = config.DEFAULT_SECONDS
TINY_SIZE = (64, 64)
TINY_SECONDS = 1


@dataclass(frozen=True)
class Settings:
    backends: tuple[str, ...]
    width: int
    height: int
    seconds: int
    device: torch.device
    weights: Path | None
    engines: Path | None
    original: Path | None
    tiny: bool
    warmup: int
    repeat: int
    prompt: str
    seed: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (config.latent_frames(self.seconds), self.height // config.VAE_SPATIAL_FACTOR,
                self.width // config.VAE_SPATIAL_FACTOR)

    @property
    def measured(self) -> tuple[str, ...]:
        """Every subject of the run, the original last."""
        return self.backends + ((ORIGINAL,) if self.original is not None else ())

    @property
    def is_reference_case(self) -> bool:
        """Whether the original's 11 s and the 3 s target apply (they are stated for this case only)."""
        return not self.tiny and (self.width, self.height) == REFERENCE_SIZE and self.seconds == REFERENCE_SECONDS

    def to_json(self) -> dict[str, object]:
        t, h, w = self.latent_shape
        return {
            "backends": list(self.backends),
            "width": self.width,
            "height": self.height,
            "duration_s": self.seconds,
            "latent_frames": t,
            "video_frames": config.video_frames(t),
            "latent_shape": [t, h, w],
            "device": str(self.device),
            "weights": "tiny random" if self.tiny else (str(self.weights) if self.weights else "random"),
            "engines": str(self.engines) if self.engines else None,
            "original": str(self.original) if self.original else None,
            "warmup": self.warmup,
            "repeat": self.repeat,
            "prompt": self.prompt,
            "seed": self.seed,
        }


def parse_backends(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise K4TRTError(f"--backends {text!r}: choose from {', '.join(BACKENDS)} (comma-separated); "
                         f"the original is measured with --original DIR")
    return tuple(dict.fromkeys(names))


def resolve(
    *, backends: str, size: str | None, duration: float | None, device: str | None, weights: Path | None,
    engines: Path | None, original: Path | None, tiny: bool, warmup: int, repeat: int, prompt: str, seed: int,
) -> Settings:
    names = parse_backends(backends)
    if tiny and weights is not None:
        raise K4TRTError("--tiny builds a tiny random model; drop --weights (or drop --tiny to use those weights)")
    for flag, path in (("--weights", weights), ("--engines", engines), ("--original", original)):
        if path is not None and not path.is_dir():
            raise K4TRTError(f"{flag} {path} is not a folder")
    if original is not None and not (original / "kandinsky" / "__init__.py").is_file():
        raise K4TRTError(f"--original {original} has no kandinsky/__init__.py; pass the root of a checkout of "
                         "https://github.com/ai-forever/Kandinsky-4")
    if warmup < 1:
        raise K4TRTError("--warmup must be at least 1: the first run pays one-time setup (kernel selection, CUDA "
                         "graph capture) that a user pays once per process, not per video")
    if repeat < 1:
        raise K4TRTError("--repeat must be at least 1")
    if not prompt.strip():
        raise K4TRTError("--prompt is empty; give the prompt to encode (or leave the flag out for the default)")
    default_size, default_seconds = (TINY_SIZE, TINY_SECONDS) if tiny else (REFERENCE_SIZE, REFERENCE_SECONDS)
    width, height = config.parse_size(size) if size else default_size
    seconds = config.check_duration(duration if duration is not None else default_seconds)
    released = not tiny and _released(weights)
    config.check_size(width, height, released=released)
    resolved = _device(device)
    if resolved.type == "cpu" and released:
        raise K4TRTError("the full-size model on the CPU would take hours per run; add --tiny for a CPU smoke run, "
                         "or run on a CUDA GPU")
    return Settings(names, width, height, seconds, resolved, weights, engines, original, tiny, warmup, repeat,
                    prompt, seed)


def _released(weights: Path | None) -> bool:
    """Random full-size runs are the released architecture; a weights folder is whatever its DiT's shapes say
    (read from the checkpoint's header through mmap, without loading the tensors)."""
    if weights is None:
        return True
    from k4trt.models.dit import infer_dit_config
    from k4trt.weights.checkpoint import read_dit_state_dict
    from k4trt.weights.layout import WeightsFolder

    folder = WeightsFolder(weights).require()
    return config.is_released(infer_dit_config(read_dit_state_dict(folder.dit)))


def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise K4TRTError("--device cuda: PyTorch sees no CUDA GPU; use --device cpu with --tiny")
    return torch.device(name)
