"""Attention heads as pruning units: finding the multi-head structure of transformer encoders.

A BERT-family attention block, as Hugging Face / PyTorch export it, is

    Q/K/V = MatMul(x, W) + b                      [B, S, H*D]   (channel tracer: sources)
    Reshape(Q/K/V, [B, S, H, D]) -> Transpose -> MatMul(Q, K^T) -> scale -> + mask -> Softmax
        -> MatMul(., V) -> Transpose -> Reshape([B, S, H*D]) -> output projection   (consumer)

The reshape targets are a constant or ``Concat(Gather(Shape(x)), H, D)``. The channel tracer cannot follow
a channel through the split into heads (its layouts have one channel axis) and freezes on the Shape that
reads the projection. This module proves the block can lose whole heads: every tensor between the split
reshapes and the merge reshape keeps the head axis as a batch axis (Transpose moves it, MatMul between two
such tensors and Softmax over another axis keep it, the mask broadcasts over it), and the Shapes involved
read only the batch/sequence dims. Then the Q, K and V channels of head h become one unit (the same heads
go from all three), the merged output carries the same units into the output projection (a consumer:
its input rows go and the refit rebuilds it), and the head counts of the reshape targets are rewritten.
Anything else in the block (an op not listed, a reader of the head count, a graph output) leaves the
block to the channel tracer, which keeps it whole and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, is_default_domain

# Ops between the split and the merge that act on each element (or broadcast) without mixing heads.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Cast", "Dropout", "Identity",
                          "Clip", "Neg", "Exp", "Tanh", "Sqrt", "Reciprocal"})


@dataclass
class _Target:
    """Where a reshape target's entry lives: a constant target, or one constant piece of a Concat."""

    pos: int  # index of the entry in the shape vector
    concat: gs.Node | None  # the Concat building the target, None: the target is a constant
    piece: int  # the Concat input holding the entry
    offset: int  # the entry's index inside that piece (or the constant)
    value: int


@dataclass
class HeadBlock:
    """One attention block whose heads can be pruned (node indexes into the analysed graph)."""

    heads: int
    head_dim: int
    splits: list[int]  # the Q, K, V reshapes [B,S,H*D] -> [B,S,H,D]
    split_targets: list[_Target]  # their head-count entries
    merge: int  # the reshape [B,S,H,D] -> [B,S,H*D]
    merge_target: _Target | None  # its channel entry (None: -1, nothing to rewrite)
    shapes: list[int] = field(default_factory=list)  # Shape nodes of the projections, reading B/S only


def _shape(t: gs.Tensor) -> list | None:
    v = const_value(t)
    if v is not None:
        return list(np.asarray(v).shape)
    return None if t.shape is None else list(t.shape)


def _ints(t: gs.Tensor) -> list[int] | None:
    v = const_value(t)
    if v is None or np.asarray(v).dtype.kind not in "iu":
        return None
    return [int(x) for x in np.asarray(v).ravel()]


def _target_entry(node: gs.Node, pos: int) -> tuple[list[int | None], _Target | None]:
    """The reshape target's entries (None where computed) and where entry ``pos`` can be rewritten."""
    t = node.inputs[1]
    v = _ints(t)
    if v is not None:
        return v, (_Target(pos, None, 1, pos, v[pos]) if pos < len(v) else None)
    cat = t.inputs[0] if len(t.inputs) == 1 else None
    if cat is None or cat.op != "Concat" or int(cat.attrs.get("axis", 0)) != 0:
        return [], None
    entries: list[int | None] = []
    where = None
    for k, piece in enumerate(cat.inputs):
        pv = _ints(piece)
        shape = _shape(piece)
        n = len(pv) if pv is not None else (int(shape[0]) if shape and len(shape) == 1
                                            and isinstance(shape[0], (int, np.integer)) else None)
        if n is None:
            return [], None
        for j in range(n):
            if len(entries) == pos and pv is not None:
                where = _Target(pos, cat, k, j, pv[j])
            entries.append(None if pv is None else pv[j])
    return entries, where


def _split_candidate(node: gs.Node) -> tuple[int, int, _Target | None] | None:
    """(H, D, head-count entry or None when it is -1) of a Reshape [B,S,H*D] -> [B,S,H,D]: H and D constant,
    one of them may be -1 (inferred from the channels, and then still right after heads go)."""
    if node.op != "Reshape" or node.attrs.get("allowzero", 0):
        return None
    si, so = _shape(node.inputs[0]), _shape(node.outputs[0])
    if si is None or so is None or len(si) != 3 or len(so) != 4 or not isinstance(si[2], (int, np.integer)):
        return None
    c = int(si[2])
    entries, where = _target_entry(node, 2)
    if len(entries) != 4 or entries[2] is None or entries[3] is None:
        return None
    h, d = entries[2], entries[3]
    if h == -1 and d > 0 and c % d == 0:
        h, where = c // d, None
    elif h > 0 and d == -1 and c % h == 0:
        d = c // h
    if h <= 1 or d <= 0 or h * d != c or (where is None and entries[2] != -1):
        return None
    return h, d, where


