"""Channel dependency analysis for structured pruning.

Every output channel of a layer with constant weights (Conv that is not plain depthwise, ConvTranspose,
Gemm, MatMul by a 2-D initializer) is an *atom*. The tracer walks the graph in topological order and
records, for every tensor it reaches, a *layout*: the channel axis and, per position along it, the
atom that position carries (-1: a channel no pruning decision touches, e.g. one that came from a
graph input). Ops move layouts around (Transpose moves the axis, Concat concatenates layouts,
Split/Slice cut them, Flatten/Reshape repeat each atom over the block of features it becomes, a
channel shuffle Reshape -> Transpose -> Reshape permutes them) and
record the rewrites pruning needs: slices of constants (weights, biases, BatchNorm parameters,
per-channel constants of elementwise ops, the input channels of consumers) and fix-ups of attributes
and shape constants (depthwise and grouped ``group``, Split sizes, Slice bounds, Reshape targets, Resize
sizes, channel shuffles). A grouped conv unifies each group's input and output channels: it loses whole
groups.

Elementwise ops between two tracked tensors (residual Add, gating Mul) *unify* the atoms they
align: the channels must be removed together. A union-find over atoms gives the *units* (sets of
atoms removed together); sources that share a unit form a *group*, the thing a ratio applies to.
Anything the tracer cannot prove safe *freezes* the atoms involved, with a reason; a group with any
frozen atom is left whole and the reason goes to the report. Graph inputs and outputs are never
touched: a tracked tensor that is a graph output freezes its atoms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, has_subgraph, is_default_domain, outer_scope_names


# Elementwise ops of one tensor input: every output element depends on the same element of the input.
UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Softplus", "Softsign",
    "Elu", "Selu", "Celu", "Mish", "Identity", "Dropout", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Cast",
    "ThresholdedRelu", "Shrink", "Not", "IsNaN", "IsInf", "Swish", "FastGelu",
})


# Elementwise ops with numpy broadcasting over several inputs.
BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where", "Clip", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
})


POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass
class Layout:
    axis: int
    ids: np.ndarray  # atom id per position along ``axis``; -1 = untouched channel


@dataclass
class SliceEdit:
    """Keep only the kept positions of ``ids`` along ``axis`` of constant input ``index`` of node ``node``."""

    node: int  # index into Analysis.graph.nodes
    index: int
    axis: int
    ids: np.ndarray


@dataclass
class Source:
    """A layer whose output channels are atoms."""

    node: int
    name: str
    op: str
    first: int  # first atom id
    count: int
    weight_index: int  # input holding the weights
    weight_axis: int  # axis of the weights that indexes output channels
    out_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Consumer:
    """A channel-mixing layer (the refit targets) reading a tracked tensor."""

    node: int
    name: str
    op: str
    ids: np.ndarray  # layout of the tracked input (channel positions it reads)
    weight_axis: int  # axis of the weights indexing those input channels
    out_ids: np.ndarray | None  # its own output atoms when it is also a source


@dataclass
class Group:
    id: str
    sources: list[int]  # indexes into Analysis.sources
    units: list[np.ndarray]  # atoms removed together, one array per unit
    reasons: list[str]
    consumers: list[str] = field(default_factory=list)
    kind: str = "channels"  # "heads": units are attention heads (onnxslim.prune.attention), not rounded
    width: int = 1  # channels of one layer per unit: a grouped conv's group width (rounding counts channels)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def channels(self) -> int:
        return len(self.units)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _ints(v) -> list[int] | None:
    if v is None:
        return None
    a = np.asarray(v)
    if a.dtype.kind not in "iu":
        return None
    return [int(x) for x in a.ravel()]


def _shape(t: gs.Tensor) -> list | None:
    if isinstance(t, gs.Constant):
        return list(t.shape)
    v = const_value(t)
    if v is not None:
        return list(np.asarray(v).shape)
    return None if t.shape is None else list(t.shape)


def _rank(t: gs.Tensor) -> int | None:
    s = _shape(t)
    return None if s is None else len(s)


def _dim(shape: list | None, axis: int) -> int | None:
    if shape is None or not 0 <= axis < len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0:
            return None
        out *= int(d)
    return out


def keep_positions(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Boolean mask of the positions of a layout that survive the atom keep mask."""
    ids = np.asarray(ids)
    return (ids < 0) | keep[np.clip(ids, 0, None)] if len(keep) else np.ones(len(ids), bool)


