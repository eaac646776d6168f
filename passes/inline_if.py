"""inline-if: replace an If whose condition is known by the nodes of the branch it takes.

The condition is known when it is a constant or an initializer, or when the nodes computing it can
be evaluated now: constants, Shape/Size of a tensor with a static shape, Gather/Slice picking static
dims out of a partly symbolic Shape, and ordinary ops on such values (fold leaves the nodes computing
an If condition alone, so this pass evaluates them itself, each node once in onnxruntime). A shape the
model's value_info does not know (fold left its computation alone too) is completed by onnx shape
inference on its producer, given the values and shapes known here.

Inlining, in every graph (the main graph and If/Loop/Scan bodies, inner Ifs first):
- the kept branch's nodes move into the enclosing graph at the If's place; names the branch reads from
  outer scopes are the same tensors there and keep working;
- a name defined in the branch (a node output or a branch initializer) that is used anywhere else in
  the model gets a unique suffix, so the enclosing scope stays in SSA form and sibling bodies do not
  shadow it;
- the producer of each branch output produces the If's output tensor instead (the name readers and
  graph outputs know); a branch output that is an outer name, a constant, or a second output of the
  same tensor goes through an Identity (dce removes those it can);
- the If output's type/shape is merged with the branch output's: a dim known on either side is kept,
  a conflicting one drops the shape (shape-inference recomputes it) so onnxruntime never sees a
  value_info that contradicts what the branch computes. Declared graph outputs keep their declaration.

onnxruntime checks: an inlined branch exposes shapes to load-time inference that it never checked
inside the If (onnx's AffineGrid function body feeds [1]-shaped Split outputs to Range that way; the
model runs, the inlined one does not load). So the inlined model (a light copy: large weights become
typed inputs) must load in onnxruntime whenever the model before did (or pass strict onnx shape
inference when onnxruntime cannot load it, e.g. an unknown custom op); otherwise each If is tried on
its own and only those that keep the model loadable are inlined.

Nodes left dead (the condition's) are removed here by identity, not by graphsurgeon's cleanup, which
unregisters readers by value and breaks on identical nodes in sibling bodies. Model-local function
bodies are not searched (their conditions depend on the call's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim.graph import (NONDETERMINISTIC_OPS, const_value, has_subgraph, in_graph, is_default_domain,
                            is_tensor, iter_graphs, to_proto, toposort)
from onnxslim.loadcheck import LoadCheck, light_proto
from onnxslim.manager import Context, Pass, PassResult, register

# Inputs of a node evaluated for a condition: shape-like values, never weights.
EVAL_ELEMENTS = 1 << 16
# Nodes evaluated per condition before giving up (a condition is a short chain of shape arithmetic).
EVAL_NODES = 64
# Ifs tried one by one when inlining them all together breaks loading.
MAX_TRIALS = 32
_BRANCH = {True: "then_branch", False: "else_branch"}


@dataclass
class _Candidate:
    path: tuple[Any, ...]  # how to find the If again in a copy of the graph: node indices and attribute names
    scopes: list[gs.Graph]  # the main graph ... the graph holding the If
    node: gs.Node
    take: bool


# -- condition ------------------------------------------------------------------------------------

class _Evaluator:
    """Values of tensors computed from constants and static shapes; each node evaluated once."""

    def __init__(self, graph: gs.Graph) -> None:
        self.opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])]
        if not any(o.domain in ("", "ai.onnx") for o in self.opsets):
            self.opsets.append(onnx.helper.make_opsetid("", int(graph.opset)))
        self.ir = max(int(graph.ir_version or 8), 4)
        self.memo: dict[int, np.ndarray | None] = {}
        self.evaluated = 0

    def condition(self, t: gs.Tensor) -> bool | None:
        self.budget = EVAL_NODES
        try:
            v = self.value(t, 0)
        except RecursionError:
            return None
        if v is None or v.size != 1 or v.dtype.kind not in "biuf":
            return None
        return bool(v.reshape(-1)[0])

    def value(self, t: gs.Tensor, depth: int) -> np.ndarray | None:
        if id(t) in self.memo:
            return self.memo[id(t)]
        v = const_value(t)
        if v is not None:
            v = np.asarray(v)
        elif len(t.inputs) == 1 and depth < EVAL_NODES and self.budget > 0:
            self.budget -= 1
            v = self._computed(t, t.inputs[0], depth)
        self.memo[id(t)] = v
        return v

    def _computed(self, t: gs.Tensor, p: gs.Node, depth: int) -> np.ndarray | None:
        if (not is_default_domain(p) or has_subgraph(p) or p.op in NONDETERMINISTIC_OPS
                or any(isinstance(a, gs.Node.AttributeRef) for a in p.attrs.values())):
            return None
        if p.op in ("Shape", "Size"):
            dims = self._shape_dims(p, depth)
            if dims is None or any(d is None for d in dims):
                return None
            return np.array(int(np.prod(dims, dtype=np.int64)) if p.op == "Size" else dims, dtype=np.int64)
        if p.op in ("Gather", "Slice") and p.inputs and len(p.inputs[0].inputs) == 1 and p.inputs[0].inputs[0].op == "Shape":
            picked = self._pick_dims(p, depth)
            if picked is not None:
                return picked
        ins = []
        for i in p.inputs:
            if not i.name:
                ins.append(None)
                continue
            v = self.value(i, depth + 1)
            if v is None or v.size > EVAL_ELEMENTS or v.dtype.kind not in "biuf":
                return None
            ins.append(v)
        outs = self._run(p, ins)
        if outs is None:
            return None
        for o, v in zip(p.outputs, outs):
            self.memo[id(o)] = v
        return self.memo.get(id(t))

    def _pick_dims(self, p: gs.Node, depth: int) -> np.ndarray | None:
        """Gather/Slice of Shape(x) that picks only static dims of a partly symbolic x."""
        dims = self._shape_dims(p.inputs[0].inputs[0], depth)
        if dims is None:
            return None
        ins: list[np.ndarray | None] = [np.arange(len(dims), dtype=np.int64)]  # the dims' positions
        for i in p.inputs[1:]:
            v = self.value(i, depth + 1) if i.name else None
            if i.name and v is None:
                return None
            ins.append(v)
        outs = self._run(p, ins)
        if outs is None:
            return None
        picked = np.asarray(outs[0])
        if any(dims[int(i)] is None for i in picked.reshape(-1)):
            return None
        return np.array([dims[int(i)] for i in picked.reshape(-1)], dtype=np.int64).reshape(picked.shape)

    def _shape_dims(self, shape_node: gs.Node, depth: int) -> list[int | None] | None:
        """The dims a Shape/Size node reads (None where unknown), honouring Shape's start/end."""
        if not shape_node.inputs:
            return None
        dims = self.shape(shape_node.inputs[0], depth + 1)
        if dims is not None and shape_node.op == "Shape":
            start, end = int(shape_node.attrs.get("start", 0)), shape_node.attrs.get("end")
            dims = dims[start:None if end is None else int(end)]
        return dims

    def shape(self, t: gs.Tensor, depth: int) -> list[int | None] | None:
        """``t``'s dims, completed by shape inference on its producer when its inputs' shapes or values are
        known here but not in the model's value_info (fold leaves the nodes feeding an If condition
        unfolded, e.g. the shape computation of a Reshape whose output's dims the condition tests)."""
        dims = _dims(t)
        if dims is not None and None not in dims:
            return dims
        key = -id(t)  # shapes and values share the memo, apart by sign
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = dims
        p = t.inputs[0] if len(t.inputs) == 1 else None
        if (p is None or depth >= EVAL_NODES or self.budget <= 0 or not is_default_domain(p) or has_subgraph(p)
                or any(isinstance(a, gs.Node.AttributeRef) for a in p.attrs.values())):
            return dims
        self.budget -= 1
        inferred = self._infer(p, t, depth)
        if inferred is not None and (dims is None or len(dims) == len(inferred)):
            dims = [a if a is not None else b for a, b in zip(inferred, dims or inferred)]
        self.memo[key] = dims
        return dims

    def _infer(self, p: gs.Node, t: gs.Tensor, depth: int) -> list[int | None] | None:
        proto = OnnxExporter.export_node(p)
        inputs, inits = [], []
        for i, name in enumerate(proto.input):
            src = p.inputs[i]
            if not name:
                continue
            v = self.value(src, depth + 1)
            if v is not None and v.size <= EVAL_ELEMENTS and v.dtype.kind in "biuf":
                inits.append(onnx.numpy_helper.from_array(v, name))
                continue
            dtype = src.dtype if is_tensor(src) else None
            if dtype is None:
                return None
            shape = self.shape(src, depth + 1)
            try:
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            except (TypeError, KeyError, ValueError):
                return None
            inputs.append(onnx.helper.make_tensor_value_info(
                name, elem, None if shape is None else [d if d is not None else f"d{k}" for k, d in enumerate(shape)]))
        g = onnx.helper.make_graph([proto], "shape", inputs,
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in proto.output if o],
                                   initializer=inits)
        try:
            model = onnx.helper.make_model(g, opset_imports=self.opsets, ir_version=self.ir)
            out = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - no inference: the shape stays as the model has it
            return None
        vi = next((o for o in out.graph.output if o.name == t.name), None)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return [int(d.dim_value) if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    def _run(self, p: gs.Node, ins: list[np.ndarray | None]) -> list[np.ndarray] | None:
        proto = OnnxExporter.export_node(p)
        names = [f"in{i}" if v is not None else "" for i, v in enumerate(ins)]
        del proto.input[:]
        proto.input.extend(names)
        outs = [f"out{i}" if o.name else "" for i, o in enumerate(p.outputs)]
        del proto.output[:]
        proto.output.extend(outs)
        inits = [onnx.numpy_helper.from_array(v, n) for n, v in zip(names, ins) if v is not None]
        g = onnx.helper.make_graph([proto], "cond", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outs if o],
                                   initializer=inits)
        model = onnx.helper.make_model(g, opset_imports=self.opsets, ir_version=self.ir)
        wanted = [o for o in outs if o]
        self.evaluated += 1
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 4
            so.intra_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            got = sess.run(wanted, {})
        except Exception:  # noqa: BLE001 - no kernel or a failing node: the condition stays unknown
            try:
                from onnx.reference import ReferenceEvaluator

                got = ReferenceEvaluator(model).run(wanted, {})
            except Exception:  # noqa: BLE001
                return None
        values = iter(np.asarray(v) for v in got)
        return [next(values) if o else None for o in outs]


