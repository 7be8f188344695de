"""Shape lists from the exporter -> one TensorRT optimization profile per engine.

Decision: ONE dynamic-shape engine per graph, with ONE optimization profile whose [min, max] box covers every
requested (size, duration) case and whose opt point is the default case (12 s at 672x384) when requested,
else the largest case.

Why not per-size engines: the released model has 7 sizes x 13 durations. A plan embeds its weights (~5.5 GB
for the FP8 DiT, ~11 GB in BF16), so 7 per-size plans would cost 40-80 GB of disk, 7 times the load time
and, to switch sizes without reloading, 7 copies of the weights in GPU memory. Each DiT build also takes tens
of minutes, so the build would take hours.

Why not one profile per size inside one engine: weights would be shared, but TensorRT tunes tactics per
profile (Developer Guide, "Working with Dynamic Shapes" > "Optimization Profiles"), so the build time still
grows ~7x, and each profile adds its own kernels and activation-memory requirement. What the extra tuning
buys is small here: the DiT's cost is GEMMs with K, N fixed by the model and M = tokens, plus fused attention
over the same tokens; kernels chosen at the opt point stay near-optimal as M varies, and the case the
performance budget is set on is exactly the opt point, so it gets exact tuning. The VAE is convolutions over
a few fixed chunk lengths (t in {1, 2, 3}) whose cost is dominated by the largest size as well.

Costs of the single box, accepted: the elementwise max of landscape and portrait sizes (e.g. 92x92 latents for
736x352 and 352x736) is a corner no case uses, so TensorRT's activation-memory upper bound is sized for up to
~2x the largest real token count (a linear, not quadratic, cost with fused attention); and sizes inside the
box that were not requested also run. Users who want a tighter box pass fewer `--sizes` / a shorter
`--max-duration` to build-engines. Nothing here knows model internals: the graph registry (`k4trt.core.graphs`)
supplies every case's concrete input shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """The [min, opt, max] shapes of one input in an optimization profile."""

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max, strict=True))

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[int]]) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


def derive_ranges(shapes: Mapping[str, Sequence[Sequence[int]]], opt_case: int | None = None) -> dict[str, ShapeRange]:
    """min/opt/max per input from the concrete shapes of every case.

    `shapes[name][i]` is input `name`'s shape in case i; every input lists the same cases in the same order.
    `opt_case` is the index of the default case (12 s at 672x384) when it was requested; without it the opt
    point is the largest case (most elements over all inputs), an actual case rather than a box corner, so
    TensorRT tunes for shapes that really occur together.
    """
    if not shapes:
        raise ValueError("no input shapes given")
    cases = {len(v) for v in shapes.values()}
    if len(cases) != 1:
        counts = ", ".join(f"{name}: {len(v)}" for name, v in shapes.items())
        raise ValueError(f"every input must list the same cases; got different counts ({counts})")
    num_cases = cases.pop()
    if num_cases == 0:
        raise ValueError("no cases given: each input needs at least one shape")
    table = {name: [_check_shape(name, s) for s in v] for name, v in shapes.items()}
    for name, v in table.items():
        ranks = sorted({len(s) for s in v})
        if len(ranks) != 1:
            raise ValueError(f"input {name!r} has shapes of different ranks {ranks}: {v}")
    if opt_case is None:
        opt_case = max(range(num_cases), key=lambda i: (sum(math.prod(v[i]) for v in table.values()), -i))
    elif not 0 <= opt_case < num_cases:
        raise ValueError(f"opt_case {opt_case} is not one of the {num_cases} cases")
    return {
        name: ShapeRange(
            min=tuple(map(min, zip(*v, strict=True))),
            opt=v[opt_case],
            max=tuple(map(max, zip(*v, strict=True))),
        )
        for name, v in table.items()
    }


def _check_shape(name: str, shape: Sequence[int]) -> Shape:
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"input {name!r}: shape {dims} must be positive integers")
    return dims


def uncovered(ranges: Mapping[str, ShapeRange], shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """One line per input whose shape lies outside the profile (or that the profile does not know)."""
    problems = []
    for name, shape in shapes.items():
        r = ranges.get(name)
        if r is None:
            problems.append(f"input {name} is not in the engine's profile")
        elif not r.covers(shape):
            problems.append(f"{name} {tuple(shape)} is outside {r.min}..{r.max}")
    return problems
