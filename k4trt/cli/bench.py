"""`k4trt bench` (the harness, `k4trt.bench`) and `k4trt bench-compare` (its regression gate).

Importing this module is cheap (no torch), so `k4trt --help` stays instant; everything heavy is imported
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt.bench.compare import DEFAULT_THRESHOLD
from k4trt.bench.settings import BACKENDS, DEFAULT_PROMPT, REFERENCE_SECONDS, REFERENCE_SIZE

if TYPE_CHECKING:
    from k4trt.parallel.world import World

DESCRIPTION = (
    "Per-stage latency (text encoder, each DiT step, VAE decode, total), load time and peak GPU memory of "
    "k4trt's backends side by side, optionally with the original implementation; achieved TFLOP/s against the "
    "floor. Writes result.json (raw samples), result.md and stages.png."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    w, h = REFERENCE_SIZE
    p.add_argument("--backends", default=",".join(BACKENDS), metavar="LIST",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default: all); "
                   "those that cannot run here are reported as skipped with the reason")
    p.add_argument("--size", metavar="WxH", help=f"video width x height (default {w}x{h}; 64x64 with --tiny)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help=f"video length, whole seconds 0-12 (default {REFERENCE_SECONDS}; 1 with --tiny)")
    p.add_argument("--weights", type=Path, metavar="DIR",
                   help="released weights folder; without it the full-size architecture is built with random "
                   "weights on the GPU (latency only)")
    p.add_argument("--engines", type=Path, metavar="DIR", help="engines folder from build-engines (for trt-fp8, trt-bf16)")
    p.add_argument("--original", type=Path, metavar="DIR",
                   help="checkout of ai-forever/Kandinsky-4: also measure the original implementation")
    p.add_argument("--tiny", action="store_true", help="a tiny random model: a CPU smoke run of the harness")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per backend first (default 1)")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="timed runs per backend (default 5)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (ignored with random weights)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default ./k4trt-bench/<date>-<device>-<commit>/; commit a baseline under the "
                   "checkout's benchmarks/results/)")


def run(args: argparse.Namespace) -> int:
    """Measure, write result.json / result.md / stages.png, print the table. Exit 1 if a backend failed. Under
    torchrun every rank measures as one rank of a sequence-parallel run; rank 0 alone writes and prints."""
    from k4trt.parallel import world as parallel

    with parallel.from_environment(args.device) as world:
        return _run(args, world)


def _run(args: argparse.Namespace, world: World | None) -> int:
    from k4trt.bench import environment, harness, report, settings

    main = world is None or world.main
    device = world.device.type if world is not None else args.device
    s = settings.resolve(
        backends=args.backends, size=args.size, duration=args.duration, device=device, weights=args.weights,
        engines=args.engines, original=args.original, tiny=args.tiny, warmup=args.warmup, repeat=args.repeat,
        prompt=args.prompt, seed=args.seed,
    )
    started = environment.now()
    out = args.out or report.default_out_dir(started, environment.device_name(s.device), environment.git_commit()[0])
    if main:
        report.prepare(out)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if main else (lambda line: None)  # noqa: E731
    workload = harness.model_flops(s)
    results = harness.run_all(s, workload, log)
    if not main:
        return 0
    doc = report.document(s, results, workload, started)
    if world is not None:
        doc["settings"]["sequence_parallel_ranks"] = world.size
    paths = report.write(doc, out)
    print(report.markdown(doc))
    for path in paths:
        print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


COMPARE = ("Check a benchmark result against the committed ones; exit 1 on a regression of a backend's median total "
           "beyond the threshold.")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="measure per-stage latency, memory and load time of the backends",
                                  description=DESCRIPTION)
    _add_arguments(bench)
    bench.set_defaults(command=run)
    compare = subparsers.add_parser("bench-compare", help="check a benchmark result against committed ones",
                                    description=COMPARE)
    compare.add_argument("new", type=Path, help="result.json of the run to check")
    compare.add_argument("--against", type=Path, required=True, help="folder of committed results (benchmarks/results/)")
    compare.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                         help=f"allowed slowdown of the median total as a fraction (default {DEFAULT_THRESHOLD})")
    compare.set_defaults(command=_compare)


def _compare(args: argparse.Namespace) -> int:
    from k4trt.bench.compare import check

    return check(args.new, args.against, args.threshold)
