"""The exchanges of a sequence-parallel DiT graph as TensorRT layers: `DistCollective` all-to-all.

The exported graph carries each exchange as an ONNX `DistCollective` node (`k4trt.parallel.collective`).
TensorRT's ONNX parser imports DistCollective since 10.16 (TensorRT OSS changelog, 10.16 "Parsers"), but
10.16's CollectiveOperation has no all-to-all (NvInfer.h 10.16: ALL_REDUCE, ALL_GATHER, BROADCAST, REDUCE,
REDUCE_SCATTER); kALL_TO_ALL arrives with the network API of 11.0, and no parser documentation says the
importer maps an `all_to_all` node onto it. So the build does not rely on the importer: it parses a copy of
the graph in which each DistCollective node is an Identity (same inputs, outputs and name), then puts an
IDistCollectiveLayer (ALL_TO_ALL, reduce NONE, root -1, all ranks, `num_ranks` = P) in place of each one:
`INetworkDefinition.add_dist_collective` and `ILayer.num_ranks` as TensorRT 11's Python API documents them
(python/docstrings/infer/pyGraphDoc.h; the sampleDistCollective sample builds the same layer in C++).
ALL_TO_ALL sends block j of dim 0 to rank j and concatenates the received blocks in rank order, which is the
exchange the graph was written for. The layers need NCCL at run time and an Ampere or later GPU.

Written against TensorRT 11's documentation, not yet run with TensorRT (README, "What was verified where").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import onnx

from k4trt.engine.trt_api import INSTALL
from k4trt.errors import K4TRTError
from k4trt.fsutil import temp_path
from k4trt.parallel.collective import ALL_TO_ALL, OP_TYPE

if TYPE_CHECKING:
    import tensorrt as trt


class _DistCollectiveLayer(Protocol):
    """The part of TensorRT 11's IDistCollectiveLayer used here (absent from the 10.x stubs)."""

    num_ranks: int

    def get_output(self, index: int) -> trt.ITensor: ...


class _MultiDeviceNetwork(Protocol):
    """INetworkDefinition.add_dist_collective(input, collective_op, reduce_op, root, groups) of TensorRT 11."""

    def add_dist_collective(self, input: trt.ITensor, collective_op: object, reduce_op: object, root: int,
                            groups: list[int] | None) -> _DistCollectiveLayer | None: ...


@contextlib.contextmanager
def placeholder_graph(onnx_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """(a copy of the .onnx beside it with every DistCollective node an Identity, the placeholders' output
    names), removed on exit. The copy refers to the same external data, so no weights are written."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    outputs = []
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == "":
            operation = next((a.s.decode() for a in node.attribute if a.name == "collective_operation"), "")
            if operation != ALL_TO_ALL:
                raise K4TRTError(f"{onnx_path}: {OP_TYPE} node {node.name} is {operation!r}, not the {ALL_TO_ALL} this "
                                 "build places; export the graph again")
            node.op_type = "Identity"
            del node.attribute[:]
            outputs.append(node.output[0])
    copy = temp_path(onnx_path)  # a temporary's name, so a rerun after a SIGKILL removes it
    try:
        copy.write_bytes(model.SerializeToString())
        yield copy, outputs
    finally:
        copy.unlink(missing_ok=True)


def require_all_to_all() -> None:
    """TensorRT with all-to-all DistCollective layers (11.0 or later), as one line otherwise."""
    import tensorrt as trt

    operations = getattr(trt, "CollectiveOperation", None)
    if operations is None or not hasattr(operations, "ALL_TO_ALL"):
        raise K4TRTError(f"TensorRT {trt.__version__} has no all-to-all DistCollective layer, which a sequence-parallel "
                         f"DiT needs; install TensorRT 11.0 or later: {INSTALL.replace('pip install', 'pip install -U', 1)}")


def place_collectives(network: trt.INetworkDefinition, placeholders: list[str], degree: int) -> None:
    """Replace the Identity layers writing `placeholders` by all-to-all collectives over `degree` ranks: each
    consumer of a placeholder's output is rewired to the collective's; the Identity is left unused, and the
    builder drops it."""
    import tensorrt as trt

    wanted = set(placeholders)
    found = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.IDENTITY and layer.get_output(0).name in wanted:
            found[layer.get_output(0).name] = layer
    missing = wanted - found.keys()
    if missing:
        raise K4TRTError(f"the parsed network lacks the exchange placeholders {', '.join(sorted(missing))}; "
                         "export the graph again")
    multi_device = cast(_MultiDeviceNetwork, network)
    # Both by name: TensorRT 11's all-to-all and NONE reduction are absent from the 10.x type stubs.
    operations, reductions = getattr(trt, "CollectiveOperation"), trt.ReduceOperation  # noqa: B009
    replaced: dict[str, trt.ITensor] = {}
    for name, identity in found.items():
        collective = multi_device.add_dist_collective(identity.get_input(0), operations.ALL_TO_ALL,
                                                      getattr(reductions, "NONE"), -1, None)  # noqa: B009
        if collective is None:
            raise K4TRTError(f"TensorRT could not add an all-to-all DistCollective layer for {name}")
        collective.num_ranks = degree
        replaced[name] = collective.get_output(0)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None and tensor.name in replaced and layer.type != trt.LayerType.IDENTITY:
                layer.set_input(j, replaced[tensor.name])
