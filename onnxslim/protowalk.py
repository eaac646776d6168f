"""Walking ModelProto graphs: subgraphs (If/Loop/Scan bodies), nodes, tensors, and model statistics.

The one place that knows where protobuf hides graphs and tensors. It imports nothing from onnxslim,
so model I/O, weights and the passes can all use it without import cycles.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto


def node_subgraphs(n: NodeProto) -> Iterator[GraphProto]:
    """The bodies one node holds (If branches, Loop/Scan bodies)."""
    for a in n.attribute:
        if a.HasField("g"):
            yield a.g
        yield from a.graphs


def subgraphs(g: GraphProto) -> Iterator[GraphProto]:
    """The bodies held by the nodes of ``g`` (one level down)."""
    for n in g.node:
        yield from node_subgraphs(n)


def iter_graphs(g: GraphProto) -> Iterator[GraphProto]:
    """``g`` and every graph nested in it, parents first; model-local functions are not graphs."""
    yield g
    for sg in subgraphs(g):
        yield from iter_graphs(sg)


def iter_nodes(g: GraphProto) -> Iterator[NodeProto]:
    """Every NodeProto of ``g`` and of its subgraphs, depth first (each node before its bodies' nodes)."""
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.HasField("g"):
                yield from iter_nodes(a.g)
            for sg in a.graphs:
                yield from iter_nodes(sg)


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers and tensor attributes, in all subgraphs and functions.

    The main graph's initializers come first, in order (onnxslim.weights relies on it)."""

    def from_graph(g: GraphProto) -> Iterator[TensorProto]:
        yield from g.initializer
        for si in g.sparse_initializer:
            yield si.values
            yield si.indices
        yield from from_nodes(g.node)

    def from_nodes(nodes) -> Iterator[TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for g in attr.graphs:
                    yield from from_graph(g)

    yield from from_graph(model.graph)
    for fn in model.functions:
        yield from from_nodes(fn.node)


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's values, from its dims and type (works for weights left on disk too)."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return int(np.prod(list(t.dims), dtype=np.int64)) * itemsize


def model_stats(model: ModelProto) -> dict[str, int]:
    """Nodes, initializers and weight bytes over the main graph and every subgraph.

    One scope for every representation: an initializer counts once by name, and only when some node
    (in any graph) reads it, which is what a graphsurgeon graph holds as its constants."""
    read: set[str] = set()
    nodes = 0
    for n in iter_nodes(model.graph):
        nodes += 1
        read.update(n.input)
    seen: dict[str, int] = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.name in read and t.name not in seen:
                seen[t.name] = tensor_nbytes(t)
    return {"nodes": nodes, "initializers": len(seen), "bytes": sum(seen.values())}


def opset_of(model: ModelProto) -> int:
    """The model's default-domain opset version (0 when it imports none)."""
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def prune_opsets(model: ModelProto) -> None:
    """Drop opset imports no node uses. onnxruntime's optimizer and converters write every domain they
    know (ai.onnx.ml, training, contrib ...) into the model; they would end up in the output."""
    used = {""} | {n.domain for n in iter_nodes(model.graph)}
    for f in model.functions:
        used.add(f.domain)
        used.update(n.domain for n in f.node)
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)
