"""CudaGraphRunner: eager on the CPU and when disabled; on a GPU, replay equals eager, shapes recapture, and a
callable that cannot be captured falls back to eager with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from k4trt.runtime.cuda_graph import CudaGraphRunner

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def step(x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for the sampler loop: a few dependent elementwise and matmul kernels."""
    for _ in range(4):
        x = 0.9 * x + 0.1 * noise
        x = (x @ x.transpose(-1, -2)).softmax(dim=-1) @ x
    return x, x.sum()


def test_cpu_tensors_run_eagerly_and_are_never_captured():
    runner = CudaGraphRunner(step)
    x, noise = torch.randn(4, 8), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no capture attempt, so no fallback warning either
        out, total = runner(x, noise)
    expected, expected_total = step(x, noise)
    assert torch.equal(out, expected) and torch.equal(total, expected_total)
    assert not runner.captured


def test_disabled_runner_only_calls_through():
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return x + 1

    runner = CudaGraphRunner(fn, enabled=False)
    x = torch.zeros(3)
    assert torch.equal(runner(x), torch.ones(3)) and calls[0] is x  # no copies into static buffers
    assert not runner.captured


@gpu
@needs_gpu
def test_replay_equals_eager_for_new_inputs():
    runner = CudaGraphRunner(step)
    for seed in range(4):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(16, 32, device="cuda", generator=g)
        noise = torch.randn(16, 32, device="cuda", generator=g)
        out, total = runner(x, noise)
        expected, expected_total = step(x, noise)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(total, expected_total)
        assert runner.captured


@gpu
@needs_gpu
def test_replays_return_the_same_static_buffers():
    runner = CudaGraphRunner(lambda x: x * 2)
    x = torch.ones(8, device="cuda")
    first = runner(x)  # warm-up result, then capture
    second = runner(x + 1)
    third = runner(x + 2)
    assert second.data_ptr() == third.data_ptr() != first.data_ptr()
    torch.testing.assert_close(third, torch.full((8,), 6.0, device="cuda"))  # second was overwritten
    torch.testing.assert_close(first, torch.full((8,), 2.0, device="cuda"))


@gpu
@needs_gpu
def test_new_shapes_are_captured_again():
    runner = CudaGraphRunner(step)
    for shape in [(8, 8), (8, 8), (4, 16), (4, 16), (8, 8)]:
        x, noise = torch.randn(*shape, device="cuda"), torch.randn(*shape, device="cuda")
        out, _ = runner(x, noise)
        torch.testing.assert_close(out, step(x, noise)[0])


@gpu
@needs_gpu
def test_uncapturable_callable_falls_back_to_eager_with_a_warning():
    def syncs(x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max())  # a device->host copy: illegal while capturing
        return x / scale

    runner = CudaGraphRunner(syncs)
    x = torch.randn(32, device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*running eagerly"):
        torch.testing.assert_close(runner(x), syncs(x))
    assert not runner.enabled and not runner.captured
    y = torch.randn(32, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(runner(y), syncs(y))
    torch.testing.assert_close(torch.ones(2, device="cuda") + 1, torch.full((2,), 2.0, device="cuda"))  # CUDA still usable
