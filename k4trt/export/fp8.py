"""FP8 (E4M3) for the DiT: calibrated activation ranges, and the Q/DQ TensorRT builds FP8 GEMMs and attention from.

Placement. A per-tensor QuantizeLinear → DequantizeLinear on the input of each FP8 Linear, and its weight
stored in FP8 with one scale per output channel (a [out_features] scale along axis 0 of the [out, in] weight),
feeding a DequantizeLinear. Which Linears is the scope, chosen at build time (`--fp8-scope`, recorded in the
manifest): "all", the four Linears of every block (qkv, attention out, feed-forward in and out), or "ffn",
the two feed-forward Linears only (two thirds of the Linear FLOPs; q, k, v and the output projection stay
bf16), the scope NVIDIA's TensorRT-Model-Connect ships for Wan2.2. Embeddings, modulations and the out layer
stay bf16: they are a sliver of the FLOPs and steer every token. Per-channel weight scales because TensorRT
runs per-channel FP8 GEMMs on Hopper since 10.6 at per-tensor speed, and a row whose largest weight is far
below the tensor's keeps its full 3-bit mantissa instead of drifting into E4M3's subnormals. With
`attention=True` (`--fp8-attention`, experimental), also TensorRT's FP8 multi-head-attention pattern: Q/DQ on
both inputs of the first MatMul (q·scale and kᵀ), on the Softmax output and on v. The probabilities' scale
is fixed at 1/448: they lie in [0, 1] whatever the input, as Model-Optimizer also fixes it.

Scales. amax/448 for every activation, amax being the largest |value| the tensor took while the real 4-step
sampler ran (`calibrate_with_sampler`: each step's re-noised latents, timestep and text, so every noise
level the engine will see), times AMAX_MARGIN. The JSON file keeps the raw amax and the SHA-256 of the
checkpoint it was measured on; a file from another checkpoint is refused. Scales are rounded to the graph's
dtype upwards, so the calibrated maximum is never clipped.

Why our own ONNX pass and not nvidia-modelopt: modelopt (0.47) pins onnx~=1.21 and onnxruntime-gpu~=1.24 for
its ONNX path, against the onnx and CPU onnxruntime this package runs its checks with, and brings about ten
more packages; its attention quantizers attach to attention modules it recognises (diffusers', Hugging
Face's), while this DiT's attention is a function, so its placement would come from wildcard configs and
patches. The pass below places each Q/DQ on the exact graph TensorRT receives, found by initializer name and
by the attention pattern, needs no GPU, leaves the torch model unquantized for the PyTorch backend, and is
tested by running the graph's float32 twin against a torch fake-quant reference of the same scales.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype
from torch import Tensor

from k4trt.config import NUM_STEPS
from k4trt.core.executor import Executor
from k4trt.core.sampler import draw_noises, sample
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path
from k4trt.models.dit import DiT, MultiheadSelfAttention, TransformerBlock, build_rope
from k4trt.models.scheduler import Schedule

E4M3_MAX = 448.0
#: the Linears of every transformer block that can run in FP8, by their path inside the block
BLOCK_LINEARS = (
    "self_attention.to_query_key_value",
    "self_attention.output_layer",
    "feed_forward.in_layer",
    "feed_forward.out_layer",
)
#: --fp8-scope: which of BLOCK_LINEARS run in FP8
SCOPES = {"all": BLOCK_LINEARS, "ffn": BLOCK_LINEARS[2:]}
#: activation scales cover this multiple of the calibrated amax. The calibration sees a few prompts at one
#: size; other prompts and longer videos (more tokens, so more extreme values) can exceed it, and a clipped
#: outlier costs far more than the margin: E4M3 being a float format, a 1.25x wider scale only pushes values
#: below 2^-9·amax·1.25 further into the subnormals, a quarter of a binade at the very bottom.
AMAX_MARGIN = 1.25
_FP8 = ir.DataType.FLOAT8E4M3FN


class AttentionAmax(NamedTuple):
    """Largest |value| of the first MatMul's inputs (q already multiplied by 1/√head_dim, and k) and of v."""

    q: float
    k: float
    v: float