def _dims(t: gs.Tensor) -> list[int | None] | None:
    if not is_tensor(t) or t.shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None
            for d in t.shape]


# -- planning ---------------------------------------------------------------------------------------

def _subgraph_attrs(node: gs.Node):
    for key, a in node.attrs.items():
        if isinstance(a, gs.Graph):
            yield (key, None), a
        elif isinstance(a, (list, tuple)):
            for j, x in enumerate(a):
                if isinstance(x, gs.Graph):
                    yield (key, j), x


def _find(graph: gs.Graph, ev: _Evaluator, opset: int) -> list[_Candidate]:
    """Ifs with a known condition, parents before children; the branch an If drops is not searched."""
    found: list[_Candidate] = []

    def walk(g: gs.Graph, path: tuple, scopes: list[gs.Graph]) -> None:
        for i, node in enumerate(g.nodes):
            take = None
            if node.op == "If" and is_default_domain(node) and node.inputs and _inlinable(node, opset):
                take = ev.condition(node.inputs[0])
            if take is not None:
                found.append(_Candidate(path + (i,), scopes, node, take))
                kept = node.attrs[_BRANCH[take]]
                walk(kept, path + (i, (_BRANCH[take], None)), scopes + [kept])
                continue
            for key, sg in _subgraph_attrs(node):
                walk(sg, path + (i, key), scopes + [sg])

    walk(graph, (), [graph])
    return found


