"""shape-chain: constant Reshape targets from Shape->Gather->Unsqueeze->Concat chains under symbolic dims,
and recurrent nodes' all-zero initial states dropped.

Exporters write a Reshape's target as the input's own dims read back at run time, e.g. for attention heads
``Reshape(x[b,s,384], Concat(Unsqueeze(Gather(Shape(x),0)), Unsqueeze(Gather(Shape(x),1)), [12], [32]))``.
Every element of such a target is followed symbolically (a constant, dim k of some tensor, or unknown):

- dim i of the Reshape's own data input at position i becomes ``0`` (copy the input's dim), also when it is
  read from another tensor whose dim has the same symbolic name (the IR's rule: one name, one size; names on
  custom-op outputs are not trusted, their value_info may be stale), or when both dims provably copy one
  dim upstream: through same-shape unary ops, Transpose, Gemm's rows, a Reshape's 0, and a Reshape's -1
  that takes exactly the input's one symbolic dim (the other dims' products agree: [T,1,2,512] -> [-1,1024]
  has T rows, where shape inference names a fresh dim). Only where the Reshape copies zeros
  (``allowzero`` absent or 0);
- a static dim becomes its value;
- one element left unknown becomes ``-1`` when every other element is a nonzero constant (their product
  then divides the element count exactly, so -1 is the value the chain computed, even for empty tensors).
If every element resolves, the target is a constant ([0, 0, 12, 32]) and the chain is dead (dce removes it).
A Reshape whose original target does not match its input fails in both versions; otherwise the new target
computes the same shape as the chain, so the outputs are bit-identical.

RNN/GRU/LSTM: an ``initial_h``/``initial_c`` that is all zeros (a zero constant, or ConstantOfShape with value
0 of a shape that resolves to [num_directions, batch of X, hidden_size]) is the op's default: the input is
dropped, and with it the chain that computed the state's shape.

Every graph (main and If/Loop/Scan bodies) is searched; model-local function bodies are not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, graph_and_bodies, is_default_domain
from onnxslim.manager import Context, Pass, PassResult, register

# Elements of a 1-D int tensor followed symbolically: ("c", value) | ("d", tensor, dim index) | None (unknown).
Elem = Any
MAX_ELEMS = 16  # shape vectors only
MAX_DEPTH = 24
_CONST = "c"
_DIM = "d"


def _int_const(t: gs.Tensor) -> np.ndarray | None:
    v = const_value(t)
    if v is None:
        return None
    v = np.asarray(v)
    return v if v.dtype.kind in "iu" else None


def _rank(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    return None if shape is None else len(shape)


def _dim(t: gs.Tensor, k: int) -> Elem:
    d = t.shape[k]
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
        return (_CONST, int(d))
    return (_DIM, t, k)


def elems(t: gs.Tensor, depth: int = 0) -> list[Elem] | None:
    """The elements of a 0-D/1-D integer tensor, followed through the ops shape chains use; None if not followed."""
    v = _int_const(t)
    if v is not None:
        return [(_CONST, int(x)) for x in v.reshape(-1)] if v.ndim <= 1 and v.size <= MAX_ELEMS else None
    if len(t.inputs) != 1 or depth > MAX_DEPTH:
        return None
    p = t.inputs[0]
    if not is_default_domain(p) or p.outputs[0] is not t:
        return None
    op = p.op
    if op == "Shape":
        x = p.inputs[0]
        r = _rank(x)
        if r is None:
            return None
        start, end = int(p.attrs.get("start", 0)), p.attrs.get("end")
        ks = range(r)[slice(start, None if end is None else int(end))]
        return [_dim(x, k) for k in ks]
    if op in ("Identity", "Squeeze", "Unsqueeze", "Cast", "Reshape") and p.inputs:
        if op == "Cast" and int(p.attrs.get("to", 0)) not in (6, 7):  # int32/int64 keep the values
            return None
        if op == "Reshape" and (len(p.inputs) < 2 or _int_const(p.inputs[1]) is None
                                or np.asarray(_int_const(p.inputs[1])).size > 1):
            return None
        src = elems(p.inputs[0], depth + 1)
        if src is None or (op in ("Squeeze", "Unsqueeze", "Reshape") and len(src) != 1):
            return None
        if op == "Cast" and p.inputs[0].dtype is not None and np.dtype(p.inputs[0].dtype).kind not in "iu":
            return None
        return src
    if op == "Concat" and int(p.attrs.get("axis", 0)) in (0, -1):
        out: list[Elem] = []
        for i in p.inputs:
            e = elems(i, depth + 1)
            if e is None:
                return None
            out.extend(e)
        return out if len(out) <= MAX_ELEMS else None
    if op == "Gather" and len(p.inputs) == 2 and int(p.attrs.get("axis", 0)) in (0, -1):
        src, idx = elems(p.inputs[0], depth + 1), _int_const(p.inputs[1])
        if src is None or idx is None or idx.ndim > 1:
            return None
        n = len(src)
        if np.any(idx >= n) or np.any(idx < -n):
            return None
        return [src[int(i)] for i in idx.reshape(-1)]
    if op == "Slice" and len(p.inputs) >= 3:
        src = elems(p.inputs[0], depth + 1)
        vals = [_int_const(x) if x.name else None for x in p.inputs[1:5]]
        if src is None or any(v is None for v, x in zip(vals, p.inputs[1:5]) if x.name):
            return None
        starts, ends = vals[0], vals[1]
        axes = vals[2] if len(vals) > 2 else None
        steps = vals[3] if len(vals) > 3 else None
        if starts.size != 1 or ends.size != 1 or (axes is not None and int(axes.reshape(-1)[0]) not in (0, -1)):
            return None
        step = 1 if steps is None else int(steps.reshape(-1)[0])
        if step == 0:
            return None
        clip = lambda x: int(np.clip(int(x), -2**62, 2**62))  # noqa: E731
        return src[slice(clip(starts.reshape(-1)[0]), clip(ends.reshape(-1)[0]), step)]
    # Anything else: unknown values, known count when the output shape is static 1-D.
    shape = getattr(t, "shape", None)
    if shape is not None and len(shape) <= 1 and all(isinstance(d, (int, np.integer)) for d in shape):
        n = int(shape[0]) if shape else 1
        return [None] * n if n <= MAX_ELEMS else None
    return None


# Ops whose output has the input's shape (dim k of the output is dim k of input 0).
_SAME_SHAPE = frozenset({"Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Identity", "Cast",
                         "LeakyRelu", "Elu", "Selu", "HardSigmoid", "Softplus", "Softsign", "Clip", "Dropout",
                         "Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "LRN", "Not",
                         "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "HardSwish", "Mish", "Gelu"})


def _static(d: Any) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0


def _source_dim(t: gs.Tensor, k: int) -> tuple[gs.Tensor, int] | None:
    """An input tensor and dim whose size dim ``k`` of ``t`` provably equals, one node up; None if unknown.

    Reshape with a constant target (allowzero 0): a 0 copies input dim k; the one -1 equals the input's only
    non-static dim when the input's static dims and the target's other entries have the same product (the
    element count divided by that product is then exactly that dim, 0 for an empty tensor included)."""
    if len(t.inputs) != 1:
        return None
    p = t.inputs[0]
    if not is_default_domain(p) or not p.inputs or p.outputs[0] is not t:
        return None
    x = p.inputs[0]
    shape = getattr(x, "shape", None)
    if p.op in _SAME_SHAPE:
        return (x, k) if shape is not None and k < len(shape) else None
    if p.op == "Transpose":
        perm = p.attrs.get("perm")
        return (x, int(perm[k])) if perm is not None and k < len(perm) else None
    if p.op == "Gemm" and k == 0 and len(p.inputs) >= 2:
        return (x, 1 if int(p.attrs.get("transA", 0)) else 0)
    if p.op == "Reshape" and len(p.inputs) == 2 and int(p.attrs.get("allowzero", 0)) == 0 and shape is not None:
        target = _int_const(p.inputs[1])
        if target is None or target.ndim != 1 or k >= target.size:
            return None
        target = [int(v) for v in target]
        if target[k] == 0:
            return (x, k) if k < len(shape) else None
        if target[k] != -1 or target.count(-1) != 1:
            return None
        dynamic = [i for i, d in enumerate(shape) if not _static(d)]
        if len(dynamic) != 1:
            return None
        rest = []
        for i, v in enumerate(target):
            if i == k:
                continue
            v = shape[i] if v == 0 and i < len(shape) else v
            if not _static(v) or v <= 0:
                return None
            rest.append(int(v))
        known = [int(d) for i, d in enumerate(shape) if i != dynamic[0]]
        if int(np.prod(rest, dtype=np.int64)) == int(np.prod(known, dtype=np.int64)):
            return (x, dynamic[0])
    return None


def _root(t: gs.Tensor, k: int) -> tuple[gs.Tensor, int]:
    """The furthest tensor/dim that dim ``k`` of ``t`` provably equals (``(t, k)`` itself at least)."""
    for _ in range(MAX_DEPTH):
        up = _source_dim(t, k)
        if up is None:
            break
        t, k = up
    return t, k


def _same_dim(e: Elem, t: gs.Tensor, k: int, untrusted: frozenset[str] = frozenset()) -> bool:
    """Whether element ``e`` is dim ``k`` of ``t``: read from ``t`` itself, from a tensor/dim both provably
    copy (``_root``), or a dim with the same named symbolic size (the IR spec: equal dim_param names in one
    model are equal sizes)."""
    if e is None or e[0] != _DIM:
        return False
    if e[1] is t and e[2] == k:
        return True
    if t.shape is None or k >= len(t.shape):
        return False
    (ta, ka), (tb, kb) = _root(e[1], e[2]), _root(t, k)
    if ta is tb and ka == kb:
        return True
    for (u, i), (v, j) in (((e[1], e[2]), (t, k)), ((ta, ka), (tb, kb))):
        a = u.shape[i] if u.shape is not None and i < len(u.shape) else None
        b = v.shape[j] if v.shape is not None and j < len(v.shape) else None
        # onnx's generated "unk__N" names are consistent within one inference run (the shape-inference pass
        # recomputes every entry each round), except on outputs onnx cannot infer (custom ops): those keep
        # the model's own entries, whose names a later run may reuse for unrelated dims.
        if isinstance(a, str) and bool(a) and a == b and a not in untrusted:
            return True
    return False


def reshape_target(node: gs.Node, untrusted: frozenset[str] = frozenset()) -> np.ndarray | None:
    """A constant target that makes ``node`` (a Reshape) compute the same output, or None."""
    if len(node.inputs) != 2 or _int_const(node.inputs[1]) is not None or int(node.attrs.get("allowzero", 0)) != 0:
        return None
    data, target = node.inputs
    es = elems(target)
    if not es:
        return None
    out: list[int | None] = []
    for i, e in enumerate(es):
        if e is None:
            out.append(None)
        elif e[0] == _CONST:
            out.append(e[1])
        elif _same_dim(e, data, i, untrusted):
            out.append(0)  # a literal 0 of the old target copied the dim too (allowzero=0)
        else:
            out.append(None)
    unknown = [i for i, v in enumerate(out) if v is None]
    if len(unknown) > 1:
        return None
    if unknown:
        others = [v for i, v in enumerate(out) if i != unknown[0]]
        if any(v is None or v <= 0 for v in others):  # -1 needs a nonzero, known product of the rest
            return None
        out[unknown[0]] = -1
    if sum(v == -1 for v in out) > 1:
        return None
    return np.array(out, dtype=np.int64)


def _zero_state(t: gs.Tensor, node: gs.Node, untrusted: frozenset[str] = frozenset()) -> bool:
    """Whether ``t`` (an initial state of an RNN/GRU/LSTM ``node``) is all zeros of the state's full shape."""
    layout = int(node.attrs.get("layout", 0))
    dirs = 2 if node.attrs.get("direction", "forward") in ("bidirectional", b"bidirectional") else 1
    hidden = node.attrs.get("hidden_size")
    x = node.inputs[0]
    if hidden is None or _rank(x) != 3:
        return False
    batch = _dim(x, 1 if layout == 0 else 0)
    want = [(_CONST, dirs), batch, (_CONST, int(hidden))]
    if layout == 1:
        want = [batch, (_CONST, dirs), (_CONST, int(hidden))]
    v = const_value(t)
    if v is not None:
        v = np.asarray(v)
        return (v.dtype.kind == "f" and v.ndim == 3 and not np.any(v)
                and all(w[0] == _CONST and w[1] == s for w, s in zip(want, v.shape)))
    if len(t.inputs) != 1 or t.inputs[0].op != "ConstantOfShape" or not is_default_domain(t.inputs[0]):
        return False
    cos = t.inputs[0]
    value = cos.attrs.get("value")
    if value is not None:
        arr = np.asarray(value.values if isinstance(value, gs.Constant) else value)
        if np.any(arr):
            return False
    es = elems(cos.inputs[0])
    return es is not None and len(es) == 3 and all(
        e is not None and (e == w if w[0] == _CONST else _same_dim(e, w[1], w[2], untrusted)) for e, w in zip(es, want))


