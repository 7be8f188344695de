"""Bound-once buffers of the TensorRT executor, on the CPU: a fake execution context records every binding call
and computes from the memory at the addresses it was given, as TensorRT would.

The reference is the contract of `k4trt.runtime.trt_bindings`: across the sampler's four DiT steps each tensor
is bound once and the buffers are reused; a new shape signature gets its own buffers, bound once; returning
to an earlier signature re-binds its buffers without allocating; every address is 256-byte aligned; results
are the function of the inputs given in each call, not of stale buffer contents.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

from k4trt.errors import K4TRTError
from k4trt.runtime.trt_bindings import BoundIO, aligned_empty


class FakeContext:
    """velocity = 2·x + mean(text), read from and written to the bound addresses (float32 throughout)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        assert name == "velocity"
        return self.shapes["x"]

    def set_tensor_address(self, name, memory):
        self.calls.append(("set_tensor_address", name, memory))
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        x, text = self._read("x"), self._read("text")
        self._read("velocity")[...] = 2 * x + text.mean()
        return True

    def _read(self, name):
        shape = self.shapes[name if name != "velocity" else "x"]
        array = (ctypes.c_float * math.prod(shape)).from_address(self.addresses[name])
        return np.ctypeslib.as_array(array).reshape(shape)


def bound(context: FakeContext, allocations: list[int]) -> BoundIO:
    def allocate(nbytes: int, what: str) -> torch.Tensor:
        allocations.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    return BoundIO(context, "dit.bf16.plan", {"x": torch.float32, "text": torch.float32}, {"velocity": torch.float32},
                   allocate, lambda what: K4TRTError(what))


def steps(io: BoundIO, context: FakeContext, shape: tuple[int, ...], n: int, generator: torch.Generator) -> None:
    for _ in range(n):
        x, text = torch.randn(shape, generator=generator), torch.randn(5, 3, generator=generator)
        (velocity,) = io.run([x, text], lambda: context.execute_async_v3(7))
        torch.testing.assert_close(velocity, 2 * x + text.mean())  # float32 on both sides: same sums


def test_four_steps_bind_every_tensor_once_and_reuse_the_buffers():
    context, allocations = FakeContext(), []
    io = bound(context, allocations)
    steps(io, context, (2, 4, 6, 16), 4, torch.Generator().manual_seed(0))
    names = [c[0] for c in context.calls]
    assert names[:5] == ["set_input_shape"] * 2 + ["set_tensor_address"] * 3  # bound once, before the first enqueue
    assert names[5:] == ["execute_async_v3"] * 4  # nothing touches the context between the four enqueues
    assert len(allocations) == 3 and io.signatures == [((2, 4, 6, 16), (5, 3))]
    assert all(address % 256 == 0 for address in context.addresses.values())


def test_a_new_signature_gets_its_own_buffers_and_an_old_one_is_rebound_without_allocating():
    context, allocations = FakeContext(), []
    io = bound(context, allocations)
    g = torch.Generator().manual_seed(1)
    steps(io, context, (2, 4, 6, 16), 2, g)
    first = dict(context.addresses)
    steps(io, context, (1, 2, 2, 16), 2, g)
    second = dict(context.addresses)
    assert len(allocations) == 6 and set(first.values()).isdisjoint(second.values())
    context.calls.clear()
    steps(io, context, (2, 4, 6, 16), 3, g)
    assert len(allocations) == 6  # the earlier buffers, still alive (a captured graph may point at them)
    assert context.addresses == first
    assert [c[0] for c in context.calls] == ["set_input_shape"] * 2 + ["set_tensor_address"] * 3 + ["execute_async_v3"] * 3


def test_refusals_are_one_line_errors():
    context, allocations = FakeContext(), []
    context.set_input_shape = lambda name, shape: False
    io = bound(context, allocations)
    with pytest.raises(K4TRTError, match=r"TensorRT rejected x of shape \(1, 2\) for dit.bf16.plan"):
        io.run([torch.zeros(1, 2), torch.zeros(5, 3)], lambda: None)
    with pytest.raises(ValueError, match="takes inputs"):
        io.run([torch.zeros(1, 2)], lambda: None)


def test_buffers_start_on_256_byte_boundaries_whatever_the_allocator_returns():
    for offset in range(0, 64, 7):  # allocators that only promise a few bytes of alignment
        def allocate(nbytes: int, offset: int = offset) -> torch.Tensor:
            return torch.empty(nbytes + 64, dtype=torch.uint8)[offset:offset + nbytes]

        t = aligned_empty((3, 5), torch.bfloat16, allocate)
        assert t.data_ptr() % 256 == 0 and t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()


class CudaFakeContext(FakeContext):
    """The same function computed on the GPU from the buffers bound for the current signature."""

    def __init__(self) -> None:
        super().__init__()
        self.io: BoundIO | None = None

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        assert self.io is not None
        buffers = self.io.bind((self.shapes["x"], self.shapes["text"]))  # bound already: touches nothing
        buffers.outputs["velocity"].copy_(2 * buffers.inputs["x"] + buffers.inputs["text"].mean())
        return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_four_bound_steps_captured_in_a_cuda_graph_replay_like_eager_and_never_rebind():
    from k4trt.runtime.cuda_graph import CudaGraphRunner

    context = CudaFakeContext()
    io = BoundIO(context, "dit.bf16.plan", {"x": torch.float32, "text": torch.float32}, {"velocity": torch.float32},
                 lambda nbytes, what: torch.empty(nbytes, dtype=torch.uint8, device="cuda"), K4TRTError)
    context.io = io

    def four_steps(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            (velocity,) = io.run([x, text], lambda: context.execute_async_v3(0))
            x = 0.5 * x - 0.1 * velocity
        return x

    runner = CudaGraphRunner(four_steps)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        x, text = torch.randn(2, 4, 6, 16, device="cuda", generator=g), torch.randn(5, 3, device="cuda", generator=g)
        torch.testing.assert_close(runner(x, text), four_steps(x, text))
    assert runner.captured
    bindings = [c for c in context.calls if c[0] != "execute_async_v3"]
    assert len(bindings) == 5  # two shapes and three addresses, once, at the warm-up before the capture
