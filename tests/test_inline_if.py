"""inline-if: If nodes with a known condition are replaced by the branch they take, in every body.

Each test builds a model onnxruntime runs, inlines (the pass alone and/or the lossless pipeline),
asserts the If is gone (or, where inlining would break loading, kept) and the outputs are equal.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim
import graph_helpers
from onnxslim.graph import iter_proto_nodes, op_histogram, to_gs, to_proto, toposort
from onnxslim.manager import Context, load_passes

OPSET = 17
RNG = np.random.default_rng(0)


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def init(name, arr):
    return nh.from_array(np.asarray(arr), name)


def make(nodes, inputs, outputs, inits=(), value_info=(), opset=OPSET, check=True) -> onnx.ModelProto:
    return graph_helpers.make(nodes, inputs, outputs, inits, opset=opset, value_info=value_info, check=check)


def branch(name, nodes, outputs, inits=()):
    return h.make_graph(nodes, name, [], outputs, initializer=list(inits))


def if_node(cond, outs, then_b, else_b, name=""):
    return h.make_node("If", [cond], outs, name=name, then_branch=then_b, else_branch=else_b)


run = graph_helpers.run


def inline(m: onnx.ModelProto):
    """The pass alone, once: (new model, PassResult)."""
    g = to_gs(m)
    res = load_passes()["inline-if"]().run(g, Context())
    toposort(g)
    out = to_proto(g, m)
    onnx.checker.check_model(out, full_check=True)
    return out, res


def ifs(m: onnx.ModelProto) -> int:
    return sum(1 for n in iter_proto_nodes(m.graph) if n.op_type == "If")


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    ra, rb = run(a, feeds), run(b, feeds)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def two_way(cond_value: bool) -> onnx.ModelProto:
    """then: (x + Wt) * k with a branch-local weight; else: x * We - outer Relu(x)."""
    then_b = branch("then", [h.make_node("Add", ["x", "Wt"], ["t0"]), h.make_node("Mul", ["t0", "k"], ["t_out"])],
                    [vi("t_out", [2, 3])], [init("Wt", RNG.standard_normal(3).astype(np.float32)), init("k", np.float32(3))])
    else_b = branch("else", [h.make_node("Mul", ["x", "We"], ["e0"]), h.make_node("Sub", ["e0", "xr"], ["e_out"])],
                    [vi("e_out", [2, 3])])
    return make([h.make_node("Relu", ["x"], ["xr"]), if_node("c", ["y"], then_b, else_b), h.make_node("Neg", ["y"], ["z"])],
                [vi("x", [2, 3])], [vi("z", [2, 3])],
                [init("c", np.array(cond_value)), init("We", RNG.standard_normal(3).astype(np.float32))])


@pytest.mark.parametrize("cond", [True, False])
def test_both_branches(cond):
    m = two_way(cond)
    out, res = inline(m)
    assert res.changed and res.stats["ifs_inlined"] == 1 and ifs(out) == 0
    hist = op_histogram(out)
    assert ("Add" in hist) == cond and ("Sub" in hist) == (not cond)
    assert_same(m, out, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})


def test_condition_from_symbolic_shape_static_dim():
    # cond = Shape(x)[1] == 8 with x [N, 8]: N is unknown, the dim that matters is not.
    then_b = branch("then", [h.make_node("Relu", ["x"], ["t"])], [vi("t", ["N", 8])])
    else_b = branch("else", [h.make_node("Neg", ["x"], ["e"])], [vi("e", ["N", 8])])
    m = make([h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "one"], ["d"], axis=0),
              h.make_node("Equal", ["d", "eight"], ["c"]), if_node("c", ["y"], then_b, else_b)],
             [vi("x", ["N", 8])], [vi("y", ["N", 8])], [init("one", np.int64(1)), init("eight", np.int64(8))])
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"]
    assert op_histogram(result) == {"Relu": 1}  # the If and the nodes computing its condition are gone
    assert_same(m, result, {"x": RNG.standard_normal((5, 8)).astype(np.float32)})


def test_unknown_condition_is_left_alone():
    m = two_way(True)
    m.graph.initializer.pop(0)
    m.graph.input.append(vi("c", [], T.BOOL))
    _, res = inline(m)
    assert not res.changed and res.stats["ifs_inlined"] == 0


def test_nested_if_inside_kept_branch():
    # The inner If's condition is computed inside the outer branch (Not of a branch-local constant).
    inner_then = branch("it", [h.make_node("Mul", ["t0", "xr"], ["it_out"])], [vi("it_out", [3])])
    inner_else = branch("ie", [h.make_node("Sub", ["t0", "xr"], ["ie_out"])], [vi("ie_out", [3])])
    then_b = branch("then", [h.make_node("Add", ["x", "W"], ["t0"]),
                             h.make_node("Not", ["f"], ["nf"]),
                             if_node("nf", ["t_out"], inner_then, inner_else)],
                    [vi("t_out", [3])], [init("f", np.array(False))])
    else_b = branch("else", [h.make_node("Neg", ["x"], ["e_out"])], [vi("e_out", [3])])
    m = make([h.make_node("Relu", ["x"], ["xr"]), if_node("c", ["y"], then_b, else_b)],
             [vi("x", [3])], [vi("y", [3])], [init("c", np.array(True)), init("W", np.float32([1, 2, 3]))])
    out, res = inline(m)
    assert res.stats["ifs_inlined"] == 2 and ifs(out) == 0
    assert sorted(n.op_type for n in out.graph.node) == ["Add", "Mul", "Relu"]  # Not (the condition) is dead
    assert_same(m, out, {"x": np.float32([-1, 0.5, 2])})
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"] and op_histogram(result) == {"Add": 1, "Mul": 1, "Relu": 1}


def test_outer_scope_captures_from_two_scopes_up():
    """An If in a Loop body whose kept branch reads a loop-carried value, a body value, a main-graph
    value and a main-graph weight: all stay visible where the branch lands."""
    then_b = branch("then", [h.make_node("Add", ["acc_in", "xr"], ["t0"]), h.make_node("Mul", ["t0", "W"], ["t1"]),
                             h.make_node("Add", ["t1", "half"], ["t_out"])], [vi("t_out", [2, 3])])
    else_b = branch("else", [h.make_node("Sub", ["acc_in", "xr"], ["e_out"])], [vi("e_out", [2, 3])])
    body = h.make_graph(
        [h.make_node("Mul", ["acc_in", "W"], ["half"]),
         if_node("c", ["acc_out"], then_b, else_b),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], T.INT64), vi("cond_in", [], T.BOOL), vi("acc_in", [2, 3])],
        [vi("cond_out", [], T.BOOL), vi("acc_out", [2, 3])])
    m = make([h.make_node("Relu", ["x"], ["xr"]), h.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
             [vi("x", [2, 3]), vi("n", [], T.INT64)], [vi("y", [2, 3])],
             [init("c", np.array(True)), init("W", np.float32([0.5, -1, 0.25]))])
    out, res = inline(m)
    assert res.stats["ifs_inlined"] == 1 and ifs(out) == 0
    loop = next(n for n in out.graph.node if n.op_type == "Loop")
    assert [n.op_type for n in loop.attribute[0].g.node] == ["Mul", "Add", "Mul", "Add", "Identity"]
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    for n in (0, 1, 4):
        assert_same(m, out, {"x": x, "n": np.array(n, np.int64)})


@pytest.mark.parametrize("kind", ["outer_name", "graph_input", "branch_initializer", "branch_constant_node",
                                  "same_tensor_twice"])
def test_branch_output_that_no_branch_node_produces(kind):
    """The kept branch's output is an outer name, a graph input, a constant, or one tensor for two If outputs;
    the If outputs are graph outputs (their names are the contract) and also read by another node.
    onnx's checker and onnxruntime reject most of these originals (a body output must be produced in
    the body, once); inlined they are valid. The reference is onnx's evaluator on the original."""
    from onnx.reference import ReferenceEvaluator

    nodes, inits = [], []
    if kind == "outer_name":
        outs = ["xr", "xr2"]
    elif kind == "graph_input":
        outs = ["x", "x"]
    elif kind == "branch_initializer":
        outs, inits = ["k", "k"], [init("k", np.float32([4, 5, 6]))]
    elif kind == "branch_constant_node":
        outs, nodes = ["kc", "kc"], [h.make_node("Constant", [], ["kc"], value=init("kv", np.float32([7, 8, 9])))]
    else:
        outs, nodes = ["s", "s"], [h.make_node("Sin", ["x"], ["s"])]
    then_b = branch("then", nodes, [vi(outs[0], [3]), vi(outs[1], [3])], inits)
    else_b = branch("else", [h.make_node("Neg", ["x"], ["e0"]), h.make_node("Abs", ["x"], ["e1"])],
                    [vi("e0", [3]), vi("e1", [3])])
    m = make([h.make_node("Relu", ["x"], ["xr"]), h.make_node("Exp", ["x"], ["xr2"]),
              if_node("c", ["y0", "y1"], then_b, else_b), h.make_node("Add", ["y0", "y1"], ["z"])],
             [vi("x", [3])], [vi("y0", [3]), vi("y1", [3]), vi("z", [3])], [init("c", np.array(True))], check=False)
    out, res = inline(m)
    assert res.changed and ifs(out) == 0
    assert [o.name for o in out.graph.output] == ["y0", "y1", "z"]
    feeds = {"x": np.float32([-1, 0.5, 2])}
    for want, got in zip(ReferenceEvaluator(m).run(None, feeds), run(out, feeds)):
        np.testing.assert_allclose(want, got, rtol=1e-6)
    result, report = onnxslim.optimize(out, passes="lossless")  # and the rest of the pipeline keeps it valid
    assert report.validation["passed"] and [o.name for o in result.graph.output] == ["y0", "y1", "z"]
    assert_same(out, result, feeds)


