"""fuse-layernorm: a LayerNorm written out in elementary ops becomes one ``LayerNormalization`` (opset >= 17).

Exporters below opset 17 (torch.onnx, tf2onnx) write LayerNorm over the last axis as

    mean = ReduceMean(x, axes=[-1], keepdims=1)
    d    = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2), axes=[-1], keepdims=1)        (or Mul(d, d))
    y    = Div(d, Sqrt(Add(var, eps)))
    y    = Add(Mul(y, gamma), beta)                            (Mul and Add optional, operands either way)

and models are often moved to a newer opset without re-exporting. The match is exact: both reductions over
the same single last axis with keepdims, exponent 2, ``eps``, ``gamma`` and ``beta`` constants (a scalar
``eps``; ``gamma``/``beta`` varying along the last axis only), float32 data with a known static last
dimension, and every intermediate read only inside the pattern and not a graph output. Anything else is
left as it is. Below opset 17 there is no standard op to fuse to and the pass does nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, graph_and_bodies, in_graph, is_default_domain, is_graph_output, opset_version
from onnxslim.manager import Context, Pass, PassResult, register

MIN_OPSET = 17
# float32 only: for float16 the fused op computes in float32 (stash_type 1), not what the graph computed.
DTYPES = (np.float32,)


def _sole(g: gs.Graph, t: gs.Tensor, op: str | tuple[str, ...]) -> gs.Node | None:
    """The only reader of ``t`` when it is a default-domain ``op`` of ``g`` and ``t`` is no graph output."""
    ops = (op,) if isinstance(op, str) else op
    if len(t.outputs) != 1 or is_graph_output(g, t):
        return None
    n = t.outputs[0]
    return n if n.op in ops and is_default_domain(n) and in_graph(g, n) else None


def _made_by(g: gs.Graph, t: gs.Tensor, op: str) -> gs.Node | None:
    if len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    return n if n.op == op and is_default_domain(n) and in_graph(g, n) and len(n.outputs) == 1 else None


def _scalar(t: gs.Tensor) -> float | None:
    v = const_value(t) if t.name else None
    if v is None or np.asarray(v).size != 1 or np.asarray(v).dtype.kind != "f":
        return None
    return float(np.asarray(v).reshape(()))


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The other operand of a binary node one of whose inputs is ``t``."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is t else a if b is t else None


class _Match:
    """One LayerNorm occurrence: the nodes it replaces and what the fused op needs."""

    def __init__(self) -> None:
        self.nodes: list[gs.Node] = []
        self.x: gs.Tensor | None = None
        self.y: gs.Tensor | None = None
        self.eps = 0.0
        self.gamma: np.ndarray | gs.Constant | None = None
        self.beta: np.ndarray | gs.Constant | None = None


def _last_axis(node: gs.Node, rank: int, opset: int) -> bool:
    """ReduceMean over exactly the last axis with keepdims=1."""
    if int(node.attrs.get("keepdims", 1)) != 1:
        return False
    if opset >= 18:
        if len(node.inputs) != 2 or not node.inputs[1].name:
            return False
        v = const_value(node.inputs[1])
        axes = None if v is None else [int(a) for a in np.asarray(v).ravel()]
    else:
        axes = node.attrs.get("axes")
        axes = None if axes is None else [int(a) for a in axes]
        if len(node.inputs) != 1:
            return False
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _last_dim_vector(t: gs.Tensor, d: int, rank: int) -> np.ndarray | None:
    """A constant that, broadcast against [..., d], varies only along the last axis, as a [d] vector."""
    v = const_value(t) if t.name else None
    if v is None:
        return None
    v = np.asarray(v)
    if v.dtype != np.float32 or v.ndim > rank or any(s != 1 for s in v.shape[:-1]) or (v.ndim and v.shape[-1] not in (1, d)):
        return None
    return np.ascontiguousarray(np.broadcast_to(v.reshape(-1), (d,)))


def _match(g: gs.Graph, div: gs.Node, opset: int) -> _Match | None:
    if len(div.inputs) != 2 or len(div.outputs) != 1:
        return None
    diff, std = div.inputs
    sub = _made_by(g, diff, "Sub")
    sqrt = _made_by(g, std, "Sqrt")
    if sub is None or sqrt is None or len(sub.inputs) != 2 or is_graph_output(g, diff):
        return None
    x, mean = sub.inputs
    rm1 = _made_by(g, mean, "ReduceMean")
    shape = x.shape if isinstance(x, gs.Variable) else None
    if (rm1 is None or rm1.inputs[0] is not x or x.dtype not in DTYPES or not shape
            or not isinstance(shape[-1], (int, np.integer)) or shape[-1] <= 0):
        return None
    rank, d = len(shape), int(shape[-1])
    if not _last_axis(rm1, rank, opset) or _sole(g, mean, "Sub") is not sub:
        return None
    # d feeds exactly the square and the Div (Mul(d, d) lists its reader twice)
    readers = list({id(r): r for r in diff.outputs}.values())
    if len(readers) != 2 or not any(r is div for r in readers):
        return None
    sq = next(r for r in readers if r is not div)
    if not is_default_domain(sq) or not in_graph(g, sq) or len(sq.outputs) != 1:
        return None
    if sq.op == "Pow":
        if len(sq.inputs) != 2 or sq.inputs[0] is not diff or _scalar(sq.inputs[1]) != 2.0:
            return None
    elif not (sq.op == "Mul" and len(sq.inputs) == 2 and sq.inputs[0] is diff and sq.inputs[1] is diff):
        return None
    rm2 = _sole(g, sq.outputs[0], "ReduceMean")
    if rm2 is None or not _last_axis(rm2, rank, opset):
        return None
    add = _sole(g, rm2.outputs[0], "Add")
    if add is None or _sole(g, add.outputs[0], "Sqrt") is not sqrt or _sole(g, std, "Div") is not div:
        return None
    eps_t = _other(add, rm2.outputs[0])
    eps = None if eps_t is None else _scalar(eps_t)
    if eps is None or not np.isfinite(eps) or eps < 0 or (np.asarray(const_value(eps_t)).ndim > rank):
        return None
    m = _Match()
    m.nodes = [rm1, sub, sq, rm2, add, sqrt, div]
    m.x, m.eps, m.y = x, eps, div.outputs[0]
    mul = _sole(g, m.y, "Mul")
    if mul is not None:
        gamma = _other(mul, m.y)
        m.gamma = None if gamma is None else _last_dim_vector(gamma, d, rank)
        if m.gamma is not None:
            m.gamma = gamma if isinstance(gamma, gs.Constant) and gamma.shape == (d,) else m.gamma
            m.nodes.append(mul)
            m.y = mul.outputs[0]
            add2 = _sole(g, m.y, "Add")
            beta = None if add2 is None else _other(add2, m.y)
            beta_v = None if beta is None else _last_dim_vector(beta, d, rank)
            if beta_v is not None:
                m.beta = beta if isinstance(beta, gs.Constant) and beta.shape == (d,) else beta_v
                m.nodes.append(add2)
                m.y = add2.outputs[0]
    if m.gamma is None:
        m.gamma = np.ones(d, np.float32)
    return m


class _Names:
    def __init__(self, graph: gs.Graph) -> None:
        self.used = {n.name for g in graph_and_bodies(graph) for n in g.nodes}
        self.used |= {t for g in graph_and_bodies(graph) for t in g.tensors()}

    def new(self, base: str) -> str:
        i, name = 0, base
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _const(names: _Names, base: str, v: np.ndarray | gs.Constant) -> gs.Constant:
    return v if isinstance(v, gs.Constant) else gs.Constant(names.new(base), np.array(v, order="C"))


@register
class FuseLayerNorm(Pass):
    name = "fuse-layernorm"
    description = "Decomposed LayerNorm (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add]) -> LayerNormalization (opset >= 17)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        opset = opset_version(graph)
        if opset < MIN_OPSET:
            return PassResult(changed=False)
        names = _Names(graph)
        fused = 0
        for g in graph_and_bodies(graph):  # bodies share the model's opset; function bodies may not
            for div in list(g.nodes):
                if div.op != "Div" or not is_default_domain(div) or not div.outputs:
                    continue
                m = _match(g, div, opset)
                if m is None:
                    continue
                scope = div.name.rsplit("/", 1)[0] if "/" in div.name else div.name
                base = m.nodes[-1].name or m.y.name
                gamma = _const(names, f"{base}_scale", m.gamma)
                inputs = [m.x, gamma] + ([_const(names, f"{base}_bias", m.beta)] if m.beta is not None else [])
                for n in m.nodes:  # dead from here on; cleanup drops them
                    n.outputs.clear()
                g.nodes.append(gs.Node("LayerNormalization", names.new(f"{scope}/LayerNormalization"),
                                       attrs={"axis": -1, "epsilon": m.eps}, inputs=inputs, outputs=[m.y]))
                fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=bool(fused), stats={"layernorm_fused": fused})
