"""The DiT against maths written out here, independently of k4trt.models.dit's helpers.

The oracle is `reference_dit`: the original's forward (ai-forever/Kandinsky-4 kandinsky/model/{dit,nn}.py)
restated with functional ops, separate visual and text streams as the original keeps them, patches cut with
strided slices, RoPE from the per-axis angle formula and attention as an einsum softmax in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import k4trt.models.dit as dit_module
from k4trt.config import RELEASED_DIT, DiTConfig
from k4trt.errors import K4TRTError
from k4trt.models.dit import (
    DiT,
    TimeEmbeddings,
    _rotate,
    build_rope,
    explicit_attention,
    infer_dit_config,
    sdpa_attention,
)

# In and out visual dims differ so a swapped unpatchify cannot pass; head_dim 16 = 4 + 6 + 6, 4 heads.
TINY = DiTConfig(
    in_visual_dim=4, in_text_dim=32, out_visual_dim=3, time_dim=32, model_dim=64, ff_dim=128, num_blocks=1,
    axes_dims=(4, 6, 6),
)
LATENT = (3, 6, 8)  # [T, h, w] -> 3 x 3 x 4 = 36 visual tokens
TEXT_LEN = 224


def random_state_dict(cfg: DiTConfig, seed: int) -> dict[str, Tensor]:
    """Every tensor random, modulations included (the original zero-inits them, which would hide their use):
    Linear weights ~ N(0, 1/fan_in) keep activations O(1); norm weights 1 ± 0.3; biases ~ N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT(cfg).state_dict().items()}
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if len(shape) == 2:
            out[key] = noise / math.sqrt(shape[1])
        elif "norm" in key and key.endswith("weight"):
            out[key] = 1 + 0.3 * noise
        else:
            out[key] = 0.3 * noise
    return out


def random_inputs(cfg: DiTConfig, latent: tuple[int, int, int], seed: int, text_len: int = TEXT_LEN):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*latent, cfg.in_visual_dim, generator=g)
    text = torch.randn(text_len, cfg.in_text_dim, generator=g)
    time = torch.randint(1, 1000, (1,), generator=g).float()
    return x, text, time


