"""`k4trt serve` for real: a local Ray cluster, two CPU replicas of the tiny model, loopback HTTP only.

One server is shared by the module (starting one takes ~15-30 s on two cores); the tests run in file order,
the last ones killing it, starting it again on the same store and stopping it. Every wait is bounded.
Driven three ways: plain HTTP (urllib), the official `openai` client, and NVIDIA AIPerf.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from PIL import Image

for _module in ("ray", "fastapi", "psutil", "openai"):
    pytest.importorskip(_module, reason="needs the [serve] and [test] extras (pip install -e '.[test,serve]')")

import psutil  # noqa: E402

from k4trt.cli.main import main  # noqa: E402
from k4trt.serve import MODEL  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN_ENV = "K4TRT_SERVE_TEST_TOKEN"
TOKEN = secrets.token_hex(16)
SIZE = "64x48"
START_BOUND_S = 240
JOB_BOUND_S = 180
EARLIER: dict[str, bytes] = {}  # results made before the SIGKILL, to download after the restart


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Server:
    def __init__(self, weights: Path, store: Path) -> None:
        self.weights, self.store, self.starts = weights, store, 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.starts += 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.store.parent / f"serve-{self.starts}.log"
        # One PyTorch thread per replica, stated rather than left to Ray, so `k4trt run` can match it.
        env = {**os.environ, TOKEN_ENV: TOKEN, "OMP_NUM_THREADS": "1"}
        began = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "k4trt", "serve", "--weights", str(self.weights), "--device", "cpu",
                 "--replicas", "2", "--port", str(self.port), "--store", str(self.store), "--token-env", TOKEN_ENV],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        while "ready at" not in self.output():
            assert self.proc.poll() is None, f"k4trt serve exited:\n{self.output()}"
            assert time.perf_counter() - began < START_BOUND_S, f"not ready in {START_BOUND_S} s:\n{self.output()}"
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - began
        status, _ = post(self, {"prompt": "warm up", "seconds": 0, "size": SIZE, "seed": 1})
        assert status == 200
        self.first_accepted_s = time.perf_counter() - began

    def output(self) -> str:
        return self.log.read_text()

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def kill_everything(self) -> None:
        """Test cleanup only: the server and every process under it, by pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        processes = self.tree()
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=20)


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    handle = Server(tiny_weights, tmp_path_factory.mktemp("serve") / "store")
    handle.start()
    print(f"\nstartup: ready line after {handle.ready_s:.1f} s, first accepted request after "
          f"{handle.first_accepted_s:.1f} s")
    yield handle
    handle.kill_everything()


def request(server, method, path, body=None, headers=None, token=TOKEN):
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(server.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def post(server, fields, form=False, token=TOKEN):
    if form:
        body = urllib.parse.urlencode({k: str(v) for k, v in fields.items()}).encode()
        kind = "application/x-www-form-urlencoded"
    else:
        body, kind = json.dumps(fields).encode(), "application/json"
    status, _, data = request(server, "POST", "/v1/videos", body, {"Content-Type": kind}, token=token)
    return status, json.loads(data)


def get_json(server, path):
    status, headers, data = request(server, "GET", path)
    return status, headers, json.loads(data)


def wait_finished(server, ids, bound_s=JOB_BOUND_S, every_s=0.1):
    """{id: video object} once every id is completed or failed."""
    deadline = time.monotonic() + bound_s
    while True:
        videos = {i: get_json(server, f"/v1/videos/{i}")[2] for i in ids}
        if all(v["status"] in ("completed", "failed") for v in videos.values()):
            return videos
        assert time.monotonic() < deadline, {i: (v["status"], v["progress"]) for i, v in videos.items()}
        time.sleep(every_s)


def content(server, video_id):
    status, headers, data = request(server, "GET", f"/v1/videos/{video_id}/content")
    assert status == 200, data
    return headers["content-type"], data


def count_frames(data: bytes, tmp_path: Path) -> int:
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)
    return sum(1 for _ in reader)


