"""Video and image output, fed chunk by chunk as the VAE decodes so frames never pile up in memory.

Pixels are quantised as the original does (torchvision's write_video casts 255·x to uint8, i.e. truncates),
so the frames handed to the encoder equal the original's. H.264 at CRF 5 (the original's setting), 8 fps,
yuv420p. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from k4trt.config import FPS
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path, check_writable_dir

SUFFIXES = (".mp4", ".png")


def check_output_path(path: Path, single_frame: bool) -> None:
    """Refuse a bad output path before any model work starts."""
    if path.suffix.lower() not in SUFFIXES:
        raise K4TRTError(f"output {path}: use a .mp4 file for a video or a .png file for an image")
    if path.suffix.lower() == ".png" and not single_frame:
        raise K4TRTError(f"output {path}: a PNG holds one frame; use .mp4, or --duration 0 for an image")
    check_writable_dir(path.parent.resolve(), f"output {path}")


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float [f, H, W, 3] in [0, 1] -> uint8, truncating like the original's writer."""
    return (255.0 * pixels.float()).to(torch.uint8).cpu().numpy()


class FrameWriter(contextlib.AbstractContextManager["FrameWriter"]):
    """Writes frames to `path` (.mp4 or .png); nothing appears under `path` unless every frame was written."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path = path
        self.size = (width, height)
        self.frames_written = 0
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None
        self._encoder = None
        self._png: np.ndarray | None = None

    def __enter__(self) -> FrameWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        if self.path.suffix.lower() == ".mp4":
            import imageio_ffmpeg

            self._encoder = imageio_ffmpeg.write_frames(
                str(self._tmp),
                self.size,
                fps=FPS,
                codec="libx264",
                quality=None,
                output_params=["-crf", "5", "-f", "mp4"],
            )
            self._encoder.send(None)
        return self

    def write(self, pixels: torch.Tensor) -> None:
        frames = to_uint8(pixels)
        if frames.shape[1:] != (self.size[1], self.size[0], 3):
            raise ValueError(f"frames of shape {frames.shape[1:]} do not match {self.size[0]}x{self.size[1]}")
        self.frames_written += len(frames)
        if self._encoder is None:
            self._png = frames[-1]
            return
        for frame in frames:
            self._encoder.send(np.ascontiguousarray(frame))

    def _finish(self, complete: bool) -> None:
        if self._encoder is not None:
            self._encoder.close()
        elif complete and self._png is not None:
            from PIL import Image

            assert self._tmp is not None
            Image.fromarray(self._png).save(self._tmp, format="PNG")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            self._finish(complete=exc_type is None)
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise
        return self._stack.__exit__(exc_type, exc, tb)
