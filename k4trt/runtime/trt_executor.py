"""The TensorRT executor: the DiT and VAE plans from `build-engines`, run on torch CUDA tensors.

Three execution contexts (DiT, VAE head, VAE body) share ONE block of activation memory sized for the
largest: they never run at the same time (one stream, in order), so holding three blocks would only waste
GPU memory. Inputs and outputs are torch tensors bound by address, so nothing is copied between torch and
TensorRT and the sampler's loop, TensorRT calls included, can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from k4trt import config
from k4trt.engine.gpu import current_gpu
from k4trt.engine.layout import MANIFEST, PRECISIONS, plan_name, rebuild_command
from k4trt.engine.manifest import EngineRecord, Manifest, check_compatible, plan_problem, read_manifest
from k4trt.engine.profiles import uncovered
from k4trt.engine.trt_api import error_recorder, is_out_of_memory, recorded_errors, require_tensorrt
from k4trt.errors import K4TRTError
from k4trt.runtime.executor import Executor

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass(frozen=True)
class _Io:
    """One plan's I/O tensor names and dtypes, read from the engine once."""

    plan: str
    record: EngineRecord
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: Mapping[str, torch.dtype]


class TensorRTExecutor(Executor):
    def __init__(self, engines_dir: Path | str, precision: str | None = None, device: torch.device | str = "cuda") -> None:
        """Load `dit.<precision>.plan` (fp8 when None and the folder has it, else bf16), `vae_image.plan`,
        `vae_head.plan` and `vae_body.plan` from `engines_dir` after checking the manifest says they fit this GPU and TensorRT."""
        require_tensorrt()
        import tensorrt as trt

        self.engines_dir = Path(engines_dir)
        self.device = _cuda_device(device)
        gpu = current_gpu(self.device)
        if gpu is None:
            raise K4TRTError(f"PyTorch cannot use {self.device}; check CUDA_VISIBLE_DEVICES and `nvidia-smi`")
        manifest = read_manifest(self.engines_dir)
        if manifest is None:
            raise K4TRTError(f"no engines in {self.engines_dir} ({MANIFEST} is missing); build them: "
                             f"{rebuild_command(self.engines_dir, extra='')}")
        check_compatible(manifest, trt.__version__, gpu, self.engines_dir)
        self._manifest = manifest
        self.dtype = torch.bfloat16
        self.dit_config = manifest.dit_config
        self.vae_scaling_factor = manifest.vae_scaling_factor

        plans = {"dit": _dit_plan(manifest, precision, self.engines_dir),
                 "vae_image": "vae_image.plan", "vae_head": "vae_head.plan", "vae_body": "vae_body.plan"}
        self._recorder = error_recorder()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._runtime.error_recorder = self._recorder
        with torch.cuda.device(self.device):
            self._engines = {graph: self._deserialize(plan) for graph, plan in plans.items()}
            self._io = {graph: _read_io(plans[graph], manifest.engines[plans[graph]], engine)
                        for graph, engine in self._engines.items()}
            self._stream = torch.cuda.Stream(self.device)
            size = max(e.device_memory_size_v2 for e in self._engines.values())
            self._workspace = self._allocate((size,), torch.uint8, "the engines' activation memory")
            self._contexts = {graph: self._context(graph, e, size) for graph, e in self._engines.items()}

    def dit(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        t, h, w = x.shape[:3]
        seconds = (t - 1) * config.VAE_TEMPORAL_FACTOR // config.FPS
        hint = f"--sizes {w * config.VAE_SPATIAL_FACTOR}x{h * config.VAE_SPATIAL_FACTOR} --max-duration {seconds}"
        return self._run("dit", {"x": x, "text": text, "time": time, "rope": rope}, hint)["velocity"]

    def vae_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The first chunk of a video (3 latent frames) and an image (1) take different paths through the
        # decoder, hence different engines; an image has no next chunk, so its engine returns no caches.
        graph = "vae_body" if caches is not None else "vae_image" if z.shape[2] == 1 else "vae_head"
        inputs = {"z": z} | {f"cache_in_{k}": c for k, c in enumerate(caches or [])}
        h, w = z.shape[-2:]
        out = self._run(graph, inputs, f"--sizes {w * config.VAE_SPATIAL_FACTOR}x{h * config.VAE_SPATIAL_FACTOR}")
        cache_names = sorted((n for n in out if n.startswith("cache_out_")), key=lambda n: int(n.removeprefix("cache_out_")))
        return out["frames"], [out[n] for n in cache_names]

    def close(self) -> None:
        """Contexts before their engines, then the shared memory (TensorRT Developer Guide, "How TensorRT
        Works" > "Object Lifetimes")."""
        self._contexts.clear()
        self._engines.clear()
        del self._workspace
        torch.cuda.empty_cache()

    def _run(self, graph: str, inputs: Mapping[str, torch.Tensor], hint: str) -> dict[str, torch.Tensor]:
        """Bind torch tensors by address and enqueue on this executor's stream.

        TensorRT Developer Guide, "The Python API" > "Performing Inference" (set_input_shape, output shapes from
        get_tensor_shape once every input shape is set, set_tensor_address, execute_async_v3). The dedicated
        stream avoids the extra synchronization TensorRT adds on the legacy default stream; it waits for the
        caller's stream before and the caller's stream waits for it after, so ordering (and CUDA-graph capture,
        which follows these event dependencies) behaves as if everything ran on the caller's stream. Tensors
        freed after return are only reused by work ordered after this call, so no record_stream is needed.
        """
        io = self._io[graph]
        if set(inputs) != set(io.inputs):
            raise ValueError(f"{io.plan} takes inputs {sorted(io.inputs)}, got {sorted(inputs)}")
        problems = uncovered(io.record.profile, {name: tuple(t.shape) for name, t in inputs.items()})
        if problems:
            command = rebuild_command(self.engines_dir, self._manifest.weights_dir, extra=f"{hint} --force")
            raise K4TRTError(f"{io.plan} in {self.engines_dir} was not built for this request ({'; '.join(problems)}); "
                             f"rebuild the engines to include it: {command}")
        with torch.cuda.device(self.device):
            return self._enqueue(graph, io, inputs)

    def _enqueue(self, graph: str, io: _Io, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = self._contexts[graph]
        bound = [t.to(device=self.device, dtype=io.dtypes[name]).contiguous() for name, t in inputs.items()]
        for name, tensor in zip(inputs, bound):
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise self._failure(f"TensorRT rejected {name} of shape {tuple(tensor.shape)} for {io.plan}")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in io.outputs:
            shape = _dims(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise K4TRTError(f"{io.plan}: output {name} has a data-dependent shape {shape}, which this executor "
                                 f"does not support; rebuild the engines: {self._manifest.rebuild_command(self.engines_dir)}")
            outputs[name] = self._allocate(shape, io.dtypes[name], f"the output {name} of {io.plan}")
            context.set_tensor_address(name, outputs[name].data_ptr())
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        self._recorder.clear()
        ok = context.execute_async_v3(self._stream.cuda_stream)
        caller.wait_stream(self._stream)
        if not ok:
            shapes = {name: tuple(t.shape) for name, t in inputs.items()}
            raise self._failure(f"TensorRT failed to run {io.plan} on {shapes}")
        return outputs

    def _deserialize(self, plan: str) -> trt.ICudaEngine:
        """TensorRT Developer Guide, "The Python API" > "Deserializing a Plan". The size recorded at build time
        is checked first: a truncated copy is named as such instead of as an opaque deserialization error."""
        path = self.engines_dir / plan
        record = self._manifest.engines.get(plan)
        if record is None:
            raise K4TRTError(f"{self.engines_dir} has no {plan} in its {MANIFEST}; build it: "
                             f"{self._manifest.rebuild_command(self.engines_dir)}")
        problem = plan_problem(self.engines_dir, plan, record)
        if problem:
            raise K4TRTError(f"{problem}; rebuild the engines: {self._manifest.rebuild_command(self.engines_dir)}")
        self._recorder.clear()
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            errors = recorded_errors(self._recorder)
            if is_out_of_memory(errors):
                raise K4TRTError(f"not enough free GPU memory to load {path}; close other programs using the GPU")
            detail = errors[-1] if errors else "no error was reported"
            raise K4TRTError(f"{path} is corrupt or not a plan for this TensorRT ({detail}); rebuild the engines: "
                             f"{self._manifest.rebuild_command(self.engines_dir)}")
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
        detail = errors[-1] if errors else "no error was reported"
        return K4TRTError(f"{what} ({detail}); if the engines are stale, rebuild them: "
                          f"{self._manifest.rebuild_command(self.engines_dir)}")


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


def _cuda_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise K4TRTError(f"the TensorRT backend runs on a CUDA GPU, not {device}; use --device cuda, "
                         "or --backend torch / onnxruntime on the CPU")
    if not torch.cuda.is_available():
        raise K4TRTError("the TensorRT backend needs a CUDA GPU and PyTorch sees none; use --backend torch or onnxruntime")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _dit_plan(manifest: Manifest, precision: str | None, engines_dir: Path) -> str:
    """The DiT plan to load: the precision asked for, else fp8 when built, else bf16."""
    built = [p for p in PRECISIONS if plan_name("dit", p) in manifest.engines]
    chosen = precision if precision is not None else (built[0] if built else "fp8")
    if chosen not in built:
        have = f"it has {', '.join(built)}" if built else "it has none"
        command = rebuild_command(engines_dir, manifest.weights_dir, extra=f"--precision {chosen}")
        raise K4TRTError(f"{engines_dir} has no {chosen} DiT engine ({have}); build it: {command}")
    return plan_name("dit", chosen)


def _read_io(plan: str, record: EngineRecord, engine: trt.ICudaEngine) -> _Io:
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    return _Io(plan, record, inputs, outputs, {n: _torch_dtype(plan, n, engine.get_tensor_dtype(n)) for n in names})


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
