"""Parameters and multiply-accumulates before/after a plan, and the per-group table of the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, is_default_domain
from onnxslim.prune.tracing import Analysis, SliceEdit, WEIGHTED, _prod, _shape, keep_positions


def _spatial_factor(node: gs.Node) -> int:
    """Multiply-accumulates per weight element for one sample (batch axis 0 excluded)."""
    def p(dims) -> int:
        v = _prod([d for d in dims])
        return v if v is not None else 1

    out = node.outputs[0]
    if node.op == "Conv":
        s = _shape(out)
        return p(s[2:]) if s else 1
    if node.op == "ConvTranspose":
        s = _shape(node.inputs[0])
        return p(s[2:]) if s else 1
    if node.op == "MatMul":
        s = _shape(out)
        return p(s[1:-1]) if s and len(s) > 2 else 1
    return 1


@dataclass
class Cost:
    params: int
    macs: int


def cost(an: Analysis, keep: np.ndarray | None = None) -> Cost:
    """Parameters (float initializer elements) and per-sample MACs of the graph after pruning ``keep``
    (without building it). Shared weights edited for several readers are counted per reader."""
    g = an.graph
    total = 0
    seen: set[int] = set()
    for t in g.tensors().values():
        if isinstance(t, gs.Constant) and id(t) not in seen and np.dtype(t.dtype).kind == "f":
            seen.add(id(t))
            total += int(np.prod(t.shape, dtype=np.int64))
    new_shape: dict[tuple[int, int], list[int]] = {}
    if keep is not None:
        by_input: dict[tuple[int, int], list[SliceEdit]] = {}
        for e in an.edits:
            by_input.setdefault((e.node, e.index), []).append(e)
        for (i, k), edits in by_input.items():
            t = g.nodes[i].inputs[k]
            shape = list(_shape(t) or [])
            old = int(np.prod(shape, dtype=np.int64))
            for e in edits:
                shape[e.axis] = int(keep_positions(e.ids, keep).sum())
            new_shape[(i, k)] = shape
            total -= old - int(np.prod(shape, dtype=np.int64))
    macs = 0
    for i, node in enumerate(g.nodes):
        if node.op not in WEIGHTED or not is_default_domain(node):
            continue
        w = node.inputs[1] if len(node.inputs) > 1 else None
        ws = _shape(w) if w is not None else None
        if w is None or ws is None:
            continue
        if const_value(w) is None:
            if node.op == "MatMul":  # activation x activation (attention): unchanged by pruning
                a = _shape(node.inputs[0])
                if a and _prod(a[1:]) and _prod(ws[-1:]):
                    macs += _prod(a[1:]) * _prod(ws[-1:])
            continue
        shape = new_shape.get((i, 1), ws)
        macs += int(np.prod(shape, dtype=np.int64)) * _spatial_factor(node)
    return Cost(int(total), int(macs))


def group_table(an: Analysis, keep: np.ndarray | None = None) -> list[dict]:
    """Per group: sources, channels before/after, skip reasons, consumers (the report's rows)."""
    rows = []
    for g in an.groups:
        after = g.channels if keep is None else int(sum(bool(keep[u[0]]) for u in g.units))
        rows.append({
            "group": g.id,
            "layers": [an.sources[s].name or an.sources[s].op for s in g.sources],
            "kind": g.kind,  # "heads": channels and kept count whole attention heads
            "width": g.width,  # channels per unit and layer (a grouped conv's group width): channels/kept count units
            "channels": g.channels,
            "kept": after,
            "skipped": "; ".join(g.reasons[:3]) + (f" (+{len(g.reasons) - 3} more)" if len(g.reasons) > 3 else "")
            if g.reasons else None,
            "consumers": g.consumers,
        })
    return rows