def _gather_reads_only(shape_node: gs.Node, rank: int, forbidden: int) -> bool:
    """The Shape's output feeds only Gathers of constant indices, none of them axis ``forbidden``."""
    if shape_node.attrs.get("start") is not None or shape_node.attrs.get("end") is not None:
        return False
    readers = shape_node.outputs[0].outputs
    if not readers:
        return True
    for r in readers:
        if r.op != "Gather" or int(r.attrs.get("axis", 0)) != 0 or r.inputs[0] is not shape_node.outputs[0]:
            return False
        idx = _ints(r.inputs[1])
        if idx is None or any((i + rank if i < 0 else i) == forbidden for i in idx):
            return False
    return True


class _Walk:
    """Forward walk from the split reshapes: head axis per tensor, the blocks they form, what breaks one."""

    def __init__(self, graph: gs.Graph, opset: int) -> None:
        self.g, self.opset = graph, opset
        self.axis: dict[str, int] = {}  # tensor -> its head axis
        self.comp: dict[str, int] = {}  # tensor -> component (union-find over split candidates)
        self.parent: list[int] = []
        self.broken: dict[int, str] = {}
        self.merges: dict[int, list[int]] = {}  # component -> merge node indexes
        self.probes: list[tuple[int, str, int, str]] = []  # (component, tensor, axis from the right, where)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra != rb:  # rb's findings move to the surviving root ra
            self.parent[rb] = ra
            if rb in self.broken:
                self.broken.setdefault(ra, self.broken.pop(rb))
            if rb in self.merges:
                self.merges.setdefault(ra, []).extend(self.merges.pop(rb))
        return ra

    def mark(self, t: gs.Tensor, axis: int, comp: int) -> None:
        self.axis[t.name], self.comp[t.name] = axis, comp

    def fail(self, comp: int, why: str) -> None:
        self.broken.setdefault(self.find(comp), why)

    def visit(self, i: int, node: gs.Node) -> None:
        ins = [(k, t) for k, t in enumerate(node.inputs) if t.name in self.axis]
        if not ins:
            return
        comp = ins[0][1].name
        c = self.comp[comp]
        for _, t in ins[1:]:
            c = self.union(c, self.comp[t.name])
        c = self.find(c)
        axes = {self.axis[t.name] for _, t in ins}
        where = f"{node.op} '{node.name}'"
        if not is_default_domain(node):
            self.fail(c, f"{where} is a custom op")
            return
        r = len(_shape(ins[0][1]) or []) or None
        if len(axes) != 1 or r is None:
            self.fail(c, f"{where} combines tensors with the heads on different axes")
            return
        h = axes.pop()
        out = node.outputs[0] if node.outputs else None
        op = node.op
        if op == "Reshape":
            if (h == 2 and r == 4 and len(_shape(node.outputs[0]) or []) == 3 and ins[0][0] == 0):
                self.merges.setdefault(c, []).append(i)
                return
            self.fail(c, f"{where} reshapes the head axis")
        elif op == "Transpose":
            perm = [int(p) for p in node.attrs.get("perm", list(range(r - 1, -1, -1)))]
            self.mark(out, perm.index(h), c)
        elif op == "MatMul":
            if len(ins) != 2 or h >= r - 2:
                self.fail(c, f"{where} multiplies along the head axis")
                return
            self.mark(out, h, c)
        elif op in ("Softmax", "LogSoftmax"):
            a = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1))
            a = a + r if a < 0 else a
            if a == h or (self.opset < 13 and a < h):
                self.fail(c, f"{where} normalizes over the head axis")
                return
            self.mark(out, h, c)
        elif op in _ELEMENTWISE:
            ro = len(_shape(out) or []) if out is not None else 0
            for k, t in enumerate(node.inputs):
                if not t.name or t.name in self.axis:
                    continue
                s = _shape(t)
                if s is None or any(not isinstance(x, (int, np.integer)) for x in s):
                    # e.g. the attention mask of transformers 5 exports: symbolic dims, so run it (find_heads)
                    self.probes.append((c, t.name, ro - h, f"{where}: '{t.name}'"))
                    continue
                j = h - (ro - len(s))
                if j >= 0 and s[j] != 1:
                    self.fail(c, f"{where}: '{t.name}' does not broadcast over the heads")
                    return
            if any(o.outputs for o in node.outputs[1:]):
                self.fail(c, f"{where}: its secondary output is used")
            self.mark(out, h + (len(_shape(out) or []) - r if _shape(out) else 0), c)
        elif op == "Shape":
            if not _gather_reads_only(node, r, h):
                self.fail(c, f"{where} reads the head count")
        else:
            self.fail(c, f"{where}: op {op} between the head split and merge is not supported")


