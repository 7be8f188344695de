"""One server per store, and what a killed server left running ended by the next start (no Ray needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

psutil = pytest.importorskip("psutil", reason="the [serve] extra is not installed (pip install -e '.[serve]')")

from k4trt.errors import K4TRTError  # noqa: E402
from k4trt.serve import lifecycle  # noqa: E402


def test_a_store_takes_one_server(tmp_path):
    with lifecycle.store_lock(tmp_path):
        with pytest.raises(K4TRTError, match=f"being written by process {os.getpid()}"):
            with lifecycle.store_lock(tmp_path):
                pass
    with lifecycle.store_lock(tmp_path):  # free again once released
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom k4trt.serve.lifecycle import store_lock\n"
                               f"with store_lock(__import__('pathlib').Path({str(tmp_path)!r})):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(K4TRTError, match=str(holder.pid)):
            with lifecycle.store_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with lifecycle.store_lock(tmp_path):
        pass


def test_leftovers_of_a_killed_server_are_ended_and_nothing_else(tmp_path):
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lifecycle.record_processes(tmp_path)
        record = json.loads((tmp_path / "server.json").read_text())
        assert record["pid"] == os.getpid() and leftover.pid in [p["pid"] for p in record["processes"]]
        # A recorded pid now held by another process (its start time differs) must survive.
        record["processes"].append({"pid": os.getpid(), "create_time": 1.0, "name": "python"})
        (tmp_path / "server.json").write_text(json.dumps(record))

        assert lifecycle.end_leftovers(tmp_path) == [leftover.pid]
        leftover.wait(timeout=10)  # ended (psutil has reaped it, so no exit status is left to read)
        assert not (tmp_path / "server.json").exists()
        assert lifecycle.end_leftovers(tmp_path) == []  # a clean stop leaves no record: nothing to do
    finally:
        if leftover.poll() is None:
            leftover.kill()
    assert psutil.Process().is_running()
