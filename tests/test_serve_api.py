"""The HTTP API in-process (FastAPI's test client, no Ray) and the dispatcher's hand-off and retry rules."""

from __future__ import annotations

import asyncio
import errno

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("prometheus_client", reason="the [serve] extra is not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from k4trt.serve.api import MAX_BODY_BYTES, Service, create_app  # noqa: E402
from k4trt.serve.dispatcher import Dispatcher  # noqa: E402
from k4trt.serve.metrics import Metrics  # noqa: E402
from k4trt.serve.request import VideoRequest  # noqa: E402
from k4trt.serve.store import JobStore  # noqa: E402
from k4trt.serve.worker import Failed, Finished, Progress  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class App:
    def __init__(self, root, token=None):
        self.store = JobStore(root)
        self.queued = 0
        service = Service(store=self.store, metrics=Metrics(self.store, lambda: 2), on_queued=self.wake,
                          released=False, token=token)
        self.client = TestClient(create_app(service))

    def wake(self):
        self.queued += 1


@pytest.fixture
def app(tmp_path):
    return App(tmp_path / "store")


def error_of(response, status):
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert message and "\n" not in message
    return message


def test_create_json_and_form_give_the_openai_video_object(app):
    made = app.client.post("/v1/videos", json={"prompt": "a fox", "seconds": 2, "size": "64x48", "seed": 5})
    assert made.status_code == 200
    video = made.json()
    assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
    assert (video["seconds"], video["size"], video["seed"], video["model"]) == ("2", "64x48", 5,
                                                                                 "kandinsky-4-t2v-flash")
    assert isinstance(video["created_at"], int) and video["error"] is None
    form = app.client.post("/v1/videos", data={"prompt": "a fox", "seconds": "0", "size": "64x48", "seed": "6"},
                           files={"model": (None, "sora-2")})  # files= forces multipart, as the openai client does
    assert form.status_code == 200 and form.json()["seconds"] == "0" and form.json()["model"] == "kandinsky-4-t2v-flash"
    assert app.queued == 2 and app.store.counts()["queued"] == 2


def test_the_video_object_has_every_field_the_openai_client_requires(app):
    """The client builds its `Video` without validating (Sora's size literals would refuse 64x48), so what it
    needs is every required field present with the right type; the Ray tests run the client itself."""
    from openai.types import Video
    from openai.types.video_create_error import VideoCreateError

    app.client.post("/v1/videos", json={"prompt": "a fox", "seconds": 1, "size": "64x48"})
    job = app.store.claim_next()
    app.store.fail(job.id, "replica lost twice")
    video = app.client.get(f"/v1/videos/{job.id}").json()
    required = {name for name, field in Video.model_fields.items() if field.is_required()}
    assert {"id", "created_at", "model", "object", "progress", "seconds", "size", "status"} <= required <= set(video)
    assert isinstance(video["progress"], int) and isinstance(video["seconds"], str)
    assert VideoCreateError.model_validate(video["error"]).message == "replica lost twice"


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"json": {"prompt": "", "size": "64x48"}}, 400, "prompt is empty"),
        ({"json": {"prompt": "a", "seconds": 13, "size": "64x48"}}, 400, "outside 0–12"),
        ({"json": {"prompt": "a", "size": "60x48"}}, 400, "multiples of 16"),
        ({"json": {"prompt": "a", "size": "64x48", "seed": -1}}, 400, "seed -1"),
        ({"json": {"prompt": "a", "size": "64x48", "frames": 9}}, 400, "'frames' is not supported"),
        ({"json": ["a fox"]}, 400, "JSON object"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"prompt=a", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
        ({"data": {"prompt": "a", "size": "64x48"}, "files": {"input_reference": ("ref.png", b"png", "image/png")}},
         400, "'input_reference' is a file"),
        ({"json": {"prompt": "x" * MAX_BODY_BYTES, "size": "64x48"}}, 413, "over 64 KiB"),
    ],
)
def test_bad_requests_are_one_sentence_and_queue_nothing(app, kwargs, status, fragment):
    assert fragment in error_of(app.client.post("/v1/videos", **kwargs), status)
    assert app.queued == 0 and sum(app.store.counts().values()) == 0


def test_a_body_without_length_is_capped_too(app):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b'{"prompt": "' + b"x" * 1024

    response = app.client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
    assert "over 64 KiB" in error_of(response, 413) and sum(app.store.counts().values()) == 0


def test_unknown_and_malformed_ids_are_404(app):
    for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/..%2F..%2Fjobs.sqlite3",
                 "/v1/videos/video_..%2Fjobs/content", "/v1/nothing"):
        error_of(app.client.get(path), 404)
    error_of(app.client.delete("/v1/videos/video_" + "1" * 32), 404)


