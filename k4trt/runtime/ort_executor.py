"""The ONNX Runtime executor: runs the exact graphs sent to TensorRT, through their float32 twins, on the CPU.

Its job is checking the exported files where no GPU is: `k4trt run --backend onnxruntime` must match
`--backend torch`. ONNX Runtime's CPU provider has few bf16 kernels, so it runs `<name>.f32.onnx`, the graph
with bf16 widened to float32 (`k4trt.export.twin`); the executor's dtype is therefore float32. The model facts
the sampler needs (DiT dimensions, VAE scaling factor) come from the manifest, so no weights are loaded.
Sessions are created on first use: an image never loads the VAE head or body, a video never the image graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
import torch

from k4trt.engine.layout import PRECISIONS, onnx_name
from k4trt.errors import K4TRTError
from k4trt.export.onnx_manifest import read_onnx_record, twin_name
from k4trt.export.vae_onnx import ROLES, cache_inputs, graph_name
from k4trt.runtime.executor import Executor


class OnnxRuntimeExecutor(Executor):
    def __init__(self, engines_dir: Path | str, device: torch.device | str = "cpu", precision: str | None = None) -> None:
        """Use the twins in `engines_dir` (from `build-engines --onnx-only`): `dit.<precision>`, by default fp8
        where it was exported, else bf16. Tensors are returned on `device`; the graphs run on the CPU."""
        self.engines_dir = Path(engines_dir)
        self.device = torch.device(device)
        self.dtype = torch.float32
        if not self.engines_dir.is_dir():
            raise K4TRTError(f"engines folder {self.engines_dir} does not exist; {self._how_to_build('W')}")
        record = read_onnx_record(self.engines_dir)
        if record is None:
            raise K4TRTError(f"{self.engines_dir} holds no exported graphs (its manifest.json has no ONNX record); "
                             f"{self._how_to_build('W')}")
        self.dit_config = record.dit_config
        self.vae_scaling_factor = record.vae_scaling_factor
        self._weights_dir = record.weights_dir
        exported = [p for p in PRECISIONS if onnx_name("dit", p).removesuffix(".onnx") in record.artifacts]
        chosen = precision or next(iter(exported), None)
        if chosen is None or chosen not in exported:
            what = f"{chosen} DiT graph" if chosen else "DiT graph"
            raise K4TRTError(f"{self.engines_dir} has no {what}; {self._how_to_build(record.weights_dir, chosen)}")
        self._files = {"dit": twin_name(onnx_name("dit", chosen))}
        self._files |= {role: twin_name(graph_name(role) + ".onnx") for role in ROLES}
        self._sessions: dict[str, ort.InferenceSession] = {}

    def dit(self, x: torch.Tensor, text: torch.Tensor, time: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        (velocity,) = self._run("dit", {"x": x, "text": text, "time": time, "rope": rope})
        return velocity

    def vae_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image graph for a lone first chunk of one latent frame, the head for any other first chunk,
        the body after it."""
        if caches is None:
            role = "image" if z.shape[2] == 1 else "head"
            frames, *new = self._run(role, {"z": z})
        else:
            frames, *new = self._run("body", {"z": z} | dict(zip(cache_inputs(len(caches)), caches)))
        return frames, new

    def close(self) -> None:
        self._sessions.clear()

    def _run(self, graph: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        session = self._session(graph)
        feeds = {name: tensor.detach().to("cpu", torch.float32).contiguous().numpy() for name, tensor in inputs.items()}
        return [torch.from_numpy(out).to(self.device) for out in session.run(None, feeds)]

    def _session(self, graph: str) -> ort.InferenceSession:
        """An ONNX Runtime session over the twin, created on first use (loading a graph costs its weights)."""
        if graph not in self._sessions:
            path = self.engines_dir / self._files[graph]
            if not path.is_file():
                raise K4TRTError(f"{path} is missing; {self._how_to_build(self._weights_dir)}")
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: the twins' unused-initializer notices are noise
            self._sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[graph]

    def _how_to_build(self, weights: str, precision: str | None = None) -> str:
        flag = f" --precision {precision}" if precision else ""
        return f"export the graphs with: build-engines --onnx-only --weights {weights} --out {self.engines_dir}{flag}"
