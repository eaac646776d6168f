"""slice-merge: Slice(Slice(x, axes A), axes B) with disjoint A and B becomes one Slice over A and B.

Slicing along different axes commutes and composes exactly (each output element is the same input
element), so the merged Slice computes a bit-identical result with one copy less. Merged only when every
reader of the inner Slice is such a Slice (then the inner one is dead and the graph shrinks), all starts,
ends, axes and steps are constants and the axes are known to be distinct after normalising negative axes
with the input's rank. Axes the merged Slice takes whole (start 0, end >= INT32_MAX, step 1) are left out.
Opset >= 10 (Slice with inputs) only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, graph_and_bodies, is_default_domain, is_graph_output
from onnxslim.manager import Context, Pass, PassResult, register


def _params(node: gs.Node, rank: int | None):
    """(starts, ends, axes, steps) as int64 arrays with non-negative axes, or None."""
    if node.op != "Slice" or not is_default_domain(node) or not 3 <= len(node.inputs) <= 5:
        return None
    vals = []
    for t in node.inputs[1:]:
        v = const_value(t) if t.name else None
        if t.name and v is None:
            return None
        vals.append(None if v is None else np.asarray(v, dtype=np.int64).reshape(-1))
    vals += [None] * (4 - len(vals))
    starts, ends, axes, steps = vals
    if axes is None:
        axes = np.arange(len(starts), dtype=np.int64)
    if steps is None:
        steps = np.ones(len(starts), dtype=np.int64)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    if np.any(axes < 0):
        if rank is None:
            return None
        axes = np.where(axes < 0, axes + rank, axes)
    if len(set(axes.tolist())) != len(axes):
        return None
    return starts, ends, axes, steps


# An end at or past this is "to the end" on any real dim (exporters write INT64_MAX or INT32_MAX).
FULL_END = 2**31 - 1


def _drop_full_axes(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Leave out the axes a Slice takes whole (start 0, end to the end, step 1): the same elements, and a
    Slice over the one axis it cuts is the form onnxruntime's own fusions recognise (the unmerged model
    had those; silero_vad's two stft halves become a Split there). One axis stays if all are whole."""
    starts, ends, axes, steps = parts
    keep = ~((starts == 0) & (ends >= FULL_END) & (steps == 1))
    if not keep.any():
        keep[0] = True
    return [p[keep] for p in parts]


def _rank(t: gs.Tensor) -> int | None:
    return None if getattr(t, "shape", None) is None else len(t.shape)


@register
class SliceMerge(Pass):
    name = "slice-merge"
    description = "Merge Slice(Slice(x)) over disjoint axes into one Slice where the inner one becomes dead"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        merged = 0
        if int(graph.opset) < 10:
            return PassResult(changed=False, stats={"slices_merged": 0})
        for g in graph_and_bodies(graph):
            for inner in list(g.nodes):
                if inner.op != "Slice" or not inner.outputs or is_graph_output(g, inner.outputs[0]):
                    continue
                mid = inner.outputs[0]
                readers = list(mid.outputs)
                a = _params(inner, _rank(inner.inputs[0]))
                if a is None or not readers:
                    continue
                plans = []
                for r in readers:
                    b = _params(r, _rank(mid)) if r.inputs and r.inputs[0] is mid else None
                    if b is None or set(a[2].tolist()) & set(b[2].tolist()):
                        plans = None
                        break
                    plans.append((r, b))
                if not plans:
                    continue
                for r, b in plans:
                    parts = _drop_full_axes([np.concatenate([x, y]) for x, y in zip(a, b)])
                    base = r.name or r.outputs[0].name
                    consts = [gs.Constant(f"{base}__{k}", p) for k, p in zip(("starts", "ends", "axes", "steps"), parts)]
                    r.inputs.clear()  # graphsurgeon unregisters the old inputs
                    r.inputs.extend([inner.inputs[0]] + consts)
                    merged += 1
        return PassResult(changed=bool(merged), stats={"slices_merged": merged})
