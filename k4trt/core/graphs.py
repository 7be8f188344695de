"""The graph registry: every graph that passes from export to engine to runtime, described once.

An engines folder holds, per DiT precision, four graphs: `dit.<precision>` (one denoising step; for P
sequence-parallel ranks `dit.sp{P}.<precision>`, the one graph every rank runs on its rows), and the
VAE decoder's chunk graphs `vae_image` (the lone latent frame of an image), `vae_head` (the first chunk of
a video, 3 latent frames, caches out) and `vae_body` (every later chunk, 2 latent frames, caches in and
out). For each graph this module holds its file names (the ONNX TensorRT builds from, with its external
data; the float32 twin ONNX Runtime runs; the TensorRT plan), its tensors in and out with their dtypes and
dynamic axes, and the concrete input shapes of a request (size, duration), from which a build profile's
min/opt/max follow. The exporter names tensors from here, the engine builder derives profiles from here,
the executors bind by these names and pick a chunk's VAE graph here; nothing else spells a graph or a
tensor name.

NVIDIA's demoDiffusion keeps the same facts in one class per network; here the graphs differ only in data,
so they are frozen records made by two functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from k4trt import config
from k4trt.config import PRECISIONS, TEXT_TOKENS, DiTConfig
from k4trt.core.profiles import ShapeRange, derive_ranges
from k4trt.core.vae_schedule import CHUNK, FIRST_CHUNK
from k4trt.errors import K4TRTError
from k4trt.models.vae import VAEConfig, VAEDecoder

DIT = "dit"
#: latent frames per chunk of each VAE graph; the first chunk of a video holds the odd remainder
VAE_ROLES = {"image": 1, "head": FIRST_CHUNK, "body": CHUNK}
#: every graph of an engines folder, by name; the DiT's files also carry its precision
GRAPH_NAMES = (DIT, *(f"vae_{role}" for role in VAE_ROLES))
_TWIN = ".f32"
_DATA = ".data"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: `factor` times the size of `symbol` (e.g. the latent height is 2 x the patch rows)."""

    symbol: str
    factor: int = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    #: dtype in the graph TensorRT builds; the float32 twin widens every bf16 tensor to float32
    dtype: torch.dtype
    dynamic: Mapping[int, Axis] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphSpec:
    name: str  # dit | vae_image | vae_head | vae_body
    stem: str  # file stem: dit.fp8, dit.bf16, dit.sp4.fp8, vae_image, ...
    precision: str  # what the graph computes its GEMMs in: fp8 | bf16 (the VAE is always bf16)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: sequence-parallel degree: the number of ranks one call of the graph spans (1: a single GPU's graph)
    degree: int = 1

    @property
    def onnx(self) -> str:
        return f"{self.stem}.onnx"

    @property
    def twin(self) -> str:
        return f"{self.stem}{_TWIN}.onnx"

    @property
    def plan(self) -> str:
        return f"{self.stem}.plan"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def is_dit(self) -> bool:
        return self.name == DIT


def external_data(onnx_file: str) -> str:
    """Where the weights of an ONNX file live: `<name>.data` beside it (always external, so graphs of any size
    are written the same way and the .onnx itself stays small enough to inspect)."""
    return onnx_file + _DATA


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise K4TRTError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}; pass --precision fp8 or bf16")
    return precision


# ---------------------------------------------------------------- the DiT


