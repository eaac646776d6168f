"""compact-names: short names for every internal tensor and node (the graph's inputs and outputs keep theirs).

Exported and quantized graphs name their tensors after the layer path (``conv10_depthwise_weights_fused_
bias_fused_quantized_zero_point``); on a small model those strings are a large share of the file (PP-OCR cls
after INT8: 96 KB of a 303 KB file). Renaming is lossless and onnxruntime does not care, but the names
help whoever debugs the model, so this pass is not in the lossless preset: ``--objective size`` appends it
(the run appends it to a lossy pipeline), or name it in ``--passes``.

Names are given in order of definition (inputs, initializers, node outputs, subgraphs where their node
stands), so a second run renames nothing. One mapping covers every graph: a subgraph's reference to an
outer-scope name follows its renaming. Model-local function bodies have their own scope and are left alone.
"""

from __future__ import annotations

from onnx import GraphProto, ModelProto

from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.protowalk import iter_nodes, node_subgraphs


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        i, r = divmod(i, 36)
        s = digits[r] + s
        if i == 0:
            return s


class _Names:
    """Fresh short names that never collide with the names that must stay."""

    def __init__(self, taken: set[str]) -> None:
        self.taken, self.next = taken, 0

    def __call__(self) -> str:
        while True:
            name = _base36(self.next)
            self.next += 1
            if name not in self.taken:
                return name


def _definitions(g: GraphProto, top: bool) -> list[str]:
    """Names defined in ``g`` and its subgraphs, in order; the top graph's inputs are the interface."""
    out = [] if top else [v.name for v in g.input]
    out += [t.name for t in g.initializer] + [t.values.name for t in g.sparse_initializer]
    for node in g.node:
        for sub in node_subgraphs(node):
            out += _definitions(sub, False)
        out += [o for o in node.output if o]
    return out


def _rename(g: GraphProto, tensors: dict[str, str], node_name: _Names) -> int:
    """Apply the mapping to every reference in ``g`` and its subgraphs; returns the node names changed."""
    def new(n: str) -> str:
        return tensors.get(n, n)

    for v in list(g.input) + list(g.output) + list(g.value_info):
        v.name = new(v.name)
    for t in g.initializer:
        t.name = new(t.name)
    for t in g.sparse_initializer:
        t.values.name = new(t.values.name)
    for ann in g.quantization_annotation:
        ann.tensor_name = new(ann.tensor_name)
    changed = 0
    for node in g.node:
        name = node_name()
        changed += node.name != name
        node.name = name
        node.input[:] = [new(i) for i in node.input]  # "" (an omitted optional input) is never in the mapping
        node.output[:] = [new(o) for o in node.output]
        for sub in node_subgraphs(node):
            changed += _rename(sub, tensors, node_name)
    return changed


def compact_names(model: ModelProto) -> int:
    """Rename in place; returns how many tensor and node names changed."""
    g = model.graph
    interface = {v.name for v in g.input} | {v.name for v in g.output}
    defined = _definitions(g, True)
    known = set(defined)
    undefined = {i for n in iter_nodes(g) for i in n.input if i not in known}  # must not be shadowed either
    fresh = _Names(interface | undefined)
    tensors: dict[str, str] = {}
    for name in defined:
        if name not in interface and name not in tensors:
            tensors[name] = fresh()
    nodes = _rename(g, tensors, _Names(set()))
    return sum(old != new for old, new in tensors.items()) + nodes


@register
class CompactNames(Pass):
    name = "compact-names"
    description = "short names for internal tensors and nodes (smaller file; graph inputs/outputs keep theirs)"
    level = "model"

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        if len(model.training_info):
            return PassResult(False, notes=["skipped: the model has training_info, whose names are not mapped"])
        size = model.ByteSize()
        renamed = compact_names(model)
        saved = size - model.ByteSize()
        return PassResult(renamed > 0, stats={"renamed": renamed, "bytes_saved": saved}, model=model)
