"""unroll-loop: Loops with a constant trip count become copies of their body, outputs bit-identical in
onnxruntime: loop-carried values, scan outputs, nested Loops, captures of outer-scope and body values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

import onnxslim
import graph_helpers
from graph_helpers import c
from onnxslim.graph import iter_graphs, to_gs, to_proto
from onnxslim.manager import Context, load_passes
from onnxslim.passes import unroll_loop
from onnxslim.protowalk import model_stats

RNG = np.random.default_rng(0)
MODELS = Path(__file__).resolve().parent.parent / "models"


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def run(m, feeds, optimize=False):
    # onnxruntime fuses MatMul+Add in a main graph but not in a Loop body: 1-ulp differences
    return graph_helpers.run(m, feeds, optimize=optimize)


def make(nodes, inputs, outputs, inits=(), opset=17):
    return graph_helpers.make(nodes, inputs, outputs, inits, opset=opset, full_check=True)


def nested_model(outer_trips=3, inner_trips=2, opset=17) -> onnx.ModelProto:
    """x[N,4] -> Loop(outer_trips){ t = acc*s ; Loop(inner_trips){ v' = (v + t) @ W + i } ; scan: v } -> y, scan."""
    inner = h.make_graph(
        [h.make_node("Add", ["v_in", "t"], ["vt"]),  # t: a value of the OUTER body (a capture)
         h.make_node("MatMul", ["vt", "W"], ["vw"]),  # W: an initializer of the main graph
         h.make_node("Cast", ["j"], ["jf"], to=T.FLOAT),
         h.make_node("Add", ["vw", "jf"], ["v_out"]),
         h.make_node("Identity", ["jc_in"], ["jc_out"])],
        "inner", [vi("j", [], T.INT64), vi("jc_in", [], T.BOOL), vi("v_in", ["N", 4])],
        [vi("jc_out", [], T.BOOL), vi("v_out", ["N", 4])])
    outer = h.make_graph(
        [h.make_node("Mul", ["acc_in", "s"], ["t"]),
         h.make_node("Loop", ["m_in", "", "t"], ["acc_out"], body=inner),
         h.make_node("Cast", ["i"], ["if_"], to=T.FLOAT),
         h.make_node("Mul", ["acc_out", "if_"], ["scan"]),
         h.make_node("Identity", ["c_in"], ["c_out"])],
        "outer", [vi("i", [], T.INT64), vi("c_in", [], T.BOOL), vi("acc_in", ["N", 4])],
        [vi("c_out", [], T.BOOL), vi("acc_out", ["N", 4]), vi("scan", ["N", 4])])
    inits = [c("W", (RNG.standard_normal((4, 4)) * 0.5).astype(np.float32)), c("s", np.float32(0.7)),
             c("M", np.int64(outer_trips)), c("m_in", np.int64(inner_trips)), c("yes", np.array(True))]
    return make([h.make_node("Loop", ["M", "yes", "x"], ["y", "ys"], body=outer)],
                [vi("x", ["N", 4])], [vi("y", ["N", 4]), vi("ys", [outer_trips, "N", 4])], inits, opset=opset)


def unroll_all(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every Loop unrolled (the size prediction bypassed), inner first, as the pass does."""
    g = to_gs(m)
    while True:
        found = []
        for sg in iter_graphs(g):
            for n in sg.nodes:
                if n.op == "Loop" and unroll_loop.trips(n, 64) is not None:
                    found.append((sg, n))
        if not found:
            break
        scopes_of = {id(g): [g]}
        for sg in iter_graphs(g):  # scope chains, parents before children
            for n in sg.nodes:
                for b in unroll_loop._subgraphs(n):
                    scopes_of[id(b)] = scopes_of[id(sg)] + [b]
        sg, n = found[-1] if len(scopes_of[id(found[-1][0])]) > 1 else found[0]
        unroll_loop.unroll(sg, n, unroll_loop.trips(n, 64), scopes_of[id(sg)], unroll_loop._Names(g), 17)
    return to_proto(g, m)


def feeds(*ns):
    return [{"x": RNG.standard_normal((n, 4)).astype(np.float32)} for n in ns]


def assert_identical(a, b, cases):
    """Bit-identical with 2+ rows; a 1-row MatMul takes another kernel path for a weight read inside a Loop
    body than for the same weight in the main graph (1-ulp differences), so one row is compared within 1e-5."""
    for f in cases:
        if next(iter(f.values())).shape[0] == 1:
            for x, y in zip(run(a, f), run(b, f)):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
            continue
        ra, rb = run(a, f), run(b, f)
        for x, y in zip(ra, rb):
            assert x.shape == y.shape and np.array_equal(x, y)
        for x, y in zip(ra, run(b, f, optimize=True)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_nested_loops_with_captures_unroll_to_identical_outputs():
    m = nested_model()
    out = unroll_all(m)
    onnx.checker.check_model(out, full_check=True)
    assert not any(n.op_type == "Loop" for n in out.graph.node)
    assert sum(n.op_type == "MatMul" for n in out.graph.node) == 3 * 2  # one per inner iteration of each outer one
    assert_identical(m, out, feeds(1, 3, 0))


def test_single_iteration_loop_is_unrolled_by_the_pipeline():
    m = nested_model(outer_trips=1, inner_trips=1)
    got, _ = onnxslim.optimize(m, validate=False)
    assert model_stats(got)["nodes"] < model_stats(m)["nodes"]
    assert not any(n.op_type == "Loop" for n in got.graph.node)
    assert_identical(m, got, feeds(2, 5))


def test_loop_with_foldable_body_shrinks_in_the_pipeline():
    # models/loop_model.onnx: 3 trips, the nested If's condition depends on the iteration number only.
    m = onnx.load(MODELS / "loop_model.onnx")
    got, _ = onnxslim.optimize(m, validate=False)
    assert not any(n.op_type in ("Loop", "If") for n in got.graph.node)
    assert model_stats(got)["nodes"] < model_stats(m)["nodes"]
    assert_identical(m, got, [{"x": RNG.standard_normal((n, 8)).astype(np.float32)} for n in (1, 4)])


def test_growth_and_bounds_keep_the_loop():
    m = nested_model(outer_trips=3, inner_trips=3)
    g = to_gs(m)
    res = load_passes()["unroll-loop"]().run(g, Context())
    assert res.stats["loops_unrolled"] == 0  # 3 copies of a MatMul chain (and 3 x 3) would grow the graph
    g = to_gs(nested_model(outer_trips=3, inner_trips=2))
    res = load_passes()["unroll-loop"]().run(g, Context())
    assert res.stats["loops_unrolled"] == 1  # the inner Loop: 2 x 3 nodes instead of Loop + 5
    small = nested_model(outer_trips=1, inner_trips=1)
    opts = unroll_loop.UnrollOptions(unroll_max_trips=0)
    g = to_gs(small)
    assert load_passes()["unroll-loop"](opts).run(g, Context()).stats["loops_unrolled"] == 0


def test_data_dependent_condition_is_not_unrolled():
    body = h.make_graph(
        [h.make_node("ReduceSum", ["a_in"], ["r"], keepdims=0),
         h.make_node("Less", ["r", "lim"], ["c_out"]),
         h.make_node("Add", ["a_in", "one"], ["a_out"])],
        "b", [vi("i", [], T.INT64), vi("c_in", [], T.BOOL), vi("a_in", [2])], [vi("c_out", [], T.BOOL), vi("a_out", [2])])
    m = make([h.make_node("Loop", ["M", "yes", "x"], ["y"], body=body)], [vi("x", [2])], [vi("y", [2])],
             [c("M", np.int64(1)), c("yes", np.array(True)), c("lim", np.float32(3.0)), c("one", np.float32(1.0))])
    n = to_gs(m).nodes[0]
    assert unroll_loop.trips(n, 16) is None  # the loop may stop early: not unrolled


def test_zero_trip_loop_returns_initial_values():
    body = h.make_graph([h.make_node("Add", ["a_in", "one"], ["a_out"]), h.make_node("Identity", ["c_in"], ["c_out"])],
                        "b", [vi("i", [], T.INT64), vi("c_in", [], T.BOOL), vi("a_in", [3])],
                        [vi("c_out", [], T.BOOL), vi("a_out", [3])])
    m = make([h.make_node("Loop", ["M", "", "x"], ["y"], body=body), h.make_node("Relu", ["y"], ["z"])],
             [vi("x", [3])], [vi("z", [3])], [c("M", np.int64(0)), c("one", np.float32(1.0))])
    got, _ = onnxslim.optimize(m, validate=False)
    assert [n.op_type for n in got.graph.node] == ["Relu"]
    assert_identical(m, got, [{"x": RNG.standard_normal(3).astype(np.float32)}])


def test_inner_loop_unrolled_inside_a_kept_outer_loop():
    m = nested_model(outer_trips=3, inner_trips=2)
    got, _ = onnxslim.optimize(m, validate=False)
    loops = [n for n in got.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1 and not any(n.op_type == "Loop" for n in loops[0].attribute[0].g.node)
    assert model_stats(got)["nodes"] <= model_stats(m)["nodes"]
    assert_identical(m, got, feeds(2, 4, 0))
