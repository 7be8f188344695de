"""Facts of the released Kandinsky 4.0 T2V Flash model (checked against ai-forever/Kandinsky-4)."""

from __future__ import annotations

from dataclasses import dataclass

from k4trt.errors import K4TRTError

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
# The case every default, the performance budget and the original's 11 s are stated for.
DEFAULT_SIZE = (672, 384)  # width, height
DEFAULT_SECONDS = MAX_SECONDS
MAX_SEED = 2**63 - 1  # seeds travel as int64 (SQLite, NumPy); torch's generator takes every one of them


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
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise K4TRTError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 672x384")
    return int(parts[0]), int(parts[1])


def check_size(width: int, height: int, released: bool) -> None:
    """The released checkpoint only knows its seven trained sizes; other checkpoints need multiples of 16."""
    if released:
        if (width, height) not in TRAINED_SIZES:
            listed = ", ".join(f"{w}x{h}" for w, h in TRAINED_SIZES)
            raise K4TRTError(f"size {width}x{height} is not one the model was trained on; use one of {listed}")
    elif width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise K4TRTError(f"size {width}x{height}: width and height must be positive multiples of {SIZE_MULTIPLE}")


def check_duration(seconds: object) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        if isinstance(seconds, float) and seconds.is_integer():
            seconds = int(seconds)
        else:
            raise K4TRTError(f"duration {seconds!r} must be a whole number of seconds from 0 to {MAX_SECONDS}")
    if not 0 <= seconds <= MAX_SECONDS:
        raise K4TRTError(f"duration {seconds} s is outside 0–{MAX_SECONDS} s (0 makes a single image)")
    return seconds


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise K4TRTError(f"seed {seed!r} must be a whole number from 0 to {MAX_SEED}")
    return seed