def find_heads(graph: gs.Graph) -> list[HeadBlock]:
    """The attention blocks of ``graph`` (toposorted, shapes inferred) whose heads can be pruned."""
    opset = int(graph.opset or 13)
    walk = _Walk(graph, opset)
    splits: dict[int, tuple[int, int, _Target, int]] = {}  # node -> (H, D, entry, component)
    for i, node in enumerate(graph.nodes):
        cand = _split_candidate(node) if is_default_domain(node) else None
        if cand is not None and node.inputs[0].name not in walk.axis:
            comp = len(walk.parent)
            walk.parent.append(comp)
            splits[i] = (*cand, comp)
            walk.mark(node.outputs[0], 2, comp)
            continue
        walk.visit(i, node)
    for comp, name, from_right, where in _probe(graph, walk):
        walk.fail(comp, where)
    outputs = {t.name for t in graph.outputs}
    for name in outputs & set(walk.axis):
        walk.fail(walk.comp[name], f"'{name}' is a graph output")
    by_comp: dict[int, list[int]] = {}
    for i, (_, _, _, comp) in splits.items():
        by_comp.setdefault(walk.find(comp), []).append(i)
    blocks = []
    for comp, members in sorted(by_comp.items()):
        merges = walk.merges.get(comp, [])
        hd = {splits[i][:2] for i in members}
        if comp in walk.broken or len(members) != 3 or len(merges) != 1 or len(hd) != 1:
            continue
        heads, dim = hd.pop()
        merge = graph.nodes[merges[0]]
        entries, where = _target_entry(merge, 2)
        if len(entries) != 3:
            continue
        if entries[2] == -1:
            where = None
        elif entries[2] is None or entries[2] != heads * dim or where is None:
            continue
        shapes = []
        ok = True
        for i in members:
            x = graph.nodes[i].inputs[0]
            for r in x.outputs:
                if r.op == "Shape":
                    if not _gather_reads_only(r, 3, 2):
                        ok = False
                    shapes.append(graph.nodes.index(r))
        if ok:
            blocks.append(HeadBlock(heads, dim, sorted(members), [splits[i][2] for i in sorted(members)],
                                    merges[0], where, shapes))
    return blocks


PROBE_DIM = 3  # every dynamic input dim of the probe run (not 1: a broadcast dim must show as 1 on its own)


def _probe(graph: gs.Graph, walk: _Walk) -> list[tuple[int, str, int, str]]:
    """The probed tensors (computed from graph inputs and constants only, e.g. an attention mask whose dims
    shape inference leaves symbolic) that do not broadcast over the heads: their subgraph is run once in
    onnxruntime on dummy inputs with every dynamic dim PROBE_DIM, and the dim facing the head axis must be 1."""
    probes = [p for p in walk.probes if walk.find(p[0]) not in walk.broken]
    if not probes:
        return []
    bad = []
    producers = {t.name: n for n in graph.nodes for t in n.outputs}
    names = sorted({p[1] for p in probes})
    needed, stack, inputs = [], list(names), set()
    seen: set[str] = set()
    graph_inputs = {t.name for t in graph.inputs}
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph_inputs:
            inputs.add(name)
            continue
        n = producers.get(name)
        if n is None:
            continue  # an initializer
        if any(o.name in walk.axis for o in n.outputs):
            return [(p[0], p[1], p[2], f"{p[3]} depends on the heads") for p in probes]
        needed.append(n)
        stack.extend(t.name for t in n.inputs if t.name)
    try:
        import onnxruntime as ort

        sub = graph.copy()
        tensors = sub.tensors()
        sub.inputs = [t for t in sub.inputs if t.name in inputs]
        sub.outputs = [tensors[n] for n in names]
        for t in sub.outputs:
            t.dtype = t.dtype or np.float32
        sub.cleanup()
        model = gs.export_onnx(sub)
        feeds = {}
        for t in sub.inputs:
            shape = [d if isinstance(d, (int, np.integer)) and d >= 0 else PROBE_DIM for d in (t.shape or [])]
            feeds[t.name] = np.zeros(shape, dtype=np.dtype(t.dtype) if t.dtype is not None else np.float32)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = dict(zip(names, sess.run(names, feeds)))
    except Exception as e:  # noqa: BLE001 - without the probe the block stays whole, with the reason
        return [(p[0], p[1], p[2], f"{p[3]} has an unknown shape ({type(e).__name__})") for p in probes]
    for comp, name, from_right, where in probes:
        shape = got[name].shape
        if from_right <= len(shape) and shape[len(shape) - from_right] != 1:
            bad.append((comp, name, from_right, f"{where} does not broadcast over the heads"))
    return bad


