"""dce: remove nodes that reach no graph output, unused initializers and value_info, and no-op nodes.

A node is a no-op only when static information proves it: Identity, inference Dropout, Cast to the
type it already has, Reshape/Expand to the shape the input already has, identity Transpose and
Transpose pairs that cancel, Pad with all-zero pads, Slice over the whole tensor, Squeeze/Unsqueeze
pairs that cancel, Add/Sub of zeros and Mul/Div by ones that do not broadcast, single-input Concat.
Its readers are rerouted to its input; graph inputs and outputs keep their names (``substitute``).
Consecutive Transposes and consecutive Reshapes are also merged into one node.
Unused initializers and value_info disappear with the tensors nobody reads.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph import (const_value, has_subgraph, in_graph, is_default_domain, is_tensor, iter_graphs,
                            live_node_count, static_shape, substitute)
from onnxslim.manager import Context, Pass, PassResult, register

# A Slice end this large reaches past any dimension a tensor can have (exporters write INT64_MAX).
END_OF_ANY_DIM = 2**62


def _ints(t: gs.Tensor | None) -> list[int] | None:
    """Values of a constant integer tensor, else None."""
    if t is None or not t.name:
        return None
    v = const_value(t)
    if v is None or np.asarray(v).dtype.kind not in "iu":
        return None
    return [int(x) for x in np.asarray(v).ravel()]


def _floats(t: gs.Tensor) -> np.ndarray | None:
    v = const_value(t)
    return None if v is None else np.asarray(v)


def _rank(t: gs.Tensor) -> int | None:
    if not is_tensor(t) or t.shape is None:
        return None
    return len(t.shape)


def _onnx_type(t: gs.Tensor) -> int | None:
    """ONNX element type of a plain tensor, if known."""
    if not is_tensor(t) or t.dtype is None:
        return None
    if isinstance(t.dtype, (int, np.integer)) and not isinstance(t.dtype, bool):
        return int(t.dtype)
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    if i < len(node.inputs) and node.inputs[i].name:
        return node.inputs[i]
    return None


def _axes(node: gs.Node, opset: int, attr_until: int) -> list[int] | None:
    """Axes of Squeeze/Unsqueeze/Reduce-like nodes: an attribute before ``attr_until``, an input after."""
    if opset < attr_until:
        a = node.attrs.get("axes")
        return None if a is None else [int(x) for x in a]
    t = _input(node, 1)
    return None if t is None else _ints(t)


def _producer(t: gs.Tensor, g: gs.Graph) -> gs.Node | None:
    if len(t.inputs) != 1:
        return None
    p = t.inputs[0]
    return p if in_graph(g, p) else None


def _unused(t: gs.Tensor, g: gs.Graph) -> bool:
    return not t.name or (not t.outputs and not any(o is t for o in g.outputs))


def _reshape_noop(x: gs.Tensor, target: list[int], allowzero: bool) -> bool:
    """Reshape of ``x`` to ``target`` keeps the shape: every dim copied, equal, or the one inferred -1."""
    shape = x.shape if is_tensor(x) else None
    if shape is None or len(shape) != len(target):
        return False
    unresolved = 0
    for d, t in zip(shape, target):
        if t == 0 and not allowzero:
            continue
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 and t == d:
            continue
        if t == -1:
            unresolved += 1
            continue
        return False
    # A single -1 with every other dim matching resolves to the input's own dim (not with a 0 dim around).
    return unresolved == 0 or (unresolved == 1 and not any(d == 0 for d in shape if isinstance(d, (int, np.integer))))


def _shape_of_itself(node: gs.Node, x: gs.Tensor, g: gs.Graph) -> bool:
    """The shape input is Shape(x) of the very tensor being reshaped/expanded."""
    t = _input(node, 1)
    p = _producer(t, g) if t is not None else None
    return (p is not None and p.op == "Shape" and is_default_domain(p) and p.inputs and p.inputs[0] is x
            and int(p.attrs.get("start", 0)) == 0 and p.attrs.get("end") is None)


def _broadcast_keeps(x: gs.Tensor, other_shape: tuple[int, ...] | list[int]) -> bool:
    """Broadcasting ``x`` with a tensor of ``other_shape`` leaves ``x``'s shape unchanged."""
    shape = x.shape if is_tensor(x) else None
    if shape is None or len(other_shape) > len(shape):
        return False
    for d, o in zip(shape[len(shape) - len(other_shape):], other_shape):
        if o == 1:
            continue
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d == o:
            continue
        return False
    return True


def _perm(node: gs.Node, x: gs.Tensor) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    r = _rank(x)
    return None if r is None else list(range(r - 1, -1, -1))


