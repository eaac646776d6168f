"""fuse-layernorm and fuse-gelu: they fire on the export-shaped BERT encoder at opsets that have the standard ops,
keep its outputs, leave older opsets alone, and refuse every near miss of the pattern."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim import optimize
from onnxslim.graph import op_histogram

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_models as mm  # noqa: E402

F = TensorProto.FLOAT
D = 8


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimized: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimized:  # onnxruntime fuses both patterns itself at load: compare the math, not its kernels
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _slim(model: onnx.ModelProto, passes: str = "lossless") -> onnx.ModelProto:
    out, _ = optimize(model, None, passes=passes, validate=False, latency=False)
    onnx.checker.check_model(out, full_check=True)
    return out


# -- the encoder ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset,gelu,layernorms,gelus", [
    (14, "erf", 0, 0),    # no standard op to fuse to: left as it is
    (17, "erf", 5, 0),    # LayerNormalization exists, Gelu does not yet (5 = embeddings + 2 per layer)
    (20, "erf", 5, 2),
    (20, "tanh", 5, 2),
])
def test_encoder_fusions_fire_where_the_opset_has_the_op_and_keep_outputs(opset: int, gelu: str, layernorms: int,
                                                                          gelus: int) -> None:
    raw = mm.bert_tiny(opset=opset, gelu=gelu)
    slim = _slim(raw)
    hist = op_histogram(slim)
    assert hist.get("LayerNormalization", 0) == layernorms and hist.get("Gelu", 0) == gelus
    if layernorms:
        assert "Pow" not in hist and "Sqrt" not in hist and "ReduceMean" not in hist
        eps = [a.f for n in slim.graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"]
        assert np.allclose(eps, 1e-12, rtol=1e-6)
    if gelus:
        assert "Erf" not in hist and "Tanh" in hist and hist["Tanh"] == 1  # only the pooler's Tanh is left
    for batch, seq in ((1, 8), (2, 16), (2, 8), (1, 16)):
        feeds = mm.bert_calib(n=batch, seq=seq, seed=batch * 100 + seq)
        for optimized, rtol in ((True, 0.0), (False, 1e-5)):
            for a, b in zip(_run(raw, feeds, optimized), _run(slim, feeds, optimized)):
                assert a.shape == b.shape
                np.testing.assert_allclose(b, a, atol=1e-4, rtol=rtol)


def test_committed_encoder_is_at_opset_14_and_the_lossless_preset_leaves_its_layernorms() -> None:
    raw = onnx.load(str(ROOT / "models" / "bert_tiny.onnx"))
    assert raw.opset_import[0].version == 14
    hist = op_histogram(_slim(raw))
    assert "LayerNormalization" not in hist and hist["ReduceMean"] == 2 * (1 + 2 * mm.BERT_LAYERS)


# -- small graphs: exact matching ------------------------------------------------------------------------------

def _ln_model(opset: int = 17, axes: list[int] | None = None, eps_input: bool = False, exponent: float = 2.0,
              extra_output: str | None = None, square: str = "pow", affine: bool = True) -> onnx.ModelProto:
    """x [2, 3, D] -> decomposed LayerNorm -> y."""
    rng = np.random.default_rng(0)
    axes = [-1] if axes is None else axes
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
             numpy_helper.from_array((1 + rng.standard_normal(D) * 0.2).astype(np.float32), "gamma"),
             numpy_helper.from_array((rng.standard_normal(D) * 0.1).astype(np.float32), "beta")]
    inputs = [helper.make_tensor_value_info("x", F, [2, 3, D])]
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps", F, []))
    else:
        inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))

    def rmean(i: str, o: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [i, f"{o}_axes"], [o], keepdims=1)
        return helper.make_node("ReduceMean", [i], [o], axes=axes, keepdims=1)

    if opset >= 18:
        inits += [numpy_helper.from_array(np.array(axes, np.int64), n) for n in ("mean_axes", "var_axes")]
    sq = (helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "pow" else helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes = [rmean("x", "mean"), helper.make_node("Sub", ["x", "mean"], ["d"]), sq, rmean("sq", "var"),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["n" if affine else "y"])]
    if affine:
        nodes += [helper.make_node("Mul", ["gamma", "n"], ["s"]), helper.make_node("Add", ["s", "beta"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", F, [2, 3, D])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, F, [2, 3, 1 if extra_output == "var" else D]))
    g = helper.make_graph(nodes, "ln", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"x": (rng.standard_normal((2, 3, D)) * 3 + 5).astype(np.float32)}
    if any(i.name == "eps" for i in model.graph.input):
        feeds["eps"] = np.array(1e-5, np.float32)
    return feeds


@pytest.mark.parametrize("kw", [{}, {"opset": 18}, {"opset": 20}, {"square": "mul"}, {"affine": False}],
                         ids=["opset17", "opset18-axes-input", "opset20", "mul-square", "no-affine"])
def test_layernorm_forms_fuse_and_compute_the_same(kw: dict) -> None:
    raw = _ln_model(**kw)
    slim = _slim(raw, "shape-inference,fuse-layernorm")
    assert [n.op_type for n in slim.graph.node] == ["LayerNormalization"]
    np.testing.assert_allclose(_run(slim, _feeds(raw), False)[0], _run(raw, _feeds(raw), False)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    {"axes": [1]},                 # not the last axis
    {"axes": [-2]},
    {"opset": 18, "axes": [1]},
    {"eps_input": True},           # epsilon is not a constant
    {"exponent": 3.0},             # not a square
    {"extra_output": "d"},         # an intermediate is read outside the pattern (a graph output)
    {"extra_output": "var"},
    {"opset": 16},                 # no LayerNormalization before opset 17
], ids=["axis1", "axis-2", "opset18-axis1", "eps-input", "pow3", "extra-consumer-d", "extra-consumer-var", "opset16"])
def test_layernorm_near_misses_are_left_alone(kw: dict) -> None:
    raw = _ln_model(**kw)
    slim = _slim(raw, "shape-inference,fuse-layernorm")
    assert "LayerNormalization" not in op_histogram(slim)
    assert len(slim.graph.node) == len(raw.graph.node)


def test_layernorm_with_a_second_reader_of_the_mean_is_left_alone() -> None:
    m = _ln_model()
    m.graph.node.append(helper.make_node("Neg", ["mean"], ["neg_mean"]))
    m.graph.output.append(helper.make_tensor_value_info("neg_mean", F, [2, 3, 1]))
    assert "LayerNormalization" not in op_histogram(_slim(m, "shape-inference,fuse-layernorm"))


def _gelu_model(form: str = "erf", opset: int = 20, consts: dict[str, float] | None = None, order: str = "x*a*h",
                extra: str | None = None) -> onnx.ModelProto:
    """x [2, D] -> GELU in elementary ops -> y. ``order``: how x * a * 0.5 is associated."""
    c = {"sqrt2": float(np.sqrt(2.0)), "one": 1.0, "half": 0.5, "k": float(np.sqrt(2 / np.pi)), "cubic": 0.044715,
         "three": 3.0, "inv_sqrt2": float(1 / np.sqrt(2.0))}
    c.update(consts or {})
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in c.items()]
    if form == "erf":
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["a"])]
    elif form == "erf-mul":
        nodes = [helper.make_node("Mul", ["inv_sqrt2", "x"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
                 helper.make_node("Add", ["one", "e"], ["a"])]
    else:  # tanh
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"]), helper.make_node("Mul", ["cubic", "x3"], ["cx3"]),
                 helper.make_node("Add", ["x", "cx3"], ["inner"]), helper.make_node("Mul", ["k", "inner"], ["ti"]),
                 helper.make_node("Tanh", ["ti"], ["e"]), helper.make_node("Add", ["one", "e"], ["a"])]
    if order == "x*a*h":
        nodes += [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Mul", ["xa", "half"], ["y"])]
    elif order == "(x*h)*a":
        nodes += [helper.make_node("Mul", ["half", "x"], ["xh"]), helper.make_node("Mul", ["xh", "a"], ["y"])]
    else:  # (a*h)*x
        nodes += [helper.make_node("Mul", ["a", "half"], ["ah"]), helper.make_node("Mul", ["x", "ah"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", F, [2, D])]
    if extra:
        outputs.append(helper.make_tensor_value_info(extra, F, [2, D]))
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", F, [2, D])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("form,order,approx", [
    ("erf", "x*a*h", "none"), ("erf", "(x*h)*a", "none"), ("erf", "(a*h)*x", "none"), ("erf-mul", "x*a*h", "none"),
    ("tanh", "(x*h)*a", "tanh"), ("tanh", "x*a*h", "tanh"),
])
def test_gelu_forms_fuse_and_compute_the_same(form: str, order: str, approx: str) -> None:
    raw = _gelu_model(form, order=order)
    slim = _slim(raw, "shape-inference,fuse-gelu")
    assert [n.op_type for n in slim.graph.node] == ["Gelu"]
    assert helper.get_attribute_value(slim.graph.node[0].attribute[0]) == approx.encode()
    x = np.linspace(-6, 6, 2 * D, dtype=np.float32).reshape(2, D)
    np.testing.assert_allclose(_run(slim, {"x": x}, False)[0], _run(raw, {"x": x}, False)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form,kw", [
    ("erf", {"consts": {"sqrt2": 2.0}}),          # not sqrt(2)
    ("erf", {"consts": {"half": 0.6}}),
    ("erf", {"consts": {"one": 1.01}}),
    ("tanh", {"consts": {"cubic": 0.05}}),
    ("tanh", {"consts": {"three": 2.0}}),
    ("erf", {"extra": "e"}),                       # the Erf output is read outside the pattern
    ("erf", {"extra": "xa"}),
    ("tanh", {"extra": "inner"}),
    ("erf", {"opset": 19}),                        # no Gelu before opset 20
], ids=["div2", "half0.6", "one1.01", "cubic", "square-not-cube", "extra-erf", "extra-xa", "extra-inner", "opset19"])
def test_gelu_near_misses_are_left_alone(form: str, kw: dict) -> None:
    raw = _gelu_model(form, **kw)
    slim = _slim(raw, "shape-inference,fuse-gelu")
    assert "Gelu" not in op_histogram(slim) and len(slim.graph.node) == len(raw.graph.node)


def test_fusions_leave_non_float32_data_alone() -> None:
    m = _gelu_model()
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    assert "Gelu" not in op_histogram(_slim(m, "shape-inference,fuse-gelu"))
