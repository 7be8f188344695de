"""`build-engines`: export the ONNX graphs, then build the TensorRT engines from them, redoing only what changed."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt import config
from k4trt.cli.errors import run_cli
from k4trt.errors import K4TRTError

if TYPE_CHECKING:
    from k4trt.core.gpu import GpuInfo
    from k4trt.core.manifest import BuildEnvironment

#: --fp8-scope choices (k4trt.export.fp8.SCOPES; spelled here so --help imports no torch)
FP8_SCOPES = ("all", "ffn")

DESCRIPTION = """\
Export Kandinsky 4.0 T2V Flash to ONNX and build TensorRT engines in the --out folder:
  dit.<precision>.onnx, vae_image.onnx, vae_head.onnx, vae_body.onnx   the graphs TensorRT builds from
  dit.sp<P>.<precision>.onnx                                           the DiT for P ranks (--sp P)
  <graph>.f32.onnx                                                     float32 twins (--onnx-only, --twins)
  dit.fp8.scales.json                                                  FP8 calibration (fp8 only)
  *.plan, timing.cache, manifest.json                                  the engines and what they were built from
Graphs whose weights and settings are unchanged are reused; engines are rebuilt only when their graph,
shapes, TensorRT version or GPU changed. Engines cover every size in --sizes and every duration up to
--max-duration; build them on the GPU that will run them.
"""

EPILOG = """\
examples:
  build-engines                                    fp8 engines for 672x384, 0-12 s, from ./weights into ./engines
  build-engines --sizes 672x384,384x672,512x512    one engine set covering three sizes
  build-engines --onnx-only --out engines          ONNX only (no GPU needed); then
  k4trt run "a fox in the snow" --backend onnxruntime --engines engines
  build-engines --fp8-scope ffn                    FP8 in the feed-forward Linears only, attention projections bf16

The DiT's attention is exported as the ONNX Attention op, which TensorRT (10.14 and later) runs as one fused
kernel or refuses to build; every built engine is inspected and one whose attention did not fuse is refused.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build-engines", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights"), metavar="DIR",
                   help="weights folder in the original's layout (default: ./weights)")
    p.add_argument("--out", type=Path, default=Path("engines"), metavar="DIR",
                   help="engines folder, created if missing (default: ./engines)")
    p.add_argument("--precision", choices=config.PRECISIONS,
                   help="DiT precision: fp8 (FP8 GEMMs, calibrated; fastest; needs compute capability 8.9+, "
                   "Ada/Hopper) or bf16 (the original's); the VAE is always bf16 (default: fp8 where the GPU has "
                   "FP8 tensor cores, else bf16, saying so)")
    p.add_argument("--fp8-scope", choices=FP8_SCOPES, default="all",
                   help="which Linears of every DiT block run in FP8: all four (qkv, attention out, feed-forward in "
                   "and out), or ffn, the two feed-forward ones (2/3 of the Linear FLOPs; q, k, v in bf16) "
                   "(default: %(default)s)")
    p.add_argument("--sizes", default=config.format_size(config.DEFAULT_SIZE), metavar="WxH,...",
                   help="video sizes the engines must serve; the released model knows "
                   + ", ".join(f"{w}x{h}" for w, h in config.TRAINED_SIZES)
                   + f", other checkpoints any multiple of {config.SIZE_MULTIPLE} (default: %(default)s)")
    p.add_argument("--max-duration", type=int, default=config.MAX_SECONDS, metavar="S",
                   help=f"longest video the engines must serve, whole seconds 0-{config.MAX_SECONDS} "
                   "(default: %(default)s)")
    p.add_argument("--calib-prompts", type=Path, metavar="FILE",
                   help="FP8 calibration prompts, one per line (default: a built-in set of varied prompts)")
    p.add_argument("--onnx-only", action="store_true",
                   help="only export the ONNX graphs and their float32 twins (no TensorRT or GPU needed)")
    p.add_argument("--twins", action="store_true",
                   help="also write the float32 twins when building engines (only --backend onnxruntime reads them; "
                   "the DiT's is twice the size of its graph)")
    p.add_argument("--force", action="store_true",
                   help="export and build everything again, even what is up to date (the FP8 calibration is "
                   "reused; delete dit.fp8.scales.json to redo it)")
    p.add_argument("--sp", type=int, default=1, metavar="P",
                   help="build the DiT for P sequence-parallel ranks (torchrun --nproc-per-node P -m k4trt run ...): "
                   "dit.sp{P}.<precision>.onnx, one plan for every rank (default 1: one GPU)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="EXPERIMENTAL: also run the DiT's attention in FP8 with per-tensor scales (needs --precision "
                   "fp8). Per-tensor FP8 attention destroys video-DiT quality: in the SageAttention2 paper's Table 2 "
                   "CogVideoX-1.5 drops from 70.2 to 6.5 VQA-a with FA3-FP8. The attention is then exported written "
                   "out for TensorRT's pattern fusion instead of as the fused Attention op")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: build(args))


