"""The exchange of a sequence-parallel DiT graph under ONNX Runtime: its `DistCollective` all-to-all as a
Python custom op (onnxruntime-extensions) carried over the process group (gloo on the CPU).

The float32 twin holds the node in onnxruntime-extensions' custom-op domain (`k4trt.export.dit_sp_onnx`), so
ONNX Runtime calls `_dist_collective` with the node's input and attributes; it runs the same
`ProcessGroupExchange.all_to_all` the PyTorch backend uses. The op is registered once per process, when this
module is imported; the exchange it uses is the one bound last (one sequence-parallel session per process).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from k4trt.errors import K4TRTError
from k4trt.parallel.collective import ALL_TO_ALL, OP_TYPE, ORT_PY_OP_DOMAIN
from k4trt.parallel.exchange import ProcessGroupExchange

try:
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    from onnxruntime_extensions._ocos import default_opset_domain
except ImportError:
    raise K4TRTError("the ONNX Runtime backend runs on several ranks only with onnxruntime-extensions: "
                     "pip install onnxruntime-extensions") from None

if default_opset_domain() != ORT_PY_OP_DOMAIN:
    raise K4TRTError(f"onnxruntime-extensions registers Python ops in {default_opset_domain()!r}, not "
                     f"{ORT_PY_OP_DOMAIN!r} as the exported twins expect; install onnxruntime-extensions 0.12 or later")

_bound: list[ProcessGroupExchange] = []


@onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
         attrs={"collective_operation": PyCustomOpDef.dt_string, "reduce_op": PyCustomOpDef.dt_string,
                "root": PyCustomOpDef.dt_int64, "group_size": PyCustomOpDef.dt_int64,
                "nb_rank": PyCustomOpDef.dt_int64})
def _dist_collective(x: np.ndarray, **attributes: object) -> np.ndarray:
    exchange = _bound[-1]
    operation, ranks = attributes.get("collective_operation"), int(str(attributes.get("nb_rank", 0)))
    if operation != ALL_TO_ALL or ranks != exchange.degree:
        raise RuntimeError(f"{OP_TYPE} {operation} over {ranks} ranks in a run of {exchange.degree} ranks")
    return exchange.all_to_all(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def session_options(exchange: ProcessGroupExchange) -> ort.SessionOptions:
    """Options for a session over a sequence-parallel twin, its exchange carried by `exchange`."""
    _bound[:] = [exchange]
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
