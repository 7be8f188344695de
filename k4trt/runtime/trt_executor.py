"""The TensorRT executor: the DiT and VAE plans from `build-engines`, run on torch CUDA tensors.

Four execution contexts (the DiT and the VAE's image, head and body graphs) share ONE block of activation
memory sized for the largest: they never run at the same time (one stream, in order), so holding four blocks
would only waste GPU memory. Each context's inputs and outputs are fixed torch buffers per shape signature,
bound once (`k4trt.runtime.trt_bindings`): calls copy into and out of them, so the sampler's loop, TensorRT
calls included, is captured in a CUDA graph without any binding changing inside the capture. Plans are read
streamed (`k4trt.engine.plan_io`), never as one bytes object of the whole file.

On a rank of a sequence-parallel run (`world` given) the DiT plan is the folder's `dit.sp{P}` one, the same
plan on every rank, its exchanges DistCollective layers; its context runs them on an NCCL communicator
(`set_communicator`, TensorRT Developer Guide, "Multi-Device Inference"), and every rank enqueues it in step.

Written against TensorRT 11's documentation, not yet run with TensorRT (README, "What was verified where").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import torch

from k4trt import config
from k4trt.core.executor import Executor
from k4trt.core.gpu import current_gpu
from k4trt.core.graphs import DIT, GraphSpec, folder_graphs, vae_role
from k4trt.core.manifest import MANIFEST, BuildEnvironment, EngineRecord, Manifest, plan_problem
from k4trt.core.profiles import uncovered
from k4trt.engine.plan_io import deserialize
from k4trt.engine.trt_api import (
    check_aligned,
    describe_errors,
    error_recorder,
    is_out_of_memory,
    recorded_errors,
    require_tensorrt,
)
from k4trt.errors import K4TRTError
from k4trt.runtime.engines_folder import choose_dit, open_engines
from k4trt.runtime.nccl import Communicator
from k4trt.runtime.trt_bindings import BoundIO

if TYPE_CHECKING:
    import tensorrt as trt

    from k4trt.parallel.world import World


class _MultiDeviceContext(Protocol):
    """IExecutionContext.set_communicator of TensorRT ≥ 10.16 (absent from the 10.x stubs)."""

    def set_communicator(self, communicator: object) -> bool: ...


@dataclass(frozen=True)
class _Io:
    """One plan's I/O tensor names and dtypes, read from the engine once."""

    plan: str
    record: EngineRecord
    spec: GraphSpec
    dtypes: Mapping[str, torch.dtype]


