"""FP8: calibration, the scales file, and the FP8 graph (with FP8 attention) through its float32 twin.

Against a torch fake-quant reference of the same scales, written here, the twin is compared op by op: every
FP8 matmul of the graph is recomputed in torch from the float inputs ONNX Runtime fed its QuantizeLinear
nodes, so both sides quantize the same numbers and only float rounding can differ. End to end that cannot be
tight: an activation within ~1e-7 of an E4M3 rounding midpoint rounds one way in ONNX Runtime and the other in
torch (their float32 kernels round differently), one such flip moves a probability by up to 1/16, and
attention spreads it over every token; with ~4·10^5 quantized values per run that happens in about half the
runs and reaches 1e-2 of the output (measured). End to end the twin is held to a bound from E4M3's precision
against the unquantized model instead. References use the DiT in float32 with bf16-rounded weights, as in
test_export_dit.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dit_cases import TINY, random_dit, random_inputs

from k4trt.config import DiTConfig
from k4trt.core.executor import Executor
from k4trt.core.graphs import dit_graph
from k4trt.core.sampler import draw_noises, sample
from k4trt.errors import K4TRTError
from k4trt.export.dit_onnx import export_dit
from k4trt.export.fp8 import AMAX_MARGIN, AttentionAmax, FP8Scales, calibrate_dit, calibrate_with_sampler
from k4trt.export.opcheck import check_graph
from k4trt.export.twin import write_float32_twin
from k4trt.models.dit import DiT, build_rope, sdpa_attention
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG, Schedule

SIZES = [(1, 4, 6), (3, 6, 2)]
LINEARS = ("self_attention.to_query_key_value", "self_attention.output_layer",
           "feed_forward.in_layer", "feed_forward.out_layer")
E4M3_MAX = 448.0


def graph_scale(amax: float) -> float:
    """The scale the bf16 graph must hold: the smallest bf16 ≥ amax/448 (so amax is not clipped)."""
    exact = amax / E4M3_MAX
    scale = torch.tensor(exact).bfloat16().item()
    if scale < exact:
        scale += 2.0 ** (math.floor(math.log2(scale)) - 7)  # one bf16 step up: 8 significant bits
    return scale


def fake_quant(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """ONNX QuantizeLinear to float8e4m3fn (divide, round to nearest even, saturate at ±448), then back."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def per_channel(weight: torch.Tensor) -> torch.Tensor:
    """The weight's scales as the graph must hold them: one per output channel (row), each graph_scale(row max)."""
    row_maxima = weight.abs().amax(dim=1).tolist()
    return torch.tensor([graph_scale(row_max) if row_max > 0 else 1.0 for row_max in row_maxima])[:, None]


