"""shape-inference: onnx's shape inference with data propagation, refreshed value_info for every pass after it.

Weights play no part in shape inference (only small shape-like tensors do), so it runs on a light copy
of the model whose large initializers are declared as typed inputs instead: a 2 GB model costs no
more than a small one, and nothing can exceed protobuf's limit. Stale value_info is dropped and
recomputed; an entry onnx cannot infer (e.g. a custom op's output) keeps the model's own.
``--input-shape NAME:1,3,224,224`` fixes the dynamic dims of that input first.
"""

from __future__ import annotations

import onnx
from onnx import ModelProto

from onnxslim.errors import InputError
from onnxslim.manager import Context, Pass, PassResult, register

# Initializers with more elements than this are not shape-like: shape inference only needs their type.
VALUE_LIMIT = 4096


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def fix_input_shapes(model: ModelProto, shapes: dict[str, list[int]]) -> bool:
    """Set the dynamic dims of the named graph inputs; a conflicting static dim or rank is an InputError."""
    changed = False
    by_name = {vi.name: vi for vi in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    for name, dims in shapes.items():
        vi = by_name.get(name)
        if vi is None or name in inits:
            raise InputError(f"--input-shape names '{name}', which is not an input of the model")
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"--input-shape {name}: the input is not a tensor")
        if tt.HasField("shape") and len(tt.shape.dim) != len(dims):
            raise InputError(f"--input-shape {name}: rank {len(dims)} but the model's input has rank {len(tt.shape.dim)}")
        if not tt.HasField("shape"):
            for d in dims:
                tt.shape.dim.add().dim_value = int(d)
            changed = True
            continue
        for dim, given in zip(tt.shape.dim, dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                if dim.dim_value != given:
                    raise InputError(f"--input-shape {name}: {list(dims)} conflicts with the model's fixed dim {dim.dim_value}")
                continue
            dim.Clear()
            dim.dim_value = int(given)
            changed = True
    return changed


def _light_copy(model: ModelProto) -> ModelProto:
    """The model without the data of large main-graph initializers (declared as inputs of the same type)."""
    light = ModelProto()
    light.ir_version = max(model.ir_version, 4)  # initializers that are not inputs need IR 4
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.sparse_initializer.extend(src.sparse_initializer)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        if _elements(t) <= VALUE_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _take_static_dims(mine: onnx.ValueInfoProto, theirs: onnx.ValueInfoProto) -> bool:
    """Dims of ``mine`` that are symbolic or unknown take ``theirs``'s static value (same rank only)."""
    a, b = mine.type.tensor_type, theirs.type.tensor_type
    if not (mine.type.HasField("tensor_type") and a.HasField("shape") and b.HasField("shape")
            and len(a.shape.dim) == len(b.shape.dim)):
        return False
    changed = False
    for da, db in zip(a.shape.dim, b.shape.dim):
        if not da.HasField("dim_value") and db.HasField("dim_value"):
            da.Clear()
            da.dim_value = db.dim_value
            changed = True
    return changed


def _vi_key(vi: onnx.ValueInfoProto) -> bytes:
    return vi.SerializeToString()


def _subgraph_nodes(model: ModelProto) -> list[int]:
    return [i for i, n in enumerate(model.graph.node)
            if any(a.HasField("g") or len(a.graphs) for a in n.attribute)]


@register
class ShapeInference(Pass):
    name = "shape-inference"
    description = "onnx shape inference with data propagation (symbolic dims kept; --input-shape fixes dynamic dims)"
    lossless = True
    level = "model"
    annotates_only = True

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        notes: list[str] = []
        given = model
        if ctx.original is not None and model is ctx.original.proto:
            # The original is the validation reference (and the caller's object): edit a copy.
            model = ModelProto()
            model.CopyFrom(given)
        fixed = fix_input_shapes(model, ctx.input_shapes) if ctx.input_shapes else False
        before = [_vi_key(v) for v in model.graph.value_info]
        light = _light_copy(model)
        own = {vi.name: vi for vi in model.graph.value_info}
        del light.graph.value_info[:]
        try:
            inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
        except Exception as e:  # noqa: BLE001 - inference is an aid: without it the model stays as it was
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            notes.append(f"shape inference failed, value_info kept as it was: {first[:200]}")
            return PassResult(changed=fixed, notes=notes, stats={"value_info": len(before)},
                              model=model if model is not given else None)
        new = list(inferred.graph.value_info)
        have = {vi.name for vi in new}
        produced = {o for n in model.graph.node for o in n.output}
        # Inputs and outputs are declared where they belong; a value_info entry for one only conflicts.
        declared = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
        new = [vi for vi in new if vi.name not in declared]
        new.extend(vi for name, vi in own.items() if name not in have and name in produced and name not in declared)
        after = [_vi_key(v) for v in new]
        changed = fixed or after != before
        if after != before:
            del model.graph.value_info[:]
            model.graph.value_info.extend(new)
        if fixed:  # the user asked for static shapes: outputs get the dims that now follow from them
            for mine, theirs in zip(model.graph.output, inferred.graph.output):
                changed |= _take_static_dims(mine, theirs)
        # value_info inside If/Loop/Scan bodies lives in the nodes' graph attributes.
        for i in _subgraph_nodes(model):
            mine, theirs = model.graph.node[i], inferred.graph.node[i]
            if mine.SerializeToString() != theirs.SerializeToString():
                mine.CopyFrom(theirs)
                changed = True
        return PassResult(changed=changed, notes=notes, model=model if model is not given else None,
                          stats={"value_info": len(new), "input_dims_fixed": int(fixed)})