class TensorRTExecutor(Executor):
    def __init__(self, engines_dir: Path | str, precision: str | None = None, device: torch.device | str = "cuda",
                 weights_dir: Path | None = None, world: World | None = None) -> None:
        """Load the `dit.<precision>` plan (fp8 when None and the folder has it, else bf16) and the VAE's image,
        head and body plans from `engines_dir` after checking the manifest says they fit this GPU and TensorRT
        (and, with `weights_dir`, were made from those weights)."""
        require_tensorrt()
        import tensorrt as trt

        self.engines_dir = Path(engines_dir)
        self.device = _cuda_device(device)
        gpu = current_gpu(self.device)
        if gpu is None:
            raise K4TRTError(f"PyTorch cannot use {self.device}; check CUDA_VISIBLE_DEVICES and `nvidia-smi`")
        manifest = open_engines(self.engines_dir, weights_dir, "engines")
        self._manifest = manifest
        _check_environment(manifest, BuildEnvironment(trt.__version__, gpu), self.engines_dir)
        model = manifest.require_model(self.engines_dir)
        self.dtype = torch.bfloat16
        self.dit_config = model.dit_config
        self.vae_scaling_factor = model.vae_scaling_factor
        built = {name.removesuffix(".plan") for name, r in manifest.engines.items() if r.plan is not None}
        degree = world.size if world is not None else 1
        self.dit_precision = choose_dit(manifest, built, precision, self.engines_dir, "engine", degree)
        specs = folder_graphs(self.dit_precision, model.dit_config, model.vae_config, degree)

        self._recorder = error_recorder()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._runtime.error_recorder = self._recorder
        with torch.cuda.device(self.device):
            self._engines = {name: self._deserialize(spec.plan) for name, spec in specs.items()}
            self._io = {name: _read_io(spec, manifest.engines[spec.plan], engine, manifest.rebuild_command(self.engines_dir))
                        for (name, spec), engine in zip(specs.items(), self._engines.values(), strict=True)}
            self._stream = torch.cuda.Stream(self.device)
            size = max(e.device_memory_size_v2 for e in self._engines.values())
            self._workspace = self._allocate((size,), torch.uint8, "the engines' activation memory")
            check_aligned(self._workspace.data_ptr(), "the engines' activation memory")
            self._contexts = {graph: self._context(graph, e, size) for graph, e in self._engines.items()}
            self._communicator = None
            if world is not None:
                self._communicator = Communicator(world.rank, world.size, self.device)
                if not cast(_MultiDeviceContext, self._contexts[DIT]).set_communicator(self._communicator.capsule()):
                    raise self._failure(f"TensorRT refused the NCCL communicator for {specs[DIT].plan}")
            self._bound = {graph: BoundIO(self._contexts[graph], io.plan,
                                          {n: io.dtypes[n] for n in io.spec.input_names},
                                          {n: io.dtypes[n] for n in io.spec.output_names},
                                          lambda nbytes, what: self._allocate((nbytes,), torch.uint8, what),
                                          self._failure)
                           for graph, io in self._io.items()}

    def dit(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        t, h, w = x.shape[:3]
        seconds = (t - 1) * config.VAE_TEMPORAL_FACTOR // config.FPS
        hint = f"--sizes {w * config.VAE_SPATIAL_FACTOR}x{h * config.VAE_SPATIAL_FACTOR} --max-duration {seconds}"
        (velocity,) = self._run(DIT, (x, text, time, rope), hint)
        return velocity

    def dit_rows(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor,
                 order: torch.Tensor) -> torch.Tensor:
        """One rank's rows of a sequence-parallel DiT call (the `dit.sp{P}` plan); every rank calls it together."""
        (velocity,) = self._run(DIT, (x, text, time, rope, order), f"--sp {self._io[DIT].spec.degree}")
        return velocity

    def vae_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        graph = f"vae_{vae_role(caches is None, z.shape[2])}"
        h, w = z.shape[-2:]
        frames, *new = self._run(graph, (z, *(caches or ())),
                                 f"--sizes {w * config.VAE_SPATIAL_FACTOR}x{h * config.VAE_SPATIAL_FACTOR}")
        return frames, new

    def close(self) -> None:
        """Buffers and contexts before their engines, then the shared memory (TensorRT Developer Guide, "How
        TensorRT Works" > "Object Lifetimes")."""
        self._bound.clear()
        self._contexts.clear()
        self._engines.clear()
        if self._communicator is not None:
            self._communicator.close()
        del self._workspace
        torch.cuda.empty_cache()

    def _run(self, graph: str, tensors: Sequence[torch.Tensor], hint: str) -> list[torch.Tensor]:
        """Copy into the context's bound buffers and enqueue on this executor's stream.

        TensorRT Developer Guide, "The Python API" > "Performing Inference" (set_input_shape, output shapes from
        get_tensor_shape once every input shape is set, set_tensor_address, execute_async_v3), done once per
        shape signature by `BoundIO`. The dedicated stream avoids the extra synchronization TensorRT adds on the
        legacy default stream; it waits for the caller's stream (where the inputs were copied in) before, and
        the caller's stream waits for it (before copying the outputs out) after, so ordering, and CUDA-graph
        capture, which follows these event dependencies, behave as if everything ran on the caller's stream.
        """
        io = self._io[graph]
        if len(tensors) != len(io.spec.inputs):
            raise ValueError(f"{io.plan} takes inputs {io.spec.input_names}, got {len(tensors)} tensors")
        inputs = dict(zip(io.spec.input_names, tensors, strict=True))
        problems = uncovered(io.record.profile, {name: tuple(t.shape) for name, t in inputs.items()})
        if problems:
            command = self._manifest.rebuild_command(self.engines_dir, extra=f"{hint} --force")
            raise K4TRTError(f"{io.plan} in {self.engines_dir} was not built for this request ({'; '.join(problems)}); "
                             f"rebuild the engines to include it: {command}")
        with torch.cuda.device(self.device):
            return self._bound[graph].run(list(inputs.values()), lambda: self._launch(graph, io, inputs))

    def _launch(self, graph: str, io: _Io, inputs: Mapping[str, torch.Tensor]) -> None:
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        self._recorder.clear()
        ok = self._contexts[graph].execute_async_v3(self._stream.cuda_stream)
        caller.wait_stream(self._stream)
        if not ok:
            shapes = {name: tuple(t.shape) for name, t in inputs.items()}
            raise self._failure(f"TensorRT failed to run {io.plan} on {shapes}")

    def _deserialize(self, plan: str) -> trt.ICudaEngine:
        """TensorRT Developer Guide, "The Python API" > "Deserializing a Plan". The size recorded at build time
        is checked first: a truncated copy is named as such instead of as an opaque deserialization error."""
        path = self.engines_dir / plan
        record = self._manifest.engines.get(plan)
        if record is None:
            raise K4TRTError(f"{self.engines_dir} has no {plan} in its {MANIFEST}; build it: "
                             f"{self._manifest.rebuild_command(self.engines_dir, extra='')}")
        problem = plan_problem(self.engines_dir, plan, record)
        if problem:
            raise K4TRTError(f"{problem}; rebuild the engines: {self._manifest.rebuild_command(self.engines_dir)}")
        self._recorder.clear()
        engine = deserialize(self._runtime, path)
        if engine is None:
            errors = recorded_errors(self._recorder)
            if is_out_of_memory(errors):
                raise K4TRTError(f"not enough free GPU memory to load {path}; close other programs using the GPU")
            raise K4TRTError(f"{path} is corrupt or not a plan for this TensorRT ({describe_errors(errors)}); rebuild "
                             f"the engines: {self._manifest.rebuild_command(self.engines_dir)}")
        return engine

    def _context(self, graph: str, engine: trt.ICudaEngine, size: int) -> trt.IExecutionContext:
        """A context without its own activation memory, pointed at the shared block (TensorRT Developer Guide,
        "How TensorRT Works" > "Memory" > "The Runtime Phase"; ExecutionContextAllocationStrategy.USER_MANAGED
        and set_device_memory with a size of at least device_memory_size_v2)."""
        import tensorrt as trt

        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise self._failure(f"TensorRT could not create an execution context for {self._io[graph].plan}")
        context.set_device_memory(self._workspace.data_ptr(), size)
        return context

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        try:
            return torch.empty(shape, dtype=dtype, device=self.device)
        except torch.cuda.OutOfMemoryError:
            raise K4TRTError(f"out of GPU memory allocating {what}; use a smaller --size or a shorter --duration, "
                             "or close other programs using the GPU") from None

    def _failure(self, what: str) -> K4TRTError:
        errors = recorded_errors(self._recorder)
        if is_out_of_memory(errors):
            return K4TRTError(f"{what}: out of GPU memory; use a smaller --size or a shorter --duration, "
                              "or close other programs using the GPU")
        return K4TRTError(f"{what} ({describe_errors(errors)}); if the engines are stale, rebuild them: "
                          f"{self._manifest.rebuild_command(self.engines_dir)}")


def _cuda_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise K4TRTError(f"the TensorRT backend runs on a CUDA GPU, not {device}; use --device cuda, "
                         "or --backend torch / onnxruntime on the CPU")
    if not torch.cuda.is_available():
        raise K4TRTError("the TensorRT backend needs a CUDA GPU and PyTorch sees none; use --backend torch or onnxruntime")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _check_environment(manifest: Manifest, current: BuildEnvironment, engines_dir: Path) -> None:
    """Refuse plans built for another GPU model or TensorRT version: they either fail to deserialize or run
    with tactics tuned for other hardware."""
    built = manifest.environment
    if built is not None and not built.changes_to(current):
        return
    what = (f"were built for {built.gpu.describe()} with TensorRT {built.tensorrt_version}" if built is not None
            else "were never built")
    raise K4TRTError(f"engines in {engines_dir} {what}, but this machine has {current.gpu.describe()} with TensorRT "
                     f"{current.tensorrt_version}; rebuild them: {manifest.rebuild_command(engines_dir)}")


def _read_io(spec: GraphSpec, record: EngineRecord, engine: trt.ICudaEngine, again: str) -> _Io:
    """The plan's tensor dtypes, after checking its tensors are the registry's (a plan from another k4trt, or
    hand-built, is refused rather than fed by the wrong names)."""
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if set(inputs) != set(spec.input_names) or set(outputs) != set(spec.output_names):
        raise K4TRTError(f"{spec.plan} has inputs {inputs} and outputs {outputs}, not the {spec.input_names} and "
                         f"{spec.output_names} this k4trt binds; rebuild it: {again}")
    return _Io(spec.plan, record, spec, {n: _torch_dtype(spec.plan, n, engine.get_tensor_dtype(n)) for n in names})


def _torch_dtype(plan: str, name: str, dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.FP8: torch.float8_e4m3fn,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise K4TRTError(f"{plan}: tensor {name} has type {dtype.name}, which has no torch equivalent; rebuild the engines")
    return table[dtype]
