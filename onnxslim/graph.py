"""Shared graph helpers: the one place that converts between ModelProto and onnx-graphsurgeon,
plus the small queries every pass needs (constants, consumers, subgraph walking).
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim import weights
from onnxslim.protowalk import iter_nodes, iter_tensors, subgraphs

# onnx-graphsurgeon logs warnings for things we handle ourselves (e.g. unknown shapes).
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)

DEFAULT_DOMAINS = ("", "ai.onnx")


class StoredValues(LazyValues):
    """Values of a weight left on disk (onnxslim.weights), read only when a pass asks for them.

    graphsurgeon exports a constant whose values are still lazy as its TensorProto, so an untouched
    weight leaves as the small stub it came in as and is streamed from disk at save time. ``tensor``
    is a fresh copy on each access because the exporter renames it in place and constants may share it.
    Loaded values are a read-only memory map: a pass that wants to change them must make a new array.
    """

    def __init__(self, stub: onnx.TensorProto) -> None:
        super().__init__(stub)
        self._loaded: weakref.ref | None = None

    @property
    def tensor(self) -> onnx.TensorProto:
        t = onnx.TensorProto()
        t.CopyFrom(self._stub)
        return t

    @tensor.setter
    def tensor(self, t: onnx.TensorProto) -> None:
        self._stub = t

    def load(self) -> np.ndarray:
        arr = weights.stub_array(self._stub)
        self._loaded = weakref.ref(arr)
        return arr

    def is_loaded_as(self, values: object) -> bool:
        return self._loaded is not None and self._loaded() is values


def _graph_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every Constant of the graph and its subgraphs/functions, including node attribute tensors."""
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                yield t
        for n in g.nodes:
            for a in n.attrs.values():
                if isinstance(a, gs.Constant):
                    yield a


def to_gs(model: ModelProto) -> gs.Graph:
    """Import a model as a graphsurgeon graph (weights stay lazy: no copy until a pass reads them)."""
    graph = gs.import_onnx(model)
    _declared_io_types(graph, model.graph)
    if weights.has_stubs(model):
        for c in _graph_constants(graph):
            if type(c._values) is LazyValues and weights.is_stub(c._values.tensor):
                c._values = c._slim_stored = StoredValues(c._values.tensor)
                # Where the data lives is decided at save time; a stale EXTERNAL here would be
                # exported onto new values if a pass replaced them.
                c.data_location = None
    return graph


