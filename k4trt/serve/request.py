"""A `POST /v1/videos` body -> a checked `VideoRequest`, with exactly the checks `k4trt run` makes.

Bodies arrive as JSON (numbers are numbers) or as multipart/url-encoded forms (the `openai` client and AIPerf:
every value a string), so values are first read as what they mean, then handed to `check_request` — the
function the CLI calls — so a request the server accepts is one `k4trt run` would accept, and the reverse.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from k4trt import config
from k4trt.errors import K4TRTError
from k4trt.runtime.request import check_request

FIELDS = ("prompt", "seconds", "size", "seed", "model")


@dataclass(frozen=True)
class VideoRequest:
    prompt: str
    seconds: int
    width: int
    height: int
    seed: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def suffix(self) -> str:
        """What `k4trt run` writes for this duration: one frame is a PNG."""
        return ".png" if self.seconds == 0 else ".mp4"


def parse_request(fields: Mapping[str, object], *, released: bool) -> VideoRequest:
    """`released`: whether the served checkpoint is the released model, which allows only its trained sizes."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise K4TRTError(f"field {unknown[0]!r} is not supported; send {', '.join(FIELDS)}")
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise K4TRTError("prompt must be a string")
    seconds = _number(fields.get("seconds", config.DEFAULT_SECONDS), "seconds")
    size = fields.get("size", config.format_size(config.DEFAULT_SIZE))
    if not isinstance(size, str):
        raise K4TRTError(f"size {size!r} must be a string WIDTHxHEIGHT, e.g. 672x384")
    width, height = config.parse_size(size)
    seed = fields.get("seed")
    seed = random.randrange(config.SEED_RANGE.stop) if seed is None or seed == "" else _number(seed, "seed")
    request = check_request(prompt or "", seconds, width, height, None, released=released, seed=seed)
    assert isinstance(prompt, str) and request.seed is not None  # check_request refused anything else
    return VideoRequest(prompt=prompt, seconds=request.seconds, width=request.width, height=request.height,
                        seed=request.seed)


def _number(value: object, name: str) -> object:
    """A form's '4' or '4.0' -> 4 or 4.0; JSON numbers pass through; the range checks come after."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    raise K4TRTError(f"{name} {value!r} is not a number")
