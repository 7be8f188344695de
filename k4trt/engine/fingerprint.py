"""SHA-256 fingerprints of the files an engine is built from, so a rebuild happens exactly when one changed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt.engine.layout import rebuild_command
from k4trt.errors import K4TRTError
from k4trt.weights.checkpoint import sha256_file

if TYPE_CHECKING:
    from onnx import GraphProto, TensorProto

__all__ = ["hash_onnx", "hash_tree", "onnx_files", "sha256_file"]


def hash_tree(root: Path, entries: Iterable[Path]) -> dict[str, str]:
    """{path relative to `root`: SHA-256} for each file in `entries`, and for every file below each folder."""
    hashes: dict[str, str] = {}
    for entry in entries:
        files = sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry]
        for f in files:
            hashes[f.relative_to(root).as_posix()] = sha256_file(f)
    return dict(sorted(hashes.items()))


def onnx_files(onnx_path: Path) -> list[Path]:
    """The .onnx file and every external-data file its tensors point at (read from the graph, not guessed from
    names, so whatever layout the exporter chose is fingerprinted completely)."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    again = rebuild_command(onnx_path.parent)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except OSError as e:
        raise K4TRTError(f"cannot read {onnx_path} ({e.strerror or e}); export it again: {again}") from None
    except DecodeError:
        raise K4TRTError(f"{onnx_path} is not a valid ONNX file; export it again: {again}") from None
    locations = {ExternalDataInfo(t).location for t in _all_tensors(model.graph) if uses_external_data(t)}
    return [onnx_path] + [onnx_path.parent / loc for loc in sorted(locations)]


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


def hash_onnx(onnx_path: Path) -> dict[str, str]:
    """{file name relative to the ONNX's folder: SHA-256} for the graph and its external data."""
    files = onnx_files(onnx_path)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise K4TRTError(f"{onnx_path} refers to missing external data {', '.join(missing)}; "
                         f"export it again: {rebuild_command(onnx_path.parent)}")
    return hash_tree(onnx_path.parent, files)
