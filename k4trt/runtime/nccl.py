"""The NCCL communicator a TensorRT execution context with DistCollective layers runs on.

TensorRT's `IExecutionContext.set_communicator` takes an `ncclComm_t` (NvInferRuntime.h: "initialized with
ncclCommInitRank and castable to ncclComm_t"; it must outlive the context). The communicator is made with
NCCL's own Python bindings, nccl4py (`nccl.core.Communicator.init(nranks, rank, unique_id)`, NCCL user guide,
"nccl4py"), rank 0's unique id sent to the others over the process group, and handed over as a PyCapsule
named "ncclComm_t", as TensorRT's Python cookbook does for its DistCollective example. Written against those
documents; it has not run (no GPU was lent to the session that wrote it).
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

import torch
import torch.distributed as dist

from k4trt.errors import K4TRTError


class Communicator:
    """One NCCL communicator over the ranks of the default process group, on this rank's GPU."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        try:
            nccl: Any = importlib.import_module("nccl.core")
        except ImportError:
            raise K4TRTError("TensorRT engines on several GPUs need NCCL's Python bindings: pip install nccl4py") from None
        box = [nccl.get_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        with torch.cuda.device(device):
            self._comm = nccl.Communicator.init(nranks=size, rank=rank, unique_id=box[0])
        if not self._comm.ptr:
            raise K4TRTError(f"NCCL could not create a communicator for rank {rank} of {size}")

    def capsule(self) -> object:
        """The `ncclComm_t` as a PyCapsule, the form the TensorRT binding's `void*` parameter accepts."""
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.c_void_p(self._comm.ptr), b"ncclComm_t", None)

    def close(self) -> None:
        self._comm.destroy()
