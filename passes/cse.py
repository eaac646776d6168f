"""cse: common-subexpression elimination.

Constants with identical dtype, shape and bytes become one tensor (grouped by dtype and shape first,
so only candidates are hashed). Then, in topological order, a node with the same op, domain,
attributes and inputs (by identity) as an earlier node of the same graph is dropped and its readers
read the earlier node's outputs; chains collapse in one sweep. Nondeterministic ops, nodes with
subgraphs, custom-domain ops and model-local function bodies are left alone.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import (NONDETERMINISTIC_OPS, StoredValues, has_subgraph, is_default_domain, is_graph_output,
                            graph_and_bodies, substitute)
from onnxslim.manager import Context, Pass, PassResult, register


SAMPLE = 1 << 16  # bytes of a constant hashed to find merge candidates


class _Unhashable(Exception):
    pass


def _const_bytes(c: gs.Constant) -> np.ndarray | None:
    """The constant's bytes as a flat uint8 array, without caching a loaded copy in the graph."""
    vals = c._values
    if isinstance(vals, gs.ir.tensor.SparseValues):
        return None
    if isinstance(vals, gs.ir.tensor.LazyValues):
        if not isinstance(vals, StoredValues):
            raw = vals.tensor.raw_data
            if raw:
                return np.frombuffer(raw, dtype=np.uint8)
        arr = np.asarray(vals.load())  # a weight left on disk: a read-only memory map
    else:
        arr = np.asarray(vals)
    if arr.dtype.kind in "OUSV":
        return None
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _fingerprint(data: np.ndarray) -> tuple[int, str]:
    """Size plus a hash of a sample (head, tail and a strided pick): equal tensors always match,
    different weights almost never do, and a 100 MB weight costs microseconds. Matches are then
    compared in full."""
    n = data.size
    if n > SAMPLE:
        data = np.concatenate([data[:SAMPLE // 4], data[-SAMPLE // 4:], data[:: max(1, n // (SAMPLE // 2))]])
    return n, hashlib.sha1(data.tobytes()).hexdigest()


def _dtype_key(c: gs.Constant) -> str:
    return str(c.dtype)


def _attr_key(v: Any) -> Any:
    if isinstance(v, gs.Graph):
        raise _Unhashable
    if isinstance(v, gs.Constant):
        data = _const_bytes(v)
        if data is None:
            raise _Unhashable
        return ("tensor", _dtype_key(v), tuple(v.shape), hashlib.sha1(data.tobytes()).hexdigest())
    if isinstance(v, gs.Node.AttributeRef):
        return ("ref", v.name)
    if isinstance(v, float):
        return ("f", struct.pack("<d", v))  # NaN attributes compare equal by bits
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_attr_key(x) for x in v))
    if isinstance(v, np.ndarray):
        return ("arr", str(v.dtype), v.shape, v.tobytes())
    return (type(v).__name__, repr(v))


def _node_key(node: gs.Node) -> tuple | None:
    try:
        attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
    except _Unhashable:
        return None
    inputs = tuple(id(t) if t.name else "" for t in node.inputs)
    outputs = tuple(bool(o.name) for o in node.outputs)
    return (node.op, node.domain or "", attrs, inputs, outputs)


def dedupe_constants(graphs: list[gs.Graph]) -> int:
    """Merge constants with equal dtype, shape and bytes; returns how many were merged away."""
    groups: dict[tuple, list[gs.Constant]] = {}
    seen: set[int] = set()
    readers: dict[int, list[gs.Node]] = {}
    for g in graphs:
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    readers.setdefault(id(t), []).append(n)
                    if id(t) not in seen:
                        seen.add(id(t))
                        groups.setdefault((_dtype_key(t), tuple(t.shape)), []).append(t)
    merged = 0
    for consts in groups.values():
        if len(consts) < 2:
            continue
        by_print: dict[tuple[int, str], list[gs.Constant]] = {}  # fingerprints only: weights are not held twice
        for c in consts:
            data = _const_bytes(c)
            if data is None:
                continue
            same = by_print.setdefault(_fingerprint(data), [])
            first = next((f for f in same if np.array_equal(_const_bytes(f), data)), None)
            if first is None:
                same.append(c)
                continue
            for n in readers.get(id(c), []):
                for i, t in enumerate(n.inputs):
                    if t is c:
                        n.inputs[i] = first
            merged += 1
    return merged


def dedupe_nodes(g: gs.Graph) -> int:
    first: dict[tuple, gs.Node] = {}
    merged = 0
    for node in list(g.nodes):
        if (not node.outputs or not is_default_domain(node) or node.op in NONDETERMINISTIC_OPS
                or has_subgraph(node)):
            continue
        key = _node_key(node)
        if key is None:
            continue
        keep = first.get(key)
        if keep is None or keep is node:
            first[key] = node
            continue
        pairs = [(d, k) for d, k in zip(node.outputs, keep.outputs) if d.name]
        if any(is_graph_output(g, d) and is_graph_output(g, k) for d, k in pairs):
            continue
        if any(is_graph_output(g, d) and (isinstance(k, gs.Constant) or any(k is t for t in g.inputs)) for d, k in pairs):
            continue
        for d, k in pairs:
            substitute(g, d, k)
        merged += 1
    return merged


@register
class CommonSubexpressionElimination(Pass):
    name = "cse"
    description = "Merge identical nodes (same op, attributes and inputs) and identical constant tensors"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        graphs = graph_and_bodies(graph)  # model-local function bodies are not touched
        consts = dedupe_constants(graphs)
        nodes = 0
        for g in graphs:
            nodes += dedupe_nodes(g)
        if consts or nodes:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=bool(consts or nodes), stats={"constants_merged": consts, "nodes_merged": nodes})
