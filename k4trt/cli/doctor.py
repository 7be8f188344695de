"""`k4trt doctor`: one line per prerequisite, "OK ..." or "FIX ...: <what to run>", so a user sees at once why
the fast path would not work on this machine. Every check is independent and none can raise: a broken
check is itself reported as a FIX line, never as a traceback."""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import platform
from collections.abc import Callable
from pathlib import Path

_Line = tuple[bool, str]

GIB = 1 << 30


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help="check GPU, drivers, TensorRT, weights and engines",
                              description="Print OK or FIX (with the command that fixes it) for each prerequisite.")
    p.add_argument("--weights", type=Path, default=Path("weights"), help="weights folder (default: ./weights)")
    p.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder (default: ./engines)")
    p.set_defaults(command=lambda args: doctor(args.weights, args.engines))


def doctor(weights_dir: Path, engines_dir: Path, out: Callable[[str], None] = print) -> int:
    """Print every check's lines; 0 when all are OK, 1 when anything needs fixing."""
    checks: list[tuple[str, Callable[[], list[_Line]]]] = [
        ("Python/PyTorch", _python_torch),
        ("GPU", _gpu),
        ("driver", _driver),
        ("TensorRT", _tensorrt),
        ("weights", lambda: _weights(weights_dir)),
        ("engines", lambda: _engines(engines_dir, weights_dir)),
    ]
    failed = False
    for name, check in checks:
        try:
            lines = check()
        except Exception as e:  # a doctor must report, not crash
            lines = [(False, f"the {name} check itself failed ({type(e).__name__}: {e}): please report this as a bug")]
        for ok, text in lines:
            out(f"{'OK' if ok else 'FIX'} {text}")
            failed |= not ok
    return 1 if failed else 0


def _python_torch() -> list[_Line]:
    import torch

    python = platform.python_version()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return [(True, f"Python {python}"), (True, f"PyTorch {torch.__version__} ({build})")]


def _gpu() -> list[_Line]:
    import torch

    from k4trt.core.gpu import FP8_COMPUTE_CAPABILITY

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return [(False, "no CUDA GPU: this PyTorch is a CPU-only build; on a GPU machine install a CUDA build: "
                            "pip install torch --index-url https://download.pytorch.org/whl/cu128")]
        return [(False, "no CUDA GPU visible to PyTorch (TensorRT needs one): check `nvidia-smi` and CUDA_VISIBLE_DEVICES; "
                        "without a GPU only `k4trt run --backend torch --device cpu` works")]
    lines: list[_Line] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        cc = (props.major, props.minor)
        text = f"GPU {index}: {props.name}, compute capability {cc[0]}.{cc[1]}, {props.total_memory / GIB:.1f} GiB"
        if cc < (8, 0):
            lines.append((False, f"{text}: bf16 engines need compute capability 8.0+ (Ampere or newer): use another GPU"))
        elif cc < FP8_COMPUTE_CAPABILITY:
            lines.append((True, f"{text}: no FP8 tensor cores (needs 8.9+, Ada/Hopper), so build-engines builds the "
                                "bf16 DiT"))
        else:
            lines.append((True, text))
    return lines


def _driver() -> list[_Line]:
    import torch

    supports = _driver_cuda()
    if isinstance(supports, str):
        return [(False, supports)]
    text = f"NVIDIA driver {_driver_release() or '(release unknown)'} supports CUDA {supports[0]}.{supports[1]}"
    if torch.version.cuda is None:
        return [(True, text)]
    runtime = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    if runtime > supports:
        return [(False, f"{text}, but PyTorch uses the CUDA {torch.version.cuda} runtime: update the NVIDIA driver "
                        "(https://www.nvidia.com/drivers)")]
    return [(True, f"{text}; PyTorch's CUDA runtime is {torch.version.cuda}")]


