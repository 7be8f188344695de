"""The CogVideoX VAE decoder (diffusers' `AutoencoderKLCogVideoX`, decoder half), written for chunked export.

diffusers keeps the causal-conv caches in nested dicts and caches every conv, even kernel-1 ones that never
look back. Here a chunk is a pure function `(z, caches) -> (pixels, caches)` over a flat list holding only
what the next chunk reads (the last two input frames of each time-kernel-3 conv), so the same code runs in
PyTorch and exports to two ONNX graphs: the "head" (no caches in; 1 or 3 latent frames) and the "body"
(2 latent frames, caches in and out). Parameter names match diffusers', so its checkpoints load as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from k4trt.errors import K4TRTError, listed

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
UP_BLOCK = "CogVideoXUpBlock3D"
DOWN_BLOCK = "CogVideoXDownBlock3D"
# Every GroupNorm of the decoder sits in a spatial norm, whose eps diffusers fixes (config `norm_eps` only
# reaches the encoder).
SPATIAL_NORM_EPS = 1e-6
# Keys of the full autoencoder the decoder does not use; anything else unknown is an error.
UNUSED_PREFIXES = ("encoder.", "quant_conv.")


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' `vae/config.json`. Defaults are diffusers' own, so a file that leaves a field
    out means what it means to diffusers; encoder-only fields are kept so the config can be written back."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise K4TRTError(f"VAE config: {problem}")

    def _problem(self) -> str | None:
        """What makes this config unusable for the decoder, or None."""
        counts = {
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
        }
        for name, value in counts.items():
            if not _is_positive_int(value):
                return f"{name} must be a positive integer, got {value!r}"
        blocks = self.block_out_channels
        if not blocks or not all(_is_positive_int(c) and c % self.norm_num_groups == 0 for c in blocks):
            groups = self.norm_num_groups
            return f"block_out_channels {blocks!r} must be positive multiples of norm_num_groups ({groups})"
        ratio = self.temporal_compression_ratio
        if not _is_positive_int(ratio) or ratio & (ratio - 1) or ratio >= 2 ** len(blocks):
            return f"temporal_compression_ratio {ratio!r} must be a power of two below 2**{len(blocks)}"
        if self.act_fn not in ("silu", "swish"):
            return f"act_fn {self.act_fn!r} is not supported; CogVideoX uses 'silu'"
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, (int, float)):
            return f"scaling_factor must be a number, got {self.scaling_factor!r}"
        if not self.scaling_factor > 0:
            return f"scaling_factor must be positive, got {self.scaling_factor!r}"
        return None

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        """Read diffusers' `config.json`; keys this decoder does not know (`_diffusers_version`, …) are ignored."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise K4TRTError(f"{path} is missing; the VAE folder needs its diffusers config.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise K4TRTError(f"{path} is not readable JSON ({e}); use the VAE's original config.json") from None
        if not isinstance(raw, dict):
            raise K4TRTError(f"{path} must hold a JSON object; replace it with the VAE's original config.json")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        ratio = values.get("temporal_compression_ratio")
        if isinstance(ratio, float) and ratio.is_integer():
            values["temporal_compression_ratio"] = int(ratio)  # diffusers types it float
        try:
            cfg = cls(**values)
        except K4TRTError as e:
            raise K4TRTError(f"{path}: {e}; fix the file or use the VAE's original config.json") from None
        for key, kind in (("up_block_types", UP_BLOCK), ("down_block_types", DOWN_BLOCK)):
            if key in raw and raw[key] != [kind] * len(cfg.block_out_channels):
                raise K4TRTError(f"{path}: {key} must list {kind!r} once per block; this is not a CogVideoX VAE")
        return cfg

    def to_diffusers_config(self) -> dict[str, Any]:
        """A complete `config.json` dict that diffusers' `AutoencoderKLCogVideoX` loads."""
        config: dict[str, Any] = {"_class_name": "AutoencoderKLCogVideoX"}
        config.update({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()})
        config["down_block_types"] = [DOWN_BLOCK] * len(self.block_out_channels)
        config["up_block_types"] = [UP_BLOCK] * len(self.block_out_channels)
        return config


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def tiny_vae_config() -> VAEConfig:
    """The released structure (4 up blocks: spatial ×8, temporal ×4; channel changes with shortcut convs;
    16 latent channels so it fits the tiny DiT) at a size that decodes in milliseconds on a CPU."""
    return VAEConfig(
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=64,
        sample_width=64,
        scaling_factor=0.7,
    )