def build(args: argparse.Namespace) -> int:
    sizes = [config.parse_size(text) for text in args.sizes.split(",") if text.strip()]
    try:
        config.check_duration(args.max_duration)
    except K4TRTError as e:
        raise K4TRTError(f"--max-duration: {e}") from None
    environment = None if args.onnx_only else _require_engine_builder()
    from k4trt.core.gpu import current_gpu

    # Checked before export and calibration, which take long: an FP8 build on a GPU without FP8 tensor cores
    # would otherwise fail deep inside TensorRT at the end.
    precision = choose_precision(args.precision, environment.gpu if environment else current_gpu(), print)
    from k4trt.export.calibration import read_prompts
    from k4trt.export.onnx_set import export_onnx

    prompts = read_prompts(args.calib_prompts) if args.calib_prompts is not None else None
    start = time.monotonic()
    with contextlib.ExitStack() as lock:  # one build into a folder at a time, export and engines together
        onnx = export_onnx(args.weights, args.out, precision=precision, sizes=sizes,
                           max_duration=args.max_duration, calib_prompts=prompts, force=args.force,
                           fp8_scope=args.fp8_scope, fp8_attention=args.fp8_attention, degree=args.sp,
                           twins=args.onnx_only or args.twins, lock=lock)
        done = ", ".join(onnx.exported) if onnx.exported else "nothing (all up to date)"
        print(f"ONNX in {onnx.engines_dir}: exported {done} in {time.monotonic() - start:.0f} s")
        launch = "k4trt" if args.sp == 1 else f"torchrun --standalone --nproc-per-node {args.sp} -m k4trt"
        if environment is None:
            print(f'check them on the CPU: {launch} run "PROMPT" --backend onnxruntime --engines {onnx.engines_dir} '
                  f"--weights {args.weights}{' --device cpu' if args.sp > 1 else ''}")
            return 0
        from k4trt.engine.update import update_engines

        update_engines(onnx, environment, force=args.force)
    print(f'engines ready in {onnx.engines_dir}: {launch} run "PROMPT" --backend trt --engines {onnx.engines_dir}')
    return 0


def choose_precision(requested: str | None, gpu: GpuInfo | None, say: Callable[[str], object]) -> str:
    """The DiT precision to build: as requested, or fp8 where `gpu` has FP8 tensor cores (or is unknown: an
    --onnx-only export on a machine without a GPU), else bf16, said in one line. `--precision fp8` for a GPU
    without FP8 is refused in one line."""
    from k4trt.core.gpu import FP8_COMPUTE_CAPABILITY

    need = ".".join(map(str, FP8_COMPUTE_CAPABILITY))
    if gpu is None or gpu.has_fp8:
        return requested or "fp8"
    if requested == "fp8":
        raise K4TRTError(f"--precision fp8 needs FP8 tensor cores (compute capability {need}+, Ada or Hopper), which "
                         f"{gpu.describe()} lacks; build with --precision bf16")
    if requested is None:
        say(f"{gpu.describe()} has no FP8 tensor cores (needs {need}+): building the bf16 DiT")
    return requested or "bf16"


def _require_engine_builder() -> BuildEnvironment:
    """TensorRT and a GPU are checked before any export, which can take long."""
    from k4trt.engine.update import current_environment

    try:
        return current_environment()
    except K4TRTError as e:
        raise K4TRTError(f"{e}; or pass --onnx-only to export the ONNX graphs without building engines") from None


if __name__ == "__main__":
    sys.exit(main())
