"""Which channels go: per-atom importance (weight norms times a following BatchNorm's scale), the
kept count per group (rounded to onnxruntime's conv block), and the plan (keep mask) from ratios.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from onnxslim.graph import const_value
from onnxslim.prune.tracing import Analysis, Source


def _nchwc_block() -> int:
    """onnxruntime's blocked-conv (NCHWc) channel block on this CPU: 16 with AVX-512, 8 otherwise (AVX2, and
    a safe multiple for the vectorized GEMMs elsewhere). Channel counts that are not multiples of it
    take the slower im2col path: on the digits CNN pruned by 0.3 on an AVX-512 machine, counts of
    24/48 (--round-to 8) ran 0.93x the original's batch-64 latency, 16/48 (--round-to 16) 0.40x, and
    unrounded counts 1.3-2.3x *slower* (tools/bench_prune.py prints the table)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if " avx512f" in line else 8
    except OSError:
        pass
    return 8


DEFAULT_ROUND_TO = _nchwc_block()


def _norms(w: np.ndarray, axis: int, kind: str) -> np.ndarray:
    m = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(m).sum(1) if kind == "l1" else np.sqrt((m * m).sum(1))


def _bn_scale(an: Analysis, src: Source) -> np.ndarray | None:
    """|gamma| / sqrt(var + eps) of a BatchNormalization that alone reads the source's output."""
    node = an.graph.nodes[src.node]
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "BatchNormalization":
        return None
    bn = out.outputs[0]
    gamma, var = const_value(bn.inputs[1]), const_value(bn.inputs[4])
    if gamma is None or var is None or gamma.shape != (src.count,):
        return None
    return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + float(bn.attrs.get("epsilon", 1e-5)))


def importance(an: Analysis, kind: str = "l1", bn: bool = True, consumers: bool = False) -> np.ndarray:
    """Per-atom importance: the norm of each output channel's weights (times the BatchNorm scale that
    follows, i.e. the norm of the folded weights), normalized by the layer's mean so that every layer
    of a group has an equal say. ``consumers`` adds the norms of the input channels of readers."""
    imp = np.zeros(an.n_atoms, np.float64)
    for s in an.sources:
        node = an.graph.nodes[s.node]
        w = const_value(node.inputs[s.weight_index])
        v = _norms(w, s.weight_axis, kind)
        if bn:
            scale = _bn_scale(an, s)
            if scale is not None:
                v = v * scale
        mean = v.mean() if v.size else 0.0
        imp[s.out_ids] += v / mean if mean > 0 else v
    if consumers:
        for c in an.consumers:
            node = an.graph.nodes[c.node]
            w = const_value(node.inputs[1])
            if w is None:
                continue
            v = _norms(w, c.weight_axis, kind)
            mean = v.mean() if v.size else 0.0
            v = v / mean if mean > 0 else v
            ok = c.ids >= 0
            np.add.at(imp, c.ids[ok], v[ok])
    return imp


def kept_count(units: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """Units kept of ``units`` when removing ``ratio``: nearest multiple of ``round_to`` (when the group is
    at least that big), never below ``min_channels`` or 1, never above ``units``."""
    if ratio <= 0 or units <= 1:
        return units
    raw = units * (1.0 - ratio)
    if round_to > 1 and units >= round_to:
        k = int(np.floor(raw / round_to + 0.5)) * round_to
        k = max(k, round_to)
    else:
        k = int(np.floor(raw + 0.5))
    return int(min(units, max(k, min(min_channels, units), 1)))


def plan(an: Analysis, ratios: dict[str, float] | float, imp: np.ndarray, *, round_to: int = 1,
         min_channels: int = 1, select: Callable[[dict[str, int]], list[tuple[str, int]]] | None = None) -> np.ndarray:
    """The atom keep mask: in each prunable group, the least important units beyond the kept count go.

    ``select`` (e.g. onnxslim.prune.refit.ReconSelector) chooses which units instead: given units to remove
    per group id, it returns (group id, unit index) pairs."""
    keep = np.ones(an.n_atoms, bool)
    removals: dict[str, int] = {}
    for g in an.groups:
        r = ratios if isinstance(ratios, (int, float)) else ratios.get(g.id, 0.0)
        if not g.prunable or r <= 0:
            continue
        # Heads are whole units already (head_dim channels each): never rounded to the conv block.
        # A unit of w channels (a grouped conv's group): round_to and min_channels count channels, not units.
        w = max(g.width, 1)
        k = kept_count(len(g.units), float(r), 1 if g.kind == "heads" else round_to // math.gcd(round_to, w),
                       1 if g.kind == "heads" else -(-min_channels // w))
        if k < len(g.units):
            removals[g.id] = len(g.units) - k
    if select is not None and removals:
        by_id = {g.id: g for g in an.groups}
        for gid, u in select(removals):
            keep[by_id[gid].units[u]] = False
    else:
        for g in an.groups:
            if g.id in removals:
                scores = np.array([imp[u].sum() for u in g.units])
                for u in np.argsort(-scores, kind="stable")[len(g.units) - removals[g.id]:]:
                    keep[g.units[u]] = False
    # A Split/Slice piece must keep a channel: bring back its most important unit.
    for seg in an.segments:
        ids = seg[seg >= 0]
        if len(ids) == len(seg) and len(ids) and not keep[ids].any():
            best = ids[np.argmax(imp[ids])]
            root = an.root(int(best))
            keep[[a for a in range(an.n_atoms) if an.root(a) == root]] = True
    return keep
