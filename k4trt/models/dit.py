"""The Kandinsky 4 diffusion transformer (DiT): the PyTorch backend, and the module exported to ONNX.

Parameter names are the released checkpoint's keys, so `kandinsky4_distil_512.pt` loads as it is. The original
runs bf16 weights under `torch.autocast("cuda", torch.bfloat16)`; TensorRT networks are strongly typed and an
exported graph has to carry that precision itself, so the autocast rules are written out as casts in
`_linear` and `_layer_norm` (plus the float32 rotary in `_rotate`). With float32 weights every cast is a no-op.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4trt.config import RELEASED_DIT, DiTConfig
from k4trt.errors import K4TRTError, listed

MAX_PERIOD = 10000.0


def _freqs(n: int, device: torch.device | str = "cpu") -> Tensor:
    """exp(-ln(10000)·i/n) for i < n, float32, in the original's order of operations (bit-for-bit)."""
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(n, dtype=torch.float32, device=device) / n)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """Linear in the weights' dtype: autocast feeds every Linear bf16, whatever its input was."""
    return layer(x.to(layer.weight.dtype))


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm in float32, returning float32: layer_norm is on autocast's float32 list, weights included."""
    weight, bias = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def _modulate(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """norm(x)·(scale+1)+shift in float32; `scale + 1` is rounded in the modulation's dtype first, as the
    original adds 1 to a bf16 tensor before type promotion meets the float32 norm."""
    return _layer_norm(norm, x) * (scale + 1).float() + shift.float()


def _rotate(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of `x` [N, heads, head_dim] by `rope` [N, 1, head_dim/2, 2, 2] (float32).

    The original multiplies the bf16 table by the float32-upcast x, so the rotation is float32 and only the
    result goes back to x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))  # [N, heads, head_dim/2, 1, (x0, x1)]
    rotated = rope[..., 0] * pairs[..., 0] + rope[..., 1] * pairs[..., 1]
    return rotated.flatten(-2).to(x.dtype)