@dataclass(frozen=True)
class FP8Scales:
    """Calibrated amax per FP8 tensor, keyed by DiT module name: the input of each FP8 Linear, and q, k, v of
    each block's attention. Saved beside the ONNX (`dit.fp8.scales.json`) and reused when present."""

    linear_inputs: dict[str, float]
    attention_inputs: dict[str, AttentionAmax]
    checkpoint_sha256: str | None = None  # of the DiT checkpoint calibrated; None only for test models

    def save(self, path: Path) -> None:
        document = {
            "checkpoint_sha256": self.checkpoint_sha256,
            "linear_inputs": self.linear_inputs,
            "attention_inputs": {name: amax._asdict() for name, amax in self.attention_inputs.items()},
        }
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path, checkpoint_sha256: str | None = None) -> FP8Scales:
        """The scales in `path`; with `checkpoint_sha256`, refused unless measured on that checkpoint."""
        try:
            document = json.loads(Path(path).read_text())
            scales = cls(
                {str(name): float(amax) for name, amax in document["linear_inputs"].items()},
                {str(name): AttentionAmax(**{k: float(a) for k, a in amax.items()})
                 for name, amax in document["attention_inputs"].items()},
                document.get("checkpoint_sha256"),
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise K4TRTError(f"{path} is not an FP8 scales file ({e}); delete it so build-engines calibrates "
                             "again") from None
        bad = [name for name, amax in scales._all() if not (math.isfinite(amax) and amax >= 0)]
        if bad:
            raise K4TRTError(f"{path} has invalid amax values ({', '.join(bad[:3])}); delete it so build-engines "
                             "calibrates again")
        if checkpoint_sha256 is not None and scales.checkpoint_sha256 != checkpoint_sha256:
            found = scales.checkpoint_sha256[:12] if scales.checkpoint_sha256 else "no recorded checkpoint"
            raise K4TRTError(f"{path} was calibrated on another DiT checkpoint ({found}, not {checkpoint_sha256[:12]}); "
                             "delete it so build-engines calibrates again")
        return scales

    def require_covers(self, dit: DiT, attention: bool) -> None:
        """Refuse scales calibrated for another DiT (a missing block, or no attention ranges when asked)."""
        missing = [name for name in _linear_names(dit, "all") if name not in self.linear_inputs]
        if attention:
            missing += [name for name in _attention_names(dit) if name not in self.attention_inputs]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise K4TRTError(
                f"FP8 scales lack {', '.join(missing[:3])}{more}: they were calibrated for another DiT; "
                "delete the scales file (dit.fp8.scales.json) so build-engines calibrates again"
            )

    def _all(self) -> list[tuple[str, float]]:
        return [*self.linear_inputs.items(),
                *((f"{name}.{part}", a) for name, amax in self.attention_inputs.items()
                  for part, a in amax._asdict().items())]


def calibrate_dit(dit: DiT, batches: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]]) -> FP8Scales:
    """Run `dit` on every (x, text, time, rope) of `batches` and return the amax of each FP8 tensor."""
    with torch.inference_mode(), _AmaxRecorder(dit) as recorder:
        for x, text, time, rope in batches:
            recorder.dit(x, text, time, rope)
    return recorder.scales()


def calibrate_with_sampler(
    dit: DiT, texts: Sequence[Tensor], latent_shapes: Sequence[tuple[int, int, int]], schedule: Schedule, seed: int,
    checkpoint_sha256: str | None = None,
) -> FP8Scales:
    """Calibrate on the DiT inputs of real sampling: the shared 4-step sampler runs once per text embedding
    ([224, D]) and latent shape (T, h, w), run i with noise seed `seed + i`, on `dit`'s device and dtype; the
    scales are stamped with `checkpoint_sha256`."""
    timesteps = schedule.timesteps(NUM_STEPS)
    with torch.inference_mode(), _AmaxRecorder(dit) as recorder:
        executor = _DiTOnly(recorder.dit)
        alphas = schedule.alphas_cumprod.to(executor.device)
        for run, (text, (t, h, w)) in enumerate(itertools.product(texts, latent_shapes)):
            shape = (t, h, w, dit.cfg.in_visual_dim)
            noises = [n.to(executor.dtype).to(executor.device) for n in draw_noises(seed + run, shape, NUM_STEPS)]
            rope = build_rope(dit.cfg, t, h, w, dtype=executor.dtype, device=executor.device)
            sample(executor, text.to(executor.device, executor.dtype), rope, noises, timesteps, alphas)
    return dataclasses.replace(recorder.scales(), checkpoint_sha256=checkpoint_sha256)


