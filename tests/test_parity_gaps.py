"""The two rewrites that closed the node gap to OnnxSlim on the real models (silero_vad, ddddocr):

- fold, near If conditions: a runtime node in front of an If condition (silero's reflect Pad, whose output
  shape the condition reads) gets its constant-only inputs folded (ConstantOfShape/Concat/Reshape chains
  computing the pads), after a load check; the condition's own chain still never folds;
- shape-chain, dims followed through Reshape(-1)/Gemm/Transpose: ``Reshape(Gemm(Reshape(x, [-1, 1024])),
  [Shape(x)[0], 1, -1])`` (ddddocr's CTC head) gets the constant target [0, 1, -1].

Each: outputs bit-identical in onnxruntime, fewer nodes, and a near miss where the rewrite must not fire.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim
import graph_helpers
from graph_helpers import c, run
from onnxslim.graph import node_count, op_histogram, to_gs, to_proto
from onnxslim.manager import Context, load_passes

RNG = np.random.default_rng(0)


def make(nodes, inputs, outputs, inits=(), opset=16) -> onnx.ModelProto:
    return graph_helpers.make(nodes, inputs, outputs, inits, opset=opset)


def assert_identical(a, b, feeds_list):
    for feeds in feeds_list:
        for x, y in zip(run(a, feeds), run(b, feeds)):
            assert x.shape == y.shape and x.tobytes() == y.tobytes()


def one_pass(name, m):
    g = to_gs(onnx.shape_inference.infer_shapes(m))
    res = load_passes()[name]().run(g, Context())
    g.cleanup()
    return to_proto(g, m), res


# -- fold near If conditions --------------------------------------------------------------------------

def padded_if(cond_const_chain: bool = False) -> onnx.ModelProto:
    """x[N, T] -> Pad(reflect, pads = Concat([0, 2], ConstantOfShape([2]))) -> Unsqueeze -> if last dim == 1:
    Squeeze else Identity; the pads are constant, the condition reads Pad's output shape (silero's stft)."""
    nodes = [h.make_node("ConstantOfShape", ["two"], ["zeros"], value=nh.from_array(np.array([0], np.int64))),
             h.make_node("Concat", ["head", "zeros"], ["pads"], axis=0),
             h.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             h.make_node("Unsqueeze", ["p", "ax1"], ["u"]),
             h.make_node("Shape", ["u"], ["s"]),
             h.make_node("Gather", ["s", "last"], ["d"], axis=0)]
    inits = [c("two", np.array([2], np.int64)), c("head", np.array([0, 2], np.int64)),
             c("ax1", np.array([1], np.int64)), c("last", np.int64(-1))]
    if cond_const_chain:  # the value compared with is computed from constants: part of the condition
        nodes.append(h.make_node("Add", ["one_a", "one_b"], ["one"]))
        inits += [c("one_a", np.int64(0)), c("one_b", np.int64(1))]
    else:
        inits.append(c("one", np.int64(1)))
    nodes.append(h.make_node("Equal", ["d", "one"], ["cond"]))
    then_b = h.make_graph([h.make_node("Squeeze", ["u", "ax1"], ["t"])], "then", [],
                          [h.make_tensor_value_info("t", T.FLOAT, ["N", None])])
    else_b = h.make_graph([h.make_node("ReduceMax", ["u"], ["e"], axes=[1], keepdims=0)], "else", [],
                          [h.make_tensor_value_info("e", T.FLOAT, ["N", None])])
    nodes.append(h.make_node("If", ["cond"], ["y"], then_branch=then_b, else_branch=else_b))
    return make(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", "T"])],
                [h.make_tensor_value_info("y", T.FLOAT, ["N", None])], inits)


FEEDS_PAD = [{"x": RNG.standard_normal((2, 7)).astype(np.float32)},
             {"x": RNG.standard_normal((1, 3)).astype(np.float32)}]


def test_pads_in_front_of_an_if_condition_fold():
    m = padded_if()
    out, res = one_pass("fold", m)
    hist = op_histogram(out)
    assert "ConstantOfShape" not in hist and "Concat" not in hist  # the pads are one initializer now
    assert hist["Pad"] == 1 and hist["If"] == 1 and hist["Shape"] == 1  # the condition's chain stays
    assert res.stats["load_checks"] >= 1
    assert node_count(out) == node_count(m) - 2
    assert_identical(m, out, FEEDS_PAD)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"] and node_count(result) < node_count(m)
    assert_identical(m, result, FEEDS_PAD)


def test_constants_of_the_condition_itself_do_not_fold():
    m = padded_if(cond_const_chain=True)
    out, _ = one_pass("fold", m)
    hist = op_histogram(out)
    assert hist.get("Add") == 1 and hist["Equal"] == 1  # the compared value stays computed
    assert "Concat" not in hist  # while the pads still fold
    assert_identical(m, out, FEEDS_PAD)


def test_pads_stay_when_the_folded_copy_would_not_load(monkeypatch):
    from onnxslim import loadcheck

    real_ok = loadcheck.LoadCheck.ok
    calls = []

    def refuse(self, model):
        calls.append(model)
        return False

    monkeypatch.setattr(loadcheck.LoadCheck, "ok", refuse)
    m = padded_if()
    out, res = one_pass("fold", m)
    monkeypatch.setattr(loadcheck.LoadCheck, "ok", real_ok)
    assert calls and op_histogram(out)["Concat"] == 1 and op_histogram(out)["ConstantOfShape"] == 1
    assert any("no longer loads" in n for n in res.notes)
    assert_identical(m, out, FEEDS_PAD)


# -- shape-chain: dims followed through Reshape(-1) and Gemm ------------------------------------------

def ctc_head(inner: int = 2, flat: int = 1024) -> onnx.ModelProto:
    """x[T, 1, inner, 512] -> Reshape(-1, flat) -> Gemm -> Reshape([Shape(x)[0], 1, -1]) (ddddocr's tail)."""
    w = (RNG.standard_normal((6, flat)) * 0.05).astype(np.float32)
    nodes = [h.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1, 3]),
             h.make_node("Reshape", ["xt", "flat"], ["f"]),
             h.make_node("Gemm", ["f", "w", "b"], ["g"], transB=1),
             h.make_node("Shape", ["xt"], ["s"]),
             h.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             h.make_node("Unsqueeze", ["n", "ax0"], ["nu"]),
             h.make_node("Concat", ["nu", "one", "minus1"], ["target"], axis=0),
             h.make_node("Reshape", ["g", "target"], ["y"])]
    inits = [c("flat", np.array([-1, flat], np.int64)), c("w", w), c("b", RNG.standard_normal(6).astype(np.float32)),
             c("zero", np.int64(0)), c("ax0", np.array([0], np.int64)), c("one", np.array([1], np.int64)),
             c("minus1", np.array([-1], np.int64))]
    return make(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["T", inner, 1, 512])],
                [h.make_tensor_value_info("y", T.FLOAT, [None, 1, None])], inits)


