"""The ranks of a sequence-parallel run: found in an initialised process group, or started from torchrun's
environment for `k4trt run`; and the one broadcast a generation needs (rank 0's prompt embedding and seed).

Each rank uses `cuda:LOCAL_RANK` with NCCL, or the CPU with gloo (`--device cpu`, or no GPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from k4trt.errors import K4TRTError

#: how long a rank waits for the others: rank 0 loads and runs T5 alone while they wait for its broadcast
TIMEOUT = timedelta(minutes=10)
#: what torchrun sets besides WORLD_SIZE; without them there is no rendezvous to join
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: encodes the prompt, decodes, writes and prints."""
        return self.rank == 0


def current(device: torch.device) -> World | None:
    """The world of an initialised process group of more than one rank (`Pipeline` under torchrun or a caller's
    `init_process_group`), its ranks on `device`; None for one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise K4TRTError("the process group uses NCCL, which needs CUDA tensors; pass a CUDA device, or start the "
                         "group with gloo for the CPU")
    return World(dist.get_rank(), dist.get_world_size(), device)


def environment_size() -> int:
    """The world size torchrun announces (1 without torchrun); a world size without the rest of a rendezvous
    (a hand-set WORLD_SIZE) is refused."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    missing = [name for name in _RENDEZVOUS if name not in os.environ]
    if size > 1 and missing:
        raise K4TRTError(f"WORLD_SIZE={size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                         f"several ranks need a rendezvous; start them with torchrun --standalone --nproc-per-node "
                         f"{size} -m k4trt run ..., or unset WORLD_SIZE to run one process")
    return size


@contextlib.contextmanager
def from_environment(device: str | None) -> Iterator[World | None]:
    """For `k4trt run` under torchrun: join the rendezvous, yield this rank's world, leave the group after.
    None (and nothing started) for one process."""
    size = environment_size()
    if size < 2:
        yield None
        return
    local = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and (device == "cuda" or torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise K4TRTError(f"rank {os.environ['RANK']} wants cuda:{local} but PyTorch sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} GPUs; start at most "
                             "one process per GPU, or pass --device cpu")
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=where)
    else:
        where = torch.device("cpu")
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), where)
    finally:
        dist.destroy_process_group()


def broadcast_prompt(world: World, text: torch.Tensor | None, seed: int | None, shape: tuple[int, ...],
                     dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Rank 0's text embedding and seed on every rank (the others pass None for both)."""
    if world.main:
        if text is None or seed is None:
            raise ValueError("rank 0 broadcasts its text embedding and seed; it passed none")
        text = text.to(world.device, dtype).contiguous()
    else:
        text = torch.empty(shape, dtype=dtype, device=world.device)
    box = torch.tensor([seed if world.main else 0], dtype=torch.int64, device=world.device)
    dist.broadcast(text, src=0)
    dist.broadcast(box, src=0)
    return text, int(box.item())