@register
class ShapeChain(Pass):
    name = "shape-chain"
    description = ("Constant Reshape targets ([0,0,12,32]-style) from Shape/Gather/Concat chains under symbolic "
                   "dims; drop all-zero RNN/GRU/LSTM initial states")
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        stats = {"reshape_targets": 0, "zero_states_dropped": 0}
        untrusted = frozenset(d for g in graph_and_bodies(graph) for n in g.nodes if not is_default_domain(n)
                              for o in n.outputs if getattr(o, "shape", None) is not None
                              for d in o.shape if isinstance(d, str))
        for g in graph_and_bodies(graph):
            for n in g.nodes:
                if not is_default_domain(n):
                    continue
                if n.op == "Reshape":
                    target = reshape_target(n, untrusted)
                    if target is not None:
                        name = f"{n.name or n.outputs[0].name}__target"
                        n.inputs[1] = gs.Constant(name, target)
                        stats["reshape_targets"] += 1
                elif n.op in ("RNN", "GRU", "LSTM"):
                    slots = (5, 6) if n.op == "LSTM" else (5,)
                    for k in slots:
                        if len(n.inputs) > k and n.inputs[k].name and _zero_state(n.inputs[k], n, untrusted):
                            n.inputs[k] = gs.Variable.empty()
                            stats["zero_states_dropped"] += 1
                    while n.inputs and not n.inputs[-1].name:  # trailing empty inputs are the same as none
                        n.inputs.pop()
        changed = any(stats.values())  # the chains left dead are dce's
        return PassResult(changed=changed, stats=stats)
