"""Run a device-side callable as one CUDA graph: captured once, then replayed with a single launch.

The pipeline wraps the sampler's whole 4-step loop in one, and one VAE body chunk in another (every chunk
after the first has the same shapes, so a video replays it once per chunk; the first chunk runs eagerly),
so the many small kernels between TensorRT calls (re-noising, casts, the x0 update) cost one launch instead
of one each.

Rules for the wrapped `fn(*tensors)`, as for any CUDA graph (CUDA Programming Guide, "CUDA Graphs"; TensorRT
Developer Guide, "Working with CUDA Graphs"):
- everything that changes between calls must be one of its tensor inputs; host work inside it (Python
  arithmetic, CPU tensors, host->device copies, progress callbacks) runs at warm-up and capture only and is
  frozen into the graph, so keep it free of host side effects;
- the returned tensors are the graph's static output buffers: the next call overwrites them, so clone what
  must outlive it;
- new input shapes, dtypes or devices trigger a new capture (TensorRT output shapes and activation sizes
  are baked into the captured launches); the previous graph is released.

The first call for a signature runs `fn` eagerly on a side stream (the warm-up both guides require:
lazy initialisation and TensorRT's deferred per-shape setup happen outside capture; the TensorRT executor
also allocates and binds its fixed buffers for the signature then, `k4trt.runtime.trt_bindings`) and returns
that result, then captures `fn` for later calls; capturing does not execute, so the first call costs one
ordinary run. Capture is in thread-local mode (cudaStreamCaptureModeThreadLocal): only this thread's unsafe
CUDA calls invalidate it, not another thread's (a video encoder, a server's other requests), as TensorRT's
CUDA-graph guidance uses.
When capture fails (a data-dependent shape, a synchronizing call, an engine TensorRT cannot capture), a
warning says so and every later call runs eagerly. CPU tensors and `enabled=False` (the CLI's
`--no-cuda-graph`) always run eagerly.

Capture and replay have not yet run on a GPU (the `gpu`-marked tests skip without one); the eager
paths are tested on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from k4trt.errors import first_line

T = TypeVar("T")

_Signature = tuple[tuple[torch.Size, torch.dtype, torch.device], ...]


@dataclass(frozen=True)
class _Capture(Generic[T]):
    graph: torch.cuda.CUDAGraph
    signature: _Signature
    inputs: tuple[torch.Tensor, ...]  # static buffers the graph reads
    outputs: T  # static buffers the graph writes


class CudaGraphRunner(Generic[T]):
    def __init__(self, fn: Callable[..., T], *, enabled: bool = True) -> None:
        self.fn = fn
        self.enabled = enabled
        self._capture: _Capture[T] | None = None

    @property
    def captured(self) -> bool:
        return self._capture is not None

    def __call__(self, *inputs: torch.Tensor) -> T:
        if not self.enabled or not inputs or not all(t.is_cuda for t in inputs):
            return self.fn(*inputs)
        signature = tuple((t.shape, t.dtype, t.device) for t in inputs)
        capture = self._capture
        if capture is not None and capture.signature == signature:
            for static, new in zip(capture.inputs, inputs, strict=True):
                static.copy_(new)
            capture.graph.replay()
            return capture.outputs
        return self._warm_up_and_capture(signature, inputs)

    def reset(self) -> None:
        """Release the captured graph and its buffers (the next call captures again)."""
        self._capture = None

    def _warm_up_and_capture(self, signature: _Signature, inputs: tuple[torch.Tensor, ...]) -> T:
        self.reset()
        static = tuple(t.clone() for t in inputs)
        caller = torch.cuda.current_stream(inputs[0].device)
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            result = self.fn(*static)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.fn(*static)
        except Exception as e:  # whatever the callable raised while being captured: capture is impossible
            warnings.warn(f"CUDA graph capture failed ({first_line(e)}); running eagerly from now on", RuntimeWarning,
                          stacklevel=3)
            self.enabled = False
            return result
        self._capture = _Capture(graph, signature, static, outputs)
        return result