#: Unmasked joint attention: q, k, v [S, heads, head_dim] -> [S, heads·head_dim], scaled by 1/√head_dim.
#: The DiT takes it as a constructor argument, so a backend or the exporter chooses the kernel (or the graph
#: form) without touching the model: `sdpa_attention` runs, `onnx_attention` exports (`explicit_attention`
#: where FP8 Q/DQ must sit inside attention), a sequence-parallel wrapper exchanges heads around either.
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def _heads_first(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[S, heads, d] -> [1, heads, S, d], the layout SDPA's fused kernels take."""
    return q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def _tokens_first(out: Tensor) -> Tensor:
    return out.squeeze(0).transpose(0, 1).flatten(1)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`F.scaled_dot_product_attention` (FlashAttention on a GPU). The scale is a Python number, so an export
    holds it as a constant, not shape arithmetic."""
    q, k, v = _heads_first(q, k, v)
    return _tokens_first(F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5))


def onnx_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`torch.onnx.ops.attention`, which the dynamo exporter writes as one ONNX `Attention` node (opset 23) and
    TensorRT (10.14+) imports as a non-decomposable IAttention: a fused kernel or a build error, never a
    materialised score tensor. Inputs are 4-D [1, heads, S, d], the form TensorRT's parser requires; only
    `scale` is set (TensorRT rejects `softcap` and `qk_matmul_output_mode`). In eager mode it is PyTorch's
    reference implementation of the op."""
    q, k, v = _heads_first(q, k, v)
    out, *_ = torch.onnx.ops.attention(q, k, v, scale=q.shape[-1] ** -0.5)
    return _tokens_first(out)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q·scale → MatMul → Softmax → MatMul written out: the form in which FP8 Q/DQ can sit inside attention
    (`--fp8-attention`), left to TensorRT's pattern fusion. TensorRT accepts the scale on q alone or √scale on
    both; q alone is kept because 1/√64 = 1/8 is exact in bf16, where √(1/8) on q and k would round both. In
    PyTorch its scores and softmax are in q's dtype, so in bf16 it is less accurate than SDPA; it exists to
    be exported."""
    q, k, v = _heads_first(q, k, v)
    return _tokens_first(((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v)


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim: int, time_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, time: Tensor) -> Tensor:
        """[1] timestep → [1, time_dim]. The sinusoid (cos half, then sin half) stays float32: the original keeps
        its frequencies in a plain attribute, which `.to(bfloat16)` leaves alone."""
        args = time.float()[:, None] * _freqs(self.in_layer.in_features // 2, time.device)
        sinusoid = torch.cat([args.cos(), args.sin()], dim=-1)
        return _linear(self.out_layer, F.silu(_linear(self.in_layer, sinusoid)))


class TextEmbeddings(nn.Module):
    def __init__(self, text_dim: int, model_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(text_dim, model_dim)

    def forward(self, text: Tensor) -> Tensor:
        return _linear(self.in_layer, text)


class VisualEmbeddings(nn.Module):
    def __init__(self, visual_dim: int, model_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_layer = nn.Linear(math.prod(patch_size) * visual_dim, model_dim)

    def forward(self, patches: Tensor) -> Tensor:
        """Patches [..., prod(patch)·C] (from `patchify`) → tokens [..., model_dim]."""
        return _linear(self.in_layer, patches)


def patchify(x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """Latents [T, H, W, C] → patches [T/pt, H/ph, W/pw, pt·ph·pw·C]; each patch flattens as (pt, ph, pw, C)."""
    (pt, ph, pw), (t, h, w, c) = patch_size, x.shape
    patches = x.reshape(t // pt, pt, h // ph, ph, w // pw, pw, c).permute(0, 2, 4, 1, 3, 5, 6)
    return patches.flatten(3)


def unpatchify(patches: Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> Tensor:
    """Output patches [t·h·w, C·pt·ph·pw] → [t·pt, h·ph, w·pw, C]. Output patches flatten as (C, pt, ph, pw),
    unlike the input's (pt, ph, pw, C)."""
    (pt, ph, pw), (t, h, w) = patch_size, grid
    patches = patches.reshape(t, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3)
    return patches.reshape(t * pt, h * ph, w * pw, -1)


class Modulation(nn.Module):
    def __init__(self, time_dim: int, model_dim: int) -> None:
        super().__init__()
        self.out_layer = nn.Linear(time_dim, 6 * model_dim)

    def forward(self, time_embed: Tensor) -> tuple[Tensor, ...]:
        """(shift, scale, gate) for attention, then (shift, scale, gate) for the feed-forward; each [1, dim]."""
        return _linear(self.out_layer, F.silu(time_embed)).chunk(6, dim=-1)


class MultiheadSelfAttention(nn.Module):
    def __init__(self, model_dim: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = model_dim // head_dim, head_dim
        self.to_query_key_value = nn.Linear(model_dim, 3 * model_dim)
        self.query_norm = nn.LayerNorm(head_dim)
        self.key_norm = nn.LayerNorm(head_dim)
        self.output_layer = nn.Linear(model_dim, model_dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[S, dim] → q, k, v [S, heads, head_dim] in the weights' dtype; q and k layer-normed per head."""
        qkv = _linear(self.to_query_key_value, x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        return _layer_norm(self.query_norm, q).to(v.dtype), _layer_norm(self.key_norm, k).to(v.dtype), v

    def forward(self, visual: Tensor, text: Tensor, rope: Tensor, attention: Attention) -> tuple[Tensor, Tensor]:
        """Joint attention over [visual; text] tokens ([N, dim], [L, dim]); RoPE rotates visual q and k only."""
        visual_q, visual_k, visual_v = self._qkv(visual)
        text_q, text_k, text_v = self._qkv(text)
        out = attention(
            torch.cat([_rotate(visual_q, rope), text_q]),
            torch.cat([_rotate(visual_k, rope), text_k]),
            torch.cat([visual_v, text_v]),
        )
        out = _linear(self.output_layer, out)
        n = visual.shape[0]
        return out[:n], out[n:]


class FeedForward(nn.Module):
    def __init__(self, model_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(model_dim, ff_dim)
        self.out_layer = nn.Linear(ff_dim, model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(self.out_layer, F.gelu(_linear(self.in_layer, x)))


class TransformerBlock(nn.Module):
    """Visual and text tokens share every weight but the modulations; the residual streams stay in the
    weights' dtype (bf16 in the original: Linear outputs plus bf16 gate·out)."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int) -> None:
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim)
        self.text_modulation = Modulation(time_dim, model_dim)
        self.self_attention_norm = nn.LayerNorm(model_dim)
        self.self_attention = MultiheadSelfAttention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(
        self, visual: Tensor, text: Tensor, time_embed: Tensor, rope: Tensor, attention: Attention
    ) -> tuple[Tensor, Tensor]:
        v_shift, v_scale, v_gate, v_ff_shift, v_ff_scale, v_ff_gate = self.visual_modulation(time_embed)
        t_shift, t_scale, t_gate, t_ff_shift, t_ff_scale, t_ff_gate = self.text_modulation(time_embed)

        visual_out, text_out = self.self_attention(
            _modulate(self.self_attention_norm, visual, v_shift, v_scale),
            _modulate(self.self_attention_norm, text, t_shift, t_scale),
            rope,
            attention,
        )
        visual = visual + v_gate * visual_out
        text = text + t_gate * text_out

        visual_out = self.feed_forward(_modulate(self.feed_forward_norm, visual, v_ff_shift, v_ff_scale))
        text_out = self.feed_forward(_modulate(self.feed_forward_norm, text, t_ff_shift, t_ff_scale))
        return visual + v_ff_gate * visual_out, text + t_ff_gate * text_out


class OutLayer(nn.Module):
    def __init__(self, model_dim: int, time_dim: int, visual_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(model_dim)
        self.out_layer = nn.Linear(model_dim, math.prod(patch_size) * visual_dim)
        self.modulation_out = nn.Linear(time_dim, 2 * model_dim)

    def forward(self, visual: Tensor, time_embed: Tensor) -> Tensor:
        """Tokens [..., dim] → patches [..., prod(patch)·C]; the modulation splits as (shift, scale)."""
        shift, scale = _linear(self.modulation_out, F.silu(time_embed)).chunk(2, dim=-1)
        return _linear(self.out_layer, _modulate(self.norm, visual, shift, scale))


class DiT(nn.Module):
    """Velocity of the latents `x` given the text embedding, the timestep and the RoPE table of `build_rope`.

    The released model's 21 (local, global) block pairs only differ in how the original groups tokens for
    attention; with the 512-resolution grouping (1, 1, 1) both attend over everything, so each pair is two
    blocks of the same structure in sequence.
    """

    def __init__(self, cfg: DiTConfig, attention: Attention = sdpa_attention) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention
        self.time_embeddings = TimeEmbeddings(cfg.model_dim, cfg.time_dim)
        self.text_embeddings = TextEmbeddings(cfg.in_text_dim, cfg.model_dim)
        self.visual_embeddings = VisualEmbeddings(cfg.in_visual_dim, cfg.model_dim, cfg.patch_size)
        self.transformer_blocks = nn.ModuleList(
            nn.ModuleList(TransformerBlock(cfg.model_dim, cfg.time_dim, cfg.ff_dim, cfg.head_dim) for _ in range(2))
            for _ in range(cfg.num_blocks)
        )
        self.out_layer = OutLayer(cfg.model_dim, cfg.time_dim, cfg.out_visual_dim, cfg.patch_size)

    def forward(self, x: Tensor, text: Tensor, time: Tensor, rope: Tensor) -> Tensor:
        """x [T, H, W, C_in] latents, text [L, text_dim], time [1] float32 timestep (e.g. 999.0), rope from
        `build_rope(cfg, T, H, W, ...)`. Returns the velocity [T, H, W, C_out] in the weights' dtype."""
        visual = self.visual_embeddings(patchify(x, self.cfg.patch_size))
        grid = visual.shape[:3]
        patches = self.tokens(visual.flatten(0, 2), text, time, rope.flatten(0, 2))
        return unpatchify(patches, grid, self.cfg.patch_size)

    def tokens(self, visual: Tensor, text: Tensor, time: Tensor, rope: Tensor) -> Tensor:
        """Everything between the patches: embedded visual tokens [N, dim], the text embedding [L, text_dim],
        the timestep and the RoPE rows of the visual tokens [N, head_dim/2, 2, 2] -> output patches
        [N, C_out·prod(patch)]. Every op here but attention acts token by token, so a sequence-parallel rank
        runs it on its own rows (any N and L), with an attention that exchanges heads for the rest."""
        time_embed = self.time_embeddings(time)
        text = self.text_embeddings(text)
        rope = rope.float().unsqueeze(1)  # [N, 1 (heads), head_dim/2, 2, 2]

        for pair in self.transformer_blocks:
            for block in pair.children():
                visual, text = block(visual, text, time_embed, rope, self.attention)
        return self.out_layer(visual, time_embed)

    def with_attention(self, attention: Attention) -> DiT:
        """The same model (its parameters shared, not copied) computing attention with `attention`; `self` is
        left as it is, so exporting or calibrating a caller's model never changes how it runs."""
        twin = DiT.__new__(DiT)
        nn.Module.__init__(twin)
        twin.cfg = self.cfg
        for name, child in self.named_children():
            twin.add_module(name, child)
        twin.attention = attention
        return twin.train(self.training)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        axes_dims: tuple[int, int, int] = RELEASED_DIT.axes_dims,
    ) -> DiT:
        """Build on the meta device and adopt the (cast) checkpoint tensors, so 5.5 B parameters are neither
        initialised nor held twice when dtype and device already match."""
        cfg = infer_dit_config(state_dict, axes_dims)
        with torch.device("meta"):
            model = cls(cfg)
        check_keys(model.state_dict(), state_dict)
        cast = {key: value.to(device=device, dtype=dtype) for key, value in state_dict.items()}
        model.load_state_dict(cast, strict=True, assign=True)
        return model.requires_grad_(False).eval()


def check_keys(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> None:
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    mismatched = sorted(
        f"{key} {tuple(given[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected.keys() & given.keys()
        if given[key].shape != expected[key].shape
    )
    problems = [
        f"{label} {listed(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if items
    ]
    if problems:
        raise K4TRTError(
            f"DiT checkpoint does not fit the Kandinsky 4 DiT its shapes describe: {'; '.join(problems)}; "
            "use an unmodified kandinsky4_distil_512.pt (`k4trt weights verify DIR` checks it)"
        )


_SHAPE_KEYS = {
    "time": "time_embeddings.in_layer.weight",
    "text": "text_embeddings.in_layer.weight",
    "visual": "visual_embeddings.in_layer.weight",
    "out": "out_layer.out_layer.weight",
    "ff": "transformer_blocks.0.0.feed_forward.in_layer.weight",
    "head": "transformer_blocks.0.0.self_attention.query_norm.weight",
}


def infer_dit_config(
    state_dict: Mapping[str, Tensor],
    axes_dims: tuple[int, int, int] = RELEASED_DIT.axes_dims,
    patch_size: tuple[int, int, int] = RELEASED_DIT.patch_size,
) -> DiTConfig:
    """Every dimension from tensor shapes. Shapes cannot tell how the head dim splits into RoPE axes, nor how
    the patch volume splits into (pt, ph, pw), so those two are given (the released model's by default)."""
    missing = [key for key in _SHAPE_KEYS.values() if key not in state_dict]
    if missing:
        raise K4TRTError(
            f"DiT checkpoint lacks {listed(missing)}; this is not a Kandinsky 4 DiT state dict "
            "(expected kandinsky4_distil_512.pt)"
        )
    shape = {name: tuple(state_dict[key].shape) for name, key in _SHAPE_KEYS.items()}
    bad = [_SHAPE_KEYS[name] for name, dims in shape.items() if len(dims) != (1 if name == "head" else 2)]
    if bad:
        raise K4TRTError(f"DiT checkpoint has weights of the wrong rank ({listed(bad)}); the file is damaged")

    time_dim, model_dim = shape["time"]
    (head_dim,) = shape["head"]
    patch_volume = math.prod(patch_size)
    if (shape["text"][0], shape["visual"][0], shape["out"][1], shape["ff"][1]) != (model_dim,) * 4:
        raise K4TRTError(
            f"DiT checkpoint shapes disagree on the model dim ({model_dim} from {_SHAPE_KEYS['time']}): "
            f"{', '.join(f'{_SHAPE_KEYS[n]} {shape[n]}' for n in ('text', 'visual', 'out', 'ff'))}; the file is damaged"
        )
    if any(d <= 0 or d % 2 for d in axes_dims) or sum(axes_dims) != head_dim or model_dim % head_dim:
        raise K4TRTError(
            f"RoPE axes {tuple(axes_dims)} do not fit the checkpoint's head dim {head_dim} (model dim {model_dim}): "
            "pass even axes that sum to the head dim, which must divide the model dim"
        )
    if shape["visual"][1] % patch_volume or shape["out"][0] % patch_volume:
        raise K4TRTError(
            f"patch widths {shape['visual'][1]} (in) and {shape['out'][0]} (out) are not multiples of the volume "
            f"of patch size {tuple(patch_size)}; pass the patch size the checkpoint was trained with"
        )
    blocks = [int(m[1]) for key in state_dict if (m := re.match(r"transformer_blocks\.(\d+)\.", key))]
    return DiTConfig(
        in_visual_dim=shape["visual"][1] // patch_volume,
        in_text_dim=shape["text"][1],
        out_visual_dim=shape["out"][0] // patch_volume,
        time_dim=time_dim,
        patch_size=patch_size,
        model_dim=model_dim,
        ff_dim=shape["ff"][0],
        num_blocks=max(blocks) + 1,
        axes_dims=axes_dims,
    )


def build_rope(
    cfg: DiTConfig, t: int, h: int, w: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Tensor:
    """RoPE rotation matrices for latents of shape [t, h, w]: [t/pt, h/ph, w/pw, head_dim/2, 2, 2].

    Entry [i, j, k, f] is [[cos a, -sin a], [sin a, cos a]] with the angles of the time axis (axes_dims[0]/2
    frequencies, position i), then height (position j), then width (position k) concatenated; positions start
    at 0 and frequencies are exp(-ln(10000)·n/(axis_dim/2)). It rotates channel pairs (2f, 2f+1) of every
    head's visual q and k. It is constant across steps, so the sampler builds it once and the ONNX graph takes
    it as its input `rope`.

    Precision, as the original: its position×frequency tables are float32 buffers computed on the CPU, and
    `dit.to(torch.bfloat16)` casts them too, so the angles are rounded to `dtype` before cos and sin, which
    are then taken in `dtype` on the device. For bf16 that rounding is coarse (steps of 0.5 rad at angle 64..128)
    and part of what the model was trained with. For float32 it is all float32.
    """
    grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    if min(t, h, w) <= 0 or (t, h, w) != tuple(n * p for n, p in zip(grid, cfg.patch_size, strict=True)):
        raise K4TRTError(f"latent shape {t}x{h}x{w} is not a positive multiple of the DiT patch {cfg.patch_size}; "
                         "use a video size that is a multiple of 16")
    axes = []
    for axis, (positions, axis_dim) in enumerate(zip(grid, cfg.axes_dims, strict=True)):
        angles = torch.outer(torch.arange(positions, dtype=torch.float32), _freqs(axis_dim // 2))
        view = [1, 1, 1, axis_dim // 2]
        view[axis] = positions
        axes.append(angles.reshape(view).expand(*grid, axis_dim // 2))
    angles = torch.cat(axes, dim=-1).to(device=device, dtype=dtype)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))
