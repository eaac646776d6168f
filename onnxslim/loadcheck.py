"""Load checks on light model copies: does a rewritten graph still load in onnxruntime?

Some rewrites are exact yet expose shapes to onnxruntime's load-time inference that it never checked
before (an inlined If branch; a Reshape target folded to a constant in front of an If condition), and
onnxruntime then refuses a model that ran. Passes that risk this try the result on a light copy (large
weights become typed graph inputs, no weight bytes copied) and keep the rewrite only where it still loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim.graph import iter_graphs, to_proto

# Initializers with more elements than this become typed inputs of the light copy.
LIGHT_ELEMENTS = 4096


def light_proto(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model whose large weights are typed graph inputs (no weight bytes copied)."""
    swapped: list[tuple[gs.Constant, Any]] = []
    stubs: set[str] = set()
    done: set[int] = set()
    try:
        for g in iter_graphs(graph):
            for n in g.nodes:
                for t in n.inputs:
                    if not isinstance(t, gs.Constant) or id(t) in done:
                        continue
                    done.add(id(t))
                    shape = t.shape
                    on_disk = isinstance(t._values, LazyValues) and t._values.tensor.data_location == onnx.TensorProto.EXTERNAL
                    if on_disk or shape is None or int(np.prod(shape, dtype=np.int64)) > LIGHT_ELEMENTS:
                        stub = onnx.TensorProto(name=t.name, data_type=_elem(t), dims=list(shape or []))
                        swapped.append((t, t._values))
                        t._values = LazyValues(stub)
                        stubs.add(t.name)
        template = onnx.ModelProto(ir_version=max(int(graph.ir_version or 8), 4))
        model = to_proto(graph, template)
    finally:
        for t, values in swapped:
            t._values = values
    inputs = {v.name for v in model.graph.input}

    def strip(g: onnx.GraphProto) -> None:
        for i in reversed(range(len(g.initializer))):
            t = g.initializer[i]
            if t.name in stubs:
                if t.name not in inputs:
                    model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
                    inputs.add(t.name)
                del g.initializer[i]
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    strip(a.g)
                for sg in a.graphs:
                    strip(sg)

    strip(model.graph)
    return model


def _elem(t: gs.Constant) -> int:
    if isinstance(t._values, LazyValues):
        return t._values.tensor.data_type
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))


class LoadCheck:
    """Whether a light model loads in onnxruntime (or, when the original cannot, passes strict inference)."""

    def __init__(self, before: onnx.ModelProto, custom_op_library: str | None = None) -> None:
        self.lib = custom_op_library
        self.sessions = 0
        self.mode = "ort" if self._ort(before) else "onnx" if self._onnx(before) else None

    def _ort(self, model: onnx.ModelProto) -> bool:
        from onnxslim.runtime import make_session

        self.sessions += 1
        try:
            # Optimizations on, as in validation: onnxruntime's constant folding is what exposes static
            # shapes to its re-run of shape inference (AffineGrid fails only then).
            make_session(model, threads=1, custom_op_library=self.lib, prepack=False)
            return True
        except Exception:  # noqa: BLE001 - any load failure counts
            return False

    @staticmethod
    def _onnx(model: onnx.ModelProto) -> bool:
        try:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            return True
        except Exception:  # noqa: BLE001
            return False

    def ok(self, model: onnx.ModelProto) -> bool:
        return self._ort(model) if self.mode == "ort" else self._onnx(model)