def test_gemm_head_target_becomes_constant():
    m = ctc_head()
    feeds = [{"x": RNG.standard_normal((t, 2, 1, 512)).astype(np.float32)} for t in (1, 5)]
    out, res = one_pass("shape-chain", m)
    assert res.stats["reshape_targets"] == 1
    target = next(i for i in out.graph.initializer if i.name.endswith("__target"))
    assert nh.to_array(target).tolist() == [0, 1, -1]
    assert "Shape" not in op_histogram(out) and "Concat" not in op_histogram(out)
    assert node_count(out) == node_count(m) - 4
    assert_identical(m, out, feeds)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"] and node_count(result) == node_count(m) - 4
    assert_identical(m, result, feeds)


def test_reshape_that_splits_the_dynamic_dim_is_not_followed():
    """Reshape(x[T, 2, 1, 512], [-1, 512]) has 2T rows: its dim 0 is not T, the target must stay."""
    m = ctc_head(flat=512)
    feeds = [{"x": RNG.standard_normal((t, 2, 1, 512)).astype(np.float32)} for t in (1, 3)]
    out, res = one_pass("shape-chain", m)
    assert res.stats["reshape_targets"] == 0 and op_histogram(out)["Shape"] == 1
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"] and op_histogram(result)["Shape"] == 1
    assert_identical(m, result, feeds)


# -- slice-merge: axes the merged Slice takes whole are left out ---------------------------------------

def stft_halves(end: int = 2**63 - 1, step: int = 1) -> onnx.ModelProto:
    """x[N, 6, T] -> Slice(all axes, whole on 0 and 2) -> Slice(axis 1) twice: silero's real/imag halves."""
    big = np.iinfo(np.int64).max
    nodes = [h.make_node("Slice", ["x", "z3", "e3", "ax3", "st3"], ["full"]),
             h.make_node("Slice", ["full", "s_lo", "e_lo", "ax1"], ["lo"]),
             h.make_node("Slice", ["full", "s_hi", "e_hi", "ax1"], ["hi"]),
             h.make_node("Add", ["lo", "hi"], ["y"])]
    inits = [c("z3", np.zeros(2, np.int64)), c("e3", np.array([big, end], np.int64)), c("ax3", np.array([0, 2], np.int64)),
             c("st3", np.array([1, step], np.int64)), c("s_lo", np.array([0], np.int64)), c("e_lo", np.array([3], np.int64)),
             c("s_hi", np.array([3], np.int64)), c("e_hi", np.array([big], np.int64)), c("ax1", np.array([1], np.int64))]
    return make(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 6, "T"])],
                [h.make_tensor_value_info("y", T.FLOAT, ["N", 3, None])], inits, opset=13)


def merged_axes(m):
    out, res = one_pass("slice-merge", m)
    assert res.stats["slices_merged"] == 2
    inits = {i.name: nh.to_array(i) for i in out.graph.initializer}
    return out, sorted(tuple(inits[n.input[3]].tolist()) for n in out.graph.node if n.op_type == "Slice")


def test_merged_slices_keep_only_the_axis_they_cut():
    m = stft_halves()
    out, axes = merged_axes(m)
    assert axes == [(1,), (1,)] and node_count(out) == node_count(m) - 1
    assert_identical(m, out, [{"x": RNG.standard_normal((n, 6, t)).astype(np.float32)} for n, t in ((1, 5), (2, 1))])


def test_axes_not_taken_whole_stay_in_the_merged_slice():
    for m in (stft_halves(end=4), stft_halves(step=2)):  # a cut on axis 2 (end 4, or every other column)
        out, axes = merged_axes(m)
        assert axes == [(2, 1), (2, 1)]  # axis 0 is whole in both, axis 2 is not
        assert_identical(m, out, [{"x": RNG.standard_normal((2, 6, 7)).astype(np.float32)}])