def test_content_waits_for_completion_and_has_the_right_type(app):
    video = app.client.post("/v1/videos", json={"prompt": "a", "seconds": 1, "size": "64x48"}).json()
    image = app.client.post("/v1/videos", json={"prompt": "a", "seconds": 0, "size": "64x48"}).json()
    assert "queued" in error_of(app.client.get(f"/v1/videos/{video['id']}/content"), 404)
    polled = app.client.get(f"/v1/videos/{video['id']}")
    assert polled.headers["openai-poll-after-ms"].isdigit()
    for content in (b"mp4", b"png"):  # claimed in the order made: the video, then the image
        app.store.complete(app.store.claim_next(), content, {"total": 0.5}, 100.0)
    got = app.client.get(f"/v1/videos/{video['id']}/content", params={"variant": "video"})
    assert got.status_code == 200 and got.content == b"mp4" and got.headers["content-type"] == "video/mp4"
    got = app.client.get(f"/v1/videos/{image['id']}/content")
    assert got.content == b"png" and got.headers["content-type"] == "image/png"
    assert "variant=video" in error_of(app.client.get(f"/v1/videos/{video['id']}/content",
                                                      params={"variant": "thumbnail"}), 400)
    done = app.client.get(f"/v1/videos/{video['id']}")
    assert "openai-poll-after-ms" not in done.headers
    assert done.json()["progress"] == 100 and done.json()["inference_time_s"] == 0.5


def test_list_pages_like_openai(app):
    ids = [app.client.post("/v1/videos", json={"prompt": "a", "seconds": 1, "size": "64x48"}).json()["id"]
           for _ in range(3)]
    page = app.client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = app.client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in rest["data"]] == [ids[0]] and not rest["has_more"]
    ascending = app.client.get("/v1/videos", params={"order": "asc"}).json()
    assert [v["id"] for v in ascending["data"]] == ids
    error_of(app.client.get("/v1/videos", params={"limit": 0}), 400)
    error_of(app.client.get("/v1/videos", params={"order": "sideways"}), 400)
    assert "no video" in error_of(app.client.get("/v1/videos", params={"after": "video_" + "f" * 32}), 400)


def test_delete_cancels_queued_refuses_running(app):
    first = app.client.post("/v1/videos", json={"prompt": "a", "seconds": 1, "size": "64x48"}).json()
    second = app.client.post("/v1/videos", json={"prompt": "a", "seconds": 1, "size": "64x48"}).json()
    app.store.claim_next()  # the first is now running
    assert "being generated" in error_of(app.client.delete(f"/v1/videos/{first['id']}"), 409)
    gone = app.client.delete(f"/v1/videos/{second['id']}")
    assert gone.json() == {"id": second["id"], "object": "video.deleted", "deleted": True}
    error_of(app.client.get(f"/v1/videos/{second['id']}"), 404)
    assert app.store.claim_next() is None  # the cancelled job never reaches a replica


