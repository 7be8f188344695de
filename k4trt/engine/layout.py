"""File names inside an engines folder (see DESIGN.md, "Contracts between stages"), and the command that
rebuilds it, which every "engines are stale / missing" message quotes."""

from __future__ import annotations

from pathlib import Path

from k4trt.errors import K4TRTError

PRECISIONS = ("fp8", "bf16")
GRAPHS = ("dit", "vae_image", "vae_head", "vae_body")  # vae_image: the 1-latent-frame (image) decoder
MANIFEST = "manifest.json"
TIMING_CACHE = "timing.cache"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise K4TRTError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}; pass --precision fp8 or bf16")
    return precision


def _stem(graph: str, precision: str) -> str:
    """Only the DiT comes in two precisions; the VAE engines are always bf16 and carry no precision in their name."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; expected one of {GRAPHS}")
    return f"dit.{check_precision(precision)}" if graph == "dit" else graph


def onnx_name(graph: str, precision: str) -> str:
    return _stem(graph, precision) + ".onnx"


def plan_name(graph: str, precision: str) -> str:
    return _stem(graph, precision) + ".plan"


def rebuild_command(engines_dir: Path, weights_dir: str | None = None, extra: str = "--force") -> str:
    """`build-engines --weights W --out DIR ...`: the one fix for every stale, missing or foreign engine."""
    weights = f"--weights {weights_dir} " if weights_dir else ""
    return f"build-engines {weights}--out {engines_dir} {extra}".rstrip()