def _inlinable(node: gs.Node, opset: int) -> bool:
    then_b, else_b = node.attrs.get("then_branch"), node.attrs.get("else_branch")
    if not isinstance(then_b, gs.Graph) or not isinstance(else_b, gs.Graph):
        return False
    for b in (then_b, else_b):
        if len(b.outputs) != len(node.outputs) or b.inputs:
            return False
        for o in b.outputs:
            # An output that needs an Identity must be of a type Identity takes at this opset.
            kind = getattr(o, "type", "tensor_type") if not isinstance(o, gs.Constant) else "tensor_type"
            if kind == "sequence_type" and opset < 14 or kind not in ("tensor_type", "sequence_type") and opset < 16:
                return False
    return True


def _resolve(graph: gs.Graph, path: tuple) -> tuple[list[gs.Graph], gs.Node]:
    scopes = [graph]
    steps = list(path)
    while True:
        node = scopes[-1].nodes[steps.pop(0)]
        if not steps:
            return scopes, node
        key, j = steps.pop(0)
        scopes.append(node.attrs[key] if j is None else node.attrs[key][j])


# -- inlining -----------------------------------------------------------------------------------------

class _Names:
    """Every tensor and node name of the model's main namespace (main graph and bodies), by object."""

    def __init__(self, graph: gs.Graph) -> None:
        self.tensors: dict[str, dict[int, gs.Tensor]] = {}
        self.nodes: dict[str, set[int]] = {}
        for g in _bodies(graph):
            for t in list(g.inputs) + list(g.outputs):
                self.add(t)
            for n in g.nodes:
                self.nodes.setdefault(n.name, set()).add(id(n))
                for t in list(n.inputs) + list(n.outputs):
                    self.add(t)
        self.fixed = {id(t) for t in list(graph.inputs) + list(graph.outputs)}  # the model's contract

    def add(self, t: gs.Tensor) -> None:
        if t.name:
            self.tensors.setdefault(t.name, {})[id(t)] = t

    def forget(self, g: gs.Graph) -> None:
        """Names of a dropped branch are free again (its tensors are gone with it)."""
        for sg in _bodies(g):
            for n in sg.nodes:
                self.nodes.get(n.name, set()).discard(id(n))
                for t in n.outputs:
                    self.tensors.get(t.name, {}).pop(id(t), None)

    def clashes(self, t: gs.Tensor) -> bool:
        return bool(t.name) and any(k != id(t) for k in self.tensors.get(t.name, {}))

    def fresh(self, base: str, tag: str) -> str:
        name, k = f"{base}__{tag}", 1
        while name in self.tensors or name in self.nodes:
            k += 1
            name = f"{base}__{tag}{k}"
        return name

    def rename(self, t: gs.Tensor, tag: str) -> None:
        self.tensors.get(t.name, {}).pop(id(t), None)
        if isinstance(t, gs.Constant) and type(t._values) is LazyValues:
            # graphsurgeon's exporter writes the constant's name into the TensorProto it wraps, which is
            # the source model's own initializer: renamed, it would rename the caller's tensor too.
            own = onnx.TensorProto()
            own.CopyFrom(t._values.tensor)
            t._values = LazyValues(own)
        t.name = self.fresh(t.name, tag)
        self.add(t)