def test_name_collisions_are_renamed():
    """Branch-local names that are also used elsewhere: a main-graph tensor defined after the If, the
    local of a sibling If that stays (its condition is an input), a branch initializer named like a
    main-graph weight with other values, and two inlined Ifs whose branches use the same names."""
    def then_b(tag_vals):
        return branch("then", [h.make_node("Add", ["x", "w"], ["t"]), h.make_node("Mul", ["t", "t"], ["u"])],
                      [vi("u", [3])], [init("w", np.float32(tag_vals))])

    else_b = branch("else", [h.make_node("Neg", ["x"], ["e"])], [vi("e", [3])])
    sibling_then = branch("st", [h.make_node("Sigmoid", ["x"], ["t"])], [vi("t", [3])])  # local 't' again
    sibling_else = branch("se", [h.make_node("Tanh", ["x"], ["v"])], [vi("v", [3])])
    m = make([if_node("c", ["y1"], then_b([1, 2, 3]), else_b, name="first"),
              if_node("c", ["y2"], then_b([-1, 0, 1]), else_b, name="second"),
              if_node("dyn", ["y3"], sibling_then, sibling_else, name="dynamic"),
              h.make_node("Mul", ["x", "W"], ["t_main"]),
              h.make_node("Add", ["y1", "W"], ["s1"]),
              h.make_node("Sum", ["s1", "y2", "y3", "t_main"], ["z"])],
             [vi("x", [3]), vi("dyn", [], T.BOOL)], [vi("z", [3])],
             [init("c", np.array(True)), init("W", np.float32([0.5, 0.25, 2]))])
    m.graph.node[3].output[0] = "u"  # a main-graph tensor named like the branch locals, defined after the Ifs
    m.graph.node[5].input[3] = "u"
    onnx.checker.check_model(m)
    out, res = inline(m)
    assert res.stats["ifs_inlined"] == 2 and ifs(out) == 1
    names = [o for n in out.graph.node for o in n.output]
    assert len(names) == len(set(names))  # SSA in the main graph
    sub = next(n for n in out.graph.node if n.op_type == "If")
    inner = {o for a in sub.attribute for n in a.g.node for o in n.output}
    assert not inner & set(names)  # the remaining If's locals do not shadow anything
    inits = [t.name for t in out.graph.initializer]
    assert len(inits) == len(set(inits)) and sum(n.startswith("w") for n in inits) == 2  # both branch weights
    x = np.float32([-1, 0.5, 2])
    for dyn in (True, False):
        assert_same(m, out, {"x": x, "dyn": np.array(dyn)})


