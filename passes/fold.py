"""fold: evaluate nodes whose inputs are all constants once and store their outputs as initializers.

Also: Constant nodes become initializers; Shape/Size of a tensor with a fully static shape, and
Gather/Slice picking only static dims out of a partly symbolic Shape, become constants (so
Shape->Gather->Concat->Reshape chains fold). Each node is evaluated on its own in onnxruntime
(onnx's reference evaluator when onnxruntime has no kernel for it).

Size limit: the output size is computed BEFORE evaluating (onnx shape inference on the one-node
model, with the small inputs as initializers), so ConstantOfShape/Expand/Tile/Range bombs are never
materialized. A node folds when its outputs are no larger than its inputs, or when they stay under
``fold_size_limit`` (default 4 MiB) and under max(256 KiB, 16 x inputs); otherwise it stays.

Never folded: nondeterministic ops, custom domains, nodes with subgraphs, nodes inside model-local
functions, DequantizeLinear (it would undo weight quantization). An If with a constant condition is
not inlined either: its branches may hide shapes that onnxruntime accepts at run time but rejects once
they are visible at load time (onnx's AffineGrid function body feeds a [1] tensor to Range that way).
For the same reason the nodes computing an If condition never fold. Constant-only inputs of runtime
nodes in front of a condition (silero_vad's reflect-Pad pads, computed by a ConstantOfShape/Concat/
Reshape/Slice/Transpose chain) do fold, but only after a light copy with them folded still loads in
onnxruntime (``onnxslim.loadcheck``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxslim.errors import InputError
from onnxslim.graph import (NONDETERMINISTIC_OPS, const_value, has_subgraph, is_default_domain, is_tensor,
                            graph_and_bodies, placeholder, static_shape, to_proto, toposort)
from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.options import option

DEFAULT_SIZE_LIMIT = 4 << 20
SMALL_GROWTH = 256 << 10
GROWTH_FACTOR = 16
# Inputs up to this many elements are given to shape inference as values (shapes, axes, repeats...).
VALUE_ELEMENTS = 4096
SKIP_OPS = NONDETERMINISTIC_OPS | {"DequantizeLinear", "Dropout", "Constant"}
# Outputs whose size shape inference cannot know but which never exceed (a multiple of) the input size.
BOUNDED_OPS = {"NonZero": "rank", "Unique": 1, "Compress": 1}
FOLDABLE_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                         np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


def parse_size(value: Any) -> int:
    """``4194304``, ``"4MB"``, ``"512k"``, ``"1.5GiB"`` -> bytes."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*", str(value))
    if not m:
        raise InputError(f"--fold-size-limit '{value}': expected a size such as 4194304, 4MB or 512KB")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _nbytes(t: gs.Tensor) -> int | None:
    shape = static_shape(t)
    if shape is None or t.dtype is None:
        return None
    try:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
    except TypeError:
        return None


def _dtype_ok(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) in FOLDABLE_DTYPES
    except TypeError:
        return False


