"""The checks a request passes before any model work, shared by `k4trt run`, `Pipeline.generate` and the server.

Kept apart from the pipeline and free of torch, so the server's HTTP process checks a request (and refuses a bad
one) without importing the models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from k4trt import config
from k4trt.errors import RequestTypeError, RequestValueError
from k4trt.fsutil import check_output_file
from k4trt.runtime import BACKENDS

SUFFIXES = (".mp4", ".png")


class Request(NamedTuple):
    """A request as `check_request` passed it: plain ints and a Path, ready for the model."""

    seed: int | None
    seconds: int
    width: int
    height: int
    output: Path | None


def check_backend(backend: object, dit_precision: object = None) -> None:
    """The backend and DiT precision asked for exist, and the precision is one that backend can choose."""
    if backend not in BACKENDS:
        raise RequestValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if dit_precision is None:
        return
    if dit_precision not in config.PRECISIONS:
        raise RequestValueError(f"DiT precision {dit_precision!r} is not one of {', '.join(config.PRECISIONS)}")
    if backend == "torch":
        raise RequestValueError("--dit-precision chooses between the DiT graphs of --backend trt or onnxruntime; "
                                "--backend torch runs the checkpoint itself (float32 on the CPU, bf16 on a GPU)")


def check_request(
    prompt: object,
    seconds: object,
    width: object,
    height: object,
    output: object,
    *,
    released: bool,
    seed: object = None,
) -> Request:
    """Every check that needs no model work, so bad input fails before anything runs or is written. The CLI
    and the server call it before loading or queueing anything, `generate` on every call. Wrong types raise
    `RequestTypeError`, values out of range `RequestValueError` (both are K4TRTErrors, so the CLI prints one
    line)."""
    check_prompt(prompt)
    seconds = config.check_duration(seconds)
    width, height = config.check_size(width, height, released=released)
    if output is not None:
        output = as_path("output", output)
        check_output_path(output, single_frame=seconds == 0)
    return Request(None if seed is None else config.check_seed(seed), seconds, width, height, output)


def check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise RequestTypeError(f"the prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestValueError("the prompt is empty; describe the video to generate")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        # Python hands undecodable command-line bytes over as lone surrogates U+DC80..U+DCFF, one per byte.
        code = ord(prompt[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise RequestValueError(f"the prompt is not valid UTF-8 text ({what} at character {e.start + 1}); "
                                "pass it in UTF-8") from None
    return prompt


def as_path(what: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise RequestTypeError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__} {value!r}")
    if not str(os.fspath(value)).strip():
        raise RequestValueError(f"{what} is an empty path; name a file or folder")
    return Path(value)


def check_output_path(path: Path, single_frame: bool) -> None:
    """Refuse a bad output path before any model work starts."""
    if path.suffix.lower() not in SUFFIXES:
        raise RequestValueError(f"output {path}: use a .mp4 file for a video or a .png file for an image")
    if path.suffix.lower() == ".png" and not single_frame:
        raise RequestValueError(f"output {path}: a PNG holds one frame; use .mp4, or --duration 0 for an image")
    check_output_file(path, f"output {path}")
