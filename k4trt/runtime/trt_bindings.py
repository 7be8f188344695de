"""Fixed input and output buffers of one TensorRT execution context, per shape signature, bound once.

A CUDA graph of the sampler's loop captures four enqueues of the DiT's context. TensorRT's documented way to
capture (Developer Guide, "Working with CUDA Graphs"; demoDiffusion's `Engine.allocate_buffers` and
`Engine.infer`) binds fixed buffers and copies into and out of them; re-binding addresses or shapes inside a
capture has no documented guarantee. So each context gets, per signature (the tuple of its input shapes), one
set of buffers, allocated and bound the first time the signature is seen: shapes set with
`set_input_shape`, output shapes read back, every address given to `set_tensor_address`. Every call then
copies its inputs in, enqueues, and returns copies of the outputs (the next call overwrites the buffers). Only
a new signature touches the context again, and a new signature is also what makes `CudaGraphRunner` capture
anew, so no binding call ever happens inside a capture. Buffers of earlier signatures are kept: a graph
captured for one still points at them.

Every buffer is placed at a 256-byte boundary and its address checked (`k4trt.engine.trt_api.ALIGNMENT`).

Tested on the CPU with a fake execution context; not yet run on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from k4trt.engine.trt_api import ALIGNMENT, check_aligned
from k4trt.errors import K4TRTError

Shape = tuple[int, ...]
Signature = tuple[Shape, ...]


class Dims(Protocol):
    """`tensorrt.Dims`, or a tuple."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> int: ...


class Context(Protocol):
    """The part of `tensorrt.IExecutionContext` used here (a fake stands in for it in the CPU tests)."""

    def set_input_shape(self, name: str, shape: Shape) -> bool: ...

    def get_tensor_shape(self, name: str) -> Dims: ...

    def set_tensor_address(self, name: str, memory: int) -> bool: ...


@dataclass(frozen=True)
class Buffers:
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class BoundIO:
    def __init__(self, context: Context, plan: str, inputs: Mapping[str, torch.dtype], outputs: Mapping[str, torch.dtype],
                 allocate: Callable[[int, str], torch.Tensor], fail: Callable[[str], Exception]) -> None:
        """`inputs` and `outputs` map tensor names, in the order calls pass and return them, to dtypes;
        `allocate(nbytes, what)` returns a flat uint8 tensor on the device; `fail(what)` builds the error for
        a refused shape or address (with what TensorRT recorded)."""
        self._context = context
        self._plan = plan
        self._inputs = dict(inputs)
        self._outputs = dict(outputs)
        self._allocate = allocate
        self._fail = fail
        self._sets: dict[Signature, Buffers] = {}
        self._bound: Signature | None = None

    @property
    def signatures(self) -> list[Signature]:
        return list(self._sets)

    def run(self, tensors: Sequence[torch.Tensor], enqueue: Callable[[], None]) -> list[torch.Tensor]:
        """Copy `tensors` into the buffers of their signature, `enqueue()` the context, return output copies."""
        buffers = self.bind(tuple(tuple(t.shape) for t in tensors))
        for buffer, tensor in zip(buffers.inputs.values(), tensors, strict=True):
            buffer.copy_(tensor)
        enqueue()
        return [buffer.clone() for buffer in buffers.outputs.values()]

    def bind(self, signature: Signature) -> Buffers:
        """The buffers of `signature`, bound to the context (a no-op when they already are)."""
        if len(signature) != len(self._inputs):
            raise ValueError(f"{self._plan} takes inputs {list(self._inputs)}, got {len(signature)} tensors")
        known = self._sets.get(signature)
        if signature == self._bound and known is not None:
            return known
        for name, shape in zip(self._inputs, signature, strict=True):
            if not self._context.set_input_shape(name, shape):
                raise self._fail(f"TensorRT rejected {name} of shape {shape} for {self._plan}")
        buffers = known or self._allocate_set(signature)
        for name, tensor in (*buffers.inputs.items(), *buffers.outputs.items()):
            check_aligned(tensor.data_ptr(), f"{self._plan}: buffer of {name}")
            if not self._context.set_tensor_address(name, tensor.data_ptr()):
                raise self._fail(f"TensorRT rejected the address of {name} for {self._plan}")
        self._sets[signature] = buffers
        self._bound = signature
        return buffers

    def _allocate_set(self, signature: Signature) -> Buffers:
        inputs = {name: self._buffer(shape, dtype, f"the input {name} of {self._plan}")
                  for (name, dtype), shape in zip(self._inputs.items(), signature, strict=True)}
        outputs = {}
        for name, dtype in self._outputs.items():
            dims = self._context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            if any(d < 0 for d in shape):
                raise K4TRTError(f"{self._plan}: output {name} has a data-dependent shape {shape}, which this executor "
                                 "does not support; rebuild the engines with this k4trt")
            outputs[name] = self._buffer(shape, dtype, f"the output {name} of {self._plan}")
        return Buffers(inputs, outputs)

    def _buffer(self, shape: Shape, dtype: torch.dtype, what: str) -> torch.Tensor:
        return aligned_empty(shape, dtype, lambda nbytes: self._allocate(nbytes, what))


def aligned_empty(shape: Shape, dtype: torch.dtype, allocate: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """An uninitialised tensor of `shape` starting on an ALIGNMENT-byte boundary, cut from a flat uint8
    allocation `allocate(nbytes)` one boundary larger than needed (allocators promise less on the CPU)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = allocate(nbytes + ALIGNMENT)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(shape)