def dit_graph(precision: str, cfg: DiTConfig, degree: int = 1) -> GraphSpec:
    """One DiT call: latents x [T, h, w, C], the text embedding [224, D], the timestep [1] (float32) and the
    RoPE table [T/pt, h/ph, w/pw, head_dim/2, 2, 2] -> velocity [T, h, w, C]; T, h and w are dynamic.

    With `degree` P > 1, the graph one rank of P runs (`dit.sp{P}.<precision>`, the same on every rank):
    its rows of the joint sequence in, its rows of the output patches out (see `k4trt.parallel.layout`):
    x [n, pt·ph·pw·C] visual patches, text [224/P, D], time [1], rope [n, head_dim/2, 2, 2], and `order`
    [N + 224] int64, which rows of the P ranks' gathered rows are the real tokens, in the single-GPU order
    [visual; text]; -> velocity [n, C·pt·ph·pw]. n (rows per rank) and N + 224 are dynamic."""
    check_precision(precision)
    pt, ph, pw = cfg.patch_size
    if degree == 1:
        stem = f"{DIT}.{precision}"
        latent = {0: Axis("t", pt), 1: Axis("h", ph), 2: Axis("w", pw)}
        grid = {0: Axis("t"), 1: Axis("h"), 2: Axis("w")}
        order: tuple[TensorSpec, ...] = ()
    else:  # one axis of rows per rank instead of the latent grid, and the gathered rows' order
        stem = f"{DIT}.sp{degree}.{precision}"
        latent = grid = {0: Axis("n")}
        order = (TensorSpec("order", torch.int64, {0: Axis("m")}),)
    return GraphSpec(
        name=DIT,
        stem=stem,
        precision=precision,
        inputs=(
            TensorSpec("x", torch.bfloat16, latent),
            TensorSpec("text", torch.bfloat16),
            TensorSpec("time", torch.float32),
            TensorSpec("rope", torch.bfloat16, grid),
            *order,
        ),
        outputs=(TensorSpec("velocity", torch.bfloat16, latent),),
        degree=degree,
    )


def dit_stem_degree(stem: str) -> int | None:
    """The degree of a DiT graph stem made by `dit_graph` (`dit.bf16` -> 1, `dit.sp4.fp8` -> 4); None for any
    other stem."""
    parts = stem.split(".")
    if parts[0] != DIT or parts[-1] not in PRECISIONS or len(parts) not in (2, 3):
        return None
    if len(parts) == 2:
        return 1
    degree = parts[1].removeprefix("sp")
    return int(degree) if parts[1].startswith("sp") and degree.isdigit() and int(degree) > 1 else None


