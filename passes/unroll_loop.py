"""unroll-loop: replace a Loop with a constant trip count by copies of its body, one per iteration.

A Loop is unrolled when its trip count M is a constant 0 <= M <= ``unroll_max_trips``, it never stops early
(no condition input, or a constant true one with a body that passes the condition through or returns a
constant true), every loop-carried value and scan output is a plain tensor, and the unrolled graph is
predicted to be no larger than the Loop once the other lossless passes have run:

- body nodes computed from constants and the iteration number only fold (the iteration number is a
  constant in each copy) and count 0;
- nodes computed from outer-scope values only are the same in every copy (cse merges them) and count once;
- nodes that read a loop-carried value count M times; an If among them counts as its larger branch;
- each scan output costs M Unsqueeze and, when M > 1, one Concat.

Per iteration i the body's nodes are copied in order with fresh names (``<name>__it<i>``): the iteration
number becomes the constant i, the condition the constant true, each loop-carried input the value the
previous iteration produced (the Loop's initial value first). Names read from outer scopes stay the same
tensors. Nested subgraphs (an If or Loop in the body) are copied with the iteration's tensors in scope, so
their captures of body values read the right copy. The Loop's outputs: the last iteration's carried values
(through Identity, which dce removes) and each scan output's values stacked along a new axis 0
(Unsqueeze + Concat), exactly what the Loop returns.

Inner Loops are unrolled before the Loops holding them (a copy then holds the unrolled body).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, is_default_domain, iter_graphs, toposort
from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.options import option


@dataclass(frozen=True)
class UnrollOptions:
    unroll_max_trips: int = option(16, "Largest constant trip count of a Loop that unroll-loop copies out "
                                       "(0 turns it off); only where the graph does not grow.", min=0)


def _scalar(t: gs.Tensor):
    if not t.name:
        return None
    v = const_value(t)
    if v is None:
        return None
    v = np.asarray(v)
    return v.reshape(-1)[0] if v.size == 1 else None


def _plain(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) or getattr(t, "type", "tensor_type") == "tensor_type"


def _subgraphs(node: gs.Node):
    for a in node.attrs.values():
        if isinstance(a, gs.Graph):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, gs.Graph))


def _size(g: gs.Graph) -> int:
    return sum(1 + sum(_size(b) for b in _subgraphs(n)) for n in g.nodes)


def trips(node: gs.Node, limit: int) -> int | None:
    """The number of iterations a Loop surely runs, when it is constant and at most ``limit``."""
    body = node.attrs.get("body")
    if not isinstance(body, gs.Graph) or len(node.inputs) < 2 or len(body.inputs) != len(node.inputs):
        return None
    m = _scalar(node.inputs[0])
    if m is None or not 0 <= int(m) <= limit:
        return None
    if node.inputs[1].name:
        cond = _scalar(node.inputs[1])
        if cond is None:
            return None
        if not bool(cond):
            return 0
        out = body.outputs[0]
        passes = out is body.inputs[1] or (len(out.inputs) == 1 and out.inputs[0].op == "Identity"
                                           and out.inputs[0].inputs[0] is body.inputs[1])
        if not passes and not (_scalar(out) is not None and bool(_scalar(out))):
            return None
    n_carried = len(node.inputs) - 2
    if len(body.outputs) < 1 + n_carried or len(node.outputs) != len(body.outputs) - 1:
        return None
    if not all(_plain(t) for t in list(body.inputs) + list(body.outputs) + list(node.outputs)):
        return None
    if int(m) == 0 and len(body.outputs) - 1 > n_carried:
        return None  # empty scan outputs: their element shape is not known here
    return int(m)


def predicted(node: gs.Node, m: int) -> tuple[int, int]:
    """(nodes the Loop counts now, nodes its unrolled form should count after fold/inline-if/cse/dce)."""
    body = node.attrs["body"]
    carried = {id(t) for t in body.inputs[2:]}
    const_like = {id(body.inputs[0]), id(body.inputs[1])}
    kind: dict[int, str] = {}  # tensor id -> "const" | "outer" | "carried"

    def of(t: gs.Tensor) -> str:
        if id(t) in kind:
            return kind[id(t)]
        if isinstance(t, gs.Constant) or id(t) in const_like or not t.name:
            return "const"
        if id(t) in carried:
            return "carried"
        return "outer"  # produced outside the body (body nodes set their outputs below)

    invariant = variant = 0
    for n in body.nodes:
        kinds = {of(t) for t in n.inputs}
        for sg in _subgraphs(n):  # captures of a nested body count as inputs of the node
            for inner in iter_graphs(sg):
                local = {id(t) for x in inner.nodes for t in x.outputs} | {id(t) for t in inner.inputs}
                kinds |= {of(t) for x in inner.nodes for t in x.inputs if id(t) not in local}
        k = "carried" if "carried" in kinds else "outer" if "outer" in kinds else "const"
        for o in n.outputs:
            kind[id(o)] = k
        if k == "const":
            continue
        if n.op == "If" and of(n.inputs[0]) == "const":  # inline-if keeps one branch
            cost = max((_size(b) for b in _subgraphs(n)), default=0)
        else:
            cost = 1 + sum(_size(b) for b in _subgraphs(n))
        if k == "carried":
            variant += cost
        else:
            invariant += cost
    scans = len(body.outputs) - 1 - (len(node.inputs) - 2)
    after = invariant + m * variant + scans * (m + (1 if m > 1 else 0))
    return 1 + _size(body), after


def _detach(n: gs.Node) -> None:
    """Remove ``n`` from its inputs' reader lists by identity (graphsurgeon compares nodes by value)."""
    for t in n.inputs:
        at = next((i for i, r in enumerate(t.outputs) if r is n), None)
        if at is not None:
            list.__delitem__(t.outputs, at)


