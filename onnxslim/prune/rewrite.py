"""Rewriting a graph to drop pruned atoms: weights, biases, norms, per-channel constants and the
attributes and shape constants the analysis recorded; a pruned copy and its export as a model.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto

from onnxslim.graph import const_value
from onnxslim.prune.tracing import Analysis, SliceEdit, keep_positions


def apply(graph: gs.Graph, an: Analysis, keep: np.ndarray) -> dict[int, gs.Node]:
    """Rewrite ``graph`` (``an.graph`` or a ``copy()`` of it: same node order) to drop the pruned atoms.

    Returns node index -> node, taken before cleanup reorders anything. Shapes of intermediate
    tensors are cleared (re-infer after export); graph inputs and outputs are never changed.
    """
    nodes = {i: n for i, n in enumerate(graph.nodes)}
    by_input: dict[tuple[int, int], list[SliceEdit]] = {}
    for e in an.edits:
        by_input.setdefault((e.node, e.index), []).append(e)
    for (i, k), edits in by_input.items():
        masks = [(e.axis, keep_positions(e.ids, keep)) for e in edits]
        if all(m.all() for _, m in masks):
            continue
        node = nodes[i]
        v = np.asarray(const_value(node.inputs[k]))
        for axis, m in masks:
            if v.shape[axis] != len(m):
                raise ValueError(f"pruning edit of '{node.name}' input {k}: axis {axis} has {v.shape[axis]} "
                                 f"positions, layout has {len(m)}")
            v = np.compress(m, v, axis=axis)
        base = node.inputs[k].name or f"{node.name}_in{k}"
        node.inputs[k] = gs.Constant(f"{base}_pruned_{i}_{k}", np.ascontiguousarray(v))
    for i, fix in an.fixups:
        fix(graph, i, keep)
    io = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in io:
            t.shape = None
    graph.cleanup().toposort()
    return nodes


def pruned_copy(an: Analysis, keep: np.ndarray) -> tuple[gs.Graph, dict[int, gs.Node]]:
    """A pruned copy of the analysed graph (the analysis stays valid for more plans)."""
    g = an.graph.copy()
    return g, apply(g, an, keep)


def export(graph: gs.Graph, template: ModelProto) -> ModelProto:
    """The pruned graph as a model, intermediate shapes inferred afresh."""
    import onnx

    from onnxslim.graph import to_proto

    model = to_proto(graph, template)
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are a convenience for later passes, not a requirement
        return model