def test_stale_if_output_shape_is_not_kept():
    # value_info of the If output comes from the other branch ([4]); the kept branch computes [3]:
    # onnxruntime would reject the merged model if the stale entry stayed on the inlined tensor.
    then_b = branch("then", [h.make_node("Relu", ["x3"], ["t"])], [vi("t", [3])])
    else_b = branch("else", [h.make_node("Relu", ["x4"], ["e"])], [vi("e", [4])])
    m = make([if_node("c", ["y"], then_b, else_b), h.make_node("Neg", ["y"], ["z"])],
             [vi("x3", [3]), vi("x4", [4])], [vi("z", [None])], [init("c", np.array(True))],
             value_info=[vi("y", [4])])
    feeds = {"x3": np.float32([-1, 0, 2]), "x4": np.float32([1, 2, 3, 4])}
    run(m, feeds)  # the original loads and runs
    out, res = inline(m)
    assert ifs(out) == 0
    y = [v for v in out.graph.value_info if v.name == "y"]
    assert not y or [d.dim_value for d in y[0].type.tensor_type.shape.dim] != [4]
    assert_same(m, out, feeds)


def test_more_specific_if_output_shape_is_merged():
    then_b = branch("then", [h.make_node("Relu", ["x"], ["t"])], [vi("t", ["N", None])])
    else_b = branch("else", [h.make_node("Neg", ["x"], ["e"])], [vi("e", ["N", None])])
    m = make([if_node("c", ["y"], then_b, else_b), h.make_node("Neg", ["y"], ["z"])],
             [vi("x", ["N", 3])], [vi("z", ["N", 3])], [init("c", np.array(True))], value_info=[vi("y", ["N", 3])])
    out, _ = inline(m)
    y = next(v for v in out.graph.value_info if v.name == "y")
    dims = y.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and dims[1].dim_value == 3
    assert_same(m, out, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})


