"""Micro-benchmarks of the two kernels the DiT's step is made of, at the DiT's own shapes.

- attention at [1, 48, 25 424, 64] (12 s at 672x384: 25 200 visual + 224 text tokens, 48 heads of 64) through
  each of SDPA's fused backends, pinned one at a time (flash, cuDNN, memory-efficient): which kernel the
  torch path should pin, and how far each is from DESIGN.md's rates (FA2 ≈ 330, cuDNN ≈ 410-440 TFLOP/s);
- the four GEMMs of a block ([tokens, 3072] x qkv 9216, out 3072, FF in 12 288; [tokens, 12 288] x FF out
  3072) in bf16 and in FP8 through `torch._scaled_mm` (per-tensor scales, bf16 out): the FP8 speed-up the
  engines' FP8 Linears can at best reach.

`python -m k4trt.bench.micro --out FILE.json [--tiny]`; `--tiny` runs the same code at toy shapes (on the
CPU every fused backend and `_scaled_mm` are reported as skipped with torch's reason). Timing: CUDA events
around `repeat` calls after `warmup`, median; wall clock on the CPU. Nothing is estimated in place of a
measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from k4trt import config
from k4trt.bench import environment
from k4trt.errors import first_line

HEADS, HEAD_DIM, MODEL_DIM, FF_DIM = 48, 64, 3072, 12288
VISUAL_TOKENS = 25 * 24 * 42  # 12 s at 672x384: 25 latent frames of 48x84 latents in 2x2 patches
GEMMS = {"qkv": (MODEL_DIM, 3 * MODEL_DIM), "attention_out": (MODEL_DIM, MODEL_DIM), "ff_in": (MODEL_DIM, FF_DIM),
         "ff_out": (FF_DIM, MODEL_DIM)}
TINY = {"heads": 2, "tokens": 64, "dims": {name: (64, 32) for name in GEMMS}}


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _result(flops: float, run: Callable[[], float]) -> dict[str, object]:
    try:
        seconds = run()
    except (RuntimeError, NotImplementedError) as e:  # no such kernel for this device, dtype or shape
        return {"status": "skipped", "reason": first_line(e)[:300]}
    return {"status": "ok", "seconds": seconds, "tflops": flops / seconds / 1e12}


def attention(device: torch.device, heads: int, tokens: int, warmup: int, repeat: int) -> dict[str, object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4.0 * heads * tokens * tokens * HEAD_DIM
    results: dict[str, object] = {"shape": [1, heads, tokens, HEAD_DIM], "dtype": "bfloat16", "flops": flops}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend: SDPBackend = backend) -> float:
            with sdpa_kernel(backend):
                return measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, warmup, repeat)

        results[name] = _result(flops, run)
    return results


def gemms(device: torch.device, tokens: int, dims: dict[str, tuple[int, int]], warmup: int,
          repeat: int) -> dict[str, object]:
    g = torch.Generator(device=device).manual_seed(1)
    results: dict[str, object] = {}
    for name, (k, n) in dims.items():
        a = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) / k**0.5
        flops = 2.0 * tokens * k * n
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)

        def fp8(a8: torch.Tensor = a8, w8: torch.Tensor = w8, one: torch.Tensor = one) -> float:
            # _scaled_mm wants the second operand column-major: w8 [n, k] row-major, transposed
            return measure(lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                           device, warmup, repeat)

        def bf16_gemm(a: torch.Tensor = a, w: torch.Tensor = w) -> float:
            return measure(lambda: a @ w.t(), device, warmup, repeat)

        bf16 = _result(flops, bf16_gemm)
        fp8_result = _result(flops, fp8)
        speedup = None
        if bf16["status"] == fp8_result["status"] == "ok":
            speedup = float(str(bf16["seconds"])) / float(str(fp8_result["seconds"]))
        results[name] = {"m_k_n": [tokens, k, n], "flops": flops, "bf16": bf16, "fp8": fp8_result, "fp8_speedup": speedup}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k4trt.bench.micro", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="result JSON file")
    p.add_argument("--tiny", action="store_true", help="toy shapes (a CPU dry run of this code)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = TINY["heads"] if args.tiny else HEADS
    tokens = TINY["tokens"] if args.tiny else VISUAL_TOKENS + config.TEXT_TOKENS
    dims = TINY["dims"] if args.tiny else GEMMS
    document = {
        "schema": "k4trt-micro-1",
        "date": environment.now(),
        "commit": environment.git_commit()[0],
        "device": environment.device_info(device),
        "software": environment.software(),
        "timer": "cuda events" if device.type == "cuda" else "wall clock",
        "settings": {"tiny": args.tiny, "warmup": args.warmup, "repeat": args.repeat},
        "attention": attention(device, heads, tokens, args.warmup, args.repeat),
        "gemm": gemms(device, VISUAL_TOKENS if not args.tiny else tokens, dims, args.warmup, args.repeat),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
