"""Generic file utilities, below every stage: atomic writes (every file k4trt writes appears whole under its
final name or not at all), streamed SHA-256 with a stamp cache that skips unchanged files, a folder lock."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_HASH_CHUNK = 16 << 20


def sha256_file(path: Path | str, on_bytes: Callable[[int], object] | None = None) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints never sit in memory; `on_bytes` is told
    how much was read after each chunk (a progress bar's `update`)."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
    except OSError as e:
        raise K4TRTError(f"cannot read {path} to fingerprint it ({e.strerror or e}); check it exists and is readable"
                         ) from None
    return digest.hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """A file's SHA-256 with the identity it had when hashed. Size, modification time and inode together
    change whenever a file is rewritten, replaced or copied over, so an unchanged stamp vouches for the hash
    without reading the file."""

    size: int
    mtime_ns: int
    inode: int
    sha256: str

    def matches(self, stat: os.stat_result) -> bool:
        return (stat.st_size, stat.st_mtime_ns, stat.st_ino) == (self.size, self.mtime_ns, self.inode)


class StampCache:
    """{key: FileStamp}: each file is hashed once and again only after it changed. Keys are the caller's
    (a path relative to a folder that may move, or an absolute path); `to_json`/`from_json` persist it."""

    def __init__(self, stamps: Mapping[str, FileStamp] | None = None) -> None:
        self.stamps: dict[str, FileStamp] = dict(stamps or {})
        self.hashed: list[Path] = []  # files actually read by this instance, oldest first

    def sha256(self, path: Path, key: str, on_bytes: Callable[[int], object] | None = None) -> str:
        try:
            stat = path.stat()
        except OSError as e:
            raise K4TRTError(f"cannot read {path} to fingerprint it ({e.strerror or e}); check it exists and is "
                             "readable") from None
        known = self.stamps.get(key)
        if known is not None and known.matches(stat):
            return known.sha256
        digest = sha256_file(path, on_bytes)  # stat taken before reading: a file changed meanwhile looks stale next time
        self.stamps[key] = FileStamp(stat.st_size, stat.st_mtime_ns, stat.st_ino, digest)
        self.hashed.append(path)
        return digest

    def record(self, path: Path, key: str, sha256: str) -> None:
        """Stamp a file whose SHA-256 its writer computed from the bytes it wrote, so it is never read back."""
        stat = path.stat()
        self.stamps[key] = FileStamp(stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256)

    def stale(self, path: Path, key: str) -> bool:
        """Whether `sha256(path, key)` would read the file."""
        known = self.stamps.get(key)
        try:
            return known is None or not known.matches(path.stat())
        except OSError:
            return True

    def to_json(self) -> dict[str, dict[str, int | str]]:
        return {key: dataclasses.asdict(stamp) for key, stamp in sorted(self.stamps.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, Any]]) -> StampCache:
        return cls({str(key): FileStamp(int(s["size"]), int(s["mtime_ns"]), int(s["inode"]), str(s["sha256"]))
                    for key, s in data.items()})


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block, or fail at once with one
    line naming the process that holds it. The kernel drops the lock when its process dies, however it dies,
    so a killed writer never leaves a folder locked."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise K4TRTError(f"{holder}: {path.parent} is being written by {other}; wait for it to finish, or "
                             "write into another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)
