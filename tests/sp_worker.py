"""One rank of the multi-process sequence-parallel checks, run by tests/test_parallel.py under torchrun (gloo).

Each rank computes the sequence-parallel result over the real process group and, independently, the
single-process reference on the same fresh random inputs; rank 0 writes what it measured as JSON for the test
to judge. One launch does every check of a mode, because starting P processes costs more than the checks.

    torchrun --standalone --nproc-per-node P tests/sp_worker.py dit OUT.json
    torchrun --standalone --nproc-per-node 2 tests/sp_worker.py ort OUT.json SP_FOLDER SINGLE_FOLDER
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dit_cases import random_dit, relative, ulps  # noqa: E402

from k4trt.config import TEXT_TOKENS  # noqa: E402
from k4trt.core.sampler import draw_noises, sample  # noqa: E402
from k4trt.models.dit import build_rope  # noqa: E402
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG, Schedule  # noqa: E402
from k4trt.parallel.exchange import ProcessGroupExchange  # noqa: E402
from k4trt.parallel.executor import SequenceParallelExecutor  # noqa: E402
from k4trt.parallel.world import World  # noqa: E402
from k4trt.runtime.torch_executor import TorchExecutor  # noqa: E402
from k4trt.weights.tiny import TINY_DIT  # noqa: E402

#: latent grids [T, h, w]: token counts that split evenly over 2 and 4 ranks, and ones that need 1-3 pad rows
SIZES = [(1, 4, 4), (3, 6, 10), (2, 10, 6), (3, 2, 6), (1, 2, 2)]



class _NoVae(torch.nn.Module):
    """These checks never decode."""

    scaling_factor = 1.0


def dit_checks(world: World) -> dict:
    """The sequence-parallel DiT against one process, float32 and bf16, over `SIZES`."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        dit = random_dit(TINY_DIT, seed=5).to(dtype)
        exchange = ProcessGroupExchange(world.size, world.device)
        backend = TorchExecutor(dit, _NoVae(), world.device, dtype, exchange)  # type: ignore[arg-type]
        parallel = SequenceParallelExecutor(backend, world, exchange)
        for i, size in enumerate(SIZES):
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(*size, TINY_DIT.in_visual_dim, generator=g).to(dtype)
            text = torch.randn(TEXT_TOKENS, TINY_DIT.in_text_dim, generator=g).to(dtype)
            time = torch.tensor([float(torch.randint(1, 1000, (1,), generator=g))])
            rope = build_rope(TINY_DIT, *size, dtype=dtype)
            with torch.inference_mode():
                expected = dit(x, text, time, rope)
            got = parallel.dit(x, text, time, rope)
            tokens = size[0] * size[1] * size[2] // 4
            results.append({"dtype": str(dtype), "size": size, "padding": -tokens % world.size,
                            "relative": relative(got, expected), "ulps": ulps(got, expected),
                            "same_shape": tuple(got.shape) == tuple(expected.shape)})
    return {"ranks": world.size, "results": results}


def ort_checks(world: World, sp_folder: Path, single_folder: Path) -> dict:
    """The 4-step sampler over the `dit.sp{P}` twin on P ranks against the single `dit` twin in one process."""
    from k4trt.runtime.ort_executor import OnnxRuntimeExecutor

    exchange = ProcessGroupExchange(world.size, world.device)
    parallel = SequenceParallelExecutor(OnnxRuntimeExecutor(sp_folder, precision="bf16", exchange=exchange), world,
                                        exchange)
    single = OnnxRuntimeExecutor(single_folder, precision="bf16")
    schedule = Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG)
    size = (3, 6, 10)
    g = torch.Generator().manual_seed(7)
    text = torch.randn(TEXT_TOKENS, TINY_DIT.in_text_dim, generator=g)
    rope = build_rope(TINY_DIT, *size, dtype=torch.float32)
    noises = draw_noises(11, (*size, TINY_DIT.in_visual_dim), 4)
    steps, alphas = schedule.timesteps(4), schedule.alphas_cumprod_f64
    got = sample(parallel, text, rope, noises, steps, alphas)
    expected = sample(single, text, rope, noises, steps, alphas)
    return {"ranks": world.size, "relative": relative(got, expected), "graph": parallel.backend._graphs["dit"].stem}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    world = World(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    try:
        result = dit_checks(world) if mode == "dit" else ort_checks(world, Path(sys.argv[3]), Path(sys.argv[4]))
        if world.main:
            out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