class _Names:
    def __init__(self, root: gs.Graph) -> None:
        self.used: set[str] = set()
        for g in iter_graphs(root):
            self.used.update(g.tensors().keys())
            self.used.update(n.name for n in g.nodes if n.name)

    def fresh(self, base: str, suffix: str) -> str:
        for k in itertools.count():
            name = f"{base}__{suffix}" if k == 0 else f"{base}__{suffix}_{k}"
            if name not in self.used:
                self.used.add(name)
                return name
        raise AssertionError("unreachable")


def _scope_map(scopes: list[gs.Graph]) -> dict[str, gs.Tensor]:
    """Every name visible where the Loop is, as the tensors of the enclosing graphs."""
    names: dict[str, gs.Tensor] = {}
    for g in scopes:
        names.update(g.tensors())
    return names


def unroll(g: gs.Graph, node: gs.Node, m: int, scopes: list[gs.Graph], names: _Names, opset: int) -> None:
    body = node.attrs["body"]
    outer = _scope_map(scopes)
    carried: list[gs.Tensor] = list(node.inputs[2:])
    loop_outputs = list(node.outputs)
    # The Loop goes: its outputs get new producers below, its body stops reading outer tensors.
    node.outputs.clear()
    node.inputs.clear()
    for inner in iter_graphs(body):
        for n in inner.nodes:
            _detach(n)
    n_carried = len(carried)
    scan_values: list[list[gs.Tensor]] = [[] for _ in body.outputs[1 + n_carried:]]
    new_nodes: list[gs.Node] = []
    true = gs.Constant(names.fresh(node.name or "loop", "true"), np.array(True))
    for i in range(m):
        tag = f"it{i}"
        local: dict[int, gs.Tensor] = {
            id(body.inputs[0]): gs.Constant(names.fresh(body.inputs[0].name or "iter", tag), np.array(i, dtype=np.int64)),
            id(body.inputs[1]): true,
        }
        for t, v in zip(body.inputs[2:], carried):
            local[id(t)] = v
        by_name = dict(outer)  # for nested bodies, which resolve captures by name
        by_name.update({t.name: local[id(t)] for t in body.inputs if t.name})

        def get(t: gs.Tensor) -> gs.Tensor:
            if not t.name:
                return gs.Variable.empty()
            return local.get(id(t), t)  # an outer-scope tensor or a constant: the same object

        for n in body.nodes:
            outs = []
            for o in n.outputs:
                if not o.name:
                    outs.append(gs.Variable.empty())
                    continue
                new = gs.Variable(names.fresh(o.name, tag), dtype=o.dtype)
                local[id(o)] = new
                by_name[o.name] = new
                outs.append(new)
            ins = [get(t) for t in n.inputs]
            copy = n.copy(inputs=ins, outputs=outs, tensor_map=by_name)
            copy.name = names.fresh(n.name, tag) if n.name else ""
            new_nodes.append(copy)
        carried = [get(t) for t in body.outputs[1:1 + n_carried]]
        for k, t in enumerate(body.outputs[1 + n_carried:]):
            scan_values[k].append(get(t))
    axes = gs.Constant(names.fresh(node.name or "loop", "axes0"), np.array([0], dtype=np.int64))
    for out, v in zip(loop_outputs[:n_carried], carried):
        new_nodes.append(gs.Node("Identity", name=names.fresh(out.name, "final"), inputs=[v], outputs=[out]))
    for out, values in zip(loop_outputs[n_carried:], scan_values):
        stacked = []
        for i, v in enumerate(values):
            last = len(values) == 1
            t = out if last else gs.Variable(names.fresh(out.name, f"it{i}"), dtype=out.dtype)
            if opset >= 13:
                new_nodes.append(gs.Node("Unsqueeze", name=names.fresh(out.name, f"unsqueeze{i}"), inputs=[v, axes],
                                         outputs=[t]))
            else:
                new_nodes.append(gs.Node("Unsqueeze", name=names.fresh(out.name, f"unsqueeze{i}"), attrs={"axes": [0]},
                                         inputs=[v], outputs=[t]))
            stacked.append(t)
        if len(values) > 1:
            new_nodes.append(gs.Node("Concat", name=names.fresh(out.name, "concat"), attrs={"axis": 0},
                                     inputs=stacked, outputs=[out]))
    at = next(i for i, x in enumerate(g.nodes) if x is node)
    g.nodes[at:at + 1] = new_nodes


