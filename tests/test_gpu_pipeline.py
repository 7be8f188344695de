"""The product path on a CUDA GPU: graph replay equals eager, and bf16 on the GPU tracks the float32 reference.

Skipped without a GPU (none was lent to the sessions that wrote these; run them on one).
"""

from __future__ import annotations

import pytest
import torch

from k4trt.runtime.pipeline import Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

REQUEST = dict(seed=21, seconds=2, width=80, height=48, keep_frames=True, progress=False)


def test_cuda_graph_replay_equals_eager(tiny_weights):
    graphed = Pipeline.from_pretrained(tiny_weights, backend="torch", device="cuda", cuda_graph=True)
    eager = Pipeline.from_pretrained(tiny_weights, backend="torch", device="cuda", cuda_graph=False)
    first = graphed.generate("a fox", **REQUEST)  # warm-up run, then capture
    replayed = graphed.generate("a fox", **REQUEST)  # replays both graphs
    reference = eager.generate("a fox", **REQUEST)
    assert graphed._loop.captured and graphed._vae_body.captured
    # The same kernels on the same inputs in the same order: replay must not change a bit.
    for result in (first, replayed):
        assert torch.equal(result.latents, reference.latents)
        assert torch.equal(result.frames, reference.frames)
    assert "dit" in replayed.stages and "dit step 1" in reference.stages


def test_bf16_on_gpu_tracks_float32_on_cpu(tiny_weights):
    gpu = Pipeline.from_pretrained(tiny_weights, backend="torch", device="cuda", cuda_graph=False)
    cpu = Pipeline.from_pretrained(tiny_weights, backend="torch", device="cpu")
    assert gpu.executor.dtype == torch.bfloat16 and cpu.executor.dtype == torch.float32
    a = gpu.generate("a fox", **REQUEST)
    b = cpu.generate("a fox", **REQUEST)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4 %). The same comparison with a bf16 executor on the
    # CPU measured 0.7 % on the latents and 0.0044 mean on the frames; the bounds leave ~5x for other kernels,
    # and stay far below the gap between two seeds (~125 %).
    rel = (a.latents - b.latents).norm() / b.latents.norm()
    assert rel < 0.05
    assert (a.frames - b.frames).abs().mean() < 0.02
