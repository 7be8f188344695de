"""One server per store, and nothing left running by one that was killed.

The lock is `fsutil.exclusive_lock` on `server.lock`: the kernel drops it when its process dies, however it dies,
so a held lock means a live server and a free one means the last server is gone. While it runs, a server records the
processes of the local Ray cluster it started in `server.json` (pid and start time, so a recycled pid is never
mistaken for one of them); a clean stop removes the record. After a SIGKILL the record is still there and the
next start on the store ends whichever of those processes outlived their parent (Ray's per-node agents do),
by pid, before it starts its own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil

from k4trt.fsutil import atomic_path, exclusive_lock

STOP_WAIT_S = 10  # bound on waiting for a killed process to be gone


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    store.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store / "server.lock", f"k4trt serve --store {store}"):
        yield


def record_processes(store: Path) -> None:
    """Our descendants now: the local Ray cluster's processes (the CLI starts nothing else)."""
    processes = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            processes.append({"pid": process.pid, "create_time": process.create_time(), "name": process.name()})
    with atomic_path(store / "server.json") as tmp:
        tmp.write_text(json.dumps({"pid": os.getpid(), "processes": processes}, indent=1) + "\n")


def forget_processes(store: Path) -> None:
    (store / "server.json").unlink(missing_ok=True)


def end_leftovers(store: Path) -> list[int]:
    """End the recorded processes of a server that did not stop cleanly (call with the lock held, so that
    server is dead); returns their pids."""
    record = store / "server.json"
    if not record.exists():
        return []
    try:
        entries = json.loads(record.read_text())["processes"]
    except (ValueError, KeyError, TypeError):
        entries = []
    alive = []
    for entry in entries:
        with contextlib.suppress(psutil.Error, KeyError, TypeError):
            process = psutil.Process(entry["pid"])
            if process.create_time() == entry["create_time"]:
                alive.append(process)
    # SIGKILL at once: they belong to a cluster that is gone, with nothing left to save (and Ray's agents
    # ignore SIGTERM for seconds).
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_WAIT_S)
    forget_processes(store)
    return [process.pid for process in alive]