def affine_grid_expanded() -> onnx.ModelProto:
    """onnx's own AffineGrid function body, expanded into the main graph (as exporters and the node tests do)."""
    import onnx.inliner

    fn = onnx.FunctionProto()
    fn.CopyFrom(onnx.defs.get_schema("AffineGrid", 20, "").function_body)
    fn.domain, fn.name = "local", "AffineGrid"
    del fn.opset_import[:]
    fn.opset_import.append(h.make_opsetid("", 20))
    node = h.make_node("AffineGrid", ["theta", "size"], ["grid"], domain="local", align_corners=0)
    g = h.make_graph([node], "ag", [vi("theta", [2, 2, 3]), vi("size", [4], T.INT64)], [vi("grid", [2, 5, 6, 2])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 20), h.make_opsetid("local", 1)], functions=[fn])
    m = onnx.inliner.inline_local_functions(m)
    del m.functions[:]
    del m.opset_import[1:]
    onnx.checker.check_model(m)
    return m


def test_if_kept_when_inlining_breaks_loading():
    """AffineGrid splits `size` into [1]-shaped pieces inside an If and feeds them to Range. Inside the If
    onnxruntime never checks them; inlined, its shape inference (re-run after constant folding) rejects
    the model. That If stays; the other Ifs of the body, whose conditions are also static, go."""
    m = affine_grid_expanded()
    feeds = {"theta": RNG.standard_normal((2, 2, 3)).astype(np.float32), "size": np.array([2, 3, 5, 6], np.int64)}
    out, res = inline(m)
    assert res.stats["ifs_kept_by_load_check"] == 1 and res.stats["ifs_inlined"] >= 2
    assert ifs(out) == 1 and len(res.notes) == 1 and "no longer loads" in res.notes[0]
    assert_same(m, out, feeds)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"] and ifs(result) == 1
    assert_same(m, result, feeds)


def test_if_model_keeps_its_data_dependent_if():
    m = onnx.load("models/if_model.onnx")
    out, res = inline(m)
    assert not res.changed and ifs(out) == 1
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"] and ifs(result) == 1
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    for sign in (1, -1):
        assert_same(m, result, {"x": np.abs(x) * sign})


def test_batch_test_decided_by_input_shape():
    """PyTorch-style `if x.size(0) == 1` on a symbolic batch: kept as exported, inlined once
    --input-shape fixes the batch (with check-each-pass verifying every pass)."""
    then_b = branch("then", [h.make_node("Squeeze", ["x", "zero"], ["t"])], [vi("t", [8])])
    else_b = branch("else", [h.make_node("ReduceMean", ["x"], ["e"], axes=[0], keepdims=0)], [vi("e", [8])])
    m = make([h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "zero_s"], ["n"], axis=0),
              h.make_node("Equal", ["n", "one"], ["c"]), if_node("c", ["y"], then_b, else_b)],
             [vi("x", ["N", 8])], [vi("y", [8])],
             [init("zero", np.array([0], np.int64)), init("zero_s", np.int64(0)), init("one", np.int64(1))])
    kept, _ = onnxslim.optimize(m, passes="lossless")
    assert ifs(kept) == 1
    fixed, report = onnxslim.optimize(m, passes="lossless", input_shapes={"x": [1, 8]}, check_each_pass=True)
    assert report.validation["passed"] and ifs(fixed) == 0 and op_histogram(fixed) == {"Squeeze": 1}
    assert_same(m, fixed, {"x": RNG.standard_normal((1, 8)).astype(np.float32)})