def _bodies(graph: gs.Graph):
    """The graph and its nested bodies (not model-local functions: they have their own namespace)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for n in g.nodes:
            stack.extend(sg for _, sg in _subgraph_attrs(n))


def _merged_shape(a, b):
    """The If output's shape and the branch output's: known dims from either; None on a conflict."""
    if a is None:
        return b
    if b is None or len(a) != len(b):
        return None if b is not None else a
    out = []
    for x, y in zip(a, b):
        xs = isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
        ys = isinstance(y, (int, np.integer)) and not isinstance(y, bool) and y >= 0
        if xs and ys and int(x) != int(y):
            return None
        out.append(x if xs or not ys else y)
    return out


def _replace_reads(branch: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    for reader in list(old.outputs):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new
    for sg in _bodies(branch):
        for i, t in enumerate(sg.outputs):
            if t is old:
                sg.outputs[i] = new


def _visible(src: gs.Tensor, scopes: list[gs.Graph], names: _Names) -> gs.Tensor | None:
    """The tensor a body output stands for. graphsurgeon imports a body output that no body node
    produces (an outer name) as a placeholder of the same name: find the real one in the scopes."""
    if isinstance(src, gs.Constant) or src.inputs:
        return src
    same = [t for t in names.tensors.get(src.name, {}).values() if t is not src]
    for gr in reversed(scopes):
        for t in same:
            if (t.inputs and in_graph(gr, t.inputs[0])) or any(t is i for i in gr.inputs):
                return t
    return next((t for t in same if isinstance(t, gs.Constant)), None)


def _inline(scopes: list[gs.Graph], node: gs.Node, take: bool, names: _Names, serial: int) -> int | None:
    """Move the kept branch of ``node`` into ``scopes[-1]``; returns how many Identity nodes it needed,
    None when a branch output cannot be traced (then nothing changed)."""
    g = scopes[-1]
    branch, dropped = node.attrs[_BRANCH[take]], node.attrs[_BRANCH[not take]]
    sources = [_visible(t, scopes, names) for t in branch.outputs]
    if any(t is None for t in sources):
        return None
    tag = f"if{serial}"
    names.forget(dropped)
    moved = list(branch.nodes)
    local = [t for n in moved for t in n.outputs if t.name]
    local += [t for sg in _bodies(branch) for n in sg.nodes for t in n.inputs if isinstance(t, gs.Constant)]
    seen: set[int] = set()
    for t in local:
        if id(t) not in seen and id(t) not in names.fixed and names.clashes(t):
            names.rename(t, tag)
        seen.add(id(t))
    for n in moved:
        if n.name and len(names.nodes.get(n.name, ())) > 1:
            names.nodes[n.name].discard(id(n))
            n.name = names.fresh(n.name, tag)
            names.nodes.setdefault(n.name, set()).add(id(n))

    if_outs = list(node.outputs)
    node.outputs.clear()
    _detach(node)
    claimed: dict[int, gs.Tensor] = {}
    extra: list[gs.Node] = []
    for out, src in zip(if_outs, sources):
        if not out.name:
            continue
        if out.dtype is None and is_tensor(src):
            out.dtype = src.dtype
        if id(out) not in names.fixed:  # a declared model output keeps its declaration
            out.shape = _merged_shape(out.shape, src.shape)
        if (id(src) not in claimed and not isinstance(src, gs.Constant) and len(src.inputs) == 1
                and in_graph(branch, src.inputs[0])):
            prod = src.inputs[0]
            idx = next(i for i, t in enumerate(prod.outputs) if t is src)
            _replace_reads(branch, src, out)
            prod.outputs[idx] = out
            names.tensors.get(src.name, {}).pop(id(src), None)
            claimed[id(src)] = out
        else:  # an outer name, a constant, or a tensor that already feeds another output
            base = claimed.get(id(src), src)
            extra.append(gs.Node("Identity", name=names.fresh(out.name, "inlined"), inputs=[base], outputs=[out]))
            names.nodes.setdefault(extra[-1].name, set()).add(id(extra[-1]))
    at = next(i for i, n in enumerate(g.nodes) if n is node)
    g.nodes[at:at + 1] = moved + extra
    branch.nodes.clear()
    for sg in _bodies(dropped):  # its nodes must not stay listed as readers of outer tensors
        for n in sg.nodes:
            _detach(n)
    node.attrs.clear()
    return len(extra)


def _detach(n: gs.Node) -> None:
    """Remove ``n`` from its inputs' reader lists. Not ``n.inputs.clear()``: after other passes a
    reader can already be missing from a tensor's list (graphsurgeon would raise)."""
    for t in n.inputs:
        at = next((i for i, r in enumerate(t.outputs) if r is n), None)
        if at is not None:
            list.__delitem__(t.outputs, at)
    list.clear(n.inputs)