def _slice_whole(node: gs.Node, x: gs.Tensor, opset: int) -> bool:
    if opset < 10:
        starts, ends, axes, steps = node.attrs.get("starts"), node.attrs.get("ends"), node.attrs.get("axes"), None
        starts = None if starts is None else [int(v) for v in starts]
        ends = None if ends is None else [int(v) for v in ends]
        axes = None if axes is None else [int(v) for v in axes]
    else:
        starts, ends = _ints(_input(node, 1)), _ints(_input(node, 2))
        axes = _ints(_input(node, 3)) if _input(node, 3) is not None else None
        if _input(node, 3) is not None and axes is None:
            return False
        steps = _ints(_input(node, 4)) if _input(node, 4) is not None else None
        if _input(node, 4) is not None and steps is None:
            return False
    if starts is None or ends is None or len(starts) != len(ends):
        return False
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts):
        return False
    shape = x.shape if is_tensor(x) else None
    rank = None if shape is None else len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            return False
        if a < 0:
            if rank is None:
                return False
            a += rank
        if rank is not None and not 0 <= a < rank:
            return False
        d = shape[a] if shape is not None else None
        if not (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0):
            d = None
        if d == 0:
            continue  # any slice of an empty axis is the whole (empty) axis
        start_ok = s == 0 or (s < 0 and d is not None and s + d <= 0)
        end_ok = e >= END_OF_ANY_DIM or (d is not None and e >= d)
        if not (start_ok and end_ok):
            return False
    return True


def _pads_zero(node: gs.Node, opset: int) -> bool:
    if opset < 11:
        pads = node.attrs.get("pads")
        pads = None if pads is None else [int(p) for p in pads]
    else:
        pads = _ints(_input(node, 1))
    return pads is not None and all(p == 0 for p in pads)


def _dropout_noop(node: gs.Node, g: gs.Graph, opset: int) -> bool:
    if len(node.outputs) > 1 and not _unused(node.outputs[1], g):
        return False  # the mask is read
    if opset < 7:
        return int(node.attrs.get("is_test", 0)) == 1
    if opset >= 12:
        tm = _input(node, 2)
        if tm is not None:
            v = const_value(tm)
            return v is not None and np.asarray(v).size == 1 and not bool(np.asarray(v).ravel()[0])
    return True


def _arith_identity(node: gs.Node) -> gs.Tensor | None:
    """``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` (either side for + and *) when the constant does not broadcast x."""
    if len(node.inputs) != 2:
        return None
    neutral = 0 if node.op in ("Add", "Sub") else 1
    sides = [(0, 1), (1, 0)] if node.op in ("Add", "Mul") else [(0, 1)]
    for xi, ci in sides:
        x, c = node.inputs[xi], node.inputs[ci]
        v = _floats(c)
        if v is None or v.size == 0 or v.dtype.kind not in "fiu" or not np.all(v == neutral):
            continue
        if _broadcast_keeps(x, tuple(v.shape)):
            return x
    return None


