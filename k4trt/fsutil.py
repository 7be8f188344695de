"""Generic file utilities, below every stage: atomic writes, streamed SHA-256 with a stamp cache that skips
unchanged files, and a folder lock.

Atomic file output: every file k4trt writes appears whole under its final name or not at all.

A file is written under a temporary name beside its final one (same filesystem, so the rename is atomic),
flushed to disk, then renamed over the final name; on any failure the temporary is removed and whatever was
under the final name is left as it was. An existing folder is never replaced or removed.

The temporary's name carries a tag of this host and the writer's process id, so a later run can tell a
`.partial` left by a killed process (SIGKILL, power loss) from one that a live process is still writing, and
removes only the former. Its length is capped so that any final name the filesystem allows has a temporary
name it allows too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from k4trt.errors import K4TRTError, first_line

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_PARTIAL = re.compile(r"^\..*\.k4-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.partial$", re.DOTALL)
_DEFAULT_NAME_MAX = 255  # bytes; Linux, macOS and Windows filesystems alike
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that `folder`'s filesystem accepts."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _DEFAULT_NAME_MAX


def write_failed(path: Path | str, error: Exception) -> K4TRTError:
    """The one line for a write that failed (disk full, read-only, ...); the final name was not touched.
    `error` is an OSError, or a library's wrapper of one (safetensors reports "No space left" in its text)."""
    reason = (error.strerror if isinstance(error, OSError) else None) or first_line(error)
    no_space = getattr(error, "errno", None) in _NO_SPACE or "No space left" in str(error) or _full(Path(path).parent)
    fix = "free some space or choose another folder" if no_space else "choose another location"
    return K4TRTError(f"could not write {path} ({reason}); {fix}; nothing was written under that name")


def _full(folder: Path) -> bool:
    """Whether `folder`'s disk is (nearly) full: numpy's short write on a full disk carries no errno."""
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def check_writable_dir(folder: Path, what: str) -> None:
    """Fail early, before any long work, if `folder` does not exist or cannot be written. Writability is tried
    (a probe file is created and removed), because permission bits say nothing about a read-only mount, /proc
    or /sys, and nothing at all for root."""
    if not folder.is_dir():
        raise K4TRTError(f"{what}: folder {folder} does not exist; create it first")
    probe = temp_path(folder / "probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise K4TRTError(f"{what}: folder {folder} is not writable ({e.strerror or e}); choose another location"
                         ) from None


def check_output_file(path: Path, what: str) -> None:
    """Fail early if `path` cannot become a file: it is an existing folder (or a link to one), its folder is
    missing or read-only, or its name is longer than the filesystem allows."""
    check_name_length(path, what)
    if path.is_dir():
        raise K4TRTError(f"{what}: {path} is an existing folder; name a file (k4trt never replaces a folder)")
    check_writable_dir(path.parent.resolve(), what)


def check_name_length(path: Path, what: str) -> None:
    """A name longer than its filesystem allows is refused up front (its temporary name always fits, see
    `temp_path`), instead of failing when the result is written."""
    size, limit = len(os.fsencode(path.name)), name_max(path.parent)
    if size > limit:
        raise K4TRTError(f"{what}: the name {path.name[:24]}… is {size} bytes long, more than the {limit} its "
                         "filesystem allows; shorten it")


def temp_path(final: Path) -> Path:
    """`.NAME.k4-HOST-PID-RANDOM.partial` beside `final`, NAME cut so the whole fits the filesystem's limit."""
    tag = f".k4-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.partial"
    room = name_max(final.parent) - len(tag) - 1
    return final.parent / ("." + os.fsdecode(os.fsencode(final.name)[:room]) + tag)


def remove_stale_partials(folder: Path) -> None:
    """Remove the temporaries in `folder` that processes of this host left when they were killed; those of
    live processes (another run writing beside us) are kept."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            _remove(Path(entry.path))


@contextlib.contextmanager
def atomic_path(final: Path | str, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path (not yet existing) beside `final`; when the block succeeds, flush it to disk and
    rename it onto `final`; whatever happens, the temporary is gone afterwards.

    `final` must not be an existing folder, except an empty one when the block makes a folder (`folder=True`),
    which the rename then takes the place of. The check is repeated by the kernel at the rename, which refuses
    to put anything over a non-empty folder, so no folder's contents are ever lost. A symlink named `final` is
    replaced by the new file; its target is left alone.
    """
    final = Path(final)
    if final.is_dir() and not (folder and not final.is_symlink() and not any(final.iterdir())):
        raise K4TRTError(f"{final} is an existing folder; k4trt never replaces a folder, so name a new path")
    remove_stale_partials(final.parent)
    tmp = temp_path(final)
    try:
        yield tmp
        try:
            _sync(tmp)
            os.replace(tmp, final)
        except OSError as e:
            raise write_failed(final, e) from None
        _sync_folder(final.parent)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[BinaryIO]:
    """`atomic_path` as an open binary file. An OSError while writing (disk full, quota, I/O error) becomes the
    one line of `write_failed`, and the previous file under `final` stays."""
    with atomic_path(final) as tmp:
        try:
            with open(tmp, "xb") as f:
                yield f
        except OSError as e:
            raise write_failed(final, e) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync(path: Path) -> None:
    """Force a file's data to disk before it is renamed into place, so a crash cannot leave the final name
    pointing at a file whose blocks were never written (folders are trees of files: not forced)."""
    if path.is_file():
        _fsync(path)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot sync a folder, which only costs durability."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
