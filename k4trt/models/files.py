"""What a .safetensors file holds, from its header alone: names and shapes, no tensor data read.

safetensors checks the header against the file (a truncated, padded or garbled file fails to open), so a
damaged file is named here before any weight is loaded.
"""

from __future__ import annotations

from pathlib import Path

from k4trt.errors import K4TRTError, first_line


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of `path`, or a K4TRTError saying the file is damaged or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise K4TRTError(f"{path} is damaged or unreadable ({first_line(e)}); "
                         "download it again with `k4trt weights download DIR`") from None
