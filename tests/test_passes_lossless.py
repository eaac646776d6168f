"""Each lossless pass on hand-built graphs: one graph it must change (with the exact structural
property asserted and outputs compared in onnxruntime) and one it must leave alone."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim
from onnxslim.graph import node_count, op_histogram, to_gs, to_proto
from onnxslim.passes.fold import FoldOptions
from onnxslim.manager import Context, load_passes

OPSET = 17
RNG = np.random.default_rng(0)


def model(nodes, inputs, outputs, inits=(), opset=OPSET, value_info=()):
    """A checked model; outputs given without a shape get the one onnx infers."""
    g = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):
        inferred = onnx.shape_inference.infer_shapes(m)
        for o, io in zip(m.graph.output, inferred.graph.output):
            o.CopyFrom(io)
    onnx.checker.check_model(m)
    return m


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def init(name, arr):
    return nh.from_array(np.asarray(arr), name)


def run_pass(m: onnx.ModelProto, name: str, ctx: Context | None = None, options=None):
    """One pass, once; returns (new model, PassResult)."""
    p = load_passes()[name](options)
    ctx = ctx or Context()
    if p.level == "model":
        work = onnx.ModelProto()
        work.CopyFrom(m)
        res = p.run(work, ctx)
        out = res.model if res.model is not None else work
    else:
        g = to_gs(m)
        res = p.run(g, ctx)
        g.toposort()
        out = to_proto(g, m)
    onnx.checker.check_model(out)
    return out, res


def outputs(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds, rtol=1e-5, atol=1e-5):
    for x, y in zip(outputs(a, feeds), outputs(b, feeds)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def assert_io_kept(a: onnx.ModelProto, b: onnx.ModelProto):
    assert [v.SerializeToString() for v in a.graph.input] == [v.SerializeToString() for v in b.graph.input]
    assert [v.name for v in a.graph.output] == [v.name for v in b.graph.output]
    for x, y in zip(a.graph.output, b.graph.output):
        assert x.type.tensor_type.elem_type == y.type.tensor_type.elem_type


def x_feed(shape=(2, 3, 4, 5), name="x"):
    return {name: RNG.standard_normal(shape).astype(np.float32)}


# ---------------------------------------------------------------- dce
def test_dce_removes_noops_and_dead_nodes():
    nodes = [
        h.make_node("Identity", ["x"], ["a"]),
        h.make_node("Dropout", ["a"], ["b"]),
        h.make_node("Cast", ["b"], ["c"], to=T.FLOAT),
        h.make_node("Reshape", ["c", "same_shape"], ["d"]),
        h.make_node("Expand", ["d", "ones4"], ["e"]),
        h.make_node("Transpose", ["e"], ["f"], perm=[0, 2, 3, 1]),
        h.make_node("Transpose", ["f"], ["g"], perm=[0, 3, 1, 2]),
        h.make_node("Transpose", ["g"], ["g2"], perm=[0, 1, 2, 3]),
        h.make_node("Pad", ["g2", "zero_pads"], ["p"]),
        h.make_node("Slice", ["p", "starts", "ends"], ["s"]),
        h.make_node("Unsqueeze", ["s", "ax0"], ["u"]),
        h.make_node("Squeeze", ["u", "ax0"], ["q"]),
        h.make_node("Add", ["q", "zero"], ["r"]),
        h.make_node("Mul", ["one", "r"], ["t"]),
        h.make_node("Relu", ["t"], ["y"]),
        h.make_node("Sigmoid", ["x"], ["dead1"]),  # reaches no output
        h.make_node("Exp", ["dead1"], ["dead2"]),
    ]
    inits = [init("same_shape", np.array([2, 3, 4, 5], np.int64)), init("ones4", np.array([1, 1, 1, 5], np.int64)),
             init("zero_pads", np.zeros(8, np.int64)), init("starts", np.array([0, 0], np.int64)),
             init("ends", np.array([2**63 - 1, 3], np.int64)), init("ax0", np.array([0], np.int64)),
             init("zero", np.zeros((1, 5), np.float32)), init("one", np.float32(1.0)),
             init("unused", np.ones((100,), np.float32))]
    m = model(nodes, [vi("x", [2, 3, 4, 5])], [vi("y", [2, 3, 4, 5])], inits)
    out, res = run_pass(m, "dce")
    assert op_histogram(out) == {"Relu": 1}
    assert res.changed and res.stats["nodes_removed"] == len(nodes) - 1
    assert not out.graph.initializer  # every initializer was unused after the rewiring
    assert_io_kept(m, out)
    assert_same(m, out, x_feed())


def test_dce_keeps_ops_that_do_something():
    nodes = [
        h.make_node("Reshape", ["x", "other_shape"], ["a"]),
        h.make_node("Cast", ["a"], ["b"], to=T.DOUBLE),
        h.make_node("Cast", ["b"], ["c"], to=T.FLOAT),
        h.make_node("Transpose", ["c"], ["d"], perm=[1, 0, 2]),
        h.make_node("Relu", ["d"], ["d2"]),
        h.make_node("Transpose", ["d2"], ["e"], perm=[1, 0, 2]),  # would cancel, but a Relu sits between
        h.make_node("Slice", ["e", "starts", "ends"], ["f"]),  # drops one row
        h.make_node("Pad", ["f", "pads"], ["g"]),
        h.make_node("Expand", ["g", "bigger"], ["k"]),  # broadcasts
        h.make_node("Reshape", ["k", "flat"], ["k2"]),
        h.make_node("Reshape", ["k2", "copy0"], ["k3"]),  # copies a dim of k2 (0): depends on the first
        h.make_node("Add", ["k3", "half"], ["y"]),
    ]
    inits = [init("other_shape", np.array([6, 4, 5], np.int64)), init("starts", np.array([1], np.int64)),
             init("ends", np.array([100], np.int64)), init("pads", np.array([0, 0, 1, 0, 0, 0], np.int64)),
             init("bigger", np.array([2, 1, 1, 1], np.int64)), init("flat", np.array([10, -1], np.int64)),
             init("copy0", np.array([0, 4, -1], np.int64)), init("half", np.float32(0.5))]
    m = model(nodes, [vi("x", [2, 3, 4, 5])], [vi("y", None)], inits)
    out, res = run_pass(m, "dce")
    assert not res.changed
    assert node_count(out) == len(nodes)
    assert_same(m, out, x_feed())


def test_dce_merges_consecutive_transposes_and_reshapes():
    nodes = [h.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]),
             h.make_node("Transpose", ["a"], ["b"], perm=[3, 0, 2, 1]),  # composed: one Transpose
             h.make_node("Reshape", ["b", "s1"], ["c"]),
             h.make_node("Reshape", ["c", "s2"], ["d"]),  # no 0 entry: reads b directly
             h.make_node("Neg", ["d"], ["y"]),
             h.make_node("Neg", ["a"], ["z"])]  # a keeps its Transpose for this reader
    m = model(nodes, [vi("x", [2, 3, 4, 5])], [vi("y", None), vi("z", None)],
              [init("s1", np.array([-1], np.int64)), init("s2", np.array([6, -1, 5], np.int64))])
    out, res = run_pass(m, "dce")
    assert op_histogram(out) == {"Neg": 2, "Reshape": 1, "Transpose": 2}
    assert res.stats["pairs_fused"] == 2
    assert_same(m, out, x_feed())


def test_dce_identity_on_graph_output_keeps_the_name():
    m = model([h.make_node("Relu", ["x"], ["r"]), h.make_node("Identity", ["r"], ["y"])],
              [vi("x", [3])], [vi("y", [3])])
    out, _ = run_pass(m, "dce")
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [("Relu", ["y"])]
    assert_same(m, out, {"x": np.array([-1, 0, 2], np.float32)})


def test_dce_identity_between_input_and_output_stays():
    m = model([h.make_node("Identity", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    out, res = run_pass(m, "dce")
    assert node_count(out) == 1 and not res.changed


def test_dce_dropout_with_used_mask_or_training_stays():
    m = model([h.make_node("Dropout", ["x", "ratio", "train"], ["y"]),
               h.make_node("Dropout", ["x"], ["z", "mask"])],
              [vi("x", [3]), vi("train", [], T.BOOL)], [vi("y", [3]), vi("z", [3]), vi("mask", [3], T.BOOL)],
              [init("ratio", np.float32(0.5))])
    out, res = run_pass(m, "dce")
    assert node_count(out) == 2 and not res.changed


def test_dce_reshape_with_symbolic_dims():
    # [N, 3] reshaped to [0, 3] or [-1, 3] is the same shape whatever N is.
    m = model([h.make_node("Reshape", ["x", "s1"], ["a"]), h.make_node("Reshape", ["a", "s2"], ["b"]),
               h.make_node("Reshape", ["b", "s3"], ["y"])],
              [vi("x", ["N", 3])], [vi("y", None)],
              [init("s1", np.array([0, 3], np.int64)), init("s2", np.array([-1, 3], np.int64)),
               init("s3", np.array([3, -1], np.int64))])
    model_si, _ = run_pass(m, "shape-inference")
    out, _ = run_pass(model_si, "dce")
    assert op_histogram(out) == {"Reshape": 1}  # only the [3, -1] one changes the shape
    assert_same(m, out, {"x": RNG.standard_normal((6, 3)).astype(np.float32)})


# ---------------------------------------------------------------- shape-inference
def test_shape_inference_adds_value_info_and_keeps_symbols():
    m = model([h.make_node("Relu", ["x"], ["a"]), h.make_node("Transpose", ["a"], ["y"], perm=[1, 0])],
              [vi("x", ["batch", 8])], [vi("y", None)])
    out, res = run_pass(m, "shape-inference")
    assert res.changed
    info = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert info["a"] == ["batch", 8]
    again, res2 = run_pass(out, "shape-inference")
    assert not res2.changed  # a fixed point: nothing new the second time
    assert_io_kept(m, out)


def test_shape_inference_input_shape_fixes_dynamic_dims():
    m = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", ["batch", 3, "h", "w"])], [vi("y", None)])
    out, res = run_pass(m, "shape-inference", Context(input_shapes={"x": [1, 3, 224, 224]}))
    dims = [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224] and res.stats["input_dims_fixed"] == 1
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, 3, 224, 224]
    with pytest.raises(onnxslim.InputError):
        run_pass(m, "shape-inference", Context(input_shapes={"x": [1, 4, 224, 224]}))  # conflicts with the fixed 3


def test_shape_inference_never_crashes_on_unknown_ops():
    m = h.make_model(h.make_graph([h.make_node("Mystery", ["x"], ["a"], domain="my.domain"),
                                   h.make_node("Relu", ["a"], ["y"])], "g", [vi("x", [2])], [vi("y", [2])]),
                     opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("my.domain", 1)])
    out, res = run_pass(m, "shape-inference")
    assert [n.op_type for n in out.graph.node] == ["Mystery", "Relu"]


# ---------------------------------------------------------------- fold
def test_fold_shape_subgraph_and_constants():
    nodes = [
        h.make_node("Shape", ["x"], ["shp"]),
        h.make_node("Gather", ["shp", "i0"], ["n"], axis=0),
        h.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        h.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        h.make_node("Reshape", ["x", "target"], ["flat"]),
        h.make_node("Constant", [], ["k"], value=nh.from_array(np.float32([2.0]), "kv")),
        h.make_node("Mul", ["k", "k"], ["k2"]),
        h.make_node("Add", ["flat", "k2"], ["y"]),
    ]
    inits = [init("i0", np.int64(0)), init("ax0", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64))]
    m = model(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], inits)
    out, res = run_pass(m, "fold")
    assert op_histogram(out) == {"Add": 1, "Reshape": 1}
    consts = {t.name: nh.to_array(t) for t in out.graph.initializer}
    assert consts["target"].tolist() == [2, -1] and consts["k2"].tolist() == [4.0]
    assert res.stats["shapes_folded"] == 1
    assert_same(m, out, x_feed((2, 3, 4)))


def test_fold_leaves_dynamic_and_random_nodes():
    nodes = [h.make_node("Shape", ["x"], ["s"]),  # batch is symbolic: not foldable
             h.make_node("RandomNormalLike", ["c"], ["r"]),  # constant input, but random
             h.make_node("Cast", ["s"], ["sf"], to=T.FLOAT),
             h.make_node("ReduceSum", ["sf"], ["a"], keepdims=0),
             h.make_node("ReduceSum", ["r"], ["b"], keepdims=0),
             h.make_node("Mul", ["a", "b"], ["y"])]
    m = model(nodes, [vi("x", ["batch", 3])], [vi("y", None)], [init("c", np.zeros((3,), np.float32))])
    out, res = run_pass(m, "fold")
    assert not res.changed and node_count(out) == len(nodes)


@pytest.mark.parametrize("case", ["constantofshape", "expand", "tile", "range"])
def test_fold_resource_bombs_stay_in_place(case):
    """~1e9-element outputs from tiny constants must not be materialized (nor folded)."""
    if case == "constantofshape":
        nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.float32([1.0]), "v"))]
        inits = [init("shape", np.array([40000, 25000], np.int64))]
    elif case == "expand":
        nodes = [h.make_node("Expand", ["one", "shape"], ["big"])]
        inits = [init("one", np.float32([1.0])), init("shape", np.array([40000, 25000], np.int64))]
    elif case == "tile":
        nodes = [h.make_node("Tile", ["one", "reps"], ["big"])]
        inits = [init("one", np.ones((2, 2), np.float32)), init("reps", np.array([20000, 12500], np.int64))]
    else:
        nodes = [h.make_node("Range", ["start", "limit", "delta"], ["big"])]
        inits = [init("start", np.int64(0)), init("limit", np.int64(10**12)), init("delta", np.int64(1))]
    nodes.append(h.make_node("ReduceMax", ["big"], ["y"], keepdims=0))
    m = model(nodes, [], [vi("y", None, T.INT64 if case == "range" else T.FLOAT)], inits)
    t0 = time.perf_counter()
    out, res = run_pass(m, "fold")
    assert time.perf_counter() - t0 < 10
    assert nodes[0].op_type in op_histogram(out)  # the bomb is still a node
    assert out.ByteSize() < 10_000
    assert res.stats["left_by_size_limit"] >= 1
    # Through the CLI pipeline as well (no validation: running the bomb would need GBs).
    result, report = onnxslim.optimize(m, passes="lossless", validate=False)
    assert nodes[0].op_type in op_histogram(result) and result.ByteSize() < 10_000


def test_fold_size_limit_is_configurable():
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.float32([1.0]), "v")),
             h.make_node("Add", ["x", "big"], ["y"])]
    m = model(nodes, [vi("x", [256, 256])], [vi("y", None)], [init("shape", np.array([256, 256], np.int64))])
    out, _ = run_pass(m, "fold")  # 256 KiB from 16 bytes: within the small-growth allowance
    assert "ConstantOfShape" not in op_histogram(out)
    out, res = run_pass(m, "fold", options=FoldOptions(fold_size_limit="64KB"))
    assert "ConstantOfShape" in op_histogram(out) and res.stats["left_by_size_limit"] == 1


def test_fold_big_weight_transpose_folds_without_growth():
    w = RNG.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB, transposed: same size
    nodes = [h.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), h.make_node("MatMul", ["x", "wt"], ["y"])]
    m = model(nodes, [vi("x", [2, 1024])], [vi("y", None)], [init("w", w)])
    out, _ = run_pass(m, "fold", options=FoldOptions(fold_size_limit="1024"))
    assert op_histogram(out) == {"MatMul": 1}
    assert_same(m, out, x_feed((2, 1024)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bn-fold
def _bn_inits(prefix: str, c: int):
    return [init(f"{prefix}_g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            init(f"{prefix}_b", RNG.standard_normal(c).astype(np.float32)),
            init(f"{prefix}_m", RNG.standard_normal(c).astype(np.float32)),
            init(f"{prefix}_v", RNG.uniform(0.5, 2.0, c).astype(np.float32))]


def _bn(x, y, prefix):
    return h.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                       epsilon=1e-3)


def test_bn_fold_conv_convtranspose_gemm_matmul():
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], group=2, pads=[1, 1, 1, 1]), _bn("c1", "b1", "bn1"),
        h.make_node("ConvTranspose", ["b1", "w2", "bias2"], ["c2"], group=2), _bn("c2", "b2", "bn2"),
        h.make_node("Mul", ["b2", "chscale"], ["m2"]), h.make_node("Add", ["m2", "chshift"], ["a2"]),
        h.make_node("ReduceMean", ["a2"], ["r"], axes=[2, 3], keepdims=0),
        h.make_node("Gemm", ["r", "w3"], ["g3"], transB=1), _bn("g3", "b3", "bn3"),
        h.make_node("MatMul", ["b3", "w4"], ["mm"]), h.make_node("Add", ["mm", "bias4"], ["ad"]), _bn("ad", "y", "bn4"),
    ]
    inits = [init("w1", RNG.standard_normal((8, 2, 3, 3)).astype(np.float32)),  # 4 in -> 8 out, 2 groups
             init("w2", RNG.standard_normal((8, 3, 2, 2)).astype(np.float32)),  # 8 in -> 6 out, 2 groups
             init("bias2", RNG.standard_normal(6).astype(np.float32)),
             init("chscale", RNG.uniform(0.5, 2, (6, 1, 1)).astype(np.float32)),
             init("chshift", RNG.standard_normal((1, 6, 1, 1)).astype(np.float32)),
             init("w3", RNG.standard_normal((5, 6)).astype(np.float32)),
             init("w4", RNG.standard_normal((5, 7)).astype(np.float32)),
             init("bias4", RNG.standard_normal(7).astype(np.float32)),
             *_bn_inits("bn1", 8), *_bn_inits("bn2", 6), *_bn_inits("bn3", 5), *_bn_inits("bn4", 7)]
    m = model(nodes, [vi("x", [2, 4, 6, 6])], [vi("y", None)], inits)
    m, _ = run_pass(m, "shape-inference")  # MatMul folding needs to know the rank
    out, res = run_pass(m, "bn-fold")
    hist = op_histogram(out)
    assert "BatchNormalization" not in hist and "Mul" not in hist and "Add" not in hist
    assert hist == {"Conv": 1, "ConvTranspose": 1, "ReduceMean": 1, "Gemm": 2}
    assert res.stats["bn_folded"] == 4 and res.stats["mul_add_fused"] == 2
    assert_same(m, out, x_feed((2, 4, 6, 6)), rtol=1e-4, atol=1e-4)


def test_bn_fold_leaves_shared_or_non_constant_producers():
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y", "bn"),
             h.make_node("Relu", ["c"], ["z"]),  # second reader of the conv output
             h.make_node("Conv", ["x", "wdyn"], ["c2"]), _bn("c2", "y2", "bn2"),  # weights are an input
             h.make_node("Mul", ["y2", "notchannel"], ["y3"])]  # varies along W, not channels
    inits = [init("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)),
             init("notchannel", RNG.standard_normal((1, 1, 1, 5)).astype(np.float32)), *_bn_inits("bn", 4),
             *_bn_inits("bn2", 4)]
    m = model(nodes, [vi("x", [1, 3, 5, 5]), vi("wdyn", [4, 3, 1, 1])], [vi("y", None), vi("z", None), vi("y3", None)],
              inits)
    out, res = run_pass(m, "bn-fold")
    assert not res.changed and op_histogram(out)["BatchNormalization"] == 2


# ---------------------------------------------------------------- cse
def test_cse_merges_nodes_and_constants():
    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("Relu", ["x"], ["b"]),
             h.make_node("Add", ["a", "c1"], ["a2"]), h.make_node("Add", ["b", "c2"], ["b2"]),  # equal after c1 == c2
             h.make_node("Mul", ["a2", "b2"], ["y"])]
    val = RNG.standard_normal(4).astype(np.float32)
    m = model(nodes, [vi("x", [4])], [vi("y", None)], [init("c1", val), init("c2", val.copy())])
    out, res = run_pass(m, "cse")
    assert op_histogram(out) == {"Add": 1, "Mul": 1, "Relu": 1}
    assert len(out.graph.initializer) == 1
    assert res.stats == {"constants_merged": 1, "nodes_merged": 2}
    assert_same(m, out, {"x": val})


def test_cse_keeps_different_and_random_nodes():
    nodes = [h.make_node("RandomUniformLike", ["x"], ["r1"]), h.make_node("RandomUniformLike", ["x"], ["r2"]),
             h.make_node("LeakyRelu", ["x"], ["l1"], alpha=0.1), h.make_node("LeakyRelu", ["x"], ["l2"], alpha=0.2),
             h.make_node("Sum", ["r1", "r2", "l1", "l2"], ["y"])]
    m = model(nodes, [vi("x", [4])], [vi("y", None)],
              [init("c1", np.float32([1, 2])), init("c2", np.float32([1, 3]))])
    out, res = run_pass(m, "cse")
    assert not res.changed and node_count(out) == len(nodes)


def test_cse_duplicate_feeding_a_graph_output():
    m = model([h.make_node("Relu", ["x"], ["y1"]), h.make_node("Relu", ["x"], ["y2"])], [vi("x", [4])],
              [vi("y1", [4]), vi("y2", [4])])
    out, res = run_pass(m, "cse")
    assert not res.changed  # two graph outputs keep their own names and producers
    m = model([h.make_node("Relu", ["x"], ["a"]), h.make_node("Relu", ["x"], ["y"]), h.make_node("Neg", ["a"], ["z"])],
              [vi("x", [4])], [vi("y", [4]), vi("z", [4])])
    out, res = run_pass(m, "cse")
    assert op_histogram(out) == {"Neg": 1, "Relu": 1}
    assert_same(m, out, {"x": np.float32([-1, 0, 1, 2])})


# ---------------------------------------------------------------- the preset
def test_lossless_pipeline_preserves_the_contract():
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "b", "bn"), h.make_node("Relu", ["b"], ["r"]),
             h.make_node("Identity", ["r"], ["i"]), h.make_node("Shape", ["i"], ["s"]),
             h.make_node("Reshape", ["i", "s"], ["y"])]
    m = model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 4, 8, 8])],
              [init("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)), *_bn_inits("bn", 4)])
    m.graph.node[0].attribute.extend([h.make_attribute("pads", [1, 1, 1, 1])])
    m.doc_string = "doc"
    m.metadata_props.add(key="author", value="test")
    m.opset_import.add(domain="ai.onnx.ml", version=3)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert op_histogram(result) == {"Conv": 1, "Relu": 1}
    assert_io_kept(m, result)
    assert result.graph.output[0].type == m.graph.output[0].type  # symbolic N kept
    assert result.doc_string == "doc" and result.metadata_props[0].value == "test"
    assert {(o.domain, o.version) for o in result.opset_import} == {(o.domain, o.version) for o in m.opset_import}
    assert report.validation["passed"]
    assert_same(m, result, x_feed((3, 3, 8, 8)), rtol=1e-4, atol=1e-4)


def test_cse_large_constants_compared_in_full():
    big = RNG.standard_normal((512, 300)).astype(np.float32)  # 600 KB: fingerprinted from a sample
    almost = big.copy()
    almost[257, 131] += 1.0  # differs where the sample may not look
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("MatMul", ["x", "w2"], ["b"]),
             h.make_node("MatMul", ["x", "w3"], ["c"]), h.make_node("Sum", ["a", "b", "c"], ["y"])]
    m = model(nodes, [vi("x", [2, 512])], [vi("y", None)],
              [init("w1", big), init("w2", big.copy()), init("w3", almost)])
    out, res = run_pass(m, "cse")
    assert res.stats["constants_merged"] == 1 and len(out.graph.initializer) == 2
    assert op_histogram(out) == {"MatMul": 2, "Sum": 1}
    assert_same(m, out, x_feed((2, 512)), rtol=1e-4, atol=1e-4)


def test_cli_fold_size_limit(tmp_path):
    import subprocess

    nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.float32([1.0]), "v")),
             h.make_node("Add", ["x", "big"], ["y"])]
    m = model(nodes, [vi("x", [128, 256])], [vi("y", None)], [init("shape", np.array([128, 256], np.int64))])
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    cli = ["onnxslim"]
    r = subprocess.run(cli + [str(src), str(dst), "--quiet", "--fold-size-limit", "64KB"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ConstantOfShape" in op_histogram(onnx.load(dst))  # 128 KiB > 64 KiB: left in place
    r = subprocess.run(cli + [str(src), str(dst), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0 and "ConstantOfShape" not in op_histogram(onnx.load(dst))  # default: folded
    r = subprocess.run(cli + [str(src), str(tmp_path / "bad.onnx"), "--fold-size-limit", "lots"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "fold-size-limit" in r.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_pipeline_is_deterministic():
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "b", "bn"), h.make_node("Relu", ["b"], ["r1"]),
             h.make_node("Relu", ["b"], ["r2"]), h.make_node("Add", ["r1", "r2"], ["a"]),
             h.make_node("Shape", ["a"], ["s"]), h.make_node("Reshape", ["a", "s"], ["y"])]
    m = model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", None)],
              [init("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)), *_bn_inits("bn", 4)])
    first, _ = onnxslim.optimize(m, passes="lossless", validate=False)
    second, _ = onnxslim.optimize(m, passes="lossless", validate=False)
    assert first.SerializeToString() == second.SerializeToString()
    assert op_histogram(first) == {"Add": 1, "Conv": 1, "Relu": 1}


def test_value_info_contradicting_an_output_does_not_win():
    # A stale/garbage value_info entry for a graph output must not replace its declared type.
    m = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    m.graph.value_info.append(h.make_tensor_value_info("y", T.STRING, [1, 1, 1, 1]))
    for passes in ("dce", "lossless"):
        result, report = onnxslim.optimize(m, passes=passes)
        assert result.graph.output[0] == m.graph.output[0]
        assert report.validation["passed"]


def test_fold_static_dims_of_a_dynamic_shape():
    # x is [N, 4, 6]: Shape(x)[1:] and Shape(x)[2] are constants although N is not.
    nodes = [h.make_node("Shape", ["x"], ["s"]),
             h.make_node("Slice", ["s", "one", "big"], ["tail"]),
             h.make_node("ReduceProd", ["tail"], ["prod"], keepdims=1),
             h.make_node("Gather", ["s", "i0"], ["n"], axis=0),  # the symbolic N: stays
             h.make_node("Concat", ["n", "prod"], ["target"], axis=0),
             h.make_node("Reshape", ["x", "target"], ["y"])]
    inits = [init("one", np.array([1], np.int64)), init("big", np.array([2**63 - 1], np.int64)),
             init("i0", np.array([0], np.int64))]
    m = model(nodes, [vi("x", ["N", 4, 6])], [vi("y", None)], inits)
    out, res = run_pass(m, "fold")
    assert op_histogram(out) == {"Concat": 1, "Gather": 1, "Reshape": 1, "Shape": 1}
    assert {t.name: nh.to_array(t).tolist() for t in out.graph.initializer}["prod"] == [24]
    assert_same(m, out, x_feed((3, 4, 6)))


def test_dce_reshape_reads_through_shape_only_ops():
    nodes = [h.make_node("ReduceMean", ["x"], ["r"], axes=[2, 3], keepdims=0),
             h.make_node("Unsqueeze", ["r", "ax"], ["u"]),
             h.make_node("Reshape", ["u", "flat"], ["y"])]
    m = model(nodes, [vi("x", ["N", 8, 4, 4])], [vi("y", None)],
              [init("ax", np.array([2], np.int64)), init("flat", np.array([-1, 8], np.int64))])
    m, _ = run_pass(m, "shape-inference")
    out, _ = run_pass(m, "dce")
    assert op_histogram(out) == {"ReduceMean": 1}  # Reshape(Unsqueeze(r)) == Reshape(r) == r
    assert_same(m, out, x_feed((2, 8, 4, 4)))


def test_bn_fold_zero_pad_into_conv():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [h.make_node("Pad", ["x", "pads"], ["p"]), h.make_node("Conv", ["p", "w"], ["c"], pads=[0, 1, 0, 1]),
             h.make_node("Pad", ["c", "pads2"], ["p2"], mode="reflect"),  # not zeros: stays
             h.make_node("Conv", ["p2", "w2"], ["y"])]
    inits = [init("pads", np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64)), init("w", w),
             init("pads2", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("w2", RNG.standard_normal((2, 4, 3, 3)).astype(np.float32))]
    m = model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", None)], inits)
    out, res = run_pass(m, "bn-fold")
    assert op_histogram(out) == {"Conv": 2, "Pad": 1} and res.stats["pad_into_conv"] == 1
    conv = next(n for n in out.graph.node if n.op_type == "Conv" and n.input[0] == "x")
    assert h.get_attribute_value(next(a for a in conv.attribute if a.name == "pads")) == [1, 3, 1, 1]
    assert_same(m, out, x_feed((1, 3, 8, 8)), rtol=1e-4, atol=1e-4)
