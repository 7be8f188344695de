"""The server's request checks (the same as `k4trt run`'s) and its SQLite job store, without Ray or HTTP."""

from __future__ import annotations

import sqlite3

import pytest

from k4trt import config
from k4trt.cli.main import main
from k4trt.errors import K4TRTError
from k4trt.serve.request import VideoRequest, parse_request
from k4trt.serve.store import JobStore


def test_form_strings_and_json_numbers_mean_the_same():
    form = parse_request({"prompt": "a fox", "seconds": "4", "size": "64x48", "seed": "7", "model": "x"},
                         released=False)
    body = parse_request({"prompt": "a fox", "seconds": 4, "size": "64x48", "seed": 7}, released=False)
    assert form == body == VideoRequest("a fox", 4, 64, 48, 7)
    assert parse_request({"prompt": "a fox", "seconds": "4.0", "size": "64x48", "seed": 1},
                         released=False).seconds == 4


def test_defaults_are_k4trt_runs():
    request = parse_request({"prompt": "a fox"}, released=True)
    assert (request.seconds, request.width, request.height) == (12, 672, 384)
    assert request.seed in config.SEED_RANGE
    assert parse_request({"prompt": "a fox"}, released=True).seed != request.seed  # drawn per request


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({}, "prompt is empty"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt": "a", "seconds": 13}, "outside 0–12"),
        ({"prompt": "a", "seconds": "2.5"}, "whole number"),
        ({"prompt": "a", "seconds": "four"}, "not a number"),
        ({"prompt": "a", "seconds": True}, "whole number"),
        ({"prompt": "a", "size": "60x48"}, "multiples of 16"),
        ({"prompt": "a", "size": "big"}, "WIDTHxHEIGHT"),
        ({"prompt": "a", "size": 64}, "must be a string"),
        ({"prompt": "a", "seed": -1}, "seed -1"),
        ({"prompt": "a", "seed": str(2**63)}, "outside 0 to 2\\*\\*63-1"),
        ({"prompt": "a", "seed": "1.5"}, "seed must be an int, got float 1.5"),
        ({"prompt": "a", "duration": 4}, "field 'duration' is not supported"),
    ],
)
def test_bad_requests_fail_with_the_cli_message(fields, message):
    with pytest.raises(K4TRTError, match=message):
        parse_request({"size": "64x48", **fields}, released=False)


def test_released_model_only_takes_trained_sizes():
    parse_request({"prompt": "a", "size": "672x384"}, released=True)
    with pytest.raises(K4TRTError, match="trained on"):
        parse_request({"prompt": "a", "size": "64x48"}, released=True)


def test_cli_refuses_the_seed_the_server_refuses(tiny_weights, tmp_path, capsys):
    """One check for both: `k4trt run --seed -1` fails before loading, with the server's message."""
    with pytest.raises(K4TRTError) as served:
        parse_request({"prompt": "a fox", "size": "64x48", "seed": -1}, released=False)
    code = main(["run", "a fox", "--weights", str(tiny_weights), "--size", "64x48", "--seed", "-1",
                 "-o", str(tmp_path / "v.mp4"), "--no-progress"])
    assert code == 2 and capsys.readouterr().err.strip() == f"error: {served.value}"
    assert list(tmp_path.iterdir()) == []


def request(seconds=1, seed=1):
    return VideoRequest("a fox", seconds, 64, 48, seed)


def test_queue_is_oldest_first_and_claims_count_attempts(tmp_path):
    store = JobStore(tmp_path)
    jobs = [store.create(request(seed=i)) for i in range(3)]
    assert all(job.status == "queued" and job.id.startswith("video_") for job in jobs)
    assert len({job.id for job in jobs}) == 3
    first = store.claim_next()
    assert first.id == jobs[0].id and first.status == "in_progress" and first.attempts == 1
    store.requeue(first.id)
    again = store.claim_next()
    assert again.id == jobs[0].id and again.attempts == 2  # requeued work keeps its place at the front
    assert store.claim_next().id == jobs[1].id
    assert store.counts() == {"queued": 1, "in_progress": 2, "completed": 0, "failed": 0}