def _driver_cuda() -> tuple[int, int] | str:
    """The newest CUDA the driver supports (cuDriverGetVersion), or the FIX text where it cannot be asked."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ("NVIDIA driver not found (libcuda.so.1 cannot be loaded): install the NVIDIA driver "
                "(https://www.nvidia.com/drivers)")
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return "the NVIDIA driver does not answer (cuDriverGetVersion failed): reinstall the driver, then check `nvidia-smi`"
    return (version.value // 1000, version.value % 1000 // 10)


def _driver_release() -> str | None:
    """The driver's release number (e.g. 550.54.15) from NVML, which ships with every Linux driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        buffer = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(len(buffer))) == 0
        nvml.nvmlShutdown()
    except (OSError, AttributeError):
        return None
    return buffer.value.decode() if ok else None


def _tensorrt() -> list[_Line]:
    import torch

    from k4trt.engine.trt_api import MISSING, cuda_variant, tensorrt_version

    version = tensorrt_version()
    if version is None:
        lines = [(False, _tensorrt_absent() or MISSING)]
    else:
        variant = cuda_variant()
        build = f"the CUDA {variant} build" if variant else "CUDA build unknown (not installed from a pip wheel)"
        lines = [(True, f"TensorRT {version}, {build}")]
        driver = _driver_cuda()
        lines += tensorrt_fit(variant, torch.version.cuda, driver if isinstance(driver, tuple) else None)
    try:
        polygraphy = importlib.metadata.version("polygraphy")
        old = tuple(int(p) for p in polygraphy.split(".")[:2]) < POLYGRAPHY
        need = ".".join(map(str, POLYGRAPHY))
        lines.append((False, f"polygraphy {polygraphy} predates TensorRT 11 (its CreateConfig reads removed layer "
                             f"precision APIs): pip install -U 'polygraphy>={need}'") if old
                     else (True, f"polygraphy {polygraphy}"))
    except importlib.metadata.PackageNotFoundError:
        lines.append((False, "polygraphy is not installed (build-engines needs it): pip install 'polygraphy>=0.53'"))
    return lines


def _tensorrt_absent() -> str | None:
    """Why a TensorRT that is installed cannot be used (too old, libraries not loadable), or None if absent."""
    from k4trt.engine.trt_api import require_tensorrt
    from k4trt.errors import K4TRTError

    try:
        require_tensorrt()
    except K4TRTError as e:
        return None if "not installed" in str(e) else str(e)
    return None


#: polygraphy 0.53 is the first to support TensorRT 11 (TensorRT 11.3's notes bump it to 0.53.6)
POLYGRAPHY = (0, 53)
#: the oldest driver each CUDA build of TensorRT runs on: the CUDA it must support, and its release
DRIVERS = {12: ((12, 2), "r535"), 13: ((13, 0), "r580")}


def tensorrt_fit(variant: int | None, torch_cuda: str | None, driver: tuple[int, int] | None) -> list[_Line]:
    """Whether TensorRT's CUDA build fits the installed torch and the driver, with the fix where it does not."""
    if variant is None:
        return []
    lines: list[_Line] = []
    if torch_cuda is None:
        lines.append((False, f"PyTorch is a CPU build, and the TensorRT backend runs on CUDA tensors: install a CUDA "
                             f"{variant}.x build of torch (https://pytorch.org/get-started/locally) to match TensorRT's "
                             f"CUDA {variant} build"))
    else:
        torch_major = int(torch_cuda.split(".")[0])
        if torch_major != variant:
            lines.append((False, f"TensorRT is the CUDA {variant} build but PyTorch uses CUDA {torch_cuda}: "
                                 f"pip uninstall -y tensorrt tensorrt-cu{variant} tensorrt-cu{variant}-libs "
                                 f"tensorrt-cu{variant}-bindings && pip install 'k4trt[trt-cu{torch_major}]'"))
        else:
            lines.append((True, f"TensorRT's CUDA {variant} build matches PyTorch's CUDA {torch_cuda}"))
    if driver is not None and variant in DRIVERS:
        needed, release = DRIVERS[variant]
        if driver < needed:
            lines.append((False, f"TensorRT's CUDA {variant} build needs a driver for CUDA {needed[0]}.{needed[1]}+ "
                                 f"({release} or newer), this one supports CUDA {driver[0]}.{driver[1]}: update the "
                                 f"NVIDIA driver, or pip install 'k4trt[trt-cu12]' with a CUDA 12 torch"))
        else:
            lines.append((True, f"the driver (CUDA {driver[0]}.{driver[1]}) runs TensorRT's CUDA {variant} build"))
    return lines