def k4trt_run(weights, tmp_path, prompt, seconds, seed, size=SIZE) -> bytes:
    """The reference: `k4trt run` itself, with the replicas' one PyTorch thread."""
    out = tmp_path / f"reference-{seed}{'.png' if seconds == 0 else '.mp4'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["run", prompt, "--weights", str(weights), "--size", size, "--duration", str(seconds), "--seed",
                     str(seed), "-o", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out.read_bytes()


def metric(server, name):
    status, _, data = request(server, "GET", "/metrics")
    assert status == 200
    for line in data.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_healthz_is_open_everything_else_needs_the_token(server):
    status, _, data = request(server, "GET", "/healthz", token=None)
    assert status == 200 and json.loads(data) == {"status": "ok"}
    for path in ("/v1/videos", "/metrics", "/v1/videos/video_" + "0" * 32):
        for token in (None, "wrong"):
            status, headers, data = request(server, "GET", path, token=token)
            assert status == 401 and "Bearer" in json.loads(data)["error"]["message"]
    assert post(server, {"prompt": "a fox", "size": SIZE}, token=None)[0] == 401
    assert metric(server, "k4trt_replicas") == 2


def test_openai_client_unmodified(server, tmp_path):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package marks its Sora API deprecated
        created = client.videos.create(prompt="a red fox in the snow", seconds="1", size=SIZE,
                                       extra_body={"seed": 21})
        assert (created.status, created.model, created.seconds, created.size) == ("queued", MODEL, "1", SIZE)
        image = client.videos.create_and_poll(prompt="a heron", seconds="0", size=SIZE, extra_body={"seed": 22})
        assert image.status == "completed" and image.progress == 100 and image.completed_at >= image.created_at
        png = client.videos.download_content(image.id, variant="video")
        assert png.response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 48)

        video = client.videos.poll(created.id, poll_interval_ms=100)
        assert video.status == "completed" and video.error is None
        mp4 = client.videos.download_content(video.id).content
        assert count_frames(mp4, tmp_path) == 9
        EARLIER[video.id] = mp4

        page = client.videos.list(limit=1)
        assert [v.id for v in page.data] == [image.id] and page.has_more
        every = [v.id for v in client.videos.list(limit=2, order="desc")]  # the client follows `after` pages
        assert every.index(image.id) < every.index(video.id)
        assert client.videos.retrieve(video.id).seconds == "1"

        assert client.videos.delete(image.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(image.id)
        with pytest.raises(openai.BadRequestError, match="prompt is empty"):
            client.videos.create(prompt=" ", seconds="1", size=SIZE)


def test_eight_jobs_at_once_match_k4trt_run(server, tiny_weights, tmp_path):
    """JSON and url-encoded forms, videos and images, all at once; two are checked byte for byte against
    `k4trt run` with the same settings."""
    specs = [{"prompt": f"a fox, take {i}", "seconds": (1, 2, 0, 3)[i % 4], "size": SIZE, "seed": 100 + i}
             for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: post(server, specs[i], form=i % 2 == 1), range(8)))
    assert all(status == 200 and video["status"] == "queued" for status, video in made)
    videos = wait_finished(server, [video["id"] for _, video in made])
    for spec, (_, queued) in zip(specs, made, strict=True):
        video = videos[queued["id"]]
        assert video["status"] == "completed" and video["progress"] == 100, video
        assert video["seconds"] == str(spec["seconds"]) and video["seed"] == spec["seed"]
        assert video["inference_time_s"] > 0 and video["peak_memory_mb"] > 0 and "total" in video["stages"]
        kind, data = content(server, video["id"])
        if spec["seconds"] == 0:
            assert kind == "image/png" and Image.open(io.BytesIO(data)).size == (64, 48)
        else:
            assert kind == "video/mp4" and count_frames(data, tmp_path) == 8 * spec["seconds"] + 1
    for i in (1, 2):
        assert content(server, made[i][1]["id"])[1] == k4trt_run(tiny_weights, tmp_path, specs[i]["prompt"],
                                                                 specs[i]["seconds"], specs[i]["seed"])


