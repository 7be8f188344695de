"""`k4trt weights make-tiny|verify|download DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="create, check or download a weights folder",
                              description="Weights folders use the original's layout: kandinsky4_distil_512.pt, "
                              "vae/, text_encoder/, tokenizer/, scheduler/.")
    sub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    tiny = sub.add_parser("make-tiny", help="write a tiny random model in the released layout (seconds, for tests)")
    tiny.add_argument("dir", type=Path, help="new or empty folder")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed, 0 to 2**63-1 (default 0)")
    tiny.set_defaults(command=make_tiny)
    verify = sub.add_parser("verify", help="read every file and name each that is missing, damaged or inconsistent")
    verify.add_argument("dir", type=Path)
    verify.set_defaults(command=verify_folder)
    download = sub.add_parser("download", help="fetch the released weights from Hugging Face (about 40 GB)")
    download.add_argument("dir", type=Path)
    download.set_defaults(command=download_folder)


def make_tiny(args: argparse.Namespace) -> int:
    from k4trt.weights.tiny import make_tiny as write_tiny

    write_tiny(args.dir, seed=args.seed)
    print(f"wrote a tiny random model to {args.dir} (for tests; its videos are noise)")
    return 0


def verify_folder(args: argparse.Namespace) -> int:
    from k4trt.weights.verify import verify

    result = verify(args.dir)
    for finding in result.findings:
        print(f"{'OK ' if finding.ok else 'FIX'} {finding.text}")
    if result.problems:
        print(f"{args.dir}: {len(result.problems)} problem(s); `k4trt weights download {args.dir}` fetches the "
              "released files again")
        return 1
    if result.hashed:
        sums = f"SHA-256 / git SHA-1 of {result.hashed} file(s) matched huggingface_hub's download record"
        sums += f", {result.unrecorded} file(s) have none" if result.unrecorded else ""
    else:
        sums = "no download record, so no checksums to compare (a folder filled by `k4trt weights download` has one)"
    print(f"OK {args.dir}: every file read and consistent; {sums}")
    return 0


def download_folder(args: argparse.Namespace) -> int:
    from k4trt.weights.download import download

    download(args.dir)
    print(f"downloaded the released weights to {args.dir}")
    return 0