def relative_error(out, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    expected = ref.numpy()
    return float(np.abs(np.asarray(out) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def fp8_graph(tmp_path_factory):
    """The FP8 graph with FP8 attention, calibrated on inputs other than the ones it is tested on."""
    dit32 = random_dit(TINY, seed=0)
    batches = [random_inputs(TINY, size, seed=10 + i) for i, size in enumerate(SIZES)]
    scales = calibrate_dit(dit32, [(b["x"], b["text"], b["time"], b["rope"]) for b in batches])
    dit16 = DiT(TINY).requires_grad_(False).eval()
    dit16.load_state_dict(dit32.state_dict())
    folder = tmp_path_factory.mktemp("engines")
    export_dit(dit16.bfloat16(), dit_graph("fp8", dit16.cfg), folder / "dit.fp8.onnx", fp8=scales, fp8_attention=True)
    write_float32_twin(folder / "dit.fp8.onnx", folder / "dit.fp8.f32.onnx")
    session = ort.InferenceSession(str(folder / "dit.fp8.f32.onnx"), providers=["CPUExecutionProvider"])
    return dit32, scales, folder, session


def test_every_fp8_matmul_is_the_fake_quant_maths_of_the_same_scales(fp8_graph):
    dit32, scales, folder, _ = fp8_graph
    model = onnx.shape_inference.infer_shapes(onnx.load(folder / "dit.fp8.f32.onnx"))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}

    def quantized_input(name):
        """The float tensor QuantizeLinear received, if `name` is a DequantizeLinear(QuantizeLinear(·))."""
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    gemms = [n for n in graph.node if n.op_type == "Gemm" and quantized_input(n.input[0])]
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and quantized_input(n.input[0])]
    assert (len(gemms), len(matmuls)) == (12, 4)  # 2 blocks: qkv x2, out, FF x2 each (FF text x0 in the last)
    infos = {v.name: v for v in graph.value_info}
    wanted = [name for node in gemms + matmuls for name in (node.output[0], *map(quantized_input, node.input[:2])) if name]
    graph.output.extend(infos[name] for name in dict.fromkeys(wanted))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = random_inputs(TINY, SIZES[1], seed=1)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {k: t.numpy() for k, t in inputs.items()})
    values = dict(zip(names, (torch.from_numpy(a) for a in outputs), strict=True))

    for gemm in gemms:
        linear = producer[gemm.input[1]].input[0].removesuffix(".weight")
        module = dit32.get_submodule(linear)
        weight = fake_quant(module.weight, per_channel(module.weight))
        x = fake_quant(values[quantized_input(gemm.input[0])], graph_scale(scales.linear_inputs[linear] * AMAX_MARGIN))
        # Identical FP8 operands on both sides (an E4M3 value times a bf16 scale is exact in float32); only the
        # order of the float32 sums differs, ~√256·2^-24 ≈ 1e-6 of the result, so 1e-5 bounds it.
        assert relative_error(values[gemm.output[0]].numpy(), x @ weight.T + module.bias) <= 1e-5, linear

    attentions = [f"transformer_blocks.0.{j}.self_attention" for j in range(2)]
    for i, matmul in enumerate(matmuls):
        amax = scales.attention_inputs[attentions[i // 2]]
        first, second = (values[quantized_input(name)] for name in matmul.input[:2])
        if i % 2 == 0:  # q·scale @ kᵀ
            expected = (fake_quant(first, graph_scale(amax.q * AMAX_MARGIN))
                        @ fake_quant(second, graph_scale(amax.k * AMAX_MARGIN)))
        else:  # probabilities @ v, probabilities at the fixed scale of amax 1
            expected = fake_quant(first, graph_scale(1.0)) @ fake_quant(second, graph_scale(amax.v * AMAX_MARGIN))
        assert relative_error(values[matmul.output[0]].numpy(), expected) <= 1e-5, matmul.name


@pytest.mark.parametrize("size", SIZES)
def test_fp8_twin_stays_near_the_unquantized_model(fp8_graph, size):
    dit32, _, _, session = fp8_graph
    inputs = random_inputs(TINY, size, seed=2)
    (out,) = session.run(None, {name: t.numpy() for name, t in inputs.items()})
    with torch.inference_mode():
        exact = dit32(**inputs)
    # E4M3 keeps 3 mantissa bits: round-to-nearest moves each quantized value by ≤ 2^-4 of itself, ≈ 3.6% RMS
    # for values spread over a binade, and a matmul of FP8 inputs and FP8 weights averages independent errors
    # to ≈ √2·3.6% ≈ 5% of its output's RMS. Four FP8 matmuls in a row per block, two blocks, partly damped by
    # the residual stream and the bf16 out layer: 15% of the output's peak bounds it with room (measured
    # 2-4%). The error must also be far above float rounding, or nothing was quantized.
    assert 1e-3 < relative_error(out, exact) <= 0.15


def test_fp8_graph_places_qdq_where_tensorrt_fuses_them(fp8_graph):
    _, _, folder, _ = fp8_graph
    graph = onnx.load(folder / "dit.fp8.onnx", load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    fp8_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims}
    blocks = [f"transformer_blocks.0.{j}" for j in range(2)]
    assert fp8_weights == {f"{b}.{linear}.weight" for b in blocks for linear in LINEARS}

    def dequantized(name):
        return producer.get(name) is not None and producer[name].op_type == "DequantizeLinear"

    for node in graph.node:
        if node.op_type == "Gemm":
            quantized = node.input[1].endswith("/dequantized")
            assert quantized == any(f".{linear}/" in node.input[1] for linear in LINEARS), node.name
            assert dequantized(node.input[0]) == dequantized(node.input[1]) == quantized, node.name
        if node.op_type == "MatMul" and "visual_embeddings" not in str(node.metadata_props):
            assert dequantized(node.input[0]) and dequantized(node.input[1]), node.name  # both attention BMMs
        if node.op_type == "Softmax":
            assert dequantized(node.input[0]) is False  # the scores stay bf16 into the softmax
    assert check_graph(folder / "dit.fp8.onnx") == []
    assert check_graph(folder / "dit.fp8.f32.onnx") == []


def test_scales_round_trip_and_refuse_what_does_not_fit(fp8_graph, tmp_path):
    _, scales, _, _ = fp8_graph
    path = tmp_path / "dit.fp8.scales.json"
    scales.save(path)
    assert FP8Scales.load(path) == scales
    assert list(tmp_path.iterdir()) == [path]

    path.write_text('{"linear_inputs": {"a": 1.0}}')
    with pytest.raises(K4TRTError, match="delete it"):
        FP8Scales.load(path)
    path.write_text('{"linear_inputs": {"a": NaN}, "attention_inputs": {}}')
    with pytest.raises(K4TRTError, match="invalid amax"):
        FP8Scales.load(path)
    bigger = DiT(DiTConfig(in_text_dim=32, time_dim=32, model_dim=128, ff_dim=256, num_blocks=2))
    with pytest.raises(K4TRTError, match="transformer_blocks.1.0.self_attention.to_query_key_value"):
        scales.require_covers(bigger, attention=False)
    without_attention = FP8Scales(scales.linear_inputs, {})
    without_attention.require_covers(DiT(TINY), attention=False)
    with pytest.raises(K4TRTError, match="calibrated for another DiT"):
        without_attention.require_covers(DiT(TINY), attention=True)


class Recording(Executor):
    """The test's own executor: runs the DiT and keeps every input the sampler gave it."""

    def __init__(self, dit: DiT) -> None:
        self.device, self.dtype, self.dit_config = torch.device("cpu"), torch.float32, dit.cfg
        self._dit, self.calls = dit, []

    def dit(self, x, text, time, rope):
        self.calls.append((x, text, time, rope))
        return self._dit(x, text, time, rope)

    def vae_chunk(self, z, caches):
        raise NotImplementedError


def test_calibration_with_the_sampler_sees_the_sampler_inputs():
    dit = random_dit(TINY, seed=3)
    schedule = Schedule.from_config(COGVIDEOX_5B_SCHEDULER_CONFIG)
    texts = [torch.randn(8, TINY.in_text_dim, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]  # short: fast
    shapes = [(1, 2, 2), (2, 4, 2)]
    scales = calibrate_with_sampler(dit, texts, shapes, schedule, seed=7)

    recording = Recording(dit)
    with torch.inference_mode():
        for run, (text, shape) in enumerate((t, s) for t in texts for s in shapes):
            noises = draw_noises(7 + run, (*shape, TINY.in_visual_dim), 4)
            sample(recording, text, build_rope(TINY, *shape, dtype=torch.float32), noises,
                   schedule.timesteps(4), schedule.alphas_cumprod)
    assert len(recording.calls) == 4 * len(texts) * len(shapes)
    assert calibrate_dit(dit, recording.calls) == scales
    assert set(scales.attention_inputs) == {f"transformer_blocks.0.{j}.self_attention" for j in range(2)}
    assert all(isinstance(a, AttentionAmax) and min(a) > 0 for a in scales.attention_inputs.values())
    # the caller's model runs as before: its own attention, no recording hook left on any module
    assert dit.attention is sdpa_attention and not any(m._forward_pre_hooks for m in dit.modules())


def test_weight_scales_are_per_output_channel_and_rows_keep_their_precision(fp8_graph):
    """A row far smaller than the tensor's maximum keeps E4M3's relative precision only with its own scale:
    the graph's per-channel DequantizeLinear must reproduce each row to 2^-4 relative, which one per-tensor
    scale cannot for the smallest rows (they fall into the subnormals)."""
    dit32, _, folder, _ = fp8_graph
    model = onnx.load(folder / "dit.fp8.f32.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    name = "transformer_blocks.0.1.feed_forward.in_layer"
    dequantize = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.weight")
    assert {a.name: a.i for a in dequantize.attribute} == {"axis": 0} and len(dequantize.input) == 2
    weight = dit32.get_submodule(name).weight
    scale = torch.from_numpy(inits[dequantize.input[1]].astype(np.float32))
    assert scale.shape == (weight.shape[0],)
    torch.testing.assert_close(scale[:, None], per_channel(weight), rtol=0, atol=0)
    stored = torch.from_numpy(inits[f"{name}.weight"].astype(np.float32))
    assert torch.equal(stored * scale[:, None], fake_quant(weight, per_channel(weight)))


def test_ffn_scope_quantizes_only_the_feed_forward_linears(tmp_path):
    dit32 = random_dit(TINY, seed=4)
    scales = calibrate_dit(dit32, [tuple(random_inputs(TINY, SIZES[0], seed=5).values())])
    dit16 = DiT(TINY).requires_grad_(False).eval()
    dit16.load_state_dict(dit32.state_dict())
    export_dit(dit16.bfloat16(), dit_graph("fp8", TINY), tmp_path / "dit.fp8.onnx", fp8=scales, fp8_scope="ffn")
    graph = onnx.load(tmp_path / "dit.fp8.onnx", load_external_data=False).graph
    fp8_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims}
    assert fp8_weights == {f"transformer_blocks.0.{j}.feed_forward.{layer}.weight" for j in range(2)
                           for layer in ("in_layer", "out_layer")}
    assert sum(n.op_type == "Attention" for n in graph.node) == 2  # the fused attention op stays
    assert check_graph(tmp_path / "dit.fp8.onnx") == []
    write_float32_twin(tmp_path / "dit.fp8.onnx", tmp_path / "twin.onnx")
    session = ort.InferenceSession(str(tmp_path / "twin.onnx"), providers=["CPUExecutionProvider"])
    inputs = random_inputs(TINY, SIZES[1], seed=6)
    (out,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.inference_mode():
        exact = dit32(**inputs)
    assert 1e-3 < relative_error(out, exact) <= 0.15  # same bound as the all-Linears graph, see above


def test_scales_are_tied_to_the_checkpoint(tmp_path):
    scales = FP8Scales({"a": 1.0}, {}, checkpoint_sha256="ab" * 32)
    path = tmp_path / "dit.fp8.scales.json"
    scales.save(path)
    assert FP8Scales.load(path, "ab" * 32) == scales
    with pytest.raises(K4TRTError, match="calibrated on another DiT checkpoint .*delete it"):
        FP8Scales.load(path, "cd" * 32)
