"""`k4trt bench`: the benchmark harness (`k4trt.bench`) as a k4trt command (same flags as `python -m k4trt.bench`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from k4trt.bench.cli import DESCRIPTION, add_arguments, run

    p = subparsers.add_parser("bench", help="measure per-stage latency, memory and load time of the backends",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(command=run)