def noop_source(node: gs.Node, g: gs.Graph) -> gs.Tensor | None:
    """The tensor whose value ``node.outputs[0]`` provably equals, or None."""
    if (not is_default_domain(node) or not node.inputs or not node.outputs or has_subgraph(node)
            or not node.inputs[0].name or not node.outputs[0].name):
        return None
    op, x, opset = node.op, node.inputs[0], int(g.opset or 0)
    if op == "Identity":
        return x
    if any(not _unused(o, g) for o in node.outputs[1:]) and op != "Dropout":
        return None
    if op == "Dropout":
        return x if _dropout_noop(node, g, opset) else None
    if op == "Cast":
        to = node.attrs.get("to")
        return x if to is not None and _onnx_type(x) == int(to) else None
    if op == "CastLike":
        t = _input(node, 1)
        return x if t is not None and _onnx_type(x) is not None and _onnx_type(x) == _onnx_type(t) else None
    if op == "Reshape":
        if opset < 5:
            target = node.attrs.get("shape")
            target = None if target is None else [int(v) for v in target]
        else:
            target = _ints(_input(node, 1))
        if target is not None and _reshape_noop(x, target, bool(node.attrs.get("allowzero", 0))):
            return x
        if opset >= 5 and _shape_of_itself(node, x, g):
            return x
        xs, ys = static_shape(x), static_shape(node.outputs[0])
        return x if xs is not None and xs == ys else None
    if op == "Expand":
        target = _ints(_input(node, 1))
        if (target is not None and _broadcast_keeps(x, target)) or _shape_of_itself(node, x, g):
            return x
        xs, ys = static_shape(x), static_shape(node.outputs[0])
        return x if xs is not None and xs == ys else None
    if op == "Transpose":
        perm = _perm(node, x)
        if perm is None:
            return None
        if perm == list(range(len(perm))):
            return x
        first = _producer(x, g)
        if first is not None and first.op == "Transpose" and is_default_domain(first):
            p1 = _perm(first, first.inputs[0])
            if p1 is not None and len(p1) == len(perm) and all(p1[perm[i]] == i for i in range(len(perm))):
                return first.inputs[0]
        return None
    if op == "Pad":
        return x if _pads_zero(node, opset) else None
    if op == "Slice":
        return x if _slice_whole(node, x, opset) else None
    if op in ("Squeeze", "Unsqueeze"):
        first = _producer(x, g)
        other = "Unsqueeze" if op == "Squeeze" else "Squeeze"
        if first is None or first.op != other or not is_default_domain(first) or len(first.outputs) != 1:
            return None
        a2, a1 = _axes(node, opset, 13), _axes(first, opset, 13)
        inner = first.inputs[0]
        if op == "Unsqueeze" and a1 is None:  # Squeeze of every size-1 dim: which ones needs a static shape
            shape = static_shape(inner)
            a1 = None if shape is None else [i for i, d in enumerate(shape) if d == 1]
        if a1 is None or a2 is None or not a1:
            return None
        # The rank both axis lists refer to: Squeeze's input rank, which is Unsqueeze's output rank.
        rank = _rank(inner) if op == "Unsqueeze" else _rank(x)
        if rank is None and op == "Squeeze" and _rank(inner) is not None:
            rank = _rank(inner) + len(a1)
        if rank is not None:
            a1 = [a % rank if -rank <= a < rank else a for a in a1]
            a2 = [a % rank if -rank <= a < rank else a for a in a2]
        return inner if sorted(a1) == sorted(a2) and len(set(a1)) == len(a1) else None
    if op in ("Add", "Sub", "Mul", "Div"):
        return _arith_identity(node)
    if op == "Concat" and len(node.inputs) == 1:
        return x
    return None


# Ops that only relabel the shape of their input, never move data: a Reshape after them can read their input.
RESHAPING_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def fuse_with_producer(node: gs.Node, g: gs.Graph) -> bool:
    """Transpose(Transpose(x)) -> one Transpose; Reshape(Reshape/Flatten/Squeeze/Unsqueeze(x)) -> Reshape(x):
    the second node reads ``x`` directly (the first dies if nothing else reads it). Exact: a composed
    permutation; a reshape whose target has no 0 (copy-a-dim) entry does not depend on the shape it
    starts from, only on the element order, which those ops keep."""
    if not is_default_domain(node) or not node.inputs or not node.outputs or not node.inputs[0].name:
        return False
    first = _producer(node.inputs[0], g)
    if first is None or not is_default_domain(first) or not first.inputs or not first.inputs[0].name:
        return False
    if first.op != node.op and not (node.op == "Reshape" and first.op in RESHAPING_OPS):
        return False
    if node.op == "Transpose":
        p1, p2 = _perm(first, first.inputs[0]), _perm(node, node.inputs[0])
        if p1 is None or p2 is None or len(p1) != len(p2):
            return False
        node.attrs["perm"] = [p1[i] for i in p2]
        node.inputs[0] = first.inputs[0]
        return True
    if node.op == "Reshape" and int(g.opset or 0) >= 5:
        target = _ints(_input(node, 1))
        if target is None or (0 in target and not int(node.attrs.get("allowzero", 0))):
            return False
        node.inputs[0] = first.inputs[0]
        return True
    return False


@register
class DeadCodeElimination(Pass):
    name = "dce"
    description = ("Remove unreachable nodes, unused initializers/value_info and provable no-ops "
                   "(Identity, Dropout, same-type Cast, same-shape Reshape/Expand, cancelling Transpose/Squeeze pairs, "
                   "zero Pad, whole Slice)")
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        before = live_node_count(graph)
        bypassed = fused = 0
        for g in list(iter_graphs(graph)):
            for node in list(g.nodes):
                if not node.outputs:
                    continue
                src = noop_source(node, g)
                if src is not None and substitute(g, node.outputs[0], src):
                    bypassed += 1
                elif node.op in ("Transpose", "Reshape") and fuse_with_producer(node, g):
                    fused += 1
                    src = noop_source(node, g)  # a fused pair may now be the identity
                    if src is not None and substitute(g, node.outputs[0], src):
                        bypassed += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        for fn in graph.functions or []:
            fn.cleanup(remove_unused_graph_inputs=False)
        after = live_node_count(graph)
        return PassResult(changed=after != before or bypassed > 0 or fused > 0,
                          stats={"nodes_removed": before - after, "noops_bypassed": bypassed, "pairs_fused": fused})
