"""The ONNX Runtime executor: runs the exact graphs sent to TensorRT, through their float32 twins, on the CPU.

Its job is checking the exported files where no GPU is: `k4trt run --backend onnxruntime` must match
`--backend torch`. ONNX Runtime's CPU provider has few bf16 kernels, so it runs each graph's twin (the graph
with bf16 widened to float32, `k4trt.export.twin`); the executor's dtype is therefore float32. The model facts
the sampler needs (DiT dimensions, VAE scaling factor) come from the manifest, so no weights are loaded.
Sessions are created on first use: an image never loads the VAE head or body, a video never the image graph.
On a rank of a sequence-parallel run (`exchange` given) it runs the folder's `dit.sp{P}` twin on the rank's
rows, its all-to-all a custom op over the process group (`k4trt.runtime.ort_collective`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
import torch

from k4trt.core.executor import Executor
from k4trt.core.graphs import DIT, folder_graphs, vae_role
from k4trt.errors import K4TRTError, first_line
from k4trt.parallel.exchange import ProcessGroupExchange
from k4trt.runtime.engines_folder import choose_dit, open_engines


class OnnxRuntimeExecutor(Executor):
    def __init__(self, engines_dir: Path | str, device: torch.device | str = "cpu", precision: str | None = None,
                 weights_dir: Path | None = None, exchange: ProcessGroupExchange | None = None) -> None:
        """Use the twins in `engines_dir` (from `build-engines --onnx-only`): `dit.<precision>`, by default fp8
        where it was exported, else bf16. Tensors are returned on `device`; the graphs run on the CPU.
        `weights_dir`, when given, must hold the weights the graphs were exported from."""
        self.engines_dir = Path(engines_dir)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self._manifest = open_engines(self.engines_dir, weights_dir, "exported graphs", "--onnx-only")
        model = self._manifest.require_model(self.engines_dir)
        self.dit_config = model.dit_config
        self.vae_scaling_factor = model.vae_scaling_factor
        self._exchange = exchange
        degree = exchange.degree if exchange is not None else 1
        self.dit_precision = choose_dit(self._manifest, set(self._manifest.artifacts), precision, self.engines_dir,
                                        "ONNX graph", degree)
        self._graphs = folder_graphs(self.dit_precision, model.dit_config, model.vae_config, degree)
        self._sessions: dict[str, ort.InferenceSession] = {}

    def dit(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        (velocity,) = self._run(DIT, (x, text, time, rope))
        return velocity

    def dit_rows(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor,
                 order: torch.Tensor) -> torch.Tensor:
        """One rank's rows of a sequence-parallel DiT call (the `dit.sp{P}` graph)."""
        (velocity,) = self._run(DIT, (x, text, time, rope, order))
        return velocity

    def vae_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        role = vae_role(caches is None, z.shape[2])
        frames, *new = self._run(f"vae_{role}", (z, *(caches or ())))
        return frames, new

    def close(self) -> None:
        self._sessions.clear()

    def _run(self, graph: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        spec = self._graphs[graph]
        if len(inputs) != len(spec.inputs):
            raise ValueError(f"{spec.twin} takes {len(spec.inputs)} inputs ({', '.join(spec.input_names)}), "
                             f"got {len(inputs)}")
        feeds = {name: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous().numpy()
                 for name, t in zip(spec.input_names, inputs, strict=True)}
        return [torch.from_numpy(out).to(self.device) for out in self._session(graph).run(spec.output_names, feeds)]

    def _session(self, graph: str) -> ort.InferenceSession:
        """An ONNX Runtime session over the twin, created on first use (loading a graph costs its weights). A
        file that is missing, or not the size it was written with, is named with the command that re-exports
        it before ONNX Runtime reads a byte; one ONNX Runtime cannot parse is named the same way."""
        if graph not in self._sessions:
            spec = self._graphs[graph]
            path = self.engines_dir / spec.twin
            flags = f"--onnx-only --force{self._precision_flag(graph)}"
            again = self._manifest.rebuild_command(self.engines_dir, extra=flags)
            artifact = self._manifest.artifacts.get(spec.stem)
            if artifact is None or spec.twin not in artifact.files:
                raise K4TRTError(f"{self.engines_dir} has no exported {spec.twin}; export it: {again}")
            for name in artifact.files:
                if name.startswith(spec.twin) and (problem := self._changed(name)):
                    raise K4TRTError(f"{problem}; export it again: {again}")
            if spec.degree > 1 and self._exchange is not None:
                from k4trt.runtime.ort_collective import session_options

                options = session_options(self._exchange)
            else:
                options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: the twins' unused-initializer notices are noise
            try:
                self._sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # ONNX Runtime raises its own untyped errors for a file it cannot load
                raise K4TRTError(f"ONNX Runtime cannot load {path} ({first_line(e)}); export it again: {again}") from None
        return self._sessions[graph]

    def _changed(self, name: str) -> str | None:
        path = self.engines_dir / name
        if not path.is_file():
            return f"{path} is missing"
        stamp = self._manifest.stamps.stamps.get(name)
        if stamp is not None and path.stat().st_size != stamp.size:
            return f"{path} has {path.stat().st_size} bytes, not the {stamp.size} it was written with (damaged or replaced)"
        return None

    def _precision_flag(self, graph: str) -> str:
        return f" --precision {self.dit_precision}" if graph == DIT else ""
