"""`Pipeline.generate`'s progress callback and a replica's job runner, on the tiny model, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from k4trt import config
from k4trt.core.vae_schedule import chunk_bounds
from k4trt.runtime.pipeline import Pipeline
from k4trt.serve.request import VideoRequest
from k4trt.serve.worker import Failed, Finished, JobRunner, Progress


@pytest.fixture(scope="module")
def pipe(tiny_weights):
    return Pipeline.from_pretrained(tiny_weights, backend="torch", device="cpu")


@pytest.mark.parametrize("seconds", [0, 2])
def test_progress_follows_every_step_and_chunk(pipe, seconds):
    calls = []
    pipe.generate("a fox", seed=1, seconds=seconds, width=64, height=48, progress=False,
                  on_progress=lambda done, total: calls.append((done, total)))
    units = config.NUM_STEPS + len(chunk_bounds(config.latent_frames(seconds)))
    assert calls == [(done, units) for done in range(1, units + 1)]


def collect(runner, request):
    async def main():
        return [event async for event in runner.run(request)]

    return asyncio.run(main())


def test_runner_streams_progress_then_the_file_generate_writes(pipe, tmp_path):
    request = VideoRequest("a fox in the snow", 2, 64, 48, 9)
    events = collect(JobRunner(pipe), request)
    *progress, finished = events
    assert all(isinstance(e, Progress) for e in progress) and isinstance(finished, Finished)
    percents = [e.percent for e in progress]
    assert len(percents) == config.NUM_STEPS + len(chunk_bounds(5)) and percents == sorted(percents)
    assert 0 < percents[0] and percents[-1] == 99  # 100 only once the store holds the file
    reference = tmp_path / "reference.mp4"
    pipe.generate(request.prompt, seed=9, seconds=2, width=64, height=48, output=reference, progress=False)
    assert finished.content == reference.read_bytes()
    assert {"text encoder", "vae decode", "video encode", "total"} <= set(finished.stages)
    assert finished.peak_memory_mb > 10  # the replica's peak resident memory, model included


def test_an_image_request_makes_a_png(pipe):
    *_, finished = collect(JobRunner(pipe), VideoRequest("a fox", 0, 64, 48, 1))
    assert finished.content.startswith(b"\x89PNG")


def test_a_job_that_fails_is_an_event_not_an_exception(pipe, monkeypatch):
    [failed] = collect(JobRunner(pipe), VideoRequest("a fox", 13, 64, 48, 1))  # past the server's checks
    assert isinstance(failed, Failed) and "outside 0–12" in failed.message

    def broken(*args, on_progress, **kwargs):
        on_progress(1, 6)
        raise RuntimeError("shape mismatch\n  at layer 3")

    monkeypatch.setattr(pipe, "generate", broken)
    progress, failed = collect(JobRunner(pipe), VideoRequest("a fox", 1, 64, 48, 1))
    assert progress == Progress(16)
    assert failed == Failed("generation failed (RuntimeError: shape mismatch)")
