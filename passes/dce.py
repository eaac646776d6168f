"""dce: remove nodes that reach no graph output, unused initializers, and no-op nodes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph import is_default_domain, is_graph_output, iter_graphs, outer_scope_names
from onnxslim.manager import Context, Pass, PassResult, register


def _bypass(graph: gs.Graph, node: gs.Node, keep: set[str]) -> bool:
    """Reroute consumers of a no-op's output to its input. Returns False when that is not safe."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst.name in keep:
        return False
    if is_graph_output(graph, dst):
        # The output name is the model's contract: rename the source instead, when it is ours alone.
        if isinstance(src, gs.Constant) or src in graph.inputs or is_graph_output(graph, src) or src.name in keep:
            return False
        if len(src.outputs) != 1:
            return False
        producer = src.inputs[0] if src.inputs else None
        if producer is None:
            return False
        idx = graph.outputs.index(dst)
        dst.inputs.clear()
        producer.outputs[producer.outputs.index(src)] = dst
        graph.outputs[idx] = dst
        node.inputs.clear()
        return True
    for consumer in list(dst.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is dst:
                consumer.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()
    return True


def _is_noop(node: gs.Node) -> bool:
    if not is_default_domain(node) or len(node.outputs) < 1 or not node.inputs:
        return False
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        # Inference Dropout is identity unless training_mode is given (and may be true) or the mask is used.
        if len(node.inputs) >= 3 and node.inputs[2].name:
            return False
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return False
        return True
    if node.op == "Cast":
        src = node.inputs[0]
        return src.dtype is not None and node.attrs.get("to") is not None and _same_type(src.dtype, node.attrs["to"])
    return False


def _same_type(dtype, to) -> bool:
    import numpy as np
    import onnx

    try:
        return np.dtype(dtype) == np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
    except (TypeError, ValueError, KeyError):
        return False


@register
class DeadCodeElimination(Pass):
    name = "dce"
    description = "Remove unreachable nodes, unused initializers and no-op nodes (Identity, inference Dropout, same-type Cast)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        before = sum(len(g.nodes) for g in iter_graphs(graph))
        keep = outer_scope_names(graph)
        bypassed = 0
        for g in iter_graphs(graph):
            for node in list(g.nodes):
                if _is_noop(node) and _bypass(g, node, keep):
                    bypassed += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        after = sum(len(g.nodes) for g in iter_graphs(graph))
        return PassResult(changed=after != before or bypassed > 0,
                          stats={"nodes_removed": before - after, "noops_bypassed": bypassed})