class Analysis:
    """The result of tracing one graph: atoms, sources, edits, fix-ups, groups (see module doc)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.opset = int(graph.opset or 13)
        self.uf = _UnionFind()
        self.atom_source: list[int] = []
        self.sources: list[Source] = []
        self.consumers: list[Consumer] = []
        self.edits: list[SliceEdit] = []
        # Fix-ups rewrite attributes or shape constants: f(graph, node_index, keep) after the edits.
        self.fixups: list[tuple[int, Callable[[gs.Graph, int, np.ndarray], None]]] = []
        self.segments: list[np.ndarray] = []  # Split/Slice pieces: each must keep at least one channel
        self.frozen: dict[int, str] = {}
        self.layouts: dict[str, Layout] = {}
        self.groups: list[Group] = []
        self.node_index: dict[int, int] = {}
        self.head_sources: set[int] = set()  # sources (Q/K/V projections) whose units are attention heads

    # --- atoms ------------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return len(self.atom_source)

    def new_atoms(self, n: int, source: int) -> np.ndarray:
        start = self.uf.add(n)
        self.atom_source.extend([source] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def freeze(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is None:
            return
        for a in np.unique(np.asarray(ids)):
            if a >= 0 and int(a) not in self.frozen:
                self.frozen[int(a)] = reason

    def unify(self, a: np.ndarray, b: np.ndarray, where: str) -> np.ndarray:
        """Positions of ``a`` and ``b`` carry the same channel from now on: their atoms go together."""
        for x, y in zip(a.tolist(), b.tolist()):
            if x >= 0 and y >= 0:
                self.uf.union(x, y)
            elif x >= 0 or y >= 0:
                self.freeze(np.array([max(x, y)]), f"{where}: combined with a channel that cannot be pruned")
        return np.where(a >= 0, a, b)

    def root(self, a: int) -> int:
        return self.uf.find(a)


class _Tracer:
    def __init__(self, graph: gs.Graph) -> None:
        from onnxslim.prune.attention import HeadTracker, find_heads

        self.g = graph
        self.an = Analysis(graph)
        self.heads = HeadTracker(self.an, find_heads(graph))

    # --- helpers ----------------------------------------------------------------------------------
    def lay(self, t: gs.Tensor) -> Layout | None:
        return self.an.layouts.get(t.name) if t is not None and t.name else None

    def set(self, t: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None and t.name:
            self.an.layouts[t.name] = layout

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            lay = self.lay(t)
            if lay is not None:
                self.an.freeze(lay.ids, reason)

    def edit(self, i: int, index: int, axis: int, ids: np.ndarray) -> None:
        self.an.edits.append(SliceEdit(i, index, axis, np.asarray(ids, np.int64)))

    def where(self, node: gs.Node) -> str:
        return f"{node.op} '{node.name}'" if node.name else node.op

    def attr_axis(self, node: gs.Node, rank: int | None, default: int) -> int | None:
        axis = int(node.attrs.get("axis", default))
        if axis < 0:
            if rank is None:
                return None
            axis += rank
        return axis

    def input_ints(self, node: gs.Node, index: int) -> list[int] | None:
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        return _ints(const_value(node.inputs[index]))

    def has_input(self, node: gs.Node, index: int) -> bool:
        return index < len(node.inputs) and bool(node.inputs[index].name)

    def used(self, t: gs.Tensor) -> bool:
        return bool(t.name) and (bool(t.outputs) or any(o is t for o in self.g.outputs))

    # --- main loop --------------------------------------------------------------------------------
    def run(self) -> Analysis:
        g = self.g
        for i, node in enumerate(g.nodes):
            self.an.node_index[id(node)] = i
            self.visit(i, node)
        for t in g.outputs:
            lay = self.lay(t)
            if lay is not None:
                self.an.freeze(lay.ids, f"reaches graph output '{t.name}'")
        for name in outer_scope_names(g):
            lay = self.an.layouts.get(name)
            if lay is not None:
                self.an.freeze(lay.ids, f"'{name}' is read inside a subgraph")
        return self.an

    def visit(self, i: int, node: gs.Node) -> None:
        ins = [self.lay(t) for t in node.inputs]
        tracked = any(x is not None for x in ins)
        if has_subgraph(node):
            self.freeze_inputs(node, f"{self.where(node)} has a subgraph")
            return
        if not is_default_domain(node):
            self.freeze_inputs(node, f"custom op {node.domain}.{node.op}")
            return
        if i in self.heads.claimed:  # attention split/merge reshapes and the Shapes beside them
            self.heads.visit(i, node, ins, self.set)
            return
        if node.op in WEIGHTED:
            getattr(self, f"op_{node.op}")(i, node, ins)
            return
        if not tracked:
            return
        handler = getattr(self, f"op_{node.op}", None)
        if node.op in UNARY:
            handler = self.op_unary
        elif node.op in BROADCAST:
            handler = self.op_broadcast
        elif node.op in POOLS:
            handler = self.op_pool
        elif node.op in REDUCE:
            handler = self.op_reduce
        if handler is None:
            self.freeze_inputs(node, f"{self.where(node)}: op {node.op} is not supported by the channel tracer")
            return
        if ins[0] is None and handler not in (self.op_broadcast, self.op_Concat):
            self.freeze_inputs(node, f"{self.where(node)}: channels enter through a parameter input")
            return
        handler(i, node, ins)

    # --- sources / consumers ----------------------------------------------------------------------
    def add_source(self, i: int, node: gs.Node, count: int, weight_index: int, weight_axis: int) -> np.ndarray:
        src = len(self.an.sources)
        ids = self.an.new_atoms(count, src)
        self.an.sources.append(Source(i, node.name, node.op, int(ids[0]) if count else 0, count, weight_index,
                                      weight_axis, ids))
        return ids

    def add_consumer(self, i: int, node: gs.Node, ids: np.ndarray, weight_axis: int) -> Consumer:
        c = Consumer(i, node.name, node.op, ids, weight_axis, None)
        self.an.consumers.append(c)
        return c

    def op_Conv(self, i: int, node: gs.Node, ins: list) -> None:
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        lx = ins[0]
        if w is None or w.ndim < 3:
            self.freeze_inputs(node, f"{self.where(node)} has non-constant weights")
            return
        group = int(node.attrs.get("group", 1))
        cout, cin = int(w.shape[0]), int(w.shape[1]) * group
        has_b = self.has_input(node, 2)
        b_const = has_b and const_value(node.inputs[2]) is not None
        if has_b and not b_const:
            self.freeze_inputs(node, f"{self.where(node)} has a non-constant bias")
            return
        if group == 1:
            self.channel_layer(i, node, lx, cin, cout, w_in_axis=1, w_out_axis=0, has_b=has_b)
        elif group == cin == cout and w.shape[1] == 1:
            # Depthwise: channel c in, channel c out. It is pruned with its producer.
            if lx is None:
                return
            if lx.axis != 1 or len(lx.ids) != cin:
                self.an.freeze(lx.ids, f"{self.where(node)} reads channels on another axis")
                return
            self.edit(i, 1, 0, lx.ids)
            if has_b:
                self.edit(i, 2, 0, lx.ids)
            ids = lx.ids

            def fix_group(g: gs.Graph, j: int, keep: np.ndarray, ids: np.ndarray = ids) -> None:
                g.nodes[j].attrs["group"] = int(keep_positions(ids, keep).sum())

            self.an.fixups.append((i, fix_group))
            self.set(node.outputs[0], Layout(1, ids))
        else:
            self.grouped_conv(i, node, lx, group, cin, cout, has_b)

    def grouped_conv(self, i: int, node: gs.Node, lx: Layout | None, group: int, cin: int, cout: int,
                     has_b: bool) -> None:
        """A grouped Conv (1 < group, not plain depthwise) loses whole groups: group k's input channels, its
        output channels and its weights go together (one unit), and ``group`` counts the groups kept.

        Why whole groups rather than the same in-group channels of every group (Torch-Pruning's
        ``ch_groups``): the kept groups compute exactly what they did (no refit, no error), the in-group
        width stays what onnxruntime's blocked conv needs (channels per group a multiple of 8), and the
        channel counts stay multiples of the group width; removing in-group channels of RegNet's 13 or 55
        groups of 8 can never give a count that is a multiple of 8."""
        where = self.where(node)
        w_in, w_out = cin // group, cout // group
        ids = self.add_source(i, node, cout, 1, 0)
        self.edit(i, 1, 0, ids)
        if has_b:
            self.edit(i, 2, 0, ids)
        self.set(node.outputs[0], Layout(1, ids))
        if cout % group:
            self.an.freeze(ids, f"{where}: {cout} output channels do not divide into {group} groups")
            return
        if lx is None or lx.axis != 1 or len(lx.ids) != cin:
            reason = (f"{where} is a grouped convolution (group={group}) reading channels that cannot be pruned"
                      if lx is None else f"{where} reads channels on another axis")
            self.an.freeze(ids, reason)
            if lx is not None:
                self.an.freeze(lx.ids, reason)
            return
        for k in range(group):
            members = np.concatenate([lx.ids[k * w_in:(k + 1) * w_in], ids[k * w_out:(k + 1) * w_out]])
            if (members < 0).any():
                self.an.freeze(members, f"{where}: group {k} reads a channel that cannot be pruned")
                continue
            for a in members[1:]:
                self.an.uf.union(int(members[0]), int(a))

        def fix_group(g: gs.Graph, j: int, keep: np.ndarray, ids: np.ndarray = ids, w_out: int = w_out) -> None:
            g.nodes[j].attrs["group"] = int(keep_positions(ids, keep).sum()) // w_out

        self.an.fixups.append((i, fix_group))

    def op_ConvTranspose(self, i: int, node: gs.Node, ins: list) -> None:
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        lx = ins[0]
        group = int(node.attrs.get("group", 1))
        has_b = self.has_input(node, 2)
        if w is None or w.ndim < 3 or group != 1 or (has_b and const_value(node.inputs[2]) is None):
            self.freeze_inputs(node, f"{self.where(node)}: only group-1 ConvTranspose with constant weights is pruned")
            return
        self.channel_layer(i, node, lx, int(w.shape[0]), int(w.shape[1]), w_in_axis=0, w_out_axis=1, has_b=has_b)

    def channel_layer(self, i: int, node: gs.Node, lx, cin: int, cout: int, *, w_in_axis: int, w_out_axis: int,
                      has_b: bool) -> None:
        """A group-1 Conv/ConvTranspose: its input channels follow the producer, its output channels are a source."""
        cons = None
        if lx is not None:
            if lx.axis != 1 or len(lx.ids) != cin:
                self.an.freeze(lx.ids, f"{self.where(node)} reads channels on another axis")
            else:
                self.edit(i, 1, w_in_axis, lx.ids)
                cons = self.add_consumer(i, node, lx.ids, w_in_axis)
        ids = self.add_source(i, node, cout, 1, w_out_axis)
        self.edit(i, 1, w_out_axis, ids)
        if has_b:
            self.edit(i, 2, 0, ids)
        if cons is not None:
            cons.out_ids = ids
        self.set(node.outputs[0], Layout(1, ids))

    def op_Gemm(self, i: int, node: gs.Node, ins: list) -> None:
        b = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        la = ins[0]
        if b is None or b.ndim != 2 or any(x is not None for x in ins[1:]):
            self.freeze_inputs(node, f"{self.where(node)}: Gemm without a constant 2-D weight")
            return
        trans_b = int(node.attrs.get("transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        n = int(b.shape[n_axis])
        cons = None
        if la is not None:
            if int(node.attrs.get("transA", 0)) or la.axis != 1 or len(la.ids) != b.shape[k_axis]:
                self.an.freeze(la.ids, f"{self.where(node)} reads features on another axis")
            else:
                self.edit(i, 1, k_axis, la.ids)
                cons = self.add_consumer(i, node, la.ids, k_axis)
        c = None
        if self.has_input(node, 2):
            c = const_value(node.inputs[2])
            if c is None:
                return  # a computed bias: its channels are unknown, the output stays whole
        ids = self.add_source(i, node, n, 1, n_axis)
        self.edit(i, 1, n_axis, ids)
        if c is not None and c.ndim >= 1 and c.shape[-1] == n and n > 1:
            self.edit(i, 2, c.ndim - 1, ids)
        if cons is not None:
            cons.out_ids = ids
        self.set(node.outputs[0], Layout(1, ids))

    def op_MatMul(self, i: int, node: gs.Node, ins: list) -> None:
        b = const_value(node.inputs[1])
        la = ins[0]
        if b is None or b.ndim != 2:
            self.freeze_inputs(node, f"{self.where(node)}: MatMul between activations")
            return
        ra, ro = _rank(node.inputs[0]), _rank(node.outputs[0])
        if ra is None or ro is None:
            self.freeze_inputs(node, f"{self.where(node)}: unknown rank")
            return
        cons = None
        if la is not None:
            if la.axis != ra - 1 or len(la.ids) != b.shape[0]:
                self.an.freeze(la.ids, f"{self.where(node)} reads features on another axis")
            else:
                self.edit(i, 1, 0, la.ids)
                cons = self.add_consumer(i, node, la.ids, 0)
        ids = self.add_source(i, node, int(b.shape[1]), 1, 1)
        self.edit(i, 1, 1, ids)
        if cons is not None:
            cons.out_ids = ids
        self.set(node.outputs[0], Layout(ro - 1, ids))

    # --- channel-preserving ops -------------------------------------------------------------------
    def passthrough(self, node: gs.Node, lay: Layout) -> None:
        for extra in node.outputs[1:]:
            if self.used(extra):
                self.an.freeze(lay.ids, f"{self.where(node)}: its secondary output is used")
        self.set(node.outputs[0], lay)

    def op_unary(self, i: int, node: gs.Node, ins: list) -> None:
        self.passthrough(node, ins[0])

    def op_pool(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None or lay.axis != 1:
            self.freeze_inputs(node, f"{self.where(node)} pools over the channel axis")
            return
        self.passthrough(node, lay)

    def op_BatchNormalization(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        if lay is None or lay.axis != 1 or any(x is not None for x in ins[1:]):
            self.freeze_inputs(node, f"{self.where(node)}: channel axis is not 1")
            return
        for k in range(1, len(node.inputs)):
            v = const_value(node.inputs[k])
            if v is None or v.shape != (len(lay.ids),):
                self.an.freeze(lay.ids, f"{self.where(node)} has non-constant parameters")
                return
        for k in range(1, len(node.inputs)):
            self.edit(i, k, 0, lay.ids)
        self.passthrough(node, lay)

    def op_InstanceNormalization(self, i: int, node: gs.Node, ins: list) -> None:
        self.op_BatchNormalization(i, node, ins)

    def op_LayerNormalization(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        r = _rank(node.inputs[0])
        axis = self.attr_axis(node, r, -1)
        if lay is None or axis is None or lay.axis >= axis:
            self.freeze_inputs(node, f"{self.where(node)} normalizes over the pruned axis")
            return
        self.passthrough(node, lay)

    def op_LpNormalization(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        axis = self.attr_axis(node, _rank(node.inputs[0]), -1)
        if lay is None or axis is None or axis == lay.axis:
            self.freeze_inputs(node, f"{self.where(node)} normalizes over the pruned axis")
            return
        self.passthrough(node, lay)

    def op_Softmax(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        r = _rank(node.inputs[0])
        default = -1 if self.an.opset >= 13 else 1
        axis = self.attr_axis(node, r, default)
        mixes = axis is None or (lay.axis == axis if self.an.opset >= 13 else lay.axis >= axis)
        if lay is None or mixes:
            self.freeze_inputs(node, f"{self.where(node)} normalizes over the pruned axis")
            return
        self.passthrough(node, lay)

    op_LogSoftmax = op_Softmax
    op_Hardmax = op_Softmax

    def op_broadcast(self, i: int, node: gs.Node, ins: list) -> None:
        where = self.where(node)
        ro = _rank(node.outputs[0])
        ranks = [(_rank(t) if t.name else None) for t in node.inputs]
        if ro is None or any(r is None for t, r in zip(node.inputs, ranks) if t.name):
            self.freeze_inputs(node, f"{where}: unknown rank")
            return
        axes = {lay.axis + ro - ranks[k] for k, lay in enumerate(ins) if lay is not None}
        if len(axes) != 1:
            self.freeze_inputs(node, f"{where} combines channels of different axes")
            return
        axis = axes.pop()
        lays = [lay for lay in ins if lay is not None]
        n = len(lays[0].ids)
        if any(len(lay.ids) != n for lay in lays):
            self.freeze_inputs(node, f"{where} combines tensors of different channel counts")
            return
        ids = lays[0].ids
        for lay in lays[1:]:
            ids = self.an.unify(ids, lay.ids, where)
        for k, t in enumerate(node.inputs):
            if not t.name or ins[k] is not None:
                continue
            ax = axis - (ro - ranks[k])
            if ax < 0:
                continue  # broadcast along the channel axis
            d = _dim(_shape(t), ax)
            if d == 1:
                continue
            if d == n and const_value(t) is not None:
                self.edit(i, k, ax, ids)
                continue
            self.an.freeze(ids, f"{where} combines them with '{t.name}', whose channels cannot be pruned")
        self.set(node.outputs[0], Layout(axis, ids))

    def op_Concat(self, i: int, node: gs.Node, ins: list) -> None:
        where = self.where(node)
        ro = _rank(node.outputs[0])
        axis = self.attr_axis(node, ro, 0)
        if axis is None:
            self.freeze_inputs(node, f"{where}: unknown rank")
            return
        lays = [lay for lay in ins if lay is not None]
        if all(lay.axis == axis for lay in lays):
            parts = []
            for t, lay in zip(node.inputs, ins):
                if lay is not None:
                    parts.append(lay.ids)
                    continue
                d = _dim(_shape(t), axis)
                if d is None:
                    self.freeze_inputs(node, f"{where}: input '{t.name}' has an unknown size on the channel axis")
                    return
                parts.append(np.full(d, -1, np.int64))
            self.set(node.outputs[0], Layout(axis, np.concatenate(parts)))
            return
        if any(lay.axis == axis for lay in lays):
            self.freeze_inputs(node, f"{where} concatenates along the channel axis of some inputs only")
            return
        self.op_broadcast(i, node, ins)  # concatenation along another axis: channels align like Add

    def op_Split(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        where = self.where(node)
        r = _rank(node.inputs[0])
        axis = self.attr_axis(node, r, 0)
        if axis is None:
            self.freeze_inputs(node, f"{where}: unknown rank")
            return
        outs = node.outputs
        if axis != lay.axis:
            for o in outs:
                self.set(o, lay)
            return
        n = len(lay.ids)
        if self.an.opset >= 13:
            sizes = self.input_ints(node, 1)
            if self.has_input(node, 1) and sizes is None:
                self.an.freeze(lay.ids, f"{where} has computed split sizes")
                return
        else:
            sizes = node.attrs.get("split")
            sizes = None if sizes is None else [int(s) for s in sizes]
        if sizes is None:
            k = len(outs)
            if n % k:
                self.an.freeze(lay.ids, f"{where}: uneven split of {n} channels into {k}")
                return
            sizes = [n // k] * k
        if sum(sizes) != n or len(sizes) != len(outs):
            self.an.freeze(lay.ids, f"{where}: split sizes do not match the channels")
            return
        pieces, off = [], 0
        for o, s in zip(outs, sizes):
            piece = lay.ids[off:off + s]
            pieces.append(piece)
            self.an.segments.append(piece)
            self.set(o, Layout(axis, piece))
            off += s

        def fix(g: gs.Graph, j: int, keep: np.ndarray, pieces=pieces) -> None:
            nd = g.nodes[j]
            new = [int(keep_positions(p, keep).sum()) for p in pieces]
            if int(g.opset or 13) >= 13:
                c = gs.Constant(f"{nd.name or 'split'}_sizes_pruned_{j}", np.array(new, np.int64))
                if len(nd.inputs) > 1:
                    nd.inputs[1] = c
                else:
                    nd.inputs.append(c)
                nd.attrs.pop("num_outputs", None)
            else:
                nd.attrs["split"] = new

        self.an.fixups.append((i, fix))

    def op_Slice(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        where = self.where(node)
        r = _rank(node.inputs[0])
        if self.an.opset >= 10:
            starts, ends = self.input_ints(node, 1), self.input_ints(node, 2)
            axes = self.input_ints(node, 3) if self.has_input(node, 3) else None
            steps = self.input_ints(node, 4) if self.has_input(node, 4) else None
            if (starts is None or ends is None or (self.has_input(node, 3) and axes is None)
                    or (self.has_input(node, 4) and steps is None) or any(x is not None for x in ins[1:])):
                self.an.freeze(lay.ids, f"{where} has computed bounds")
                return
        else:
            starts = [int(v) for v in node.attrs.get("starts", [])]
            ends = [int(v) for v in node.attrs.get("ends", [])]
            axes = node.attrs.get("axes")
            axes = None if axes is None else [int(v) for v in axes]
            steps = None
        axes = axes if axes is not None else list(range(len(starts)))
        if r is None:
            self.an.freeze(lay.ids, f"{where}: unknown rank")
            return
        axes = [a + r if a < 0 else a for a in axes]
        if lay.axis not in axes:
            self.set(node.outputs[0], lay)
            return
        j = axes.index(lay.axis)
        if steps is not None and steps[j] != 1:
            self.an.freeze(lay.ids, f"{where} slices channels with a step")
            return
        n = len(lay.ids)
        s, e = starts[j], ends[j]
        s = min(max(s + n if s < 0 else s, 0), n)
        e = min(max(e + n if e < 0 else e, 0), n)
        e = max(e, s)
        piece = lay.ids[s:e]
        self.an.segments.append(piece)
        self.set(node.outputs[0], Layout(lay.axis, piece))
        before, inside = lay.ids[:s], piece

        def fix(g: gs.Graph, k: int, keep: np.ndarray, j=j, before=before, inside=inside) -> None:
            nd = g.nodes[k]
            ns = int(keep_positions(before, keep).sum())
            ne = ns + int(keep_positions(inside, keep).sum())
            if int(g.opset or 13) >= 10:
                st = np.array(const_value(nd.inputs[1]), np.int64).ravel().copy()
                en = np.array(const_value(nd.inputs[2]), np.int64).ravel().copy()
                st[j], en[j] = ns, ne
                dt = np.asarray(const_value(nd.inputs[1])).dtype
                nd.inputs[1] = gs.Constant(f"{nd.name or 'slice'}_starts_pruned_{k}", st.astype(dt))
                nd.inputs[2] = gs.Constant(f"{nd.name or 'slice'}_ends_pruned_{k}", en.astype(dt))
            else:
                st, en = list(nd.attrs["starts"]), list(nd.attrs["ends"])
                st[j], en[j] = ns, ne
                nd.attrs["starts"], nd.attrs["ends"] = st, en

        self.an.fixups.append((i, fix))

    def op_Transpose(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        r = _rank(node.inputs[0])
        perm = node.attrs.get("perm")
        if perm is None:
            if r is None:
                self.an.freeze(lay.ids, f"{self.where(node)}: unknown rank")
                return
            perm = list(range(r - 1, -1, -1))
        perm = [int(p) for p in perm]
        self.set(node.outputs[0], Layout(perm.index(lay.axis), lay.ids))

    def op_Flatten(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        shape = _shape(node.inputs[0])
        r = None if shape is None else len(shape)
        k = self.attr_axis(node, r, 1)
        if k is None or lay.axis < k:
            self.an.freeze(lay.ids, f"{self.where(node)} merges the channel axis into the batch")
            return
        outer, inner = _prod(shape[k:lay.axis]), _prod(shape[lay.axis + 1:])
        if outer is None or inner is None:
            self.an.freeze(lay.ids, f"{self.where(node)}: unknown sizes around the channel axis")
            return
        self.set(node.outputs[0], Layout(1, np.tile(np.repeat(lay.ids, inner), outer)))

    def op_Reshape(self, i: int, node: gs.Node, ins: list) -> None:
        """Supported: the channel axis keeps its position, the dims before it are unchanged, and each
        channel owns one contiguous block of the new channel axis (Flatten-like, or (N,C)->(N,C,1,1))."""
        lay = ins[0]
        where = self.where(node)
        target = self.input_ints(node, 1)
        si, so = _shape(node.inputs[0]), _shape(node.outputs[0])
        if target is None or ins[1] is not None:
            self.an.freeze(lay.ids, f"{where} has a computed shape it cannot rewrite")
            return
        if self.channel_shuffle(i, node, lay, target):
            return
        a, n = lay.axis, len(lay.ids)
        inner = self._reshape_block(si, so, target, a, n, bool(node.attrs.get("allowzero", 0)))
        if inner is None:
            self.an.freeze(lay.ids, f"{where} reshapes the channel axis {list(si or [])}->{list(so or [])}")
            return
        self.set(node.outputs[0], Layout(a, np.repeat(lay.ids, inner)))
        if target[a] > 0:
            ids = lay.ids

            def fix(g: gs.Graph, k: int, keep: np.ndarray, a=a, inner=inner, ids=ids) -> None:
                nd = g.nodes[k]
                v = np.array(const_value(nd.inputs[1])).copy()
                v[a] = int(keep_positions(ids, keep).sum()) * inner
                nd.inputs[1] = gs.Constant(f"{nd.name or 'reshape'}_shape_pruned_{k}", v)

            self.an.fixups.append((i, fix))

    def channel_shuffle(self, i: int, node: gs.Node, lay: Layout, target: list[int]) -> bool:
        """Reshape [.., C, ..] -> [.., g, C/g, ..], Transpose of those two axes, Reshape back to [.., C, ..]
        (ShuffleNet's channel shuffle): a fixed permutation of the channels. The output's layout is the input's
        permuted, so channels are pruned across it freely; the fix-up rewrites the three nodes for the kept
        channels (see ``_shuffle_fix``). False when ``node`` does not start that pattern."""
        a, n = lay.axis, len(lay.ids)
        mid = node.outputs[0]
        graph_outs = {id(t) for t in self.g.outputs}
        if len(mid.outputs) != 1 or id(mid) in graph_outs or mid.outputs[0].op != "Transpose":
            return False
        tr = mid.outputs[0]
        perm = [int(p) for p in tr.attrs.get("perm", [])]
        t2 = tr.outputs[0]
        if len(t2.outputs) != 1 or id(t2) in graph_outs or t2.outputs[0].op != "Reshape":
            return False
        back = t2.outputs[0]
        si, sm, so = _shape(node.inputs[0]), _shape(mid), _shape(back.outputs[0])
        back_target = self.input_ints(back, 1)
        if si is None or sm is None or so is None or back_target is None or self.lay(back.inputs[1]) is not None:
            return False
        d0, d1 = _dim(sm, a), _dim(sm, a + 1)
        swap = list(range(len(sm)))
        if a + 1 < len(swap):
            swap[a], swap[a + 1] = a + 1, a
        if (d0 is None or d1 is None or d0 * d1 != n or len(sm) != len(si) + 1 or perm != swap
                or list(sm[:a]) + list(sm[a + 2:]) != list(si[:a]) + list(si[a + 1:]) or list(so) != list(si)
                or len(target) != len(sm) or len(back_target) != len(so) or node.attrs.get("allowzero", 0)
                or back.attrs.get("allowzero", 0) or target[a] not in (d0, -1) or target[a + 1] not in (d1, -1)
                or back_target[a] not in (n, -1)):
            return False
        order = np.arange(n).reshape(d0, d1).T.ravel()  # output position p holds input channel order[p]
        self.set(back.outputs[0], Layout(a, lay.ids[order]))
        ids = lay.ids

        def fix(g: gs.Graph, k: int, keep: np.ndarray, a=a, d0=d0, d1=d1, ids=ids, order=order) -> None:
            _shuffle_fix(g.nodes[k], keep_positions(ids, keep), a, d0, d1, order)

        self.an.fixups.append((i, fix))
        return True

    @staticmethod
    def _reshape_block(si: list | None, so: list | None, target: list[int], a: int, n: int,
                       allowzero: bool) -> int | None:
        """Features per channel on the output axis ``a``, or None when the reshape is not of that form."""
        if si is None or so is None or allowzero or len(target) != len(so) or a >= len(so) or a >= len(si):
            return None
        for d in range(a):  # leading dims copied, equal, or (batch only) inferred
            if not (target[d] == 0 or (_dim(si, d) is not None and target[d] == si[d]) or (target[d] == -1 and a == 1)):
                return None
        out_c, rest_in, rest_out = _dim(so, a), _prod(si[a + 1:]), _prod(so[a + 1:])
        if out_c is None or rest_in is None or rest_out is None or out_c % n:
            return None
        inner = out_c // n
        if rest_in != inner * rest_out or (target[a] == 0 and inner != 1):
            return None
        return inner

    def op_Squeeze(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        r = _rank(node.inputs[0])
        axes = node.attrs.get("axes") if self.an.opset < 13 else self.input_ints(node, 1)
        if axes is None and r is not None:
            shape = _shape(node.inputs[0])
            static = all(_dim(shape, d) is not None for d in range(r))
            axes = [d for d, s in enumerate(shape) if s == 1] if static else None
        if axes is None or r is None:
            self.an.freeze(lay.ids, f"{self.where(node)}: unknown axes")
            return
        axes = [a + r if a < 0 else a for a in axes]
        if lay.axis in axes:
            self.an.freeze(lay.ids, f"{self.where(node)} squeezes the channel axis")
            return
        self.set(node.outputs[0], Layout(lay.axis - sum(a < lay.axis for a in axes), lay.ids))

    def op_Unsqueeze(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        ro = _rank(node.outputs[0])
        axes = node.attrs.get("axes") if self.an.opset < 13 else self.input_ints(node, 1)
        if axes is None or ro is None:
            self.an.freeze(lay.ids, f"{self.where(node)}: unknown axes")
            return
        axis = lay.axis
        for a in sorted(x + ro if x < 0 else x for x in axes):
            if a <= axis:
                axis += 1
        self.set(node.outputs[0], Layout(axis, lay.ids))

    def op_Pad(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        r = _rank(node.inputs[0])
        if self.an.opset < 11:
            pads = node.attrs.get("pads")
            pads = None if pads is None else [int(p) for p in pads]
            axes = None
        else:
            pads = self.input_ints(node, 1)
            axes = self.input_ints(node, 3) if self.has_input(node, 3) else None
            if any(x is not None for x in ins[1:]) or (self.has_input(node, 3) and axes is None):
                pads = None
        if pads is None or r is None:
            self.freeze_inputs(node, f"{self.where(node)} has computed pads")
            return
        axes = [a + r if a < 0 else a for a in axes] if axes is not None else list(range(r))
        k = len(axes)
        if lay.axis in axes:
            j = axes.index(lay.axis)
            if pads[j] != 0 or pads[j + k] != 0:
                self.an.freeze(lay.ids, f"{self.where(node)} pads the channel axis")
                return
        self.set(node.outputs[0], lay)

    def op_Resize(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        where = self.where(node)
        crop = node.attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
        if any(x is not None for x in ins[1:]) or crop:
            self.freeze_inputs(node, f"{where}: unsupported mode")
            return
        r = _rank(node.inputs[0])
        axes = node.attrs.get("axes")
        axes = list(range(r or 0)) if axes is None else [a + (r or 0) if a < 0 else a for a in axes]
        if node.op == "Upsample" and self.an.opset < 9:
            scales, sizes = node.attrs.get("scales"), None
        else:
            si = 1 if (node.op == "Upsample" or self.an.opset < 11) else 2
            scales = const_value(node.inputs[si]) if self.has_input(node, si) else None
            sizes = self.input_ints(node, 3) if self.has_input(node, 3) else None
            if scales is not None and np.asarray(scales).size == 0:
                scales = None
            if scales is None and sizes is None:
                self.an.freeze(lay.ids, f"{where} has computed scales or sizes")
                return
        if lay.axis not in axes:
            self.set(node.outputs[0], lay)
            return
        j = axes.index(lay.axis)
        if scales is not None:
            if float(np.asarray(scales).ravel()[j]) != 1.0:
                self.an.freeze(lay.ids, f"{where} scales the channel axis")
                return
            self.set(node.outputs[0], lay)
            return
        if sizes[j] != len(lay.ids):
            self.an.freeze(lay.ids, f"{where} resizes the channel axis")
            return
        ids = lay.ids

        def fix(g: gs.Graph, k: int, keep: np.ndarray, j=j, ids=ids) -> None:
            nd = g.nodes[k]
            v = np.array(const_value(nd.inputs[3])).copy()
            v[j] = int(keep_positions(ids, keep).sum())
            nd.inputs[3] = gs.Constant(f"{nd.name or 'resize'}_sizes_pruned_{k}", v)

        self.an.fixups.append((i, fix))
        self.set(node.outputs[0], lay)

    op_Upsample = op_Resize

    def op_reduce(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        r = _rank(node.inputs[0])
        if node.op == "ReduceSum" and self.an.opset >= 13 or self.an.opset >= 18:
            axes = self.input_ints(node, 1) if self.has_input(node, 1) else None
            if self.has_input(node, 1) and axes is None:
                self.an.freeze(lay.ids, f"{self.where(node)} has computed axes")
                return
        else:
            axes = node.attrs.get("axes")
        if axes is None or not len(axes) or r is None:
            if axes is not None and not len(axes) and int(node.attrs.get("noop_with_empty_axes", 0)):
                self.set(node.outputs[0], lay)
                return
            self.an.freeze(lay.ids, f"{self.where(node)} reduces over the channel axis")
            return
        axes = [int(a) + r if a < 0 else int(a) for a in axes]
        if lay.axis in axes:
            self.an.freeze(lay.ids, f"{self.where(node)} reduces over the channel axis")
            return
        axis = lay.axis if int(node.attrs.get("keepdims", 1)) else lay.axis - sum(a < lay.axis for a in axes)
        self.set(node.outputs[0], Layout(axis, lay.ids))

    def op_Expand(self, i: int, node: gs.Node, ins: list) -> None:
        lay = ins[0]
        shape = self.input_ints(node, 1)
        r, ro = _rank(node.inputs[0]), _rank(node.outputs[0])
        if shape is None or r is None or ro is None:
            self.freeze_inputs(node, f"{self.where(node)} has a computed shape")
            return
        axis = lay.axis + ro - r
        j = axis - (ro - len(shape))
        if j >= 0 and shape[j] not in (1, -1):
            self.an.freeze(lay.ids, f"{self.where(node)} expands to an explicit channel count")
            return
        self.set(node.outputs[0], Layout(axis, lay.ids))

    def op_Shape(self, i: int, node: gs.Node, ins: list) -> None:
        self.freeze_inputs(node, f"{self.where(node)} reads the shape (the channel count would change)")

    op_Size = op_Shape


def _shuffle_fix(first: gs.Node, kept: np.ndarray, a: int, d0: int, d1: int, order: np.ndarray) -> None:
    """Rewrite a channel shuffle (Reshape ``first`` -> Transpose -> Reshape) for the ``kept`` input channels.

    When every row of the [d0, d1] grid keeps the same columns, the shuffle of the smaller tensor is still
    one: only the reshape constants change. Otherwise the kept channels in shuffled order are one Gather
    along the channel axis (a copy of whole channel planes, like the Transpose it replaces)."""
    if kept.all():
        return
    tr = first.outputs[0].outputs[0]
    back = tr.outputs[0].outputs[0]
    grid = kept.reshape(d0, d1)
    name = first.name or "shuffle"
    if (grid == grid[:1]).all():
        k = int(grid[0].sum())
        t = np.array(const_value(first.inputs[1])).copy()
        if t[a + 1] != -1:
            t[a + 1] = k
        first.inputs[1] = gs.Constant(f"{name}_shape_pruned", t)
        b = np.array(const_value(back.inputs[1])).copy()
        if b[a] != -1:
            b[a] = d0 * k
        back.inputs[1] = gs.Constant(f"{back.name or 'shuffle'}_shape_pruned", b)
        return
    rank = np.cumsum(kept) - 1  # position of each kept input channel in the pruned tensor
    idx = rank[order[kept[order]]].astype(np.int64)
    outs = list(back.outputs)
    back.outputs.clear()
    x = first.inputs[0]
    first.inputs.clear()
    first.outputs.clear()
    first.op, first.attrs, first.name = "Gather", {"axis": a}, f"{name}_gather"
    first.inputs.extend([x, gs.Constant(f"{name}_gather_pruned", idx)])
    first.outputs.extend(outs)


def traced_graph(model) -> gs.Graph:
    """A graphsurgeon graph of ``model`` with inferred shapes, ready for ``analyze``."""
    import onnx

    from onnxslim.graph import to_gs

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes only sharpen the analysis; without them groups get frozen
        inferred = model
    return to_gs(inferred)