class _CacheIO:
    """Hands each cached conv its cache in forward order and collects the caches left for the next chunk.

    One object threaded through the forward keeps the modules free of state between calls, which is what
    lets a chunk be exported as a graph with the caches as plain inputs and outputs."""

    def __init__(self, caches: Sequence[torch.Tensor] | None) -> None:
        self._past: Iterator[torch.Tensor] | None = None if caches is None else iter(caches)
        self.new: list[torch.Tensor] = []

    def take(self) -> torch.Tensor | None:
        return None if self._past is None else next(self._past)

    def leave(self, cache: torch.Tensor) -> None:
        self.new.append(cache)


class _CausalConv3d(nn.Module):
    """A 3D conv padded in time on the past side only. The past is the previous chunk's last input frames, or
    the chunk's first frame repeated when there is no previous chunk. Wrapping `conv` keeps diffusers' names."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.past_frames = kernel - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        if self.past_frames:
            past = io.take()
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.past_frames, -1, -1)
            x = torch.cat([past, x], dim=2)
            # A copy, so the eager path does not keep this whole activation alive through the next chunk.
            io.leave(x[:, :, -self.past_frames :].clone())
        return self.conv(x)


def _resize_like(z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-resize latents to a feature map's (t, h, w). A feature map with an odd frame count > 1 holds
    the causal first frame apart from pairs of frames, so the first latent frame maps onto it alone."""
    if size[0] > 1 and size[0] % 2 == 1:
        first = F.interpolate(z[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(z[:, :, 1:], size=(size[0] - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(z, size=tuple(size))


class _SpatialNorm3D(nn.Module):
    """GroupNorm whose per-pixel scale and shift are pointwise convs of the latents (the decoder's only norm)."""

    def __init__(self, channels: int, latent_channels: int, groups: int) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=SPATIAL_NORM_EPS)
        self.conv_y = _CausalConv3d(latent_channels, channels, 1)
        self.conv_b = _CausalConv3d(latent_channels, channels, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        zq = _resize_like(z, x.shape[2:])
        return self.norm_layer(x) * self.conv_y(zq, io) + self.conv_b(zq, io)


class _ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        groups, latent = cfg.norm_num_groups, cfg.latent_channels
        self.norm1 = _SpatialNorm3D(in_channels, latent, groups)
        self.conv1 = _CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = _SpatialNorm3D(out_channels, latent, groups)
        self.conv2 = _CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, z: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, z, io)), io)
        h = self.conv2(F.silu(self.norm2(h, z, io)), io)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class _Upsample3D(nn.Module):
    """Nearest ×2 in space, and in time when `compress_time` (the causal first frame is not doubled), then a
    per-frame 3×3 conv."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        if self.compress_time and t % 2 == 1 and t > 1:
            first = F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0))
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        elif self.compress_time and t > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0))
        # A per-frame 2D conv is a 3D conv with a one-frame kernel; this avoids reshaping frames into the batch.
        return F.conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, padding=(0, 1, 1))


class _UpBlock3D(nn.Module):
    """Resnets then an optional upsampler; with no upsampler it is also the mid block."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, cfg: VAEConfig, upsample: bool, compress_time: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, cfg) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([_Upsample3D(out_channels, compress_time)]) if upsample else None

    def forward(self, x: torch.Tensor, z: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, z, io)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class _Decoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        channels = list(reversed(cfg.block_out_channels))
        time_doublings = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = _CausalConv3d(cfg.latent_channels, channels[0], 3)
        self.mid_block = _UpBlock3D(channels[0], channels[0], 2, cfg, upsample=False, compress_time=False)
        self.up_blocks = nn.ModuleList(
            _UpBlock3D(
                channels[max(i - 1, 0)],
                channels[i],
                cfg.layers_per_block + 1,
                cfg,
                upsample=i < len(channels) - 1,
                compress_time=i < time_doublings,
            )
            for i in range(len(channels))
        )
        self.norm_out = _SpatialNorm3D(channels[-1], cfg.latent_channels, cfg.norm_num_groups)
        self.conv_out = _CausalConv3d(channels[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, io), z, io)
        for block in self.up_blocks:
            x = block(x, z, io)
        return self.conv_out(F.silu(self.norm_out(x, z, io)), io)


class VAEDecoder(nn.Module):
    """CogVideoX VAE decoder, one causal chunk per call; dtype is the module's (the original runs it in bf16)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scaling_factor = cfg.scaling_factor
        self.decoder = _Decoder3D(cfg)
        # diffusers declares it with out_channels, which only works where that equals latent_channels.
        latent = cfg.latent_channels
        self.post_quant_conv = nn.Conv3d(latent, latent, 1) if cfg.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def cache_names(self) -> list[str]:
        """Module paths of the cached convs, in the order of `decode_chunk`'s cache lists (forward order:
        modules are registered in the order they run)."""
        return [name for name, m in self.named_modules() if isinstance(m, _CausalConv3d) and m.past_frames]

    def cache_shapes(self, h: int, w: int) -> list[tuple[int, ...]]:
        """Shape of each cache for latents of spatial size (h, w), in `cache_names` order. They do not depend
        on the chunk's frame count; their dtype is `self.dtype`. Found by a dry run on the meta device."""
        with torch.device("meta"):
            shadow = VAEDecoder(self.cfg)
            _, caches = shadow.decode_chunk(torch.empty(1, self.cfg.latent_channels, 1, h, w), None)
        return [tuple(c.shape) for c in caches]

    def decode_chunk(
        self, z: torch.Tensor, caches: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode latents `z` [1, C, t, h, w] (already divided by the scaling factor) to pixels
        [1, 3, f, 8h, 8w] in about [-1, 1], unclipped; f = 4t - 3 for the first chunk, 4t after it.
        `caches` is None for the first chunk, else what the previous chunk returned."""
        if caches is not None and len(caches) != len(self.cache_names):
            raise ValueError(f"expected {len(self.cache_names)} caches, got {len(caches)}")
        io = _CacheIO(caches)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, io), io.new

    def forward(self, z: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat form for ONNX export: (pixels, *new caches); no caches given means a head chunk."""
        pixels, new = self.decode_chunk(z, caches or None)
        return (pixels, *new)

    @classmethod
    def from_pretrained(
        cls, vae_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> VAEDecoder:
        """Load diffusers' `vae/` folder (config.json + diffusion_pytorch_model.safetensors). Encoder and
        quant_conv weights are skipped unread; every decoder weight must be present with its exact shape."""
        vae_dir = Path(vae_dir)
        cfg = VAEConfig.from_json(vae_dir / CONFIG_NAME)
        path = vae_dir / WEIGHTS_NAME
        if not path.is_file():
            raise K4TRTError(f"{path} is missing; put the CogVideoX-5b vae/ weights there (k4trt weights download DIR)")
        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                keys = [k for k in f.keys() if not k.startswith(UNUSED_PREFIXES)]
                _check_keys(path, expected.keys(), keys)
                tensors = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as e:
            raise K4TRTError(f"{path} is corrupt or truncated ({e}); download the VAE weights again") from None
        wrong = [
            f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
            for k, v in tensors.items()
            if v.shape != expected[k].shape
        ]
        if wrong:
            raise K4TRTError(
                f"{path} does not fit its config.json: wrong shapes for {listed(wrong)}; "
                "use the config.json that came with these weights"
            )
        model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
        return model.eval()


def _check_keys(path: Path, expected: Iterable[str], found: Iterable[str]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = [f"missing {listed(missing)}"] if missing else []
    problems += [f"unexpected {listed(unexpected)}"] if unexpected else []
    if problems:
        raise K4TRTError(
            f"{path} is not the decoder its config.json describes ({'; '.join(problems)}); "
            "use the config.json and weights of the same CogVideoX VAE"
        )
