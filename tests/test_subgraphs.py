"""If/Loop/Scan bodies and model-local functions under the lossless passes: folding and dead-node
elimination recurse into bodies, values captured from outer scopes stay alive, outputs stay equal."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim
from onnxslim.graph import op_histogram

OPSET = 17


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def run(m: onnx.ModelProto, feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def all_graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                yield from all_graphs(a.g)
            for sg in a.graphs:
                yield from all_graphs(sg)


def loop_if_model() -> onnx.ModelProto:
    """Loop whose body holds foldable constants, a no-op, a dead node and an If nested inside it that
    reads values from the body, from the main graph (two scopes up) and a main-graph weight."""
    then_b = h.make_graph([h.make_node("Add", ["acc_id", "W"], ["t_out"])], "then", [], [vi("t_out", [2, 3])])
    else_b = h.make_graph([h.make_node("Sub", ["acc_id", "xr"], ["e_out"])], "else", [], [vi("e_out", [2, 3])])
    body = h.make_graph(
        [
            h.make_node("Constant", [], ["k"], value=nh.from_array(np.float32(0.5), "kv")),
            h.make_node("Mul", ["k", "k"], ["k2"]),  # constant: folds inside the body
            h.make_node("Identity", ["acc_in"], ["acc_id"]),  # no-op inside the body
            h.make_node("Exp", ["acc_in"], ["dead"]),  # reaches nothing
            h.make_node("If", ["c"], ["branch"], then_branch=then_b, else_branch=else_b),
            h.make_node("Mul", ["branch", "k2"], ["acc_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [vi("i", [], T.INT64), vi("cond_in", [], T.BOOL), vi("acc_in", [2, 3])],
        [vi("cond_out", [], T.BOOL), vi("acc_out", [2, 3])],
    )
    top_then = h.make_graph([h.make_node("Add", ["xr", "W"], ["tt"])], "top_then", [], [vi("tt", [2, 3])])
    top_else = h.make_graph([h.make_node("Mul", ["xr", "W"], ["te"])], "top_else", [], [vi("te", [2, 3])])
    g = h.make_graph(
        [
            h.make_node("Relu", ["x"], ["xr"]),  # read only from inside bodies
            h.make_node("Constant", [], ["true"], value=nh.from_array(np.array(True), "tv")),
            h.make_node("Loop", ["n", "true", "x"], ["y"], body=body),
            h.make_node("If", ["c"], ["z"], then_branch=top_then, else_branch=top_else),
        ],
        "main",
        [vi("x", [2, 3]), vi("n", [], T.INT64), vi("c", [], T.BOOL)],
        [vi("y", [2, 3]), vi("z", [2, 3])],
        initializer=[nh.from_array(np.float32([1.0, -2.0, 3.0]), "W")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_loop_with_nested_if_folds_and_cleans_bodies():
    m = loop_if_model()
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"]
    onnx.checker.check_model(result, full_check=True)
    body = next(a.g for n in result.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    body_ops = [n.op_type for n in body.node]
    assert "Exp" not in body_ops and "Constant" not in body_ops  # dead node gone, constant folded
    assert body_ops.count("Mul") == 1 and "Identity" in body_ops  # k*k folded; cond passthrough must stay
    assert sum(1 for n in body.node if n.op_type == "Identity" and n.input[0] == "acc_in") == 0
    # The Relu read only by the nested bodies is alive, and W is stored once.
    assert [n.op_type for n in result.graph.node].count("Relu") == 1
    assert sum(1 for g in all_graphs(result.graph) for t in g.initializer if t.name == "W") == 1
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for n, c in itertools.product([0, 1, 3], [True, False]):
        feeds = {"x": x, "n": np.array(n, np.int64), "c": np.array(c)}
        for a, b in zip(run(m, feeds), run(result, feeds)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_subgraph_output_fed_from_outer_scope_stays_valid():
    # The branch output is an Identity of an outer value: it cannot be renamed away, so it stays.
    then_b = h.make_graph([h.make_node("Identity", ["xr"], ["t"])], "then", [], [vi("t", [3])])
    else_b = h.make_graph([h.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", [3])])
    g = h.make_graph([h.make_node("Relu", ["x"], ["xr"]),
                      h.make_node("If", ["c"], ["y"], then_branch=then_b, else_branch=else_b)],
                     "main", [vi("x", [3]), vi("c", [], T.BOOL)], [vi("y", [3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)])
    result, report = onnxslim.optimize(m, passes="lossless")
    onnx.checker.check_model(result, full_check=True)
    assert op_histogram(result) == {"Identity": 1, "If": 1, "Neg": 1, "Relu": 1}
    feeds = {"x": np.float32([-1, 0, 2]), "c": np.array(True)}
    np.testing.assert_array_equal(run(m, feeds)[0], run(result, feeds)[0])


def test_scan_body_is_optimized():
    body = h.make_graph(
        [h.make_node("Identity", ["s_in"], ["s_id"]),
         h.make_node("Add", ["s_id", "row"], ["s_out"]),
         h.make_node("Mul", ["two", "two"], ["four"]),
         h.make_node("Mul", ["s_out", "four"], ["scanned"])],
        "body", [vi("s_in", [3]), vi("row", [3])], [vi("s_out", [3]), vi("scanned", [3])],
        initializer=[nh.from_array(np.float32(2.0), "two")])
    g = h.make_graph([h.make_node("Scan", ["init", "xs"], ["final", "ys"], body=body, num_scan_inputs=1)],
                     "main", [vi("init", [3]), vi("xs", [4, 3])], [vi("final", [3]), vi("ys", [4, 3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)])
    result, report = onnxslim.optimize(m, passes="lossless")
    body_out = next(a.g for n in result.graph.node for a in n.attribute if a.name == "body")
    assert sorted(n.op_type for n in body_out.node) == ["Add", "Mul"]
    feeds = {"init": np.float32([1, 2, 3]), "xs": np.arange(12, dtype=np.float32).reshape(4, 3)}
    for a, b in zip(run(m, feeds), run(result, feeds)):
        np.testing.assert_array_equal(a, b)


def test_model_local_functions_survive():
    fn = h.make_function(
        "local.fn", "ScaledRelu", ["X", "S"], ["Y"],
        [h.make_node("Identity", ["X"], ["Xi"]), h.make_node("Relu", ["Xi"], ["R"]), h.make_node("Mul", ["R", "S"], ["Y"])],
        opset_imports=[h.make_opsetid("", OPSET)])
    g = h.make_graph([h.make_node("ScaledRelu", ["x", "s"], ["a"], domain="local.fn"),
                      h.make_node("ScaledRelu", ["a", "s"], ["y"], domain="local.fn"),
                      h.make_node("ScaledRelu", ["s", "s"], ["z"], domain="local.fn")],  # constant inputs: not folded
                     "main", [vi("x", [4])], [vi("y", [4]), vi("z", [1])],
                     initializer=[nh.from_array(np.float32([3.0]), "s")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("local.fn", 1)], functions=[fn])
    onnx.checker.check_model(m, full_check=True)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"]
    assert [f.name for f in result.functions] == ["ScaledRelu"]
    assert [n.op_type for n in result.graph.node] == ["ScaledRelu"] * 3
    feeds = {"x": np.float32([-2, -1, 1, 2])}
    for a, b in zip(run(m, feeds), run(result, feeds)):
        np.testing.assert_array_equal(a, b)


def test_weight_shared_by_both_branches_is_stored_once():
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    then_b = h.make_graph([h.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", [1, 64])])
    else_b = h.make_graph([h.make_node("MatMul", ["W", "xt"], ["e0"]), h.make_node("Transpose", ["e0"], ["e"])],
                          "else", [], [vi("e", [1, 64])])
    g = h.make_graph([h.make_node("Transpose", ["x"], ["xt"]),
                      h.make_node("If", ["c"], ["y"], then_branch=then_b, else_branch=else_b)],
                     "main", [vi("x", [1, 64]), vi("c", [], T.BOOL)], [vi("y", [1, 64])],
                     initializer=[nh.from_array(w, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)])
    result, _ = onnxslim.optimize(m, passes="lossless")
    assert sum(1 for gr in all_graphs(result.graph) for t in gr.initializer if t.name == "W") == 1
    assert result.ByteSize() < m.ByteSize() + 1024
    feeds = {"x": np.ones((1, 64), np.float32), "c": np.array(False)}
    np.testing.assert_allclose(run(m, feeds)[0], run(result, feeds)[0], rtol=1e-5)
