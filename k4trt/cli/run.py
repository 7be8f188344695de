"""`k4trt run`: one prompt to one video (or image), with the stage times.

Under `torchrun --nproc-per-node P` it is one rank of a sequence-parallel run (`k4trt.parallel`): the degree is
the world size; rank 0 writes and prints, the other ranks write and print nothing (their refusals are rank 0's).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt import __version__, config
from k4trt.cli.errors import EXIT_USER_ERROR
from k4trt.errors import K4TRTError
from k4trt.fsutil import check_output_file
from k4trt.runtime import BACKENDS
from k4trt.weights.layout import WeightsFolder

if TYPE_CHECKING:
    from k4trt.parallel.world import World


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate a video (or an image with --duration 0) from a prompt",
        description="Generate a video from PROMPT with Kandinsky 4.0 T2V Flash (4 steps).",
    )
    p.add_argument("prompt", help="what the video shows (English; longer than 224 T5 tokens is truncated)")
    p.add_argument("-o", "--output", type=Path, help="output .mp4 (or .png for --duration 0); default k4trt.mp4/.png")
    p.add_argument("--weights", type=Path, default=Path("weights"), help="weights folder (default: ./weights)")
    p.add_argument("--engines", type=Path, help="engines folder from build-engines (for --backend trt|onnxruntime)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="trt: TensorRT engines (fastest); torch: PyTorch reference; onnxruntime: the exported graphs")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dit-precision", choices=config.PRECISIONS,
                   help="which DiT graph of --engines to run (--backend trt|onnxruntime); default: fp8 where "
                   "it was built, else bf16")
    p.add_argument("--seed", type=int, help="0 to 2**63-1; same seed, same video (default: random, printed)")
    p.add_argument("--duration", type=float, default=12, metavar="SECONDS",
                   help=f"whole seconds, 0-{config.MAX_SECONDS}; 0 makes a single image (default 12)")
    p.add_argument("--size", default=config.format_size(config.DEFAULT_SIZE), metavar="WxH",
                   help="width x height; the released model knows "
                   + ", ".join(config.format_size(s) for s in config.TRAINED_SIZES) + " (default %(default)s)")
    p.add_argument("--save-latents", type=Path, metavar="FILE.npy",
                   help="also save the final latents, float32 (T, H/8, W/8, 16)")
    p.add_argument("--save-frames", type=Path, metavar="FILE.npy",
                   help="also save the frames, float32 (F, H, W, 3) in [0, 1]")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="also save the stage times as JSON")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run the DiT loop and VAE chunks eagerly instead of replaying CUDA graphs (per-step times)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(command=run)


def _check_outputs(args: argparse.Namespace, output: Path) -> None:
    """Suffix, folder, name length and "not an existing folder" of every file the run writes, and no two of
    them the same file (one would silently replace the other)."""
    paths = [("-o", output)]
    for flag, path, suffix in (("--save-latents", args.save_latents, ".npy"), ("--save-frames", args.save_frames, ".npy"),
                               ("--report", args.report, ".json")):
        if path is None:
            continue
        if path.suffix.lower() != suffix:
            raise K4TRTError(f"{flag} {path}: the file name must end in {suffix}")
        check_output_file(path, f"{flag} {path}")
        paths.append((flag, path))
    seen: dict[str, str] = {}
    for flag, path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise K4TRTError(f"{seen[real]} and {flag} both name {path}; give each its own file")
        seen[real] = flag


def run(args: argparse.Namespace) -> int:
    from k4trt.parallel import world as parallel

    with parallel.from_environment(args.device) as world:
        if world is None or world.main:
            return _run(args, world)
        try:
            return _run(args, world)
        except K4TRTError:
            return EXIT_USER_ERROR  # the same refusal is rank 0's to print


def _run(args: argparse.Namespace, world: World | None) -> int:
    """Every check that needs no model (request, paths, weights layout, degree, memory) comes before loading."""
    from k4trt.parallel.degree import check_degree
    from k4trt.runtime.pipeline import (
        Pipeline,
        check_backend,
        check_memory_before_loading,
        check_request,
        model_facts,
        resolve_device,
        save_array,
    )
    from k4trt.runtime.report import format_table, is_reference, save_report

    main = world is None or world.main
    width, height = config.parse_size(args.size)
    seconds = config.check_duration(args.duration)
    output = args.output or Path("k4trt.png" if seconds == 0 else "k4trt.mp4")
    check_backend(args.backend, args.dit_precision)
    folder = WeightsFolder(args.weights).require(dit_and_vae=args.backend == "torch")
    model = model_facts(folder.root, args.backend, args.engines)
    if world is not None:
        check_degree(model.dit_config, world.size)
    request = check_request(args.prompt, seconds, width, height, output,
                            released=config.is_released(model.dit_config), seed=args.seed)
    _check_outputs(args, output)
    device = world.device if world is not None else resolve_device(args.device)
    check_memory_before_loading(folder, model, args.backend, device, seconds, width, height, args.save_frames is not None)

    pipe = Pipeline.from_pretrained(args.weights, backend=args.backend, device=device, engines=args.engines,
                                    cuda_graph=not args.no_cuda_graph, dit_precision=args.dit_precision)
    result = pipe.generate(args.prompt, seed=request.seed, seconds=seconds, width=width, height=height, output=output,
                           keep_frames=args.save_frames is not None, progress=not args.no_progress)
    if not main:
        return 0
    print(f"wrote {output} ({result.frames_written} frames, seed {result.seed}, DiT {pipe.dit_precision})")
    if args.save_latents:
        save_array(args.save_latents, result.latents)
        print(f"wrote {args.save_latents}")
    if args.save_frames:
        assert result.frames is not None
        save_array(args.save_frames, result.frames)
        print(f"wrote {args.save_frames}")
    reference = is_reference(seconds, width, height)
    if args.report:
        settings = {"prompt": args.prompt, "seed": result.seed, "duration_s": seconds, "width": width, "height": height,
                    "backend": args.backend, "device": str(pipe.executor.device)}
        if world is not None:
            settings["sequence_parallel_ranks"] = world.size
        save_report(args.report, result.stages, {"output": str(output), "frames": result.frames_written,
                                                 "weights": str(args.weights), "dit_precision": pipe.dit_precision,
                                                 "k4trt_version": __version__, "settings": settings}, reference)
        print(f"wrote {args.report}")
    print(format_table(result.stages, reference))
    return 0