def _declared_io_types(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """graphsurgeon lets a value_info entry override the declared type of a graph input or output
    (it reads value_info first); the declarations are the model's contract, so they win."""
    from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

    declared = {vi.name: vi for vi in list(proto.input) + list(proto.output) if vi.type.HasField("tensor_type")}
    for t in list(graph.inputs) + list(graph.outputs):
        vi = declared.get(t.name)
        if vi is None or isinstance(t, gs.Constant):
            continue
        t.dtype = get_onnx_tensor_dtype(vi) if vi.type.tensor_type.elem_type else None
        t.shape = get_onnx_tensor_shape(vi)
        t.type = "tensor_type"


def stored_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A Constant holding a new array a pass made. While the run is spilling (onnxslim.weights), a large
    one goes to the spill file at once and the Constant reads it back lazily: a pass that rewrites every
    weight never holds more than the one it is working on."""
    values = np.asarray(values)
    stub = weights.spill(values, name)
    if stub is None:  # a C-ordered copy of its own (ascontiguousarray would make 0-d arrays 1-d)
        return gs.Constant(name, np.array(values, order="C"))
    c = gs.Constant(name, StoredValues(stub))
    c._slim_stored = c._values
    return c


def _spill_constant(c: gs.Constant) -> None:
    """Move a large in-memory array of ``c`` to the spill file (if spilling), leaving a lazy stub."""
    if c._export_dtype is not None or not isinstance(c._values, np.ndarray):
        return
    stub = weights.spill(c._values, c.name)
    if stub is not None:
        c._values = c._slim_stored = StoredValues(stub)
        c.data_location = None


def to_proto(graph: gs.Graph, template: ModelProto) -> ModelProto:
    """Export ``graph`` and carry over every model-level field of ``template``.

    graphsurgeon rebuilds the ModelProto from scratch; metadata, producer, doc strings,
    IR version and opset imports of other domains would be lost without this.
    While spilling, large arrays the passes made leave as stubs into the spill file, not as protobuf
    copies (the graph's constants then read them lazily too).
    """
    spilling = weights.spill_active()
    for c in _graph_constants(graph):
        # A weight a pass only read (values loaded, same array) leaves as its stub again, not as a copy.
        stored = getattr(c, "_slim_stored", None)
        if stored is not None and c._values is not stored and stored.is_loaded_as(c._values):
            c._values = stored
        elif spilling:
            _spill_constant(c)
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    model.graph.doc_string = template.graph.doc_string
    model.graph.name = template.graph.name
    # Opset imports: keep the template's (the model's contract); add any new domain a pass used.
    have = {imp.domain: imp.version for imp in template.opset_import}
    new = [imp for imp in model.opset_import if imp.domain not in have]
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.opset_import.extend(new)
    if not graph.functions and template.functions:
        model.functions.extend(template.functions)
    if len(template.training_info):
        model.training_info.extend(template.training_info)
    _dedupe_subgraph_initializers(model.graph)
    if template.ir_version and template.ir_version < 4:
        _initializers_as_inputs(model.graph)
    return model


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    return (a.data_type == b.data_type and list(a.dims) == list(b.dims)
            and a.SerializeToString() == b.SerializeToString())


def _dedupe_subgraph_initializers(main: onnx.GraphProto) -> None:
    """graphsurgeon exports a constant read from an outer scope as an initializer of every subgraph
    that reads it (a weight used by both If branches is stored three times). Drop copies that an
    enclosing scope already holds, and hoist identical copies held by several subgraphs to the main graph.
    """
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}

    def walk(g: onnx.GraphProto, outer: dict[str, onnx.TensorProto]) -> None:
        if outer:
            for i in reversed(range(len(g.initializer))):
                t = g.initializer[i]
                if t.name in outer and _same_tensor(outer[t.name], t):
                    del g.initializer[i]
        if g is not main:
            for t in g.initializer:
                copies.setdefault(t.name, []).append((g, t))
        scope = dict(outer)
        scope.update((t.name, t) for t in g.initializer)
        for sg in subgraphs(g):
            walk(sg, scope)

    walk(main, {})
    main_names = ({t.name for t in main.initializer} | {v.name for v in main.input}
                  | {o for n in main.node for o in n.output})
    for name, held in copies.items():
        if len(held) < 2 or name in main_names or not all(_same_tensor(held[0][1], t) for _, t in held[1:]):
            continue
        main.initializer.append(held[0][1])
        for g, _ in held:
            for i in reversed(range(len(g.initializer))):
                if g.initializer[i].name == name:
                    del g.initializer[i]


def _initializers_as_inputs(g: onnx.GraphProto) -> None:
    """IR version < 4 requires every initializer of the main graph to be a graph input too (graphsurgeon drops them)."""
    have = {v.name for v in g.input}
    for t in g.initializer:
        if t.name not in have:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def opset_version(graph: gs.Graph, domain: str = "") -> int:
    if domain in DEFAULT_DOMAINS:
        return int(graph.opset)
    return int(graph.import_domains and next((d.version for d in graph.import_domains if d.domain == domain), 1) or 1)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every nested subgraph (If/Loop/Scan bodies), depth first, plus function bodies."""
    stack = [graph]
    seen: set[int] = set()
    while stack:
        g = stack.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        yield g
        for node in g.nodes:
            for attr in node.attrs.values():
                if isinstance(attr, gs.Graph):
                    stack.append(attr)
                elif isinstance(attr, (list, tuple)):
                    stack.extend(a for a in attr if isinstance(a, gs.Graph))
        for fn in getattr(g, "functions", []) or []:
            stack.append(fn)


def graph_and_bodies(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and its If/Loop/Scan bodies, parents first; not model-local function bodies."""
    # Called before and after every pass (the manager's statistics): plain loops, no generator per
    # attribute, since nearly every attribute is an int or a list of ints.
    out, stack = [], [graph]
    Graph = gs.Graph
    while stack:
        g = stack.pop(0)
        out.append(g)
        for n in g.nodes:
            for a in n.attrs.values():
                if isinstance(a, Graph):
                    stack.append(a)
                elif isinstance(a, (list, tuple)) and a and isinstance(a[0], Graph):
                    stack.extend(x for x in a if isinstance(x, Graph))
    return out


def has_subgraph(node: gs.Node) -> bool:
    for a in node.attrs.values():
        if isinstance(a, gs.Graph) or (isinstance(a, (list, tuple)) and any(isinstance(x, gs.Graph) for x in a)):
            return True
    return False


def is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in DEFAULT_DOMAINS


def is_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(t, gs.Constant):
        return t.values
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and is_default_domain(t.inputs[0]):
        attrs = t.inputs[0].attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return attrs["value"].values
    return None


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)


def outer_scope_names(graph: gs.Graph) -> set[str]:
    """Names that nested subgraphs read from an enclosing scope: they must stay alive."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        if g is graph:
            continue
        local = {t.name for t in g.inputs} | {t.name for n in g.nodes for t in n.outputs}
        for n in g.nodes:
            for t in n.inputs:
                if t.name and t.name not in local and not isinstance(t, gs.Constant):
                    names.add(t.name)
    return names


def count_params(model: ModelProto) -> int:
    """Number of elements in floating-point initializers (what people call parameters)."""
    total = 0
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    for t in iter_tensors(model):
        if t.data_type in float_types:
            n = 1
            for d in t.dims:
                n *= d
            total += n
    return total


iter_proto_nodes = iter_nodes  # the older name, kept for callers


def op_histogram(model: ModelProto) -> dict[str, int]:
    """Op type counts over the main graph and all subgraphs (custom domains prefixed)."""
    hist: dict[str, int] = {}
    for n in iter_nodes(model.graph):
        key = n.op_type if n.domain in DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}"
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items()))


