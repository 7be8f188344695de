"""Atomic file output: every file k4trt writes appears whole under its final name or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from k4trt.errors import K4TRTError


def check_writable_dir(folder: Path, what: str) -> None:
    """Fail early, before any long work, if `folder` does not exist or cannot be written."""
    if not folder.is_dir():
        raise K4TRTError(f"{what}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise K4TRTError(f"{what}: folder {folder} is not writable; choose another location")


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    Beside (not in /tmp) so the rename stays on one filesystem and is atomic. Works for files and folders.
    """
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
