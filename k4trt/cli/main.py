"""`k4trt`: run, bench, doctor, weights, serve. Heavy imports happen inside each command so --help is instant."""

from __future__ import annotations

import argparse
import sys

from k4trt import __version__
from k4trt.cli import bench as bench_cmd
from k4trt.cli import doctor as doctor_cmd
from k4trt.cli import run as run_cmd
from k4trt.cli import serve as serve_cmd
from k4trt.cli import weights as weights_cmd
from k4trt.cli.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k4trt",
        description="Kandinsky 4.0 T2V Flash on TensorRT (or PyTorch / ONNX Runtime): prompt -> video.",
    )
    parser.add_argument("--version", action="version", version=f"k4trt {__version__}")
    sub = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")
    run_cmd.add_parser(sub)
    weights_cmd.add_parser(sub)
    doctor_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    serve_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.command(args))


if __name__ == "__main__":
    sys.exit(main())
