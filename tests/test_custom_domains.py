"""Custom-domain nodes (onnxruntime-extensions' ai.onnx.contrib, onnxruntime's com.microsoft, unknown
domains) pass through every lossless pass untouched, even with constant inputs or duplicates, while the
standard ops around them are still optimized, and the model still validates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim
from onnxslim.graph import op_histogram

PASSES = ["dce", "shape-inference", "fold", "bn-fold", "cse"]


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def custom_nodes(m: onnx.ModelProto) -> list[bytes]:
    return sorted(n.SerializeToString() for n in m.graph.node if n.domain not in ("", "ai.onnx"))


def contrib_model() -> onnx.ModelProto:
    eye = (np.eye(3, dtype=np.float32) * 4.0)
    nodes = [
        h.make_node("Identity", ["x"], ["xi"]),
        h.make_node("Add", ["xi", "eye"], ["xs"]),
        h.make_node("Inverse", ["xs"], ["inv"], domain="ai.onnx.contrib"),
        h.make_node("Inverse", ["eye"], ["inv_const"], domain="ai.onnx.contrib"),  # constant input: not folded
        h.make_node("Mul", ["two", "two"], ["four"]),  # standard constant math around it: folded
        h.make_node("Mul", ["inv", "four"], ["a"]),
        h.make_node("Add", ["a", "inv_const"], ["y"]),
    ]
    g = h.make_graph(nodes, "g", [vi("x", [3, 3])], [vi("y", [3, 3])],
                     initializer=[nh.from_array(eye, "eye"), nh.from_array(np.float32(2.0), "two")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.contrib", 1)])
    onnx.checker.check_model(m)
    return m


def microsoft_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nodes = [
        h.make_node("FusedMatMul", ["x", "w"], ["m1"], domain="com.microsoft", alpha=0.5, transB=1),
        h.make_node("FusedMatMul", ["x", "w"], ["m2"], domain="com.microsoft", alpha=0.5, transB=1),  # duplicate
        h.make_node("Gelu", ["w"], ["gw"], domain="com.microsoft"),  # constant input
        h.make_node("Add", ["m1", "m2"], ["s"]),
        h.make_node("MatMul", ["s", "gw"], ["y"]),
    ]
    g = h.make_graph(nodes, "g", [vi("x", [2, 4])], [vi("y", [2, 4])], initializer=[nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("make", [contrib_model, microsoft_model], ids=["ai.onnx.contrib", "com.microsoft"])
def test_custom_nodes_survive_the_pipeline_and_validate(make):
    m = make()
    result, report = onnxslim.optimize(m, passes="lossless")
    assert custom_nodes(result) == custom_nodes(m)  # byte-identical, none merged or folded
    assert report.validation["passed"] and report.validation["outputs"]
    assert {(o.domain, o.version) for o in result.opset_import} == {(o.domain, o.version) for o in m.opset_import}


def test_standard_ops_around_custom_nodes_are_still_optimized():
    result, _ = onnxslim.optimize(contrib_model(), passes="lossless")
    hist = op_histogram(result)
    assert "Identity" not in hist and hist["Mul"] == 1  # no-op removed, constant Mul folded


@pytest.mark.parametrize("name", PASSES)
def test_each_pass_leaves_an_unknown_domain_alone(name):
    # No kernel exists for this op: nothing can run it, so validation is off; no pass may crash on it.
    nodes = [h.make_node("Frobnicate", ["x", "c"], ["a"], domain="vendor.secret", mode="fast", k=3),
             h.make_node("Frobnicate", ["c", "c"], ["b"], domain="vendor.secret", mode="fast", k=3),
             h.make_node("Frobnicate", ["c", "c"], ["b2"], domain="vendor.secret", mode="fast", k=3),
             h.make_node("Identity", ["a"], ["a2"]),
             h.make_node("Sum", ["a2", "b", "b2"], ["y"])]
    g = h.make_graph(nodes, "g", [vi("x", [2])], [vi("y", [2])], initializer=[nh.from_array(np.float32([1, 2]), "c")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("vendor.secret", 1)])
    result, report = onnxslim.optimize(m, passes=name, validate=False)
    assert custom_nodes(result) == custom_nodes(m)
    onnx.checker.check_model(result)