def _resync(graph: gs.Graph) -> None:
    """Rebuild every tensor's reader list from the nodes that really read it. graphsurgeon removes a
    reader with ``list.remove``, which compares nodes by value: when sibling bodies hold identical
    nodes with identical names (legal, and what inlining may leave), a cleanup can unregister the
    wrong one, and the next edit of that tensor fails or misses a reader."""
    readers: dict[int, list[gs.Node]] = {}
    tensors: dict[int, gs.Tensor] = {}
    for g in iter_graphs(graph):
        for t in list(g.inputs) + list(g.outputs):
            tensors[id(t)] = t
        for n in g.nodes:
            for t in n.inputs:
                tensors[id(t)] = t
                readers.setdefault(id(t), []).append(n)
            for t in n.outputs:
                tensors[id(t)] = t
    for k, t in tensors.items():
        list.clear(t.outputs)
        list.extend(t.outputs, readers.get(k, []))


def _prune(graph: gs.Graph) -> int:
    """Remove the nodes nothing reads any more (the condition's, a dead branch output's), in every graph.
    Not graphsurgeon's cleanup: it unregisters readers with a by-value ``list.remove`` (see _resync)
    and fails on identical nodes in sibling bodies. Needs exact reader lists (_resync)."""
    removed = 0
    again = True
    while again:
        again = False
        for g in list(iter_graphs(graph)):
            outs = {id(t) for t in g.outputs}
            keep = []
            for n in reversed(g.nodes):  # readers before producers: a dead chain goes in one sweep
                if n.outputs and all(not t.outputs and id(t) not in outs for t in n.outputs):
                    for _, sg in _subgraph_attrs(n):
                        for inner in _bodies(sg):
                            for m in inner.nodes:
                                _detach(m)
                    _detach(n)
                    for t in n.outputs:
                        list.clear(t.inputs)
                    removed += 1
                    again = True
                else:
                    keep.append(n)
            if len(keep) != len(g.nodes):
                g.nodes[:] = keep[::-1]
    return removed


