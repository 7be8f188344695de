"""The job store: one SQLite database and one folder of results, the server's only state that outlives it.

Every state change is one committed SQLite transaction and every result file appears whole (written beside its
final name, then renamed) before the job that points at it is marked completed, so a server killed at any
instant leaves a store the next one can resume: `recover()` re-queues what was in progress and removes files
no completed job points at. Ids are opaque (`video_` + 32 hex digits); one that does not match is unknown
before any lookup, and a file name is only ever built from an id read back from the database.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_file
from k4trt.serve.request import VideoRequest

STATUSES = ("queued", "in_progress", "completed", "failed")
_ID = re.compile(r"video_[0-9a-f]{32}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: the queue's order and the list's
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seconds INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    completed_at INTEGER,
    error TEXT,
    stages TEXT,
    inference_time_s REAL,
    peak_memory_mb REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    created_at: int
    status: str
    request: VideoRequest
    progress: int
    attempts: int  # times handed to a replica
    completed_at: int | None
    error: str | None
    stages: dict[str, float] | None
    inference_time_s: float | None
    peak_memory_mb: float | None


class JobStore:
    """One per server process. Calls are short transactions under one lock, safe from any thread."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.results = self.root / "videos"
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL + FULL: a committed change survives the process being killed the instant after.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _one(self, sql: str, *args: object) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return _job(row) if row is not None else None

    def create(self, request: VideoRequest) -> Job:
        job_id = f"video_{uuid.uuid4().hex}"
        self._execute(
            "INSERT INTO jobs (id, created_at, status, prompt, seconds, width, height, seed) VALUES (?,?,?,?,?,?,?,?)",
            job_id, int(time.time()), "queued", request.prompt, request.seconds, request.width, request.height,
            request.seed,
        )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        if not _ID.fullmatch(job_id):
            return None
        return self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    def list(self, *, after: str | None, limit: int, newest_first: bool) -> tuple[list[Job], bool]:
        """A page of jobs after the job `after` in the chosen order, and whether more follow."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        where, args = "", []
        if after is not None:
            anchor = self.get(after)
            if anchor is None:
                raise K4TRTError(f"after: there is no video {after!r}")
            where, args = f"WHERE seq {compare} ?", [anchor.seq]
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq {order} LIMIT ?", (*args, limit + 1))
            jobs = [_job(row) for row in rows.fetchall()]
        return jobs[:limit], len(jobs) > limit

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {status: n for status, n in rows}

    def claim_next(self) -> Job | None:
        """The oldest queued job, now in progress and one attempt older; None when nothing is queued."""
        with self._lock:
            rows = self._db.execute(
                "UPDATE jobs SET status = 'in_progress', progress = 0, attempts = attempts + 1 WHERE seq = "
                "(SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) RETURNING *"
            ).fetchall()  # all: a RETURNING statement commits only once stepped to its end
        return _job(rows[0]) if rows else None

    def set_progress(self, job_id: str, percent: int) -> None:
        self._execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", percent, job_id)

    def requeue(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE id = ? AND status = 'in_progress'",
                      job_id)

    def complete(self, job: Job, content: bytes, stages: dict[str, float], peak_memory_mb: float | None) -> None:
        """Blocking file write: call it off the event loop. The file is whole before the job says completed."""
        with atomic_file(self.result_path(job)) as f:
            f.write(content)
        self._execute(
            "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, stages = ?, "
            "inference_time_s = ?, peak_memory_mb = ? WHERE id = ?",
            int(time.time()), json.dumps(stages), stages.get("total"), peak_memory_mb, job.id,
        )

    def fail(self, job_id: str, message: str) -> None:
        self._execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE id = ?",
                      int(time.time()), message, job_id)

    def delete(self, job: Job) -> None:
        """Remove a queued (so never started) or finished job and its file. A job in progress stays: its
        replica cannot be stopped mid-step, and deleting it would only hide work still being done."""
        cursor = self._execute("DELETE FROM jobs WHERE id = ? AND status != 'in_progress'", job.id)  # race-free
        if cursor.rowcount == 0:
            raise K4TRTError(f"video {job.id} is being generated; delete it once it has completed or failed")
        self.result_path(job).unlink(missing_ok=True)

    def result_path(self, job: Job) -> Path:
        return self.results / f"{job.id}{job.request.suffix}"

    def recover(self) -> int:
        """After a stop of any kind: jobs in progress go back to the queue (their replica is gone), and files
        no completed job points at (half-written temporaries, results of jobs deleted mid-way) are removed.
        Returns how many jobs were re-queued."""
        requeued = self._execute(
            "UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'in_progress'").rowcount
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = 'completed'").fetchall()
        keep = {self.result_path(_job(row)).name for row in rows}
        for path in self.results.iterdir():
            if path.name not in keep:
                path.unlink()
        return requeued


def _job(row: sqlite3.Row) -> Job:
    request = VideoRequest(prompt=row["prompt"], seconds=row["seconds"], width=row["width"], height=row["height"],
                           seed=row["seed"])
    return Job(
        seq=row["seq"], id=row["id"], created_at=row["created_at"], status=row["status"], request=request,
        progress=row["progress"], attempts=row["attempts"], completed_at=row["completed_at"], error=row["error"],
        stages=json.loads(row["stages"]) if row["stages"] else None, inference_time_s=row["inference_time_s"],
        peak_memory_mb=row["peak_memory_mb"],
    )