@register
class UnrollLoop(Pass):
    name = "unroll-loop"
    description = ("Unroll Loop nodes with a small constant trip count, body copied per iteration, where the "
                   "graph does not grow (--unroll-max-trips)")
    lossless = True
    Options = UnrollOptions

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        stats = {"loops_unrolled": 0, "iterations": 0}
        limit = int(self.options.unroll_max_trips)
        if limit <= 0 or not any(n.op == "Loop" for g in iter_graphs(graph) for n in g.nodes):
            return PassResult(changed=False, stats=stats)
        try:
            toposort(graph)  # the copies land at the Loop's place: a valid place only in a sorted graph
        except ValueError:
            return PassResult(changed=False, stats=stats, notes=["not unrolled: graph is not a DAG"])
        found: list[tuple[int, gs.Graph, gs.Node, int, list[gs.Graph]]] = []

        def walk(g: gs.Graph, scopes: list[gs.Graph]) -> None:
            for n in g.nodes:
                if n.op == "Loop" and is_default_domain(n):
                    m = trips(n, limit)
                    if m is not None:
                        before, after = predicted(n, m)
                        if after <= before:
                            found.append((len(scopes), g, n, m, scopes))
                for sg in _subgraphs(n):
                    walk(sg, scopes + [sg])

        walk(graph, [graph])
        if not found:
            return PassResult(changed=False, stats=stats)
        names = _Names(graph)
        for _, g, n, m, scopes in sorted(found, key=lambda f: -f[0]):  # inner Loops first
            unroll(g, n, m, scopes, names, int(graph.opset))
            stats["loops_unrolled"] += 1
            stats["iterations"] += m
        toposort(graph)
        return PassResult(changed=True, stats=stats)