def _rewrite(g: gs.Graph, j: int, target: _Target, value: int) -> None:
    """Set entry ``target`` of node ``j``'s reshape target to ``value`` (new constants, new Concat: the old
    ones may be shared with blocks that keep another count)."""
    nd = g.nodes[j]
    tag = f"{nd.name or 'reshape'}_heads_pruned_{j}"
    if target.concat is None:
        v = np.array(const_value(nd.inputs[1])).copy()
        v[target.pos] = value
        nd.inputs[1] = gs.Constant(f"{tag}_shape", v)
        return
    cat = nd.inputs[1].inputs[0]
    pieces = list(cat.inputs)
    pv = np.array(const_value(pieces[target.piece])).copy()
    pv.reshape(-1)[target.offset] = value
    pieces[target.piece] = gs.Constant(f"{tag}_piece", pv)
    out = gs.Variable(f"{tag}_target", dtype=nd.inputs[1].dtype, shape=nd.inputs[1].shape)
    g.nodes.append(gs.Node("Concat", f"{tag}_concat", attrs={"axis": 0}, inputs=pieces, outputs=[out]))
    nd.inputs[1] = out


class HeadTracker:
    """The channel tracer's hook for attention blocks (see module doc): it claims the blocks' reshapes
    and the Shapes of the projections, unifies each head's Q/K/V channels, carries them to the merge."""

    def __init__(self, an, blocks: list[HeadBlock]) -> None:
        self.an = an
        self.blocks = blocks
        self.claimed: dict[int, tuple[str, HeadBlock]] = {}
        for b in blocks:
            for i in b.splits:
                self.claimed[i] = ("split", b)
            for i in b.shapes:
                self.claimed[i] = ("shape", b)
            self.claimed[b.merge] = ("merge", b)
        self.seen: dict[int, list] = {id(b): [] for b in blocks}

    def visit(self, i: int, node: gs.Node, ins: list, set_layout: Callable) -> None:
        from onnxslim.prune.tracing import Layout, keep_positions

        role, b = self.claimed[i]
        if role == "shape":
            return  # reads batch and sequence only (checked by find_heads)
        if role == "split":
            lay = ins[0]
            ok = lay is not None and lay.axis == 2 and len(lay.ids) == b.heads * b.head_dim and (lay.ids >= 0).all()
            if lay is not None and not ok:
                self.an.freeze(lay.ids, f"Reshape '{node.name}': the attention heads carry channels the "
                                        "projection does not own")
            self.seen[id(b)].append(lay if ok else None)
            return
        lays = self.seen[id(b)]
        if len(lays) != len(b.splits) or any(x is None for x in lays):
            for x in lays:
                if x is not None:
                    self.an.freeze(x.ids, f"attention '{node.name}': not all of Q, K, V are prunable projections")
            return
        d = b.head_dim
        for h in range(b.heads):
            atoms = np.concatenate([x.ids[h * d:(h + 1) * d] for x in lays])
            for a in atoms[1:]:
                self.an.uf.union(int(atoms[0]), int(a))
        for x in lays:
            for a in np.unique(x.ids):
                self.an.head_sources.add(self.an.atom_source[int(a)])
        ids = lays[-1].ids
        heads_of = ids[::d]

        def count(keep: np.ndarray) -> int:
            return int(keep_positions(heads_of, keep).sum())

        for j, t in zip(b.splits, b.split_targets):
            if t is not None:  # None: the head count is -1, inferred from the channels
                self.an.fixups.append((j, lambda g, k, keep, t=t: _rewrite(g, k, t, count(keep))))
        if b.merge_target is not None:
            mt = b.merge_target
            self.an.fixups.append((i, lambda g, k, keep: _rewrite(g, k, mt, count(keep) * d)))
        set_layout(node.outputs[0], Layout(2, ids))