def _constant_attr_value(node: gs.Node) -> Any:
    """The value of a Constant node as gs values (LazyValues stay lazy), or None if not a plain tensor."""
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        c = a["value"]
        return c._values if not isinstance(c._values, gs.ir.tensor.SparseValues) else None
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(list(a["value_floats"]), dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(list(a["value_ints"]), dtype=np.int64)
    return None


class _Evaluator:
    """Runs one node on constant inputs; knows its output sizes before running it."""

    def __init__(self, graph: gs.Graph) -> None:
        self.opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])]
        if not any(o.domain in ("", "ai.onnx") for o in self.opsets):
            self.opsets.append(onnx.helper.make_opsetid("", int(graph.opset)))
        self.ir = int(graph.ir_version or 8)
        self._so = None

    def _model(self, node: gs.Node, inputs: dict[str, gs.Tensor], values: dict[str, np.ndarray],
               out_types: list[int] | None) -> onnx.ModelProto:
        proto = OnnxExporter.export_node(node)
        graph_inputs, inits = [], []
        for name, t in inputs.items():
            if name in values:
                inits.append(onnx.numpy_helper.from_array(values[name], name))
            else:
                graph_inputs.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(static_shape(t))))
        outs = []
        for i, o in enumerate(node.outputs):
            if not o.name:
                continue
            elem = out_types[i] if out_types else 0
            outs.append(onnx.helper.make_tensor_value_info(o.name, elem, None) if elem
                        else onnx.helper.make_empty_tensor_value_info(o.name))
        g = onnx.helper.make_graph([proto], "fold", graph_inputs, outs, initializer=inits)
        return onnx.helper.make_model(g, opset_imports=self.opsets, ir_version=max(self.ir, 4) if inits else self.ir)

    def output_info(self, node: gs.Node, inputs: dict[str, gs.Tensor]) -> list[tuple[int, tuple[int, ...] | None]] | None:
        """(elem type, static shape or None) per output, from shape inference; small inputs given by value."""
        values = {}
        for name, t in inputs.items():
            shape = static_shape(t)
            if shape is not None and int(np.prod(shape, dtype=np.int64)) <= VALUE_ELEMENTS:
                values[name] = np.asarray(const_value(t))
        try:
            model = self._model(node, inputs, values, None)
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception:  # noqa: BLE001 - unknown sizes: the node is simply not folded
            return None
        info = []
        by_name = {o.name: o for o in inferred.graph.output}
        for o in node.outputs:
            vi = by_name.get(o.name)
            if vi is None or not vi.type.HasField("tensor_type"):
                info.append((0, None))
                continue
            tt = vi.type.tensor_type
            shape = None
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shape = tuple(int(d.dim_value) for d in tt.shape.dim)
            info.append((tt.elem_type, shape))
        return info

    def run(self, node: gs.Node, inputs: dict[str, gs.Tensor], out_types: list[int]) -> list[np.ndarray] | None:
        feeds = {name: np.asarray(const_value(t)) for name, t in inputs.items()}
        model = self._model(node, inputs, {}, out_types)
        names = [o.name for o in node.outputs if o.name]
        try:
            import onnxruntime as ort

            if self._so is None:
                so = ort.SessionOptions()
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                so.intra_op_num_threads = 1
                so.inter_op_num_threads = 1
                so.log_severity_level = 4
                self._so = so
            try:
                sess = ort.InferenceSession(model.SerializeToString(), self._so, providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - no kernel for this op/type: onnx's reference evaluator may have one
                return self._reference(model, names, feeds)
            outs = sess.run(names, feeds)
        except Exception:  # noqa: BLE001 - the node fails on these inputs: leave it, the model keeps its behaviour
            return None
        return outs

    @staticmethod
    def _reference(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        try:
            from onnx.reference import ReferenceEvaluator

            return list(ReferenceEvaluator(model).run(names, feeds))
        except Exception:  # noqa: BLE001
            return None


def _set_constant(g: gs.Graph, node: gs.Node, out: gs.Tensor, values: Any) -> None:
    """``out`` (an output of ``node``) now holds ``values``: an initializer, or a Constant node for graph outputs."""
    if any(o is out for o in g.outputs):
        idx = next(i for i, t in enumerate(node.outputs) if t is out)
        node.outputs[idx] = placeholder(out.name)
        g.nodes.append(gs.Node("Constant", name=f"{out.name}__const", attrs={"value": gs.Constant(f"{out.name}__value", values)},
                               outputs=[out]))
        return
    out.inputs.clear()
    out.to_constant(values)


def _runtime(t: gs.Tensor, memo: dict[int, bool]) -> bool:
    """Whether ``t``'s values depend on a graph input's values (shapes alone do not count)."""
    stack = [t]
    while stack:
        x = stack[-1]
        if id(x) in memo:
            stack.pop()
            continue
        if isinstance(x, gs.Constant) or not x.name:
            memo[id(x)] = False
        elif len(x.inputs) != 1:
            memo[id(x)] = True  # a graph input (or a body input / outer name without a producer here)
        else:
            p = x.inputs[0]
            if p.op in ("Shape", "Size") or (has_subgraph(p) and p.op != "If"):
                memo[id(x)] = False  # shape-only, or a Loop/Scan (not looked into)
            else:
                deps = list(p.inputs)
                if p.op == "If":  # runtime when what either branch returns there is (inlining keeps one)
                    k = next(j for j, o in enumerate(p.outputs) if o is x)
                    deps = [b.outputs[k] for b in (p.attrs.get("then_branch"), p.attrs.get("else_branch"))
                            if isinstance(b, gs.Graph) and len(b.outputs) > k]
                    if len(deps) != 2:
                        memo[id(x)] = False
                        stack.pop()
                        continue
                todo = [i for i in deps if id(i) not in memo]
                if todo:
                    stack.extend(todo)
                    continue
                memo[id(x)] = (all if p.op == "If" else any)(memo[id(i)] for i in deps)
        stack.pop()
    return memo[id(t)]


def _weight_like(t: gs.Tensor, memo: dict[int, bool]) -> bool:
    """A float tensor computed from constants only, of a static shape: its values never define a shape."""
    try:
        floating = t.dtype is not None and np.dtype(t.dtype).kind == "f"
    except TypeError:
        return False
    return floating and static_shape(t) is not None and not _runtime(t, memo)


@dataclass(frozen=True)
class FoldOptions:
    fold_size_limit: str = option("4MB", "Largest tensor a fold may add, e.g. 4MB or 512KB; folds that do not grow "
                                         "the model always run.")

    def __post_init__(self) -> None:
        parse_size(self.fold_size_limit)  # a bad size is an input error before any work


class _Folder:
    def __init__(self, graph: gs.Graph, limit: int) -> None:
        self.ev = _Evaluator(graph)
        self.limit = limit
        self.stats = {"nodes_folded": 0, "constants_to_initializers": 0, "shapes_folded": 0,
                      "left_by_size_limit": 0, "bytes_added": 0}
        self.notes: list[str] = []
        self.protected: set[int] = set()
        self.only: set[int] | None = None  # when set, only these nodes may fold

    def allowed(self, in_bytes: int, out_bytes: int) -> bool:
        if out_bytes <= in_bytes:
            return True
        return out_bytes <= min(self.limit, max(SMALL_GROWTH, GROWTH_FACTOR * in_bytes))

    def protect_if_conditions(self, graphs: list[gs.Graph], strict: bool = True) -> set[int]:
        """Nodes that compute an If condition stay as they are. A constant condition makes onnxruntime
        inline the branch at load time, exposing shapes its checks reject although the model runs
        (onnx's own AffineGrid function body does this).

        A node reading a runtime value never folds, so its constant float inputs of static shape cannot
        make the condition constant nor change a shape onnxruntime infers (an LSTM's weight re-ordering
        behind Shape(LSTM(x)) folds). ``strict=False`` leaves out every constant-only input of such a
        node (e.g. a Pad's pads or a Reshape's target computed by ConstantOfShape/Concat/Slice chains):
        folding those can only add static dims onnxruntime's own constant folding would find at load,
        but that is checked (``fold_near_conditions``), not assumed."""
        protected: set[int] = set()
        stack = [n.inputs[0] for g in graphs for n in g.nodes if n.op == "If" and n.inputs and is_default_domain(n)]
        dyn: dict[int, bool] = {}
        while stack:
            t = stack.pop()
            for p in t.inputs:
                if id(p) not in protected:
                    protected.add(id(p))
                    reads_runtime = any(_runtime(i, dyn) for i in p.inputs)
                    skip = _weight_like if strict else (lambda i, memo: not _runtime(i, memo))
                    stack.extend(i for i in p.inputs if not (reads_runtime and skip(i, dyn)))
        return protected

    def fold_graph(self, g: gs.Graph) -> None:
        for node in list(g.nodes):
            if not node.outputs or not is_default_domain(node) or (id(node) in self.protected and node.op != "Constant"):
                continue
            if self.only is not None and id(node) not in self.only:
                continue
            try:
                if node.op == "Constant":
                    self.constant_node(g, node)
                elif node.op in ("Shape", "Size"):
                    self.shape_node(g, node)
                elif node.op in ("Gather", "Slice") and self.shape_part(g, node):
                    pass
                else:
                    self.generic(g, node)
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - one node we could not fold is not a reason to stop
                self.notes.append(f"{node.op} '{node.name}' not folded ({type(e).__name__}: {str(e)[:120]})")

    def live(self, g: gs.Graph, node: gs.Node) -> bool:
        return any(o.outputs or any(o is x for x in g.outputs) for o in node.outputs if o.name)

    def constant_node(self, g: gs.Graph, node: gs.Node) -> None:
        out = node.outputs[0]
        if len(node.outputs) != 1 or any(out is o for o in g.outputs) or not out.outputs:
            return
        values = _constant_attr_value(node)
        if values is None:
            return
        out.inputs.clear()
        out.to_constant(values)
        self.stats["constants_to_initializers"] += 1

    def shape_node(self, g: gs.Graph, node: gs.Node) -> None:
        if not node.inputs or not self.live(g, node):
            return
        shape = static_shape(node.inputs[0])
        if shape is None:
            return
        if node.op == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            value = np.array(shape[start:None if end is None else int(end)], dtype=np.int64)
        _set_constant(g, node, node.outputs[0], value)
        self.stats["shapes_folded"] += 1

    def shape_part(self, g: gs.Graph, node: gs.Node) -> bool:
        """Gather/Slice picking only the static dims out of Shape(x) (x's other dims may be symbolic):
        the picked dims are a constant, e.g. Shape([N,24,8,8])[1:] -> [24, 8, 8]."""
        src = node.inputs[0] if node.inputs else None
        shp = src.inputs[0] if src is not None and len(src.inputs) == 1 else None
        if shp is None or shp.op != "Shape" or not is_default_domain(shp) or not self.live(g, node):
            return False
        x = shp.inputs[0]
        if not is_tensor(x) or x.shape is None:
            return False
        start, end = int(shp.attrs.get("start", 0)), shp.attrs.get("end")
        dims = list(x.shape)[start:None if end is None else int(end)]
        picked = self._pick(node, dims, int(g.opset))
        if picked is None:
            return False
        values, shape = picked
        if any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0 for d in values):
            return False
        _set_constant(g, node, node.outputs[0], np.array(values, dtype=np.int64).reshape(shape))
        self.stats["shapes_folded"] += 1
        return True

    @staticmethod
    def _pick(node: gs.Node, dims: list, opset: int) -> tuple[list, tuple[int, ...]] | None:
        n = len(dims)
        if node.op == "Gather":
            idx = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if idx is None or int(node.attrs.get("axis", 0)) not in (0, -1):
                return None
            idx = np.asarray(idx)
            if idx.dtype.kind not in "iu" or np.any(idx >= n) or np.any(idx < -n):
                return None
            return [dims[int(i)] for i in idx.ravel()], idx.shape
        if opset < 10:
            starts, ends, axes, steps = node.attrs.get("starts"), node.attrs.get("ends"), node.attrs.get("axes"), None
        else:
            vals = [const_value(t) if t.name else None for t in node.inputs[1:5]]
            if any(v is None for v, t in zip(vals, node.inputs[1:5]) if t.name):
                return None
            vals += [None] * (4 - len(vals))
            starts, ends, axes, steps = vals
        if starts is None or ends is None:
            return None
        starts, ends = np.asarray(starts).ravel(), np.asarray(ends).ravel()
        if len(starts) != 1 or len(ends) != 1:
            return None
        if axes is not None and int(np.asarray(axes).ravel()[0]) not in (0, -1):
            return None
        step = 1 if steps is None else int(np.asarray(steps).ravel()[0])
        if step <= 0:
            return None
        # ONNX clamps like Python slicing does for a positive step.
        out = dims[slice(int(np.clip(starts[0], -2**62, 2**62)), int(np.clip(ends[0], -2**62, 2**62)), step)]
        return out, (len(out),)

    def generic(self, g: gs.Graph, node: gs.Node) -> None:
        if node.op in SKIP_OPS or has_subgraph(node) or not node.inputs or not self.live(g, node):
            return
        if any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values()):
            return
        try:
            onnx.defs.get_schema(node.op, int(g.opset), node.domain or "")
        except Exception:  # noqa: BLE001 - no schema: not a standard op (e.g. a model-local function)
            return
        inputs: dict[str, gs.Tensor] = {}
        for t in node.inputs:
            if not t.name:
                continue
            if not isinstance(t, gs.Constant) and const_value(t) is None:
                return
            if not is_tensor(t) or not _dtype_ok(t) or static_shape(t) is None:
                return
            inputs[t.name] = t
        if not inputs:
            return
        info = self.ev.output_info(node, inputs)
        if info is None or len(info) != len(node.outputs):
            return
        in_bytes = sum(_nbytes(t) or 0 for t in inputs.values())
        out_bytes = 0
        for (elem, shape), o in zip(info, node.outputs):
            if not o.name:
                continue
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 0
            except (KeyError, TypeError, ValueError):
                return
            if not itemsize or np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) not in FOLDABLE_DTYPES:
                return
            if shape is None:
                bound = BOUNDED_OPS.get(node.op)
                if bound is None:
                    self.skip(node, "its output size is unknown before evaluation")
                    return
                first = node.inputs[0]
                n = int(np.prod(static_shape(first), dtype=np.int64))
                n *= len(static_shape(first)) if bound == "rank" else bound
                out_bytes += n * 8
            else:
                out_bytes += int(np.prod(shape, dtype=np.int64)) * itemsize
        if not self.allowed(in_bytes, out_bytes):
            self.skip(node, f"its output ({out_bytes:,} bytes) would exceed the fold size limit")
            return
        outs = self.ev.run(node, inputs, [e for e, _ in info])
        named = [o for o in node.outputs if o.name]
        if outs is None or len(outs) != len(named):
            return
        expected = [info_ for info_, o in zip(info, node.outputs) if o.name]
        for v, (elem, shape) in zip(outs, expected):
            # The value must be exactly what the model declares there: type, and shape when known.
            if (not isinstance(v, np.ndarray) or v.dtype not in FOLDABLE_DTYPES
                    or v.dtype != np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
                    or (shape is not None and tuple(v.shape) != shape)):
                return
        if sum(v.nbytes for v in outs) > max(out_bytes, in_bytes):
            return  # shape inference was wrong about the size: trust neither
        for o, v in zip(named, outs):
            _set_constant(g, node, o, np.array(v, order="C"))  # not ascontiguousarray: it makes 0-d arrays 1-d
        self.stats["nodes_folded"] += 1
        self.stats["bytes_added"] += int(sum(v.nbytes for v in outs))

    def skip(self, node: gs.Node, why: str) -> None:
        self.stats["left_by_size_limit"] += 1
        if len(self.notes) < 20:
            self.notes.append(f"{node.op} '{node.name or node.outputs[0].name}' left in place: {why}")