def test_token_guards_every_route_but_healthz(tmp_path):
    app = App(tmp_path / "store", token=TOKEN)
    assert app.client.get("/healthz").status_code == 200
    for method, path in (("get", "/v1/videos"), ("post", "/v1/videos"), ("get", "/metrics"),
                         ("get", "/v1/videos/video_" + "0" * 32), ("delete", "/v1/videos/video_" + "0" * 32)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = getattr(app.client, method)(path, headers=headers)
            assert "Authorization: Bearer" in error_of(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
    assert app.client.get("/v1/videos", headers=AUTH).status_code == 200
    made = app.client.post("/v1/videos", headers=AUTH, json={"prompt": "a", "seconds": 1, "size": "64x48"})
    assert made.status_code == 200 and app.store.counts()["queued"] == 1


def test_metrics_count_from_the_store_and_time_stages(app):
    for _ in range(3):
        app.client.post("/v1/videos", json={"prompt": "a", "seconds": 1, "size": "64x48"})
    job = app.store.claim_next()
    app.store.complete(job, b"x", {"dit step 1": 0.02, "total": 0.3}, None)
    service_metrics = Metrics(app.store, lambda: 2)
    service_metrics.observe({"dit step 1": 0.02, "total": 0.3})
    text = service_metrics.render().decode()
    assert "k4trt_queue_depth 2.0" in text and 'k4trt_jobs{status="completed"} 1.0' in text
    assert "k4trt_replicas 2.0" in text
    assert 'k4trt_stage_seconds_count{stage="dit step 1"} 1.0' in text
    assert 'k4trt_stage_seconds_bucket{le="0.5",stage="total"} 1.0' in text
    scraped = app.client.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain") and "k4trt_queue_depth 2.0" in scraped.text


# The dispatcher, with replicas stood in for by async generators.

def fake_replica(script):
    """`script(request, attempt)` -> the events a replica yields, or an exception it dies with."""
    calls = []

    async def run_job(request: VideoRequest):
        calls.append(request.seed)
        for event in script(request, calls.count(request.seed)):
            await asyncio.sleep(0)
            if isinstance(event, Exception):
                raise event
            yield event

    return run_job, calls


def dispatch(tmp_path, script, seeds, slots=2, bound_s=10.0):
    store = JobStore(tmp_path / "store")
    metrics = Metrics(store, lambda: slots)
    run_job, calls = fake_replica(script)
    jobs = [store.create(VideoRequest("a fox", 1, 64, 48, seed)) for seed in seeds]

    async def main():
        dispatcher = Dispatcher(store, run_job, slots=slots, metrics=metrics)
        loop = dispatcher.start()
        dispatcher.notify()
        for _ in range(int(bound_s / 0.01)):
            if store.counts()["queued"] == store.counts()["in_progress"] == 0:
                break
            await asyncio.sleep(0.01)
        loop.cancel()

    asyncio.run(main())
    return store, [store.get(job.id) for job in jobs], calls, metrics


def done(request, attempt):
    return [Progress(40), Progress(80), Finished(f"video {request.seed}".encode(), {"total": 0.1}, 10.0)]


def test_jobs_run_oldest_first_and_results_land_in_the_store(tmp_path):
    store, jobs, calls, _ = dispatch(tmp_path, done, seeds=[3, 1, 2, 5, 4])
    assert calls == [3, 1, 2, 5, 4]
    assert all(job.status == "completed" and job.attempts == 1 for job in jobs)
    assert store.result_path(jobs[0]).read_bytes() == b"video 3"


def test_no_more_jobs_in_flight_than_replicas(tmp_path):
    running, peak = set(), []

    async def run_job(request):
        running.add(request.seed)
        peak.append(len(running))
        await asyncio.sleep(0.02)
        running.discard(request.seed)
        yield Finished(b"x", {"total": 0.02}, 1.0)

    store = JobStore(tmp_path / "store")
    for seed in range(7):
        store.create(VideoRequest("a", 1, 64, 48, seed))

    async def main():
        loop = Dispatcher(store, run_job, slots=3, metrics=Metrics(store, lambda: 3)).start()
        for _ in range(500):
            if store.counts()["completed"] == 7:
                break
            await asyncio.sleep(0.01)
        loop.cancel()

    asyncio.run(main())
    assert store.counts()["completed"] == 7 and max(peak) == 3


def test_a_failed_job_is_not_retried(tmp_path):
    _, [job], calls, _ = dispatch(tmp_path, lambda r, a: [Progress(10), Failed("out of GPU memory")], seeds=[1])
    assert job.status == "failed" and job.error == "out of GPU memory" and calls == [1]


def test_a_lost_replica_is_retried_once_then_fails_with_the_reason(tmp_path):
    def dies_first(request, attempt):
        return [Progress(50), ConnectionError("actor died")] if attempt == 1 else done(request, attempt)

    def always_dies(request, attempt):
        return [Progress(50), ConnectionError("actor died\nlong traceback")]

    _, [retried], calls, metrics = dispatch(tmp_path / "a", dies_first, seeds=[1])
    assert retried.status == "completed" and retried.attempts == 2 and calls == [1, 1]
    _, [lost], calls, metrics = dispatch(tmp_path / "b", always_dies, seeds=[2])
    assert lost.status == "failed" and calls == [2, 2]
    assert lost.error == "the replica generating this video stopped 2 times (ConnectionError: actor died)"
    assert "k4trt_replica_losses_total 2.0" in metrics.render().decode()


def test_a_result_that_cannot_be_stored_fails_the_job_instead_of_leaving_it_in_progress(tmp_path, monkeypatch):
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("k4trt.fsutil.os.replace", no_space)  # the rename that puts the finished file in place
    store, [job], calls, _ = dispatch(tmp_path, done, seeds=[1])
    assert job.status == "failed" and calls == [1], job
    assert "could not be stored" in job.error and "No space left" in job.error and not list(store.results.iterdir())


def test_a_stream_without_a_result_counts_as_lost(tmp_path):
    _, [job], calls, _ = dispatch(tmp_path, lambda r, a: [Progress(50)], seeds=[1])
    assert job.status == "failed" and "without a result" in job.error and calls == [1, 1]