def inline_all(graph: gs.Graph, cands: list[_Candidate]) -> tuple[int, int]:
    """Inline ``cands`` (found in ``graph``), inner Ifs first. Returns (Ifs inlined, Identity nodes added)."""
    names = _Names(graph)
    inlined = identities = 0
    for serial, c in sorted(enumerate(cands), key=lambda sc: -len(sc[1].path)):
        added = _inline(c.scopes, c.node, c.take, names, serial)
        if added is not None:
            inlined += 1
            identities += added
    return inlined, identities


# -- the load check -----------------------------------------------------------------------------------

def _trial(light: onnx.ModelProto, cands: list[_Candidate], check: LoadCheck) -> bool:
    """Whether the light copy still loads with ``cands`` inlined (a copy: the model is not touched)."""
    try:
        g = gs.import_onnx(light)
        inline_all(g, [_Candidate(c.path, *_resolve(g, c.path), c.take) for c in cands])
        _resync(g)
        _prune(g)
        model = to_proto(g, onnx.ModelProto(ir_version=light.ir_version))
    except Exception:  # noqa: BLE001 - a copy we cannot inline is a copy that does not load
        return False
    return check.ok(model)


def _key(node: gs.Node) -> tuple[str, ...]:
    return (node.name,) + tuple(o.name for o in node.outputs)


@register
class InlineIf(Pass):
    name = "inline-if"
    description = ("Inline If nodes whose condition is known (constants, static shapes), in every body; "
                   "kept only where the model still loads in onnxruntime")
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        if not any(n.op == "If" for g in _bodies(graph) for n in g.nodes):
            return PassResult(changed=False, stats={"ifs_inlined": 0})
        try:
            toposort(graph)  # the branch lands at the If's place: that is a valid place only in a sorted graph
        except ValueError:
            return PassResult(changed=False, notes=["not inlined: graph is not a DAG"])
        ev = _Evaluator(graph)
        # An If rejected by the load check in an earlier round of the fixed point stays rejected
        # (the pass object lives for the whole pipeline; graph objects do not, so keys are names).
        rejected: set[tuple[str, ...]] = self.__dict__.setdefault("_rejected", set())
        cands = [c for c in _find(graph, ev, int(graph.opset)) if _key(c.node) not in rejected]
        stats = {"ifs_inlined": 0, "ifs_kept_by_load_check": 0, "nodes_evaluated": ev.evaluated, "identities": 0}
        if not cands:
            return PassResult(changed=False, stats=stats)
        notes: list[str] = []
        light = light_proto(graph)
        check = LoadCheck(light, ctx.custom_op_library)
        if check.mode is None:
            notes.append(f"{len(cands)} If node(s) with a known condition kept: the model cannot be load-checked")
            return PassResult(changed=False, stats=stats, notes=notes)
        accepted = cands
        if not _trial(light, cands, check):
            accepted = []
            for c in cands[:MAX_TRIALS]:
                # Greedy: each If is tried with those accepted before it. An If nested in a rejected
                # If's kept branch still has a valid path: that If stays and holds it.
                if _trial(light, accepted + [c], check):
                    accepted.append(c)
                else:
                    rejected.add(_key(c.node))
                    name = c.node.name or c.node.outputs[0].name
                    notes.append(f"If '{name}' kept: with its branch inlined the model no longer loads in onnxruntime")
            stats["ifs_kept_by_load_check"] = len(cands) - len(accepted)
        _resync(graph)
        stats["ifs_inlined"], stats["identities"] = inline_all(graph, accepted)
        stats["nodes_evaluated"] = ev.evaluated
        stats["load_checks"] = check.sessions
        if stats["ifs_inlined"]:
            _resync(graph)
            stats["dead_nodes_removed"] = _prune(graph)
        return PassResult(changed=bool(stats["ifs_inlined"]), stats=stats, notes=notes)