def _weights(weights_dir: Path) -> list[_Line]:
    try:
        from k4trt.weights.layout import WeightsFolder
    except ImportError as e:
        return [(False, f"cannot check weights ({e}): reinstall k4trt: pip install -e .")]
    problems = WeightsFolder(weights_dir).problems()
    fix = f"k4trt weights download {weights_dir}"
    return [(False, f"{problem}: {fix}") for problem in problems] or [(True, f"weights in {weights_dir}")]


def _engines(engines_dir: Path, weights_dir: Path) -> list[_Line]:
    """The manifest's plans, each checked by size and, where its file changed identity since it was built,
    by SHA-256: a plan the stamp cache vouches for is not read."""
    from k4trt.core.gpu import current_gpu
    from k4trt.core.graphs import DIT, GRAPH_NAMES
    from k4trt.core.manifest import MANIFEST, BuildEnvironment, Manifest, plan_problem, rebuild_command
    from k4trt.engine.trt_api import tensorrt_version
    from k4trt.errors import K4TRTError

    build = rebuild_command(engines_dir, str(weights_dir), extra="")
    try:
        manifest = Manifest.load(engines_dir)
    except K4TRTError as e:
        return [(False, str(e))]
    if manifest is None:
        return [(False, f"no engines in {engines_dir} (no {MANIFEST}): {build}")]
    built = {r.graph for r in manifest.engines.values() if r.plan is not None}
    if not built:
        exported = ", ".join(sorted(manifest.artifacts)) or "nothing"
        return [(False, f"{engines_dir} holds exported ONNX graphs ({exported}) but no TensorRT engines yet: {build}")]
    lines: list[_Line] = []
    missing = [("a DiT plan" if g == DIT else f"{g}.plan") for g in GRAPH_NAMES if g not in built]
    if missing:
        lines.append((False, f"{engines_dir} lacks {', '.join(missing)}: {build}"))
    version, gpu = tensorrt_version(), current_gpu()
    env = manifest.environment
    if version is not None and gpu is not None and env is not None:
        changes = env.changes_to(BuildEnvironment(version, gpu))
        if changes:
            lines.append((False, f"engines in {engines_dir} do not fit this machine ({'; '.join(changes)}): "
                                 f"{manifest.rebuild_command(engines_dir)}"))
    rebuild = manifest.rebuild_command(engines_dir)
    for plan, record in sorted(manifest.engines.items()):
        path = engines_dir / plan
        problem = plan_problem(engines_dir, plan, record)
        if problem is None and record.plan is not None and manifest.file_sha(engines_dir, plan) != record.plan.sha256:
            problem = f"{path} differs from the plan that was built (SHA-256 mismatch)"
        if problem:
            lines.append((False, f"{problem}: {rebuild}"))
        else:
            latent, r = next(iter(record.profile.items()))  # every graph's first input is its latents
            shapes = f"{latent} {r.min}..{r.max}"
            where = f"TensorRT {env.tensorrt_version} for {env.gpu.name}" if env is not None else "an unknown TensorRT"
            scope = f", FP8 scope {record.fp8_scope}" if record.fp8_scope else ""
            seen = record.inspection
            inspected = (f"; {len(seen.attention_layers)} fused attention, {seen.fp8_gemm_layers} FP8 GEMM layers"
                         if seen is not None else "")
            lines.append((True, f"{plan} ({record.precision}{scope}, built with {where}; {shapes}{inspected})"))
    return lines