def test_bad_requests_over_http_queue_nothing(server):
    before = len(json.loads(request(server, "GET", "/v1/videos?limit=100")[2])["data"])
    cases = [
        ({"prompt": "", "size": SIZE}, 400, "prompt is empty"),
        ({"prompt": "a fox", "seconds": 13, "size": SIZE}, 400, "outside 0–12"),
        ({"prompt": "a fox", "size": "60x48"}, 400, "multiples of 16"),
        ({"prompt": "a fox", "size": SIZE, "seed": -5}, 400, "seed -5"),
        ({"prompt": "a fox " * 20000, "size": SIZE}, 413, "over 64 KiB"),
    ]
    for fields, status, fragment in cases:
        got, body = post(server, fields, form=status == 400 and "seed" in fields)
        assert got == status and fragment in body["error"]["message"], body
    for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/..%2Fjobs.sqlite3", "/v1/videos/nope/content"):
        status, _, data = request(server, "GET", path)
        assert status == 404 and json.loads(data)["error"]["message"]
    after = len(json.loads(request(server, "GET", "/v1/videos?limit=100")[2])["data"])
    assert after == before


def replica_processes(server):
    return [p for p in server.tree() if alive(p) and "ServeReplica:k4trt:Worker" in " ".join(p.cmdline())]


def test_progress_cancel_and_a_replica_killed_mid_job(server, tmp_path):
    """Both replicas busy with long jobs: a third waits and is cancelled; a running one cannot be deleted;
    one replica is killed mid-job and its job is retried on a replica that lives."""
    long = [post(server, {"prompt": f"a long fox {s}", "seconds": 6, "size": "128x96", "seed": s})[1]["id"]
            for s in (201, 202)]
    seen: dict[str, list[int]] = {i: [] for i in long}
    deadline = time.monotonic() + JOB_BOUND_S
    while not all(any(0 < p < 100 for p in seen[i]) for i in long):
        for i in long:
            status, headers, video = get_json(server, f"/v1/videos/{i}")
            seen[i].append(video["progress"])
            assert video["status"] in ("queued", "in_progress"), video
            assert headers["openai-poll-after-ms"].isdigit()
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    assert all(p == sorted(p) for p in seen.values())

    status, waiting = post(server, {"prompt": "cancel me", "seconds": 1, "size": SIZE, "seed": 203})
    assert get_json(server, f"/v1/videos/{waiting['id']}")[2]["status"] == "queued"
    status, _, data = request(server, "DELETE", f"/v1/videos/{waiting['id']}")
    assert status == 200 and json.loads(data) == {"id": waiting["id"], "object": "video.deleted", "deleted": True}
    assert get_json(server, f"/v1/videos/{waiting['id']}")[0] == 404
    status, _, data = request(server, "DELETE", f"/v1/videos/{long[0]}")
    assert status == 409 and "being generated" in json.loads(data)["error"]["message"]

    replicas = replica_processes(server)
    assert len(replicas) == 2
    replicas[0].kill()
    videos = wait_finished(server, long)
    assert all(v["status"] == "completed" for v in videos.values()), videos
    assert all(count_frames(content(server, i)[1], tmp_path) == 49 for i in long)
    assert metric(server, "k4trt_replica_losses_total") == 1
    deadline = time.monotonic() + JOB_BOUND_S  # Ray Serve brings the killed replica back
    while metric(server, "k4trt_replicas") != 2:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def find_aiperf() -> str:
    found = os.environ.get("K4TRT_AIPERF") or shutil.which("aiperf")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("AIPerf is missing in CI: .ci/run installs it into .venv-aiperf and sets K4TRT_AIPERF")
    pytest.skip("AIPerf is not installed (it lives in its own venv: see .ci/run); set K4TRT_AIPERF to its CLI")


