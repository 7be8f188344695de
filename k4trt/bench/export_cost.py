"""What the one-off DiT export costs on the host: wall time and peak resident memory, at the released width.

`python -m k4trt.bench.export_cost --pairs 1 2 --out FILE.json` writes, per block-pair count, a random
checkpoint of the released DiT's width (model dim 3072, FF 12 288, 48 heads) with that many of its 21 block
pairs, in bf16 and torch.save's zip format (memory-mapped when read, as the released file is), then exports the
bf16 graph in a fresh process, as build-engines does (weightless trace, weights streamed from the mapped
checkpoint), and records that process's time and peak RSS (`ru_maxrss`, mapped checkpoint pages included).
Time and memory grow linearly with the pairs, so two counts give the per-pair cost and the fixed part, and
the released 21 pairs are extrapolated from them (labelled so in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from k4trt import config

RELEASED_PAIRS = config.RELEASED_DIT.num_blocks


def write_checkpoint(path: Path, pairs: int) -> int:
    """A random bf16 checkpoint of the released width with `pairs` block pairs; returns its size in bytes."""
    from k4trt.models.dit import DiT

    cfg = dataclasses.replace(config.RELEASED_DIT, num_blocks=pairs)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in DiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for k, (shape, _) in shapes.items()}
    torch.save(state, path)
    return path.stat().st_size


def export_once(checkpoint: Path, out: Path) -> dict[str, float]:
    """In this process: the export as build-engines runs it; returns seconds and peak RSS in bytes."""
    from k4trt.core.graphs import dit_graph
    from k4trt.export.dit_onnx import export_dit
    from k4trt.models.dit import DiT, infer_dit_config
    from k4trt.weights.checkpoint import read_dit_state_dict

    start = time.monotonic()
    state = read_dit_state_dict(checkpoint)
    cfg = infer_dit_config(state)
    with torch.device("meta"):
        dit = DiT(cfg).to(torch.bfloat16)
    export_dit(dit, dit_graph("bf16", cfg), out, weights=state)
    return {"seconds": time.monotonic() - start, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k4trt.bench.export_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[1, 2], help="block-pair counts to measure (default 1 2)")
    p.add_argument("--out", type=Path, required=True, help="result JSON file")
    p.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "ONNX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(export_once(Path(args.child[0]), Path(args.child[1]))))
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pairs in args.pairs:
            checkpoint, onnx = Path(tmp) / f"dit{pairs}.pt", Path(tmp) / f"dit{pairs}.onnx"
            size = write_checkpoint(checkpoint, pairs)
            child = subprocess.run([sys.executable, "-m", "k4trt.bench.export_cost", "--out", str(args.out),
                                    "--child", str(checkpoint), str(onnx)], capture_output=True, text=True, check=True)
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            runs.append({"pairs": pairs, "checkpoint_bytes": size, **measured})
            print(f"{pairs} pair(s): {measured['seconds']:.1f} s, peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"checkpoint {size / 2**30:.2f} GiB", flush=True)
            for f in Path(tmp).iterdir():
                f.unlink()
    document: dict[str, object] = {"runs": runs, "cpu": _cpu()}
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        span = b["pairs"] - a["pairs"]
        extrapolated = {}
        for key in ("seconds", "peak_rss_bytes", "checkpoint_bytes"):
            per_pair = (b[key] - a[key]) / span
            extrapolated[key] = a[key] + per_pair * (RELEASED_PAIRS - a["pairs"])
            extrapolated[f"{key}_per_pair"] = per_pair
        document["extrapolated_to_21_pairs"] = extrapolated
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _cpu() -> str:
    from k4trt.bench.environment import device_name

    return device_name(torch.device("cpu"))


if __name__ == "__main__":
    raise SystemExit(main())
