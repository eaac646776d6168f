"""Small ONNX graph builders shared by the tests of the lossless passes: a checked model from nodes, an
initializer from numpy, and a run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as h
from onnx import numpy_helper as nh


def make(nodes, inputs, outputs, inits=(), *, opset: int, value_info=(), check: bool = True,
         full_check: bool = False) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    if check:
        onnx.checker.check_model(m, full_check=full_check)
    return m


def c(name: str, arr) -> onnx.TensorProto:
    return nh.from_array(np.asarray(arr), name)


def run(m: onnx.ModelProto, feeds, *, optimize: bool = True) -> list[np.ndarray]:
    """Outputs in onnxruntime; ``optimize=False`` turns its graph rewrites off (and prepacking), for
    comparisons that must be bit-exact where onnxruntime would fuse one side only."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
