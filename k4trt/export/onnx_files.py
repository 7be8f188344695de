"""How k4trt writes an ONNX file, and which files one ONNX graph is.

A graph is its `.onnx` plus the external-data file(s) its tensors point at; fingerprints and reuse decisions
must cover all of them, and a writer must never leave a reader an `.onnx` whose data is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from k4trt.core.graphs import external_data
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path, write_failed

if TYPE_CHECKING:
    from onnx import GraphProto, TensorProto

OPSET = 23  # ONNX Attention (the DiT); TensorRT 10.15+ and 11.x parse opsets 9-24


def save_onnx(model: ir.Model, path: Path) -> None:
    """Write `model` to `path` with its weights in `external_data(path)`, both atomically.

    Both files are written under temporary names; the data file is renamed first and the .onnx last, so a
    reader that finds the new .onnx always finds its data. The .onnx is rewritten to name the data file by
    its final name, because the serializer records the temporary name it wrote to.
    """
    data = path.with_name(external_data(path.name))
    with atomic_path(path) as tmp_onnx, atomic_path(data) as tmp_data:
        try:
            ir.save(model, tmp_onnx, external_data=tmp_data.name)
            proto = onnx.load(tmp_onnx, load_external_data=False)
            for tensor in proto.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data.name
            tmp_onnx.write_bytes(proto.SerializeToString())
        except OSError as e:  # numpy's short write on a full disk is an OSError with no errno
            raise write_failed(path, e) from None


def graph_files(onnx_path: Path, again: str) -> list[Path]:
    """The .onnx file and every external-data file its tensors point at (read from the graph, not guessed from
    names, so whatever layout wrote it is covered); `again` is the command that writes it anew, quoted when the
    graph is unreadable or its data is missing."""
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except OSError as e:
        raise K4TRTError(f"cannot read {onnx_path} ({e.strerror or e}); export it again: {again}") from None
    except DecodeError:
        raise K4TRTError(f"{onnx_path} is not a valid ONNX file; export it again: {again}") from None
    locations = {ExternalDataInfo(t).location for t in _all_tensors(model.graph) if uses_external_data(t)}
    files = [onnx_path] + [onnx_path.parent / loc for loc in sorted(locations)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise K4TRTError(f"{onnx_path} refers to missing external data {', '.join(missing)}; export it again: {again}")
    return files


def _all_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Initializers and Constant-node tensors, in subgraphs too (where an exporter may put weights)."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)