def rope_angles(cfg: DiTConfig, grid: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """[t, h, w, head_dim/2] angles: position on the axis times 10000^(-i/(axis_dim/2)); axes time, height, width.
    float32 uses the original's float32 frequency expression, so a bf16 rounding of the angles matches it bit for
    bit; float64 uses the exact power."""
    parts = []
    for axis, (n, axis_dim) in enumerate(zip(grid, cfg.axes_dims, strict=True)):
        half = axis_dim // 2
        if dtype == torch.float32:
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        else:
            freqs = torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=dtype)
        pos = torch.arange(n, dtype=dtype)
        view = [1, 1, 1, 1]
        view[axis] = n
        parts.append((pos.reshape(view) * freqs).expand(*grid, half))
    return torch.cat(parts, dim=-1)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Channels (2f, 2f+1) rotated by angle f: (x0 cos - x1 sin, x0 sin + x1 cos)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def exact_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """[S, heads, d] -> [S, heads, d], float64 softmax(q k^T / sqrt(d)) v."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """[T, H, W, C] -> [T/pt, H/ph, W/pw, pt·ph·pw·C], patch flattened as (pt, ph, pw, C)."""
    pt, ph, pw = patch
    return torch.cat([x[a::pt, b::ph, c::pw] for a in range(pt) for b in range(ph) for c in range(pw)], dim=-1)


def unpatchify(tokens: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """[t, h, w, C·pt·ph·pw] -> [t·pt, h·ph, w·pw, C], patch flattened as (C, pt, ph, pw)."""
    pt, ph, pw = patch
    volume = pt * ph * pw
    t, h, w, width = tokens.shape
    out = tokens.new_empty(t * pt, h * ph, w * pw, width // volume)
    for a in range(pt):
        for b in range(ph):
            for c in range(pw):
                out[a::pt, b::ph, c::pw] = tokens[..., (a * ph + b) * pw + c :: volume]
    return out


def reference_dit(p: dict[str, Tensor], x: Tensor, text: Tensor, time: Tensor, cfg: DiTConfig, real: torch.dtype):
    """The original's forward. `real` is float64 for exact maths, or float32 to emulate the original's bf16 run:
    then call it with bf16 weights under CPU autocast. CPU autocast keeps layer_norm in the input dtype where
    CUDA autocast runs it in float32, so `ln` does that by hand; every other op here (linear lower precision,
    silu/gelu/cos/sin/arithmetic by type promotion) is treated the same by both. Attention is exact and rounded
    to the q dtype, as FlashAttention accumulates in float32."""

    def lin(name: str, v: Tensor) -> Tensor:
        return F.linear(v, p[f"{name}.weight"], p[f"{name}.bias"])

    def ln(name: str, v: Tensor) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            weight, bias = p[f"{name}.weight"].to(real), p[f"{name}.bias"].to(real)
            return F.layer_norm(v.to(real), v.shape[-1:], weight, bias, 1e-5)

    heads, head_dim = cfg.num_heads, cfg.head_dim
    half = cfg.model_dim // 2
    freqs = torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=real)
    args = time.to(real)[:, None] * freqs
    sinusoid = torch.cat([args.cos(), args.sin()], dim=-1)
    time_embed = lin("time_embeddings.out_layer", F.silu(lin("time_embeddings.in_layer", sinusoid)))

    text = lin("text_embeddings.in_layer", text)
    visual = lin("visual_embeddings.in_layer", patchify(x, cfg.patch_size))
    grid = tuple(visual.shape[:3])
    angles = rope_angles(cfg, grid, real)
    if real == torch.float32:  # emulating the bf16 run: the original's angle buffers went through .to(bfloat16)
        angles = angles.to(torch.bfloat16)
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # broadcast over heads

    def qkv(prefix: str, v: Tensor, rotate: bool):
        q, k, val = lin(f"{prefix}.to_query_key_value", v).chunk(3, dim=-1)
        q = ln(f"{prefix}.query_norm", q.unflatten(-1, (heads, head_dim))).type_as(val)
        k = ln(f"{prefix}.key_norm", k.unflatten(-1, (heads, head_dim))).type_as(val)
        if rotate:
            q, k = rotate_pairs(q.to(real), cos, sin).type_as(val), rotate_pairs(k.to(real), cos, sin).type_as(val)
        return q.reshape(-1, heads, head_dim), k.reshape(-1, heads, head_dim), val.reshape(-1, heads, head_dim)

    def feed_forward(prefix: str, h: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        y = ln(f"{prefix}.feed_forward_norm", h) * (mod[4] + 1.0) + mod[3]
        return h + mod[5] * lin(f"{prefix}.feed_forward.out_layer", F.gelu(lin(f"{prefix}.feed_forward.in_layer", y)))

    for i in range(cfg.num_blocks):
        for j in range(2):
            b = f"transformer_blocks.{i}.{j}"
            vm = lin(f"{b}.visual_modulation.out_layer", F.silu(time_embed)).chunk(6, dim=-1)
            tm = lin(f"{b}.text_modulation.out_layer", F.silu(time_embed)).chunk(6, dim=-1)
            v_in = ln(f"{b}.self_attention_norm", visual) * (vm[1] + 1.0) + vm[0]
            t_in = ln(f"{b}.self_attention_norm", text) * (tm[1] + 1.0) + tm[0]
            vq, vk, vv = qkv(f"{b}.self_attention", v_in, rotate=True)
            tq, tk, tv = qkv(f"{b}.self_attention", t_in, rotate=False)
            with torch.autocast("cpu", enabled=False):
                out = exact_attention(torch.cat([vq, tq]), torch.cat([vk, tk]), torch.cat([vv, tv])).to(vq.dtype)
            out = out.flatten(1)
            n = vq.shape[0]
            visual = visual + vm[2] * lin(f"{b}.self_attention.output_layer", out[:n]).reshape(visual.shape)
            text = text + tm[2] * lin(f"{b}.self_attention.output_layer", out[n:])
            visual, text = feed_forward(b, visual, vm), feed_forward(b, text, tm)

    shift, scale = lin("out_layer.modulation_out", F.silu(time_embed)).chunk(2, dim=-1)
    out = lin("out_layer.out_layer", ln("out_layer.norm", visual) * (scale + 1.0) + shift)
    return unpatchify(out, cfg.patch_size)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[DiT, dict[str, Tensor]]:
    state = random_state_dict(TINY, seed)
    return DiT.from_state_dict(state, dtype=dtype, axes_dims=TINY.axes_dims), state


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest difference relative to the largest reference value."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def mean_rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).abs().mean() / b.double().abs().mean()).item()


# ---------------------------------------------------------------------------------------------------- pieces


def test_patchify_and_unpatchify_layouts(monkeypatch):
    """Identity in and out layers: the model's output is unpatchify(patchify(x)), which is NOT x because the
    patch flattens as (pt, ph, pw, C) going in and (C, pt, ph, pw) coming out. Checked with index loops; the
    patch (2, 2, 3) and in = out channels 3 give every axis a distinct size."""
    cfg = DiTConfig(in_visual_dim=3, out_visual_dim=3, patch_size=(2, 2, 3), model_dim=36, num_blocks=0,
                    axes_dims=(2, 2, 2), in_text_dim=8, time_dim=8, ff_dim=8)

    class Tokens(torch.nn.Module):
        def forward(self, visual, time_embed):
            return visual

    model = DiT(cfg)
    model.visual_embeddings.in_layer.weight.data = torch.eye(36)
    model.visual_embeddings.in_layer.bias.data.zero_()
    monkeypatch.setattr(model, "out_layer", Tokens())
    x = torch.randn(4, 6, 9, 3)
    with torch.no_grad():
        tokens = model.visual_embeddings(dit_module.patchify(x, cfg.patch_size))
        y = model(x, torch.randn(5, 8), torch.tensor([500.0]), build_rope(cfg, 4, 6, 9, torch.float32))
    assert tokens.shape == (2, 3, 3, 36) and y.shape == x.shape
    for t, i, j in np.ndindex(2, 3, 3):
        for a, b, c, ch in np.ndindex(2, 2, 3, 3):
            # going in, token channel ((a·ph + b)·pw + c)·C + ch holds patch offset (a, b, c), channel ch
            assert tokens[t, i, j, ((a * 2 + b) * 3 + c) * 3 + ch] == x[2 * t + a, 2 * i + b, 3 * j + c, ch]
            # coming out, token channel ((ch·pt + a)·ph + b)·pw + c goes to patch offset (a, b, c), channel ch
            assert y[2 * t + a, 2 * i + b, 3 * j + c, ch] == tokens[t, i, j, ((ch * 2 + a) * 2 + b) * 3 + c]
    assert not torch.equal(y, x)
    # The reference helpers used by reference_dit agree with the loops above.
    assert torch.equal(patchify(x, (2, 2, 3)), tokens)
    assert torch.equal(unpatchify(tokens, (2, 2, 3)), y)


def test_rope_table_format_and_rotation():
    """[t, h/2, w/2, head_dim/2, 2, 2] of [[cos, -sin], [sin, cos]], angles by axis in order t, h, w from
    position 0; rotating q by it equals rotating channel pairs by the formula. float32 tolerance: angles up to
    ~5 rad carry ~5e-7 error, cos/sin one float32 ulp."""
    t, h, w = 3, 10, 8
    rope = build_rope(TINY, t, h, w, torch.float32)
    assert rope.shape == (3, 5, 4, 8, 2, 2) and rope.dtype == torch.float32
    angles = rope_angles(TINY, (3, 5, 4), torch.float64)
    expected = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).unflatten(-1, (2, 2))
    torch.testing.assert_close(rope.double(), expected, rtol=0, atol=2e-6)
    # spot checks of the formula itself: the second time frequency is 10000^(-1/2) = 0.01; width angle at w=3
    assert angles[2, 0, 0, 1].item() == pytest.approx(2 * 0.01)
    assert angles[0, 0, 3, 2 + 3].item() == pytest.approx(3.0)  # first width frequency is 1

    q = torch.randn(3 * 5 * 4, TINY.num_heads, TINY.head_dim)
    rotated = _rotate(q, rope.flatten(0, 2).unsqueeze(1))
    flat = angles.flatten(0, 2)[:, None, :]
    torch.testing.assert_close(rotated.double(), rotate_pairs(q.double(), flat.cos(), flat.sin()), rtol=0, atol=1e-5)


def test_rope_bf16_rounds_angles_like_the_original():
    """The original's angle buffers are cast to bf16 with the model, then cos/sin are taken in bf16. The table
    must equal that bit for bit. Released axes at 736 px (46 positions): rounding the angles first moves entries
    by up to ~0.1 against rounding only cos/sin, so the check is not vacuous."""
    t, h, w = 5, 92, 60
    rope = build_rope(RELEASED_DIT, t, h, w, torch.bfloat16)
    assert rope.dtype == torch.bfloat16 and rope.shape == (5, 46, 30, 32, 2, 2)
    angles = rope_angles(RELEASED_DIT, (5, 46, 30), torch.float32)

    def table(cos: Tensor, sin: Tensor) -> Tensor:
        return torch.stack([cos, -sin, sin, cos], -1).unflatten(-1, (2, 2))

    rounded = angles.to(torch.bfloat16)
    assert torch.equal(rope, table(rounded.cos(), rounded.sin()))
    late = table(angles.cos(), angles.sin()).to(torch.bfloat16)
    assert (rope.float() - late.float()).abs().max() > 0.05
    with pytest.raises(K4TRTError, match="multiple of 16"):
        build_rope(RELEASED_DIT, 5, 91, 60, torch.bfloat16)


def test_attention_forms_match_exact_softmax():
    """Joint attention, no mask, scale 1/sqrt(d); float32 vs float64 einsum: ~1e-6 relative."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(50, 4, 16, generator=g) for _ in range(3))
    expected = exact_attention(q, k, v).flatten(1)
    for attention in (sdpa_attention, explicit_attention):
        out = attention(q, k, v)
        assert out.shape == (50, 64)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_time_embedding_formula():
    """cos half then sin half of t·10000^(-i/(dim/2)), Linear-SiLU-Linear. float32 sinusoid of t up to 999 has
    abs error ~t·6e-8 = 6e-5 per entry, so 1e-4 of an O(1) output is the right scale."""
    emb = TimeEmbeddings(64, 32)
    for time in (999.0, 249.0):
        half = 32
        args = torch.tensor([time * 10000.0 ** (-i / half) for i in range(half)], dtype=torch.float64)
        sinusoid = torch.cat([args.cos(), args.sin()])
        w1, b1 = emb.in_layer.weight.double(), emb.in_layer.bias.double()
        w2, b2 = emb.out_layer.weight.double(), emb.out_layer.bias.double()
        expected = F.silu(sinusoid @ w1.T + b1) @ w2.T + b2
        with torch.no_grad():
            out = emb(torch.tensor([time]))
        assert out.shape == (1, 32)
        torch.testing.assert_close(out[0].double(), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- whole model


def test_forward_matches_reference_float32():
    """Float32 model vs float64 reference at the first step's t = 999, where the float32 time sinusoid (~6e-5
    abs, see above) dominates the error: ~2.5e-6 of the output scale after two blocks, so 2e-5 leaves a 10x margin
    while any layout, ordering or formula slip is O(1)."""
    model, state = tiny_model()
    x, text, _ = random_inputs(TINY, LATENT, seed=1)
    time = torch.tensor([999.0])
    with torch.no_grad():
        out = model(x, text, time, build_rope(TINY, *LATENT, torch.float32))
    state64 = {k: v.double() for k, v in state.items()}
    expected = reference_dit(state64, x.double(), text.double(), time, TINY, torch.float64)
    assert out.shape == (*LATENT, TINY.out_visual_dim) and out.dtype == torch.float32
    assert rel_err(out, expected) < 2e-5


def test_explicit_attention_form_matches_sdpa_and_leaves_the_model_as_it_was():
    model, _ = tiny_model()
    x, text, time = random_inputs(TINY, LATENT, seed=2)
    rope = build_rope(TINY, *LATENT, torch.float32)
    explicit_model = model.with_attention(explicit_attention)
    with torch.no_grad():
        sdpa = model(x, text, time, rope)
        explicit = explicit_model(x, text, time, rope)
    assert rel_err(explicit, sdpa) < 1e-5  # float32 reassociation only
    assert model.attention is sdpa_attention and explicit_model.attention is explicit_attention
    assert all(a is b for a, b in zip(model.parameters(), explicit_model.parameters(), strict=True))  # shared


def test_bf16_matches_the_originals_autocast_run():
    """bf16 weights vs the reference run as the original runs: bf16 weights under autocast (CPU autocast with
    CUDA's float32 layer_norm, see reference_dit). With the same attention maths on both sides every rounding
    point coincides and the outputs are bit-identical here (>= 95% equal and 5e-4 mean allow another CPU's bf16
    GEMM blocking); moving any one cast (scale+1 in float32, LayerNorm or rotary in bf16) leaves only ~35-50%
    equal with ~3e-3 mean error, so this pins the dtype flow. With SDPA the only change is attention's bf16
    rounding (one ulp, 2^-8 relative, at some outputs), which stays within a few ulps downstream."""
    model, state = tiny_model(torch.bfloat16)
    x, text, time = random_inputs(TINY, LATENT, seed=4)
    feed = (x.bfloat16(), text.bfloat16(), time, build_rope(TINY, *LATENT, torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emulated = reference_dit({k: v.bfloat16() for k, v in state.items()}, *feed[:3], TINY, torch.float32)
    assert emulated.dtype == torch.bfloat16

    with torch.no_grad():
        out = model(*feed)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, emulated) < 1e-2 and mean_rel_err(out, emulated) < 5e-3

    exact_rounded = model.with_attention(lambda q, k, v: exact_attention(q, k, v).to(q.dtype).flatten(1))
    with torch.no_grad():
        out = exact_rounded(*feed)
    assert (out == emulated).float().mean() >= 0.95 and mean_rel_err(out, emulated) < 5e-4


# ---------------------------------------------------------------------------------------------------- loading


def test_infer_config_of_released_shapes():
    with torch.device("meta"):
        state = DiT(RELEASED_DIT).state_dict()
    assert infer_dit_config(state) == RELEASED_DIT
    assert sum(v.numel() for v in state.values()) == pytest.approx(5.57e9, rel=1e-3)
    with pytest.raises(K4TRTError, match="head dim 64"):
        infer_dit_config(state, axes_dims=(16, 24, 32))
    with pytest.raises(K4TRTError, match="lacks time_embeddings.in_layer.weight"):
        infer_dit_config({k: v for k, v in state.items() if not k.startswith("time_embeddings")})


def test_state_dict_is_parameters_only_and_round_trips():
    model, state = tiny_model()
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == set(state)
    assert infer_dit_config(state, axes_dims=TINY.axes_dims) == TINY
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("transformer_blocks.0.1.self_attention.key_norm.bias"), "missing .*key_norm.bias"),
        (lambda s: s.update({"rope_embeddings.args_0": torch.zeros(128, 2)}), "unexpected rope_embeddings.args_0"),
        (lambda s: s.update({"transformer_blocks.0.0.feed_forward.out_layer.bias": torch.zeros(65)}),
         r"wrong shape .*feed_forward.out_layer.bias \(65,\) \(expected \(64,\)\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_from_state_dict_rejects_mismatches(edit, message):
    state = random_state_dict(TINY, 0)
    edit(state)
    with pytest.raises(K4TRTError, match=message):
        DiT.from_state_dict(state, axes_dims=TINY.axes_dims)