def node_count(model: ModelProto) -> int:
    return sum(op_histogram(model).values())


# Ops whose output is not a function of their inputs: never folded, never merged.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})


def is_tensor(t: gs.Tensor) -> bool:
    """A plain tensor (not a sequence, map, optional or sparse value)."""
    return isinstance(t, gs.Constant) or getattr(t, "type", "tensor_type") == "tensor_type"


def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """The fully known shape of a tensor, else None (unknown rank or any symbolic/unknown dim)."""
    if not is_tensor(t):
        return None
    shape = t.shape
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
            return None
        out.append(int(d))
    return tuple(out)


def tensor_dtype(t: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a plain tensor when known and representable, else None."""
    if not is_tensor(t) or t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def placeholder(base: str) -> gs.Variable:
    """An output nobody reads, for a node that must keep its output count until cleanup removes it.
    Named after the tensor it stands in for, so that runs stay byte-identical."""
    return gs.Variable(f"{base}__unused")


def in_graph(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether ``node`` belongs to ``graph`` itself (not to an enclosing or nested one), in O(1).

    The id set is cached on the graph and rebuilt whenever its node list changes identity, length
    or ends (cleanup, appends); passes clear dead nodes rather than removing them mid-pass."""
    nodes = graph.nodes
    stamp = (id(nodes), len(nodes), id(nodes[0]) if nodes else 0, id(nodes[-1]) if nodes else 0)
    cached = graph.__dict__.get("_slim_members")  # not getattr: gs.Graph.__getattr__ logs an error for unknown names
    if cached is None or cached[0] != stamp:
        cached = (stamp, {id(n) for n in nodes})
        graph._slim_members = cached
    return id(node) in cached[1]


def substitute(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every reader of ``old`` read ``new`` (which holds the same value); ``old``'s producer goes dead.

    Readers in nested subgraphs are the same tensor objects and follow. When ``old`` is an output of
    ``graph`` its name is part of the contract, so ``new``'s producer is made to produce ``old``
    instead; that needs ``new`` to come from a node of this very graph and not be an input or output.
    Returns False (and changes nothing) when the substitution is not possible.
    """
    if old is new:
        return False
    if any(o is old for o in graph.outputs):
        if (isinstance(new, gs.Constant) or len(new.inputs) != 1 or any(t is new for t in graph.inputs)
                or any(t is new for t in graph.outputs)):
            return False
        prod = new.inputs[0]
        if not in_graph(graph, prod):
            return False  # produced in an enclosing scope
        idx = next(i for i, t in enumerate(prod.outputs) if t is new)
        if old.inputs:  # its old producer keeps its output arity (a placeholder nobody reads)
            p = old.inputs[0]
            j = next(i for i, t in enumerate(p.outputs) if t is old)
            p.outputs[j] = placeholder(old.name)
        for reader in list(new.outputs):
            for i, t in enumerate(reader.inputs):
                if t is new:
                    reader.inputs[i] = old
        prod.outputs[idx] = old
        return True
    for reader in list(old.outputs):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new
    return True


def live_node_count(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in iter_graphs(graph))


def toposort(graph: gs.Graph) -> None:
    """Order the nodes of the graph, its subgraphs and functions topologically, keeping the current
    order wherever it is already valid. Linear time (graphsurgeon's own sort is far slower on large
    graphs). A node with subgraphs depends on whatever its bodies read from this graph.
    Raises ValueError on a cycle."""
    for g in iter_graphs(graph):
        nodes = list(g.nodes)
        index = {id(n): i for i, n in enumerate(nodes)}
        order: list[gs.Node] = []
        state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed

        def deps(n: gs.Node) -> list[int]:
            tensors = list(n.inputs)
            if has_subgraph(n):
                for a in n.attrs.values():
                    for sg in (a if isinstance(a, (list, tuple)) else [a]):
                        if isinstance(sg, gs.Graph):
                            for inner in iter_graphs(sg):
                                for m in inner.nodes:
                                    tensors.extend(m.inputs)
                                tensors.extend(inner.outputs)
            out = []
            for t in tensors:
                for p in t.inputs:
                    i = index.get(id(p))
                    if i is not None:
                        out.append(i)
            return out

        for start in range(len(nodes)):
            if state[start]:
                continue
            stack = [(start, iter(deps(nodes[start])))]
            state[start] = 1
            while stack:
                i, it = stack[-1]
                for d in it:
                    if state[d] == 0:
                        state[d] = 1
                        stack.append((d, iter(deps(nodes[d]))))
                        break
                    if state[d] == 1:
                        raise ValueError(f"graph '{g.name}' has a cycle through node '{nodes[d].name}'")
                else:
                    stack.pop()
                    state[i] = 2
                    order.append(nodes[i])
        g.nodes.clear()
        g.nodes.extend(order)