def quantize_dit_graph(model: ir.Model, dit: DiT, weight: Callable[[str], Tensor], scales: FP8Scales, *, scope: str,
                       attention: bool) -> None:
    """Insert FP8 Q/DQ into `model`, the ONNX export of `dit`, in place (placement in the module docstring).
    `weight(name)` is the value of a parameter in the graph's dtype (the export may trace a weightless DiT).

    Scales take the graph's dtype: QuantizeLinear wants the scale in its input's type, and DequantizeLinear
    returns the scale's type, so the graph stays strongly typed."""
    if scope not in SCOPES:
        raise K4TRTError(f"FP8 scope {scope!r} is not one of {', '.join(SCOPES)}; pass --fp8-scope all or ffn")
    scales.require_covers(dit, attention)
    dtype = next(dit.parameters()).dtype
    graph = model.graph
    zero = _initializer(graph, "fp8_zero_point", torch.zeros((), dtype=torch.float8_e4m3fn))
    for name in _linear_names(dit, scope):
        _quantize_linear(graph, name, partial(weight, f"{name}.weight"), scales.linear_inputs[name], zero, dtype)
    if attention:
        _quantize_attention(graph, _attention_names(dit), scales.attention_inputs, dtype, zero)


def _quantize_linear(graph: ir.Graph, name: str, weight: Callable[[], Tensor], input_amax: float, zero: ir.Value,
                     dtype: torch.dtype) -> None:
    """The exporter writes a Linear on [tokens, dim] as Gemm(x, W, b, transB=1) with W the named parameter
    [out, in]; visual and text tokens make two Gemms share it. Each Gemm gets its own Q/DQ on x and a DQ on the
    FP8 W with one scale per output channel (axis 0, no zero point: a per-axis zero point would have to be a
    vector, and TensorRT takes zero anyway). `weight()` is read twice, for the scales now and for the FP8
    values when the file is written, so no copy of it is held in between."""
    key = f"{name}.weight"
    bf16_weight = graph.initializers.get(key)
    uses = list(bf16_weight.uses()) if bf16_weight is not None else []
    if bf16_weight is None or not uses or any(n.op_type != "Gemm" or i != 1 or not _transposed(n) for n, i in uses):
        raise RuntimeError(f"{key} is not the weight of transposed Gemms in the export; update the FP8 pass")
    channel_scale = _scale(weight().detach().abs().amax(dim=1).float(), dtype)
    weight_scale = _initializer(graph, f"{name}.weight_scale", channel_scale)
    input_scale = _initializer(graph, f"{name}.input_scale", _scale(torch.tensor(input_amax * AMAX_MARGIN), dtype))
    fp8_weight = ir.Value(  # computed while the file is written, so the FP8 copy of 5 B weights is never held
        name=key, shape=bf16_weight.shape, type=ir.TensorType(_FP8),
        const_value=ir.LazyTensor(lambda: TorchTensor(_to_e4m3(weight(), channel_scale[:, None])), dtype=_FP8,
                                  shape=bf16_weight.shape),
    )
    graph_dtype = from_torch_dtype(dtype)
    for k, (gemm, _) in enumerate(uses):
        gemm.replace_input_with(1, _dequantize(graph, gemm, fp8_weight, weight_scale, None, graph_dtype,
                                               f"{name}/weight{k}", axis=0))  # one scale per output channel
        _fake_quantize(graph, gemm, 0, input_scale, zero, graph_dtype, f"{name}/input{k}")
    graph.initializers.pop(key)
    graph.register_initializer(fp8_weight)


