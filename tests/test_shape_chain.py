"""shape-chain: Reshape targets read back from Shape chains become constants ([0, 0, 12, 32]); all-zero
RNN/LSTM initial states are dropped. Outputs stay bit-identical in onnxruntime on several symbolic shapes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim
import graph_helpers
from graph_helpers import c, run
from onnxslim.graph import op_histogram, to_gs, to_proto
from onnxslim.manager import Context, load_passes
from onnxslim.protowalk import model_stats

RNG = np.random.default_rng(0)


def make(nodes, inputs, outputs, inits=(), opset=14) -> onnx.ModelProto:
    return graph_helpers.make(nodes, inputs, outputs, inits, opset=opset)


def shape_pass(m: onnx.ModelProto):
    g = to_gs(onnx.shape_inference.infer_shapes(m))  # ranks, as the pipeline's shape-inference gives them
    res = load_passes()["shape-chain"]().run(g, Context())
    return to_proto(g, m), res


def dim_nodes(prefix, src, k):
    """Unsqueeze(Gather(Shape(src), k)) -> prefix_u: one element of a shape read back at run time."""
    return [h.make_node("Shape", [src], [f"{prefix}_s"]),
            h.make_node("Gather", [f"{prefix}_s", f"{prefix}_k"], [f"{prefix}_g"], axis=0),
            h.make_node("Unsqueeze", [f"{prefix}_g", "ax0"], [f"{prefix}_u"])], c(f"{prefix}_k", np.int64(k))


def attention_like(allowzero: int | None = None) -> onnx.ModelProto:
    """x[b,s,24] -> MatMul -> Reshape(b, s, 4, 6) -> Transpose -> Transpose back -> Reshape(b*s, 24) -> Reshape(b, s, 24)."""
    nodes, inits = [], [c("w", RNG.standard_normal((24, 24)).astype(np.float32)), c("ax0", np.array([0], np.int64)),
                        c("heads", np.array([4, 6], np.int64)), c("width", np.array([24], np.int64))]
    nodes.append(h.make_node("MatMul", ["x", "w"], ["q"]))
    for p, k in (("b", 0), ("s", 1)):
        ns, k_init = dim_nodes(p, "q", k)
        nodes += ns
        inits.append(k_init)
    nodes.append(h.make_node("Concat", ["b_u", "s_u", "heads"], ["t4"], axis=0))
    kw = {} if allowzero is None else {"allowzero": allowzero}
    nodes.append(h.make_node("Reshape", ["q", "t4"], ["q4"], **kw))
    nodes.append(h.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]))
    nodes.append(h.make_node("Transpose", ["qt"], ["q4b"], perm=[0, 2, 1, 3]))
    # b*s as a product: one unknown element next to a nonzero constant -> -1
    nodes.append(h.make_node("Mul", ["b_g", "s_g"], ["bs"]))
    nodes.append(h.make_node("Unsqueeze", ["bs", "ax0"], ["bs_u"]))
    nodes.append(h.make_node("Concat", ["bs_u", "width"], ["t2"], axis=0))
    nodes.append(h.make_node("Reshape", ["q4b", "t2"], ["flat"]))
    nodes.append(h.make_node("Concat", ["b_u", "s_u", "width"], ["t3"], axis=0))
    nodes.append(h.make_node("Reshape", ["flat", "t3"], ["y"]))
    return make(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 24])],
                [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 24])], inits)


def feeds_of(*shapes):
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


SHAPES = ((1, 5, 24), (3, 7, 24), (2, 1, 24), (0, 4, 24))


def test_reshape_targets_become_constants_and_outputs_are_identical():
    m = attention_like()
    out, res = shape_pass(m)
    assert res.stats["reshape_targets"] == 2  # [0, 0, 4, 6] and [-1, 24]; the last one reads a tensor of another shape
    targets = {n.output[0]: n.input[1] for n in out.graph.node if n.op_type == "Reshape"}
    inits = {t.name: nh.to_array(t).tolist() for t in out.graph.initializer}
    assert inits[targets["q4"]] == [0, 0, 4, 6]
    assert inits[targets["flat"]] == [-1, 24]
    for f in feeds_of(*SHAPES):
        for a, b in zip(run(m, f), run(out, f)):
            assert a.shape == b.shape and np.array_equal(a, b)


def test_lossless_pipeline_removes_the_chains():
    m = attention_like()
    got, _ = onnxslim.optimize(m, validate=False)
    before, after = model_stats(m)["nodes"], model_stats(got)["nodes"]
    assert after < before
    hist = op_histogram(got)
    assert hist.get("Concat", 0) <= 1 and hist.get("Mul", 0) == 0  # only the last target still reads a shape
    for f in feeds_of(*SHAPES):
        for a, b in zip(run(m, f), run(got, f)):
            assert a.shape == b.shape and np.array_equal(a, b)


def test_allowzero_reshape_is_left_alone():
    m = attention_like(allowzero=1)
    out, res = shape_pass(m)
    q4 = next(n for n in out.graph.node if n.output[0] == "q4")
    assert q4.input[1] == "t4"  # 0 would mean a zero-sized dim here, not a copy
    for f in feeds_of((2, 3, 24)):
        assert np.array_equal(run(m, f)[0], run(out, f)[0])


def test_dim_of_another_tensor_is_not_assumed_equal():
    # Reshape(x[a, 6], [Shape(z)[0], -1]): z's dim 0 is unrelated to x's, so the chain stays.
    ns, k = dim_nodes("z", "z", 0)
    m = make(ns + [h.make_node("Concat", ["z_u", "m1"], ["t"], axis=0), h.make_node("Reshape", ["x", "t"], ["y"])],
             [h.make_tensor_value_info("x", T.FLOAT, ["a", 6]), h.make_tensor_value_info("z", T.FLOAT, ["n"])],
             [h.make_tensor_value_info("y", T.FLOAT, ["o0", "o1"])], [k, c("ax0", np.array([0], np.int64)), c("m1", np.array([-1], np.int64))])
    _, res = shape_pass(m)
    assert res.stats["reshape_targets"] == 0


def lstm_model(zero: bool, batch_from_x: bool = True) -> onnx.ModelProto:
    hidden, inp = 5, 3
    inits = [c("W", RNG.standard_normal((2, 4 * hidden, inp)).astype(np.float32)),
             c("R", RNG.standard_normal((2, 4 * hidden, hidden)).astype(np.float32)),
             c("B", RNG.standard_normal((2, 8 * hidden)).astype(np.float32)),
             c("ax0", np.array([0], np.int64)), c("two", np.array([2], np.int64)), c("hid", np.array([hidden], np.int64))]
    ns, k = dim_nodes("b", "x" if batch_from_x else "other", 1)
    inits.append(k)
    value = nh.from_array(np.array([0.0 if zero else 0.5], np.float32), "v")
    nodes = ns + [h.make_node("Concat", ["two", "b_u", "hid"], ["hs"], axis=0),
                  h.make_node("ConstantOfShape", ["hs"], ["h0"], value=value),
                  h.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "h0"], ["Y", "Yh"], hidden_size=hidden,
                              direction="bidirectional")]
    ins = [h.make_tensor_value_info("x", T.FLOAT, ["seq", "batch", inp])]
    if not batch_from_x:
        ins.append(h.make_tensor_value_info("other", T.FLOAT, ["seq", "n"]))  # "n": not known to equal batch
    return make(nodes, ins, [h.make_tensor_value_info("Y", T.FLOAT, ["s", 2, "b", 5]), h.make_tensor_value_info("Yh", T.FLOAT, [2, "b", 5])],
                inits)


def test_zero_lstm_state_is_dropped():
    m = lstm_model(zero=True)
    out, res = shape_pass(m)
    assert res.stats["zero_states_dropped"] == 2
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    assert len(lstm.input) == 4
    got, _ = onnxslim.optimize(m, validate=False)
    assert "ConstantOfShape" not in op_histogram(got) and model_stats(got)["nodes"] == 1
    for shape in ((4, 2, 3), (1, 1, 3), (6, 3, 3)):
        f = {"x": RNG.standard_normal(shape).astype(np.float32)}
        for a, b in zip(run(m, f), run(got, f)):
            assert np.array_equal(a, b)


def test_nonzero_or_foreign_state_is_kept():
    for m in (lstm_model(zero=False), lstm_model(zero=True, batch_from_x=False)):
        _, res = shape_pass(m)
        assert res.stats["zero_states_dropped"] == 0


def slices_model(extra_reader: bool) -> onnx.ModelProto:
    """x[1,3,8,8] -> Slice(axis 2, step 2) -> two Slices on axis -1 (space-to-depth style)."""
    nodes = [h.make_node("Slice", ["x", "s0", "e", "a2", "st2"], ["h"]),
             h.make_node("Slice", ["h", "s0", "e", "am1", "st2"], ["y0"]),
             h.make_node("Slice", ["h", "s1", "e", "am1", "st2"], ["y1"])]
    outs = [h.make_tensor_value_info("y0", T.FLOAT, [1, 3, 4, 4]), h.make_tensor_value_info("y1", T.FLOAT, [1, 3, 4, 4])]
    if extra_reader:
        nodes.append(h.make_node("Relu", ["h"], ["r"]))
        outs.append(h.make_tensor_value_info("r", T.FLOAT, [1, 3, 4, 8]))
    inits = [c("s0", np.array([0], np.int64)), c("s1", np.array([1], np.int64)), c("e", np.array([2**62], np.int64)),
             c("a2", np.array([2], np.int64)), c("am1", np.array([-1], np.int64)), c("st2", np.array([2], np.int64))]
    return make(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])], outs, inits, opset=13)


def test_slices_over_disjoint_axes_merge():
    m = slices_model(extra_reader=False)
    got, _ = onnxslim.optimize(m, validate=False)
    assert op_histogram(got).get("Slice") == 2 and model_stats(got)["nodes"] == 2
    f = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for a, b in zip(run(m, f), run(got, f)):
        assert np.array_equal(a, b)


def test_slice_with_another_reader_is_not_merged():
    m = slices_model(extra_reader=True)
    g = to_gs(onnx.shape_inference.infer_shapes(m))
    assert load_passes()["slice-merge"]().run(g, Context()).stats["slices_merged"] == 0


def test_named_dims_of_another_tensor_count_as_equal():
    # Reshape(y[batch, seq, 4, 6], [Shape(x)[0], Shape(x)[1], 24]) with x[batch, seq, 24]: equal dim names -> [0, 0, 24]
    nodes, inits = [], [c("ax0", np.array([0], np.int64)), c("width", np.array([24], np.int64)),
                        c("t4", np.array([0, 0, 4, 6], np.int64))]
    for p, k in (("b", 0), ("s", 1)):
        ns, k_init = dim_nodes(p, "x", k)
        nodes += ns
        inits.append(k_init)
    nodes += [h.make_node("Reshape", ["x", "t4"], ["y4"]), h.make_node("Relu", ["y4"], ["r"]),
              h.make_node("Concat", ["b_u", "s_u", "width"], ["t3"], axis=0), h.make_node("Reshape", ["r", "t3"], ["y"])]
    m = make(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 24])],
             [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 24])], inits)
    out, res = shape_pass(m)
    assert res.stats["reshape_targets"] == 1
    for f in feeds_of((2, 3, 24), (1, 1, 24)):
        assert np.array_equal(run(m, f)[0], run(out, f)[0])
