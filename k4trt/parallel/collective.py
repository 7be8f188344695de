"""The exchange as an ONNX node: TensorRT's `DistCollective` operator with `all_to_all`.

Attributes as TensorRT's DistCollective operator documents them (TensorRT 11 operator reference,
"DistCollective") and as polygraphy's `multi-device shard` writes them into ONNX: `collective_operation`
and `reduce_op` lower-case strings, `root` -1 for root-less collectives, `group_size` 0 with no `groups`
(all ranks), `nb_rank` the number of ranks. The node sits in the default domain; the float32 twin moves it
into onnxruntime-extensions' custom-op domain, where a Python op carries it over the process group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from k4trt.parallel.attention import AllToAll

OP_TYPE = "DistCollective"
#: the domain onnxruntime-extensions registers Python custom ops in (its `default_opset_domain()`)
ORT_PY_OP_DOMAIN = "ai.onnx.contrib"
ALL_TO_ALL = "all_to_all"


def attributes(degree: int) -> dict[str, str | int]:
    return {"collective_operation": ALL_TO_ALL, "reduce_op": "none", "root": -1, "group_size": 0, "nb_rank": degree}


def onnx_all_to_all(degree: int) -> AllToAll:
    """The all-to-all of `k4trt.parallel.attention` as it is exported: one DistCollective node (shape and dtype
    those of its input). Outside an export it returns zeros, so it is only for `torch.onnx.export`."""

    def exchange(x: Tensor) -> Tensor:
        return torch.onnx.ops.symbolic(f"::{OP_TYPE}", (x,), attributes(degree), dtype=x.dtype, shape=x.shape)

    return exchange
