"""fuse-gelu: GELU written out in elementary ops becomes one ``Gelu`` (opset >= 20).

Two forms, as exporters write them (operands of Add/Mul in either order, the three-way product
``x * a * 0.5`` in any association):

    erf   a = Add(Erf(Div(x, sqrt(2))), 1)              (or Erf(Mul(x, 1/sqrt(2))))       y = x * a * 0.5
    tanh  a = Add(Tanh(Mul(sqrt(2/pi), Add(x, Mul(0.044715, Pow(x, 3))))), 1)             y = x * a * 0.5
          (x^3 also as Mul(Mul(x, x), x))                                   -> Gelu(approximate="tanh")

Every constant must be a float scalar equal to the one of the formula (float32 rounding allowed), the data
float32, and every intermediate read only inside the pattern and not a graph output. Below opset 20 the
pattern is already as small as standard ops allow and the pass does nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, graph_and_bodies, in_graph, is_default_domain, is_graph_output, opset_version
from onnxslim.manager import Context, Pass, PassResult, register

MIN_OPSET = 20
DTYPES = (np.float32,)
RTOL = 1e-6  # constants exported from float64 formulas round to float32: ~6e-8 relative


def _sole(g: gs.Graph, t: gs.Tensor, op: str) -> gs.Node | None:
    """The only reader of ``t`` when it is a default-domain ``op`` of ``g`` and ``t`` is no graph output."""
    if len(t.outputs) != 1 or is_graph_output(g, t):
        return None
    n = t.outputs[0]
    return n if n.op == op and is_default_domain(n) and in_graph(g, n) and len(n.outputs) == 1 else None


def _made_by(g: gs.Graph, t: gs.Tensor, op: str) -> gs.Node | None:
    if len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    return n if n.op == op and is_default_domain(n) and in_graph(g, n) and len(n.outputs) == 1 else None


def _is(t: gs.Tensor, value: float, rank: int) -> bool:
    """``t`` is a float scalar constant equal to ``value`` that does not broadcast a rank-``rank`` tensor up."""
    v = const_value(t) if t.name else None
    if v is None:
        return False
    v = np.asarray(v)
    return (v.size == 1 and v.dtype.kind == "f" and v.ndim <= rank
            and bool(np.isclose(float(v.reshape(())), value, rtol=RTOL, atol=0.0)))


def _operands(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    return (node.inputs[0], node.inputs[1]) if len(node.inputs) == 2 else None


def _with_const(node: gs.Node, value: float, rank: int) -> gs.Tensor | None:
    """For a binary node with a constant ``value`` on one side, the other operand."""
    ops = _operands(node)
    if ops is None:
        return None
    a, b = ops
    if _is(b, value, rank):
        return a
    if _is(a, value, rank):
        return b
    return None


def _product(g: gs.Graph, x: gs.Tensor, a: gs.Tensor, rank: int) -> tuple[list[gs.Node], gs.Tensor] | None:
    """The nodes computing ``x * a * 0.5`` from ``a`` (read once) and the result, in any association."""
    m1 = _sole(g, a, "Mul")
    if m1 is None or _operands(m1) is None:
        return None
    other = m1.inputs[1] if m1.inputs[0] is a else m1.inputs[0]
    if other is x or _is(other, 0.5, rank):  # (x * a) * 0.5  or  (a * 0.5) * x
        m2 = _sole(g, m1.outputs[0], "Mul")
        if m2 is None or _operands(m2) is None:
            return None
        rest = m2.inputs[1] if m2.inputs[0] is m1.outputs[0] else m2.inputs[0]
        if (other is x and _is(rest, 0.5, rank)) or (other is not x and rest is x):
            return [m1, m2], m2.outputs[0]
        return None
    half = _made_by(g, other, "Mul")  # (x * 0.5) * a
    if half is not None and _sole(g, other, "Mul") is m1 and _with_const(half, 0.5, rank) is x:
        return [half, m1], m1.outputs[0]
    return None


def _x_of(t: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    if not isinstance(t, gs.Variable) or t.dtype not in DTYPES or t.shape is None:
        return None
    return t, len(t.shape)


def _match_erf(g: gs.Graph, erf: gs.Node) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor, str] | None:
    if len(erf.inputs) != 1 or len(erf.outputs) != 1:
        return None
    scale = erf.inputs[0]
    div, mul = _made_by(g, scale, "Div"), _made_by(g, scale, "Mul")
    x = None
    if div is not None and len(div.inputs) == 2:
        xr = _x_of(div.inputs[0])
        if xr and _is(div.inputs[1], float(np.sqrt(2.0)), xr[1]):
            x, first = div.inputs[0], div
    elif mul is not None:
        for cand in (mul.inputs[0], mul.inputs[1]) if len(mul.inputs) == 2 else ():
            xr = _x_of(cand)
            if xr and _with_const(mul, float(1 / np.sqrt(2.0)), xr[1]) is cand:
                x, first = cand, mul
                break
    if x is None or _sole(g, scale, "Erf") is not erf:
        return None
    rank = len(x.shape)
    add = _sole(g, erf.outputs[0], "Add")
    if add is None or _with_const(add, 1.0, rank) is not erf.outputs[0]:
        return None
    prod = _product(g, x, add.outputs[0], rank)
    if prod is None:
        return None
    return [first, erf, add] + prod[0], x, prod[1], "none"


def _cube_of(g: gs.Graph, t: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor] | None:
    """``Pow(x, 3)`` or ``Mul(Mul(x, x), x)`` producing ``t``: its nodes and x."""
    p = _made_by(g, t, "Pow")
    if p is not None and len(p.inputs) == 2:
        xr = _x_of(p.inputs[0])
        if xr and _is(p.inputs[1], 3.0, xr[1]):
            return [p], p.inputs[0]
        return None
    m = _made_by(g, t, "Mul")
    if m is None or _operands(m) is None:
        return None
    for sq_t, x in ((m.inputs[0], m.inputs[1]), (m.inputs[1], m.inputs[0])):
        sq = _made_by(g, sq_t, "Mul")
        if (sq is not None and len(sq.inputs) == 2 and sq.inputs[0] is x and sq.inputs[1] is x
                and _sole(g, sq_t, "Mul") is m and _x_of(x)):
            return [sq, m], x
    return None


def _match_tanh(g: gs.Graph, tanh: gs.Node) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor, str] | None:
    if len(tanh.inputs) != 1 or len(tanh.outputs) != 1:
        return None
    outer = _made_by(g, tanh.inputs[0], "Mul")
    if outer is None or _sole(g, tanh.inputs[0], "Tanh") is not tanh:
        return None
    for inner in (outer.inputs if len(outer.inputs) == 2 else ()):
        add = _made_by(g, inner, "Add")
        if add is None or _sole(g, inner, "Mul") is not outer or len(add.inputs) != 2:
            continue
        for x, cub_t in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            xr = _x_of(x)
            if xr is None or _with_const(outer, float(np.sqrt(2.0 / np.pi)), xr[1]) is not inner:
                continue
            cmul = _made_by(g, cub_t, "Mul")
            if cmul is None or _sole(g, cub_t, "Add") is not add:
                continue
            cube_t = _with_const(cmul, 0.044715, xr[1])
            cube = None if cube_t is None or _sole(g, cube_t, "Mul") is not cmul else _cube_of(g, cube_t)
            if cube is None or cube[1] is not x:
                continue
            plus = _sole(g, tanh.outputs[0], "Add")
            if plus is None or _with_const(plus, 1.0, xr[1]) is not tanh.outputs[0]:
                return None
            prod = _product(g, x, plus.outputs[0], xr[1])
            if prod is None:
                return None
            return cube[0] + [cmul, add, outer, tanh, plus] + prod[0], x, prod[1], "tanh"
    return None


@register
class FuseGelu(Pass):
    name = "fuse-gelu"
    description = "GELU in elementary ops (Erf form, tanh approximation) -> Gelu (opset >= 20)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        if opset_version(graph) < MIN_OPSET:
            return PassResult(changed=False)
        used = {n.name for g in graph_and_bodies(graph) for n in g.nodes}
        stats = {"gelu_fused": 0, "gelu_tanh_fused": 0}
        for g in graph_and_bodies(graph):  # bodies share the model's opset; function bodies may not
            for node in list(g.nodes):
                if not node.outputs or not is_default_domain(node):
                    continue
                m = (_match_erf(g, node) if node.op == "Erf" else _match_tanh(g, node) if node.op == "Tanh" else None)
                if m is None:
                    continue
                nodes, x, y, approx = m
                scope = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
                name, i = f"{scope}/Gelu", 0
                while name in used:
                    i += 1
                    name = f"{scope}/Gelu_{i}"
                used.add(name)
                for n in nodes:  # dead from here on; cleanup drops them
                    n.outputs.clear()
                g.nodes.append(gs.Node("Gelu", name, attrs={"approximate": approx}, inputs=[x], outputs=[y]))
                stats["gelu_fused" if approx == "none" else "gelu_tanh_fused"] += 1
        changed = any(stats.values())
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=changed, stats=stats)
