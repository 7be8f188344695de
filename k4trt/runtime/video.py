"""Video and image output, fed chunk by chunk as the VAE decodes so frames never pile up in memory.

Pixels are quantised as the original does (torchvision's write_video casts 255·x to uint8, i.e. truncates),
so the frames handed to the encoder equal the original's. H.264 at CRF 5 (the original's setting), 8 fps,
yuv420p. The file is written under a temporary name and renamed only when it is known complete: ffmpeg
exited with status 0 and the frames read back from the file are as many as were sent. On any failure (disk
full, ffmpeg dying, an interrupt) ffmpeg is stopped, the temporary removed and a previous file of that name
kept.

ffmpeg is driven directly rather than through `imageio_ffmpeg.write_frames`, whose generator never checks
ffmpeg's exit status and lets its diagnostics run onto the terminal; only the executable and the frame
counter come from imageio-ffmpeg.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np
import torch

from k4trt.config import FPS
from k4trt.errors import K4TRTError, first_line
from k4trt.fsutil import atomic_path, write_failed

_KILL_WAIT_S = 10


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float [f, H, W, 3] in [0, 1] -> uint8, truncating like the original's writer."""
    return (255.0 * pixels.float()).to(torch.uint8).cpu().numpy()


def encoder_command(path: Path, width: int, height: int) -> list[str]:
    """What imageio-ffmpeg's writer runs for the original's settings (raw RGB frames on stdin, libx264 CRF 5)."""
    import imageio_ffmpeg

    return [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
            "-pix_fmt", "rgb24", "-r", str(FPS), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
            "-v", "warning", "-crf", "5", "-f", "mp4", str(path)]


class FrameWriter(contextlib.AbstractContextManager["FrameWriter"]):
    """Writes frames to `path` (.mp4 or .png); nothing appears under `path` unless every frame was written
    and read back. `frames_written` is the count read back from the finished file."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path = path
        self.size = (width, height)
        self.frames_sent = 0
        self.frames_written: int | None = None
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None
        self._ffmpeg: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._png: np.ndarray | None = None

    def __enter__(self) -> FrameWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        if self.path.suffix.lower() == ".mp4":
            # ffmpeg's messages go to an anonymous file, read only to explain a failure. Its own session, so a
            # terminal's Ctrl-C or hang-up reaches k4trt alone and k4trt decides how ffmpeg stops.
            self._log = self._stack.enter_context(tempfile.TemporaryFile())
            self._ffmpeg = subprocess.Popen(encoder_command(self._tmp, *self.size), stdin=subprocess.PIPE,
                                            stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
            self._stack.callback(self._stop)
        return self

    def write(self, pixels: torch.Tensor) -> None:
        frames = to_uint8(pixels)
        if frames.shape[1:] != (self.size[1], self.size[0], 3):
            raise ValueError(f"frames of shape {frames.shape[1:]} do not match {self.size[0]}x{self.size[1]}")
        self.frames_sent += len(frames)
        if self._ffmpeg is None:
            self._png = frames[-1]
            return
        assert self._ffmpeg.stdin is not None
        try:
            self._ffmpeg.stdin.write(np.ascontiguousarray(frames).data)
        except OSError:  # ffmpeg is gone (disk full, killed): its own message says why
            self._ffmpeg.wait()
            raise self._failed(f"ffmpeg stopped after {self.frames_sent - len(frames)} frames") from None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise
        return self._stack.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        """Close the file and prove it complete; any problem raises, which removes the temporary."""
        assert self._tmp is not None
        if self._ffmpeg is None:
            if self._png is None:
                raise ValueError("no frame was written")
            from PIL import Image

            try:
                Image.fromarray(self._png).save(self._tmp, format="PNG")
                with Image.open(self._tmp) as image:
                    image.load()
                    ok = image.size == self.size
            except OSError as e:
                raise write_failed(self.path, e) from None
            if not ok:
                raise K4TRTError(f"could not write {self.path}: the image read back is not {self.size[0]}x{self.size[1]}")
            self.frames_written = 1
            return
        assert self._ffmpeg.stdin is not None
        try:
            self._ffmpeg.stdin.close()
        except OSError:
            pass  # a broken pipe here means ffmpeg already exited; its status says how
        if self._ffmpeg.wait() != 0:
            raise self._failed(f"ffmpeg exited with status {self._ffmpeg.returncode}")
        self.frames_written = _count_frames(self._tmp, self.path)
        if self.frames_written != self.frames_sent:
            raise K4TRTError(f"could not write {self.path}: the encoded file holds {self.frames_written} of "
                             f"{self.frames_sent} frames; check the disk it is on, then run again")

    def _failed(self, what: str) -> K4TRTError:
        """ffmpeg's own last message, which names the cause (e.g. "No space left on device")."""
        assert self._log is not None
        self._log.seek(0)
        # ffmpeg prefixes lines with the component, e.g. "[vf#0:0 @ 0x55a3...]"; the rest is the message
        text = self._log.read().decode(errors="replace")
        lines = [re.sub(r"^\[[^]]*\]\s*", "", line.strip()) for line in text.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "No space left" in line), lines[-1] if lines else what)
        fix = "free some space or choose another folder" if "No space left" in reason else "check the disk and run again"
        return K4TRTError(f"could not write {self.path} ({what}: {reason}); {fix}; nothing was written under that name")

    def _stop(self) -> None:
        """On the way out, however it is left: an ffmpeg still running is killed (its file is being discarded)."""
        assert self._ffmpeg is not None
        if self._ffmpeg.poll() is None:
            self._ffmpeg.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._ffmpeg.wait(timeout=_KILL_WAIT_S)
        if self._ffmpeg.stdin is not None:
            with contextlib.suppress(OSError):
                self._ffmpeg.stdin.close()


def _count_frames(path: Path, shown: Path) -> int:
    """Frames in the video at `path` (written for `shown`), counted by decoding it (imageio-ffmpeg's counter)."""
    import imageio_ffmpeg

    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError) as e:
        raise K4TRTError(f"could not read back the encoded {shown} ({first_line(e)}); check the disk, then run again"
                         ) from None
    return frames or 0
