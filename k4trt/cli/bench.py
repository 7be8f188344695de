"""`k4trt bench`: the benchmark harness of benchmarks/ as a k4trt command (same flags as `python -m benchmarks`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks.cli import DESCRIPTION, add_arguments, run

    p = subparsers.add_parser("bench", help="measure per-stage latency, memory and load time of the backends",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(command=run)