def _positions(graph: gs.Graph, ids: set[int]) -> set[tuple[int, int]]:
    """(graph index, node index) in ``graph_and_bodies`` order of the nodes whose id is in ``ids``."""
    return {(gi, ni) for gi, g in enumerate(graph_and_bodies(graph)) for ni, n in enumerate(g.nodes) if id(n) in ids}


def fold_near_conditions(graph: gs.Graph, folder: _Folder, ctx: Context) -> None:
    """Fold the constant-only inputs of runtime nodes in front of If conditions (``strict=False`` above),
    first on a light copy: kept only if that copy still loads in onnxruntime (when the graph did)."""
    graphs = graph_and_bodies(graph)
    extra = folder.protected - folder.protect_if_conditions(graphs, strict=False)
    if not extra:
        return
    from onnxslim.loadcheck import LoadCheck, light_proto

    light = light_proto(graph)
    want = _positions(graph, extra)
    trial = gs.import_onnx(light)
    tgraphs = graph_and_bodies(trial)
    if [[n.op for n in g.nodes] for g in tgraphs] != [[n.op for n in g.nodes] for g in graphs]:
        return  # the copy does not line up with the graph: leave these nodes alone
    tfolder = _Folder(trial, folder.limit)
    tfolder.only = {id(g.nodes[ni]) for gi, g in enumerate(tgraphs) for ni in range(len(g.nodes)) if (gi, ni) in want}
    for g in tgraphs:
        tfolder.fold_graph(g)
    folded = {(gi, ni) for gi, g in enumerate(tgraphs) for ni, n in enumerate(g.nodes)
              if id(n) in tfolder.only and not any(o.inputs for o in n.outputs if o.name)}
    if not folded:
        return
    check = LoadCheck(light, ctx.custom_op_library)
    trial.cleanup(remove_unused_graph_inputs=False)
    try:
        model = to_proto(trial, onnx.ModelProto(ir_version=light.ir_version))
    except Exception:  # noqa: BLE001 - a copy we cannot export is a copy that does not load
        model = None
    ok = check.mode is not None and model is not None and check.ok(model)
    folder.stats["load_checks"] = folder.stats.get("load_checks", 0) + check.sessions
    if not ok:
        folder.notes.append(f"{len(folded)} constant node(s) in front of If conditions left: folded, the model "
                            "no longer loads in onnxruntime")
        return
    folder.only = {id(g.nodes[ni]) for gi, g in enumerate(graphs) for ni in range(len(g.nodes)) if (gi, ni) in folded}
    folder.protected -= folder.only
    for g in graphs:
        folder.fold_graph(g)
    folder.only = None


@register
class ConstantFolding(Pass):
    name = "fold"
    description = ("Evaluate constant subgraphs once (size-limited, --fold-size-limit), fold static Shape/Size, "
                   "Constant nodes to initializers")
    lossless = True
    Options = FoldOptions

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        folder = _Folder(graph, parse_size(self.options.fold_size_limit))
        try:
            toposort(graph)
        except Exception as e:  # noqa: BLE001 - a cycle: evaluation order is undefined, fold nothing
            return PassResult(changed=False, notes=[f"not folded: graph is not a DAG ({type(e).__name__})"])
        graphs = graph_and_bodies(graph)
        folder.protected = folder.protect_if_conditions(graphs)
        for g in graphs:
            folder.fold_graph(g)
        s = folder.stats
        counts = ("nodes_folded", "constants_to_initializers", "shapes_folded")
        changed = any(s[k] for k in counts)
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)  # the copy fold_near_conditions tries lines up
        before = sum(s[k] for k in counts)
        fold_near_conditions(graph, folder, ctx)
        if sum(s[k] for k in counts) > before:
            changed = True
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=changed, stats=dict(s), notes=folder.notes)
