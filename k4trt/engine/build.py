"""ONNX -> TensorRT plan for one graph: strongly typed, one optimization profile, shared timing cache.

The plan streams from TensorRT into a temporary file (`k4trt.engine.plan_io`), renamed onto the plan only after
TensorRT succeeded, and the timing cache is written the same way, so an interrupted or failed build leaves
the previous files (or none) and never a partial plan.

Written against TensorRT 11's documentation, not yet run with TensorRT (README, "What was verified where").
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from k4trt.core.graphs import check_precision
from k4trt.core.manifest import FileDigest, rebuild_command
from k4trt.core.profiles import ShapeRange
from k4trt.engine.collectives import place_collectives, placeholder_graph, require_all_to_all
from k4trt.engine.plan_io import plan_writer
from k4trt.engine.trt_api import (
    describe_errors,
    error_recorder,
    is_out_of_memory,
    needs_strongly_typed_flag,
    recorded_errors,
    require_tensorrt,
)
from k4trt.errors import K4TRTError, first_line
from k4trt.fsutil import atomic_path, check_writable_dir

if TYPE_CHECKING:
    import tensorrt as trt
    from polygraphy.backend.trt import Profile


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    ranges: Mapping[str, ShapeRange],
    timing_cache: Path,
    precision: str,
    *,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    degree: int = 1,
) -> FileDigest:
    """Build `plan_path` from `onnx_path` with one optimization profile of `ranges` (per input, from
    `k4trt.core.graphs.profile`). A graph for `degree` > 1 sequence-parallel ranks gets its exchanges as
    DistCollective layers (`k4trt.engine.collectives`); the one plan serves every rank.

    `precision` is what the ONNX must carry (fp8: FP8 Q/DQ nodes; bf16: none): in a strongly typed network
    the graph, not a builder flag, decides precision, so this only guards against a mislabelled file.
    `timing_cache` is read if present and rewritten with what this build measured, so later builds (other
    graphs, other shape sets) skip re-timing the same tactics. `optimization_level` is TensorRT's builder
    optimization level (0-5, default 3); `workspace_bytes` caps the workspace pool (default: TensorRT's,
    the whole GPU).
    """
    require_tensorrt()
    check_precision(precision)
    _check_onnx_precision(onnx_path, precision)
    check_writable_dir(plan_path.parent, "build-engines")
    if degree > 1:
        require_all_to_all()
    progress = BuildProgress(plan_path.name)
    with _cancel_on_interrupt(progress), atomic_path(plan_path) as tmp_plan, contextlib.ExitStack() as stack:
        parsed, placeholders = stack.enter_context(placeholder_graph(onnx_path)) if degree > 1 else (onnx_path, [])
        plan, cache = _serialize(parsed, plan_path, tmp_plan, ranges, timing_cache, optimization_level, workspace_bytes,
                                 progress, placeholders, degree)
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(cache)
    progress.finish()
    return plan


def _serialize(
    onnx_path: Path,
    plan_path: Path,
    tmp_plan: Path,
    ranges: Mapping[str, ShapeRange],
    timing_cache: Path,
    optimization_level: int,
    workspace_bytes: int | None,
    progress: BuildProgress,
    placeholders: list[str],
    degree: int,
) -> tuple[FileDigest, memoryview]:
    """Parse, configure and build, streaming the plan into `tmp_plan`; returns what was written and the
    serialized timing cache (a view of TensorRT's host memory; it is megabytes, the plan is gigabytes).

    TensorRT Developer Guide: "Strongly Typed Networks" (the only mode in TensorRT 11; the ONNX carries bf16
    tensors and FP8 Q/DQ, so no precision flags are set), "Working with Dynamic Shapes" > "Optimization
    Profiles", "Optimizing Builder Performance" > "Timing Cache", and the IProgressMonitor / IErrorRecorder
    interfaces ("How TensorRT Works" > "Error Handling and Logging"). Layer information is kept at DETAILED
    profiling verbosity, which the engine inspector needs to show each layer's tensors (`k4trt.engine.inspect`).
    """
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    plan_name = plan_path.name
    again = rebuild_command(plan_path.parent)
    try:
        # the flag only before TensorRT 11, where it is deprecated because strong typing is the only mode
        builder, network, _parser = NetworkFromOnnxPath(
            str(onnx_path), strongly_typed=needs_strongly_typed_flag(trt.__version__))()
    except PolygraphyException as e:
        raise K4TRTError(f"TensorRT cannot parse {onnx_path} ({first_line(e)}); export it again: {again}") from None
    if degree > 1:
        place_collectives(network, placeholders, degree)
    recorder = error_recorder()
    builder.error_recorder = recorder
    monitor = _progress_monitor(progress)
    pools = {trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes is not None else None
    with contextlib.ExitStack() as stack:
        # An open file rather than the path: given a path, polygraphy leaves a `timing.cache.lock` behind.
        cache_file = stack.enter_context(open(timing_cache, "rb")) if timing_cache.is_file() else None
        config = CreateConfig(
            profiles=[to_profile(ranges)],
            load_timing_cache=cache_file,
            builder_optimization_level=optimization_level,
            memory_pool_limits=pools,
            progress_monitor=monitor,
            profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        )(builder, network)
    with tmp_plan.open("wb") as file:
        writer, written = plan_writer(file)
        ok = builder.build_serialized_network_to_stream(network, config, writer)
    if progress.cancelled:
        raise KeyboardInterrupt
    if not ok or written.size == 0:
        errors = recorded_errors(recorder)
        if is_out_of_memory(errors):
            workspace = " or a smaller workspace limit" if workspace_bytes is not None else ""
            raise K4TRTError(
                f"building {plan_name} ran out of GPU memory; build for fewer or smaller --sizes, a shorter "
                f"--max-duration{workspace}, and close other programs using the GPU ({describe_errors(errors)})"
            )
        raise K4TRTError(f"TensorRT {trt.__version__} could not build {plan_name} from {onnx_path.name} "
                         f"({describe_errors(errors)}); check the ONNX export, then: {again}")
    return written.plan_file(), memoryview(config.get_timing_cache().serialize())


def _check_onnx_precision(onnx_path: Path, precision: str) -> None:
    """fp8 graphs carry (De)QuantizeLinear nodes around the DiT's Linear layers; bf16 graphs carry none."""
    import onnx

    if not onnx_path.is_file():
        raise K4TRTError(f"{onnx_path} does not exist; export it first: {rebuild_command(onnx_path.parent)}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    quantized = any(node.op_type.endswith("QuantizeLinear") for node in graph.node)
    if quantized != (precision == "fp8"):
        found = "FP8 quantization" if quantized else "no FP8 quantization"
        again = rebuild_command(onnx_path.parent, extra=f"--precision {precision} --force")
        raise K4TRTError(f"{onnx_path} carries {found}, but precision {precision} was asked for; export it again "
                         f"with the precision you want: {again}")


class BuildProgress:
    """Turns TensorRT's nested phase/step callbacks into a status line every `interval` seconds, so a build
    that runs for tens of minutes visibly advances. Thread-safe: TensorRT may report from worker threads."""

    def __init__(self, label: str, interval: float = 30.0, out: TextIO | None = None) -> None:
        self.label = label
        self.interval = interval
        self.out = out if out is not None else sys.stderr
        self.cancelled = False
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = self._start
        self._phases: dict[str, tuple[int, int]] = {}  # open phases, outermost first: name -> (done, steps)
        self._emit("building (this can take a while)")

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._phases[phase_name] = (0, num_steps)
            if parent_phase is None:
                self._emit(f"{phase_name} ...")

    def step_complete(self, phase_name: str, step: int) -> bool:
        """Returns False once the user asked to stop, which TensorRT takes as a request to cancel the build."""
        with self._lock:
            if phase_name in self._phases:
                self._phases[phase_name] = (step + 1, self._phases[phase_name][1])
            if time.monotonic() - self._last >= self.interval:
                self._emit(" > ".join(f"{name} {done}/{total}" for name, (done, total) in self._phases.items()))
            return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._phases.pop(phase_name, None)

    def finish(self) -> None:
        with self._lock:
            self._emit("done")

    def _emit(self, text: str) -> None:
        self._last = time.monotonic()
        print(f"[{self.label} {self._last - self._start:6.0f} s] {text}", file=self.out, flush=True)


def to_profile(ranges: Mapping[str, ShapeRange]) -> Profile:
    """The polygraphy `Profile` that `CreateConfig(profiles=[...])` adds to the builder configuration."""
    try:
        from polygraphy.backend.trt import Profile
    except ImportError:
        raise K4TRTError("polygraphy is not installed: pip install 'polygraphy>=0.53'") from None
    profile = Profile()
    for name, r in ranges.items():
        profile.add(name, min=r.min, opt=r.opt, max=r.max)
    return profile


def _progress_monitor(progress: BuildProgress) -> trt.IProgressMonitor:
    """An IProgressMonitor (TensorRT Python API, "IProgressMonitor") forwarding to `progress`; TensorRT keeps
    only a raw pointer, so the caller holds the returned object until the build ends."""
    import tensorrt as trt

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


@contextlib.contextmanager
def _cancel_on_interrupt(progress: BuildProgress) -> Iterator[None]:
    """While TensorRT builds, Ctrl-C marks the build cancelled (the monitor then asks TensorRT to stop) instead
    of raising inside a TensorRT callback; the build then ends with KeyboardInterrupt and writes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: object) -> None:
        progress.cancelled = True
        print(f"[{progress.label}] interrupted: stopping the build ...", file=progress.out, flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if progress.cancelled:
        raise KeyboardInterrupt