def dit_input_shapes(cfg: DiTConfig, latent_t: int, h: int, w: int, degree: int = 1) -> dict[str, Shape]:
    """The DiT graph's input shapes for latents [latent_t, h, w] (one rank's, for `degree` > 1)."""
    pt, ph, pw = cfg.patch_size
    if min(latent_t, h, w) <= 0 or latent_t % pt or h % ph or w % pw:
        raise K4TRTError(
            f"latent shape {latent_t}x{h}x{w} is not a positive multiple of the DiT patch {cfg.patch_size}; "
            "use a video size that is a multiple of 16"
        )
    grid = (latent_t // pt, h // ph, w // pw)
    if degree > 1:
        tokens = grid[0] * grid[1] * grid[2]
        rows = -(-tokens // degree)  # visual rows per rank, the last rank's padded at the end
        return {
            "x": (rows, cfg.in_visual_dim * pt * ph * pw),
            "text": (TEXT_TOKENS // degree, cfg.in_text_dim),
            "time": (1,),
            "rope": (rows, cfg.head_dim // 2, 2, 2),
            "order": (tokens + TEXT_TOKENS,),
        }
    return {
        "x": (latent_t, h, w, cfg.in_visual_dim),
        "text": (TEXT_TOKENS, cfg.in_text_dim),
        "time": (1,),
        "rope": (*grid, cfg.head_dim // 2, 2, 2),
    }


def dit_sequence(cfg: DiTConfig, x_shape: Shape) -> int:
    """The joint sequence the DiT's attention runs over for latents of `x_shape`: visual patches, then text."""
    pt, ph, pw = cfg.patch_size
    t, h, w = x_shape[:3]
    return (t // pt) * (h // ph) * (w // pw) + TEXT_TOKENS


# ---------------------------------------------------------------- the VAE decoder chunks


def vae_graph(role: str, cfg: VAEConfig) -> GraphSpec:
    """One causal chunk of `VAE_ROLES[role]` latent frames: z [1, C, t, h, w] (and for the body the caches the
    previous chunk left) -> frames [1, 3, f, 8h, 8w] (and, but for an image, the caches for the next chunk).
    Latent height and width are dynamic; each cache is a fixed multiple of them."""
    _check_role(role)
    factors = _cache_factors(cfg)
    z = TensorSpec("z", torch.bfloat16, {3: Axis("h"), 4: Axis("w")})
    scale = config.VAE_SPATIAL_FACTOR
    frames = TensorSpec("frames", torch.bfloat16, {3: Axis("h", scale), 4: Axis("w", scale)})

    def caches(prefix: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(f"{prefix}_{k}", torch.bfloat16, {3: Axis("h", f), 4: Axis("w", f)})
                     for k, f in enumerate(factors))

    return GraphSpec(
        name=f"vae_{role}",
        stem=f"vae_{role}",
        precision="bf16",
        inputs=(z, *caches("cache_in")) if role == "body" else (z,),
        outputs=(frames,) if role == "image" else (frames, *caches("cache_out")),
    )


def vae_role(first: bool, latent_frames: int) -> str:
    """The VAE graph that decodes a chunk: the image graph for a lone first frame (its frame count picks other
    code paths in the decoder), the head for any other first chunk, the body after it."""
    if not first:
        return "body"
    return "image" if latent_frames == VAE_ROLES["image"] else "head"


def vae_input_shapes(cfg: VAEConfig, role: str, h: int, w: int) -> dict[str, Shape]:
    """The `role` graph's input shapes for latents of spatial size (h, w)."""
    _check_role(role)
    shapes: dict[str, Shape] = {"z": (1, cfg.latent_channels, VAE_ROLES[role], h, w)}
    if role == "body":
        shapes |= {f"cache_in_{k}": s for k, s in enumerate(_cache_shapes(cfg, h, w))}
    return shapes


@functools.lru_cache(maxsize=64)
def _cache_shapes(cfg: VAEConfig, h: int, w: int) -> tuple[Shape, ...]:
    """Found by a dry run of a weightless decoder on the meta device (no memory, no arithmetic)."""
    with torch.device("meta"):
        return tuple(VAEDecoder(cfg).cache_shapes(h, w))


def _cache_factors(cfg: VAEConfig) -> list[int]:
    """Each cache's height (and width) per latent row: the resolution of the decoder level it belongs to."""
    return [shape[3] for shape in _cache_shapes(cfg, 1, 1)]


def _check_role(role: str) -> None:
    if role not in VAE_ROLES:
        raise ValueError(f"unknown VAE graph role {role!r}; expected one of {', '.join(VAE_ROLES)}")


# ---------------------------------------------------------------- a folder's graphs, requests and profiles


def folder_graphs(precision: str, dit: DiTConfig, vae: VAEConfig, degree: int = 1) -> dict[str, GraphSpec]:
    """{name: spec} of the four graphs one build of `precision` (for `degree` ranks) writes into an engines
    folder; only the DiT's depends on the degree, the VAE runs on one rank."""
    return {DIT: dit_graph(precision, dit, degree)} | {f"vae_{role}": vae_graph(role, vae) for role in VAE_ROLES}


Case = tuple[int, int, int]  # (width, height, seconds)


def input_shapes(spec: GraphSpec, dit: DiTConfig, vae: VAEConfig, case: Case) -> dict[str, Shape]:
    """The concrete shape of each input of `spec` for a video of `case`. A VAE graph gets the shape it would
    get even where it serves no chunk of that case (the head for an image), so a profile box over several
    cases is the box of the shapes that really occur."""
    width, height, seconds = case
    h, w = height // config.VAE_SPATIAL_FACTOR, width // config.VAE_SPATIAL_FACTOR
    if spec.is_dit:
        return dit_input_shapes(dit, config.latent_frames(seconds), h, w, spec.degree)
    return vae_input_shapes(vae, spec.name.removeprefix("vae_"), h, w)


def request_cases(sizes: Sequence[tuple[int, int]], max_seconds: int) -> list[Case]:
    """Every size with every whole duration from 0 to `max_seconds`: what a build covers."""
    return [(w, h, s) for w, h in sizes for s in range(max_seconds + 1)]


def default_case(cases: Sequence[Case]) -> int | None:
    """Index of the default case (12 s at 672x384) where it is requested: a profile's opt point."""
    default = (*config.DEFAULT_SIZE, config.DEFAULT_SECONDS)
    return cases.index(default) if default in cases else None


def profile(spec: GraphSpec, dit: DiTConfig, vae: VAEConfig, cases: Iterable[Case]) -> dict[str, ShapeRange]:
    """The min/opt/max of each input over `cases` (see `k4trt.core.profiles`)."""
    cases = list(cases)
    per_case = [input_shapes(spec, dit, vae, case) for case in cases]
    shapes = {name: [shapes[name] for shapes in per_case] for name in spec.input_names}
    return derive_ranges(shapes, default_case(cases))
