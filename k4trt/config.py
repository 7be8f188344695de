"""Facts of the released Kandinsky 4.0 T2V Flash model (checked against ai-forever/Kandinsky-4)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from k4trt.errors import RequestTypeError, RequestValueError

FPS = 8
MAX_SECONDS = 12
TEXT_TOKENS = 224
NUM_STEPS = 4
LATENT_CHANNELS = 16
VAE_SPATIAL_FACTOR = 8
VAE_TEMPORAL_FACTOR = 4

# (width, height) pairs the released model was trained on; the original lists them as (height, width).
TRAINED_SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (736, 352),
    (352, 736),
    (672, 384),
    (384, 672),
    (544, 480),
    (480, 544),
)
SIZE_MULTIPLE = 16  # VAE /8 then DiT patch /2
#: what the DiT's engines compute their GEMMs in (the VAE's are always bf16); here, not in the graph registry,
#: so the command line can offer them without importing torch
PRECISIONS = ("fp8", "bf16")
# The case every default, the performance budget and the original's 11 s are stated for.
DEFAULT_SIZE = (672, 384)  # width, height
DEFAULT_SECONDS = MAX_SECONDS
# Seeds are 0 to 2**63-1: every one a torch.Generator takes without wrapping, and every one that travels as a
# signed 64-bit integer (the serving job store's SQLite, NumPy, most JSON readers). Negative seeds are refused
# rather than given a meaning, because torch folds -1 onto 2**64-1 and a seed printed as -1 would not say
# which video it made.
SEED_RANGE = range(2**63)


@dataclass(frozen=True)
class DiTConfig:
    """Dimensions of the diffusion transformer; every one but `axes_dims` is inferred from weight shapes."""

    in_visual_dim: int = 16
    in_text_dim: int = 4096
    out_visual_dim: int = 16
    time_dim: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 3072
    ff_dim: int = 12288
    num_blocks: int = 21  # pairs of (local, global) blocks
    axes_dims: tuple[int, int, int] = (16, 24, 24)

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim


RELEASED_DIT = DiTConfig()


def is_released(dit: DiTConfig) -> bool:
    """Whether a checkpoint is the released architecture, which only knows its seven trained sizes."""
    return dit == RELEASED_DIT


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def latent_frames(seconds: int) -> int:
    """T = 2·seconds + 1 latent frames (seconds·8 fps / 4 temporal compression, plus the causal first frame)."""
    return 1 if seconds == 0 else seconds * FPS // VAE_TEMPORAL_FACTOR + 1


def video_frames(latent_t: int) -> int:
    return VAE_TEMPORAL_FACTOR * (latent_t - 1) + 1


def parse_size(text: str) -> tuple[int, int]:
    """'672x384' -> (672, 384) as (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise RequestValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 672x384")
    return int(parts[0]), int(parts[1])


def check_size(width: object, height: object, released: bool) -> tuple[int, int]:
    """The released checkpoint only knows its seven trained sizes; other checkpoints need multiples of 16.
    Returns (width, height) as ints (a numpy integer is accepted; a float or a string is not)."""
    width, height = _whole("width", width), _whole("height", height)
    if released:
        if (width, height) not in TRAINED_SIZES:
            listed = ", ".join(f"{w}x{h}" for w, h in TRAINED_SIZES)
            raise RequestValueError(f"size {width}x{height} is not one the model was trained on; use one of {listed}")
    elif width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise RequestValueError(
            f"size {width}x{height}: width and height must be positive multiples of {SIZE_MULTIPLE}")
    return width, height


def check_duration(seconds: object) -> int:
    if isinstance(seconds, float) and seconds.is_integer():
        seconds = int(seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, (numbers.Integral, float)):
        raise RequestTypeError(f"duration {seconds!r} must be a whole number of seconds from 0 to {MAX_SECONDS}")
    if isinstance(seconds, float):  # fractional, nan or infinite
        raise RequestValueError(f"duration {seconds!r} must be a whole number of seconds from 0 to {MAX_SECONDS}")
    seconds = int(seconds)
    if not 0 <= seconds <= MAX_SECONDS:
        raise RequestValueError(f"duration {seconds} s is outside 0–{MAX_SECONDS} s (0 makes a single image)")
    return seconds


def check_seed(seed: object) -> int:
    """A seed as an int in SEED_RANGE (see there why negative seeds are refused)."""
    seed = _whole("seed", seed)
    if seed not in SEED_RANGE:
        raise RequestValueError(f"seed {seed} is outside 0 to 2**63-1 ({SEED_RANGE.stop - 1}); "
                                "leave it out for a random one")
    return seed


def _whole(name: str, value: object) -> int:
    """Python and numpy integers pass; bools, floats (64.0 included) and strings are a caller's mistake."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)