def test_aiperf_video_generation_benchmark(server, tiny_weights, tmp_path):
    aiperf = find_aiperf()
    artifacts = tmp_path / "aiperf"
    # A local tokenizer folder: AIPerf's `builtin` one downloads its encoding (and HF_HUB_OFFLINE would make
    # it read a local path as a hub id).
    env = {**os.environ, "AIPERF_HTTP_VIDEO_POLL_INTERVAL": "0.2"}
    run = subprocess.run(
        [aiperf, "profile", "--model", MODEL, "--url", server.url, "--endpoint-type", "video_generation",
         "--tokenizer", str(tiny_weights / "tokenizer"), "--api-key", TOKEN, "--extra-inputs", "seconds:1",
         "--extra-inputs", f"size:{SIZE}", "--extra-inputs", "seed:31", "--request-count", "4", "--concurrency", "2",
         "--download-video-content", "--ui-type", "none", "--artifact-dir", str(artifacts)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    assert report["request_count"]["avg"] == 4 and report["request_error_rate"]["avg"] == 0
    assert report["error_summary"] == [] and not report["was_cancelled"]
    assert report["video_inference_time"]["count"] == 4 and report["video_peak_memory"]["count"] == 4
    listed = json.loads(request(server, "GET", "/v1/videos?limit=100")[2])["data"]
    assert sum(v["seed"] == 31 and v["status"] == "completed" for v in listed) == 4


def usage(server):
    rss = threads = 0
    processes = [p for p in server.tree() if alive(p)]
    for process in processes:
        with process.oneshot():
            rss += process.memory_info().rss
            threads += process.num_threads()
    return rss / 2**20, threads, len(processes)


RSS_GROWTH_MB = 100  # the whole server (CLI, Ray, two replicas: ~2.5 GB) over the jobs after warm-up
THREAD_GROWTH = 8  # Ray's gRPC pools breathe by a few; a leak per job would be 40+


def test_fifty_jobs_in_a_row_keep_memory_and_threads_flat(server):
    overheads, samples = [], []
    for i in range(50):
        if i == 10:
            samples.append(usage(server))
        began = time.perf_counter()
        status, video = post(server, {"prompt": f"a fox {i}", "seconds": 0, "size": SIZE, "seed": 400 + i})
        assert status == 200
        done = wait_finished(server, [video["id"]], bound_s=60, every_s=0.01)[video["id"]]
        assert done["status"] == "completed"
        overheads.append(time.perf_counter() - began - done["inference_time_s"])
    samples.append(usage(server))
    (rss0, threads0, n0), (rss1, threads1, n1) = samples
    overheads.sort()
    print(f"\n50 jobs: server tree RSS {rss0:.0f} -> {rss1:.0f} MiB, threads {threads0} -> {threads1}, "
          f"processes {n0} -> {n1}; per-job overhead over the generation itself: median "
          f"{overheads[25] * 1e3:.0f} ms, max {overheads[-1] * 1e3:.0f} ms (client polls every 10 ms)")
    assert n1 == n0
    assert rss1 - rss0 < RSS_GROWTH_MB
    assert threads1 - threads0 <= THREAD_GROWTH


def test_sigkill_with_jobs_queued_then_restart_resumes(server, tmp_path):
    ids = [post(server, {"prompt": f"after the kill {s}", "seconds": 2, "size": "128x96", "seed": s})[1]["id"]
           for s in range(501, 505)]
    deadline = time.monotonic() + JOB_BOUND_S
    while get_json(server, f"/v1/videos/{ids[0]}")[2]["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = server.tree()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    _, still = psutil.wait_procs(before[1:], timeout=3)  # what dies with the server is gone by now
    survivors = [p.pid for p in still if alive(p)]

    server.start()
    assert not any(alive(p) for p in before)
    for pid in survivors:  # Ray's node agents outlive a killed parent; the restart names and ends them
        assert str(pid) in server.output().split("ready at")[0]
    videos = wait_finished(server, ids)
    assert all(v["status"] == "completed" for v in videos.values()), videos
    assert all(count_frames(content(server, i)[1], tmp_path) == 17 for i in ids)
    for video_id, data in EARLIER.items():
        assert content(server, video_id) == ("video/mp4", data)


def test_sigterm_stops_the_server_and_its_ray(server):
    processes = server.tree()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert "stopped (SIGTERM)" in server.output() and "Traceback" not in server.output()
    _, still = psutil.wait_procs([p for p in processes if alive(p)], timeout=20)
    assert not [p for p in still if alive(p)]
    assert not (server.store / "server.json").exists()
    with socket.socket() as probe:  # nothing listens there any more (closed connections may linger)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))