def test_complete_fail_and_list_pages(tmp_path):
    store = JobStore(tmp_path)
    jobs = [store.create(request(seconds=i % 2, seed=i)) for i in range(5)]
    for _ in jobs:
        store.claim_next()
    store.complete(jobs[0], b"mp4 bytes", {"total": 1.5}, 12.0)
    store.fail(jobs[1].id, "it broke")
    done = store.get(jobs[0].id)
    assert done.status == "completed" and done.progress == 100 and done.inference_time_s == 1.5
    assert done.stages == {"total": 1.5} and done.completed_at is not None
    assert store.result_path(done).read_bytes() == b"mp4 bytes" and store.result_path(done).suffix == ".png"
    assert store.get(jobs[1].id).error == "it broke"

    page, more = store.list(after=None, limit=2, newest_first=True)
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id] and more
    page, more = store.list(after=page[-1].id, limit=2, newest_first=True)
    assert [j.id for j in page] == [jobs[2].id, jobs[1].id] and more
    page, more = store.list(after=page[-1].id, limit=2, newest_first=True)
    assert [j.id for j in page] == [jobs[0].id] and not more
    page, _ = store.list(after=jobs[1].id, limit=10, newest_first=False)
    assert [j.id for j in page] == [j.id for j in jobs[2:]]
    with pytest.raises(K4TRTError, match="no video"):
        store.list(after="video_" + "0" * 32, limit=2, newest_first=True)


def test_ids_never_reach_a_path(tmp_path):
    store = JobStore(tmp_path)
    store.create(request())
    for bad in ("../jobs.sqlite3", "video_../../etc/passwd", "video_" + "0" * 31 + "/", "", "VIDEO_" + "a" * 32,
                "video_" + "0" * 32 + "' OR '1'='1"):
        assert store.get(bad) is None


def test_delete_cancels_queued_removes_finished_keeps_running(tmp_path):
    store = JobStore(tmp_path)
    running, done, queued = (store.create(request(seed=i)) for i in range(3))
    store.claim_next()
    store.claim_next()
    store.complete(store.get(done.id), b"x", {"total": 1.0}, None)
    with pytest.raises(K4TRTError, match="being generated"):
        store.delete(store.get(running.id))
    store.delete(store.get(queued.id))
    done = store.get(done.id)
    store.delete(done)
    assert store.get(queued.id) is None and store.get(done.id) is None
    assert not store.result_path(done).exists()
    assert store.get(running.id).status == "in_progress"


def test_recover_requeues_in_progress_and_removes_stray_files(tmp_path):
    store = JobStore(tmp_path)
    kept, running = store.create(request(seed=1)), store.create(request(seed=2))
    store.claim_next()
    store.claim_next()
    store.complete(store.get(kept.id), b"kept", {"total": 1.0}, None)
    (store.results / ".video_x.mp4.abc.partial").write_bytes(b"half")  # a write the kill cut short
    (store.results / f"{running.id}.mp4").write_bytes(b"orphan")  # stored, but killed before marked done
    store.close()

    reopened = JobStore(tmp_path)
    assert reopened.recover() == 1
    assert reopened.get(running.id).status == "queued" and reopened.get(running.id).attempts == 1
    assert sorted(p.name for p in reopened.results.iterdir()) == [f"{kept.id}.mp4"]
    assert reopened.result_path(reopened.get(kept.id)).read_bytes() == b"kept"


def test_a_commit_is_on_disk_for_another_connection(tmp_path):
    """What a SIGKILL leaves is what another process reads: every change is committed when the call returns."""
    store = JobStore(tmp_path)
    job = store.create(request())
    store.claim_next()
    other = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert other.execute("SELECT status, attempts FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("in_progress", 1)
