"""Groups: sources whose output channels share a unit (atoms unified by residual adds, gating muls, the
groups of a grouped conv) form one group, the thing a ratio applies to; a group with a frozen atom is left
whole, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.prune.tracing import Analysis, Group, _Tracer, _UnionFind


def analyze(graph: gs.Graph) -> Analysis:
    """Trace channels through ``graph`` (toposorted, shapes inferred) and build the groups."""
    graph.toposort()
    an = _Tracer(graph).run()
    _build_groups(an)
    return an


def _build_groups(an: Analysis) -> None:
    n = an.n_atoms
    if not n:
        return
    roots = np.array([an.root(a) for a in range(n)], np.int64)
    src = np.asarray(an.atom_source, np.int64)
    # Sources joined by any shared unit form one group.
    suf = _UnionFind()
    suf.add(len(an.sources))
    first_src: dict[int, int] = {}
    for a in range(n):
        r = int(roots[a])
        if r in first_src:
            suf.union(first_src[r], int(src[a]))
        else:
            first_src[r] = int(src[a])
    by_group: dict[int, list[int]] = {}
    for s in range(len(an.sources)):
        by_group.setdefault(suf.find(s), []).append(s)
    units_of: dict[int, dict[int, list[int]]] = {}
    for a in range(n):
        g = suf.find(int(src[a]))
        units_of.setdefault(g, {}).setdefault(int(roots[a]), []).append(a)
    consumers_of: dict[int, set[str]] = {}
    for c in an.consumers:
        for a in np.unique(c.ids[c.ids >= 0]):
            consumers_of.setdefault(suf.find(int(src[a])), set()).add(c.name or c.op)
    for k, (g, members) in enumerate(sorted(by_group.items(), key=lambda kv: min(kv[1]))):
        units = [np.array(v, np.int64) for v in units_of.get(g, {}).values()]
        reasons = []
        for u in units:
            for a in u:
                r = an.frozen.get(int(a))
                if r is not None and r not in reasons:
                    reasons.append(r)
        kind = "heads" if an.head_sources.intersection(members) else "channels"
        # Channels one layer loses per unit (a grouped conv's group width): the kept count is rounded in channels.
        width = min((int(np.bincount(src[u]).max()) for u in units if len(u)), default=1)
        an.groups.append(Group(f"g{k}", sorted(members), units, reasons, sorted(consumers_of.get(g, set())), kind,
                               width))