def _quantize_attention(
    graph: ir.Graph, names: list[str], amaxes: dict[str, AttentionAmax], dtype: torch.dtype, zero: ir.Value
) -> None:
    """Each block's attention is the one Softmax between two MatMuls; blocks run one after the other, so in
    the graph's topological order the Softmax nodes come in block order."""
    softmaxes = [node for node in graph if node.op_type == "Softmax"]
    if len(softmaxes) != len(names):
        raise RuntimeError(f"found {len(softmaxes)} Softmax nodes for {len(names)} attentions; update the FP8 pass")
    probability_scale = _initializer(graph, "attention_probability_scale", _scale(torch.tensor(1.0), dtype))
    graph_dtype = from_torch_dtype(dtype)
    for name, softmax in zip(names, softmaxes, strict=True):
        scores = softmax.inputs[0]
        first = scores.producer() if scores is not None else None
        uses = list(softmax.outputs[0].uses())
        if first is None or first.op_type != "MatMul" or len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1]:
            raise RuntimeError(f"attention of {name} is not MatMul → Softmax → MatMul in the export; update the FP8 pass")
        second = uses[0][0]
        for matmul, index, part in ((first, 0, "q"), (first, 1, "k"), (second, 1, "v")):
            amax = torch.tensor(getattr(amaxes[name], part) * AMAX_MARGIN)
            scale = _initializer(graph, f"{name}.{part}_scale", _scale(amax, dtype))
            _fake_quantize(graph, matmul, index, scale, zero, graph_dtype, f"{name}/{part}")
        _fake_quantize(graph, second, 0, probability_scale, zero, graph_dtype, f"{name}/probabilities")


def _fake_quantize(
    graph: ir.Graph, node: ir.Node, index: int, scale: ir.Value, zero: ir.Value, dtype: ir.DataType, name: str
) -> None:
    """Route input `index` of `node` through QuantizeLinear → DequantizeLinear."""
    value = node.inputs[index]
    if value is None:
        raise RuntimeError(f"{node.name} has no input {index} to quantize; update the FP8 pass")
    fp8 = ir.Value(name=f"{name}/fp8", shape=value.shape, type=ir.TensorType(_FP8))
    graph.insert_before(node, ir.Node("", "QuantizeLinear", [value, scale, zero], name=f"{name}/quantize", outputs=[fp8]))
    node.replace_input_with(index, _dequantize(graph, node, fp8, scale, zero, dtype, name))


def _dequantize(
    graph: ir.Graph, before: ir.Node, value: ir.Value, scale: ir.Value, zero: ir.Value | None, dtype: ir.DataType,
    name: str, axis: int | None = None,
) -> ir.Value:
    out = ir.Value(name=f"{name}/dequantized", shape=value.shape, type=ir.TensorType(dtype))
    inputs = [value, scale] if zero is None else [value, scale, zero]
    attributes = [] if axis is None else [ir.AttrInt64("axis", axis)]
    graph.insert_before(before, ir.Node("", "DequantizeLinear", inputs, name=f"{name}/dequantize", outputs=[out],
                                        attributes=attributes))
    return out


def _initializer(graph: ir.Graph, name: str, tensor: Tensor) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(from_torch_dtype(tensor.dtype)),
                     const_value=TorchTensor(tensor, name=name))
    graph.register_initializer(value)
    return value


def _scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """amax/448 in `dtype` (a scalar or one per channel), each rounded up to the next representable value so
    amax itself still fits (an all-zero channel gets scale 1: any positive scale quantizes zeros exactly)."""
    exact = torch.where(amax > 0, amax.double() / E4M3_MAX, 1.0)
    scale = exact.to(dtype)
    bits = {2: torch.int16, 4: torch.int32}[scale.element_size()]
    return torch.where(scale.double() < exact, (scale.view(bits) + 1).view(dtype), scale)


