"""`k4trt run`: one prompt to one video (or image), with the stage times.

Under `torchrun --nproc-per-node P` it is one rank of a sequence-parallel run (`k4trt.parallel`): the degree is
the world size; rank 0 writes and prints, the other ranks write and print nothing (their refusals are rank 0's).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt import config
from k4trt.cli.errors import EXIT_USER_ERROR
from k4trt.errors import K4TRTError
from k4trt.fsutil import check_writable_dir
from k4trt.runtime import BACKENDS

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
    p.add_argument("--seed", type=int, help="same seed, same video (default: random, printed)")
    p.add_argument("--duration", type=float, default=12, metavar="SECONDS",
                   help=f"whole seconds, 0-{config.MAX_SECONDS}; 0 makes a single image (default 12)")
    p.add_argument("--size", default=config.format_size(config.DEFAULT_SIZE), metavar="WxH",
                   help="width x height; the released model knows "
                   + ", ".join(config.format_size(s) for s in config.TRAINED_SIZES) + " (default %(default)s)")
    p.add_argument("--save-latents", type=Path, metavar="FILE.npy", help="also save the final latents, float32 (T, H/8, W/8, 16)")
    p.add_argument("--save-frames", type=Path, metavar="FILE.npy", help="also save the frames, float32 (F, H, W, 3) in [0, 1]")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="also save the stage times as JSON")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run the DiT loop and VAE chunks eagerly instead of replaying CUDA graphs (per-step times)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(command=run)


def _check_side_outputs(args: argparse.Namespace) -> None:
    for flag, path, suffix in (("--save-latents", args.save_latents, ".npy"), ("--save-frames", args.save_frames, ".npy"),
                               ("--report", args.report, ".json")):
        if path is None:
            continue
        if path.suffix.lower() != suffix:
            raise K4TRTError(f"{flag} {path}: the file name must end in {suffix}")
        check_writable_dir(path.parent.resolve(), f"{flag} {path}")


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
    from k4trt.parallel.degree import check_degree
    from k4trt.runtime.pipeline import Pipeline, check_request, model_dit_config, save_array
    from k4trt.runtime.report import format_table, save_report

    main = world is None or world.main
    width, height = config.parse_size(args.size)
    seconds = config.check_duration(args.duration)
    output = args.output or Path("k4trt.png" if seconds == 0 else "k4trt.mp4")
    _check_side_outputs(args)
    dit = model_dit_config(args.weights, args.backend, args.engines)
    if world is not None:
        check_degree(dit, world.size)
    check_request(args.prompt, seconds, width, height, output, released=config.is_released(dit),
                  seed=args.seed)

    pipe = Pipeline.from_pretrained(args.weights, backend=args.backend,
                                    device=world.device if world is not None else args.device,
                                    engines=args.engines, cuda_graph=not args.no_cuda_graph)
    result = pipe.generate(args.prompt, seed=args.seed, seconds=seconds, width=width, height=height, output=output,
                           keep_frames=args.save_frames is not None, progress=not args.no_progress)
    if not main:
        return 0
    if args.save_latents:
        save_array(args.save_latents, result.latents)
    if args.save_frames:
        assert result.frames is not None
        save_array(args.save_frames, result.frames)
    settings = {"prompt": args.prompt, "seed": result.seed, "duration_s": seconds, "width": width, "height": height,
                "backend": args.backend, "device": str(pipe.executor.device)}
    if world is not None:
        settings["sequence_parallel_ranks"] = world.size
    if args.report:
        save_report(args.report, result.stages, settings)
    print(f"wrote {output} ({config.video_frames(config.latent_frames(seconds))} frames, seed {result.seed})")
    print(format_table(result.stages))
    return 0