def _to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """QuantizeLinear's arithmetic (divide, round to nearest even, saturate), on the CPU for serialization."""
    return (x.detach().cpu().float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _transposed(gemm: ir.Node) -> bool:
    attr = gemm.attributes.get("transB")
    return attr is not None and attr.as_int() == 1


def _linear_names(dit: DiT, scope: str) -> list[str]:
    """Module names of the Linears FP8 `scope` covers, block by block in execution order."""
    blocks = [name for name, module in dit.named_modules() if isinstance(module, TransformerBlock)]
    return [f"{block}.{linear}" for block in blocks for linear in SCOPES[scope]]


def _attention_names(dit: DiT) -> list[str]:
    return [name for name, module in dit.named_modules() if isinstance(module, MultiheadSelfAttention)]


class _AmaxRecorder:
    """While active, records the running amax of every FP8 tensor of `dit` as the model runs.

    Linear inputs come from forward pre-hooks. Attention's q, k and v are not module inputs: they are made
    inside `MultiheadSelfAttention.forward` and handed to the DiT's attention function, so `self.dit` is the
    caller's model with a recording attention (`DiT.with_attention`; the caller's own model is not changed), and
    a pre-hook on each attention module tells it whose q, k, v it sees. Maxima stay tensors on the model's
    device until the end, so recording adds no host synchronisation to the loop."""

    def __init__(self, dit: DiT) -> None:
        self._dit = dit
        self._linear: dict[str, Tensor] = {}
        self._attention: dict[str, Tensor] = {}
        self._running: tuple[str, MultiheadSelfAttention] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inner = dit.attention
        self.dit = dit.with_attention(self._attention_function)

    def __enter__(self) -> _AmaxRecorder:
        for name in _linear_names(self._dit, "all"):
            self._handles.append(self._dit.get_submodule(name).register_forward_pre_hook(partial(self._on_linear, name)))
        for name in _attention_names(self._dit):
            self._handles.append(self._dit.get_submodule(name).register_forward_pre_hook(partial(self._on_attention, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def scales(self) -> FP8Scales:
        if not self._linear:
            raise ValueError("no DiT call was recorded; calibrate on at least one batch")
        linear = {name: amax.item() for name, amax in self._linear.items()}
        attention = {name: AttentionAmax(*amax.tolist()) for name, amax in self._attention.items()}
        scales = FP8Scales(linear, attention)
        broken = [name for name, amax in scales._all() if not math.isfinite(amax)]
        if broken:
            raise K4TRTError(
                f"calibration saw non-finite activations at {', '.join(broken[:3])}; the DiT weights are damaged, "
                "check them with `k4trt weights verify`"
            )
        return scales

    def _on_linear(self, name: str, module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
        self._update(self._linear, name, args[0].detach().abs().amax().float())

    def _on_attention(self, name: str, module: MultiheadSelfAttention, args: tuple[Tensor, ...]) -> None:
        self._running = (name, module)

    def _attention_function(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self._running is None:
            raise RuntimeError("attention ran outside a MultiheadSelfAttention module")
        name, module = self._running
        amax = torch.stack([q.abs().amax() * module.head_dim**-0.5, k.abs().amax(), v.abs().amax()]).float()
        self._update(self._attention, name, amax)
        return self._inner(q, k, v)

    @staticmethod
    def _update(maxima: dict[str, Tensor], name: str, amax: Tensor) -> None:
        maxima[name] = amax if name not in maxima else torch.maximum(maxima[name], amax)


class _DiTOnly(Executor):
    """Lets the shared sampler drive a bare DiT during calibration, on the DiT's own device and dtype."""

    def __init__(self, dit: DiT) -> None:
        weight = next(dit.parameters())
        self.device, self.dtype, self.dit_config = weight.device, weight.dtype, dit.cfg
        self.dit_precision = str(weight.dtype).removeprefix("torch.")
        self._dit = dit

    def dit(self, x: Tensor, text: Tensor, time: Tensor, rope: Tensor) -> Tensor:
        return self._dit(x, text, time, rope)

    def vae_chunk(self, z: Tensor, caches: Sequence[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError("calibration runs the DiT only")
