"""What the gate judges and on what data: the lossy gate's centred cosine (a result that answers every
input with roughly the average answer passes a raw cosine of 0.99 and must still be refused), and generated
validation inputs at an image size where a strided CNN still computes something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.api import optimize
from onnxslim.errors import GateError
from onnxslim.validate import SIGNAL_DIM, SPATIAL_DIM, centred_cosine, compare_models, make_inputs


def affine(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 6))
B = 40.0 + RNG.standard_normal(6)  # a large mean every input shares
FEEDS = {"x": RNG.standard_normal((32, 8)).astype(np.float32)}


def test_mean_answer_passes_raw_cosine_but_not_the_centred_one():
    unrelated = affine(RNG.standard_normal((8, 6)) * 0.2, B)  # input-dependent part replaced by noise
    res = compare_models(affine(W, B), unrelated, FEEDS, lossy=True, min_cosine=0.99)
    m = res.outputs[0]
    assert m.cosine > 0.99 and m.centred_cosine is not None and m.centred_cosine < 0.5
    assert not res.passed and "centred cosine" in res.reason and "--min-centred-cosine" in res.reason
    assert compare_models(affine(W, B), unrelated, FEEDS, lossy=True, min_cosine=0.99,
                          min_centred_cosine=-1.0).passed  # the option turns it off


def test_a_close_result_passes_both():
    close = affine(W + RNG.standard_normal(W.shape) * 0.01, B)
    res = compare_models(affine(W, B), close, FEEDS, lossy=True)
    assert res.passed and res.outputs[0].centred_cosine > 0.99


def test_centred_cosine_needs_samples_and_spread():
    a = RNG.standard_normal((3, 5))
    assert centred_cosine(a, a) is None  # fewer than 4 samples: the mean is not estimated
    same = np.repeat(RNG.standard_normal((1, 5)), 8, axis=0)
    assert centred_cosine(same, same + 1e-3) is None  # the original does not vary with the input
    x = RNG.standard_normal((8, 5))
    assert abs(centred_cosine(x, x) - 1.0) < 1e-12 and centred_cosine(x, -x + 2 * x.mean(0)) < -0.99


def image_model(dims: list) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_generated_images_get_a_spatial_size_not_1x1():
    s = SPATIAL_DIM
    assert make_inputs(image_model(["N", 3, "H", "W"]))["x"].shape == (1, 3, s, s)  # NCHW
    assert make_inputs(image_model(["N", "H", "W", 3]))["x"].shape == (1, s, s, 3)  # NHWC
    assert make_inputs(image_model([1, 3, 48, "W"]))["x"].shape == (1, 3, 48, s)  # fixed dims kept
    assert make_inputs(image_model(["N", "C", "H", "W"]))["x"].shape == (1, 1, 1, 1)  # channels unknown: no guess
    assert make_inputs(image_model(["N", 3, "H", "W"]), {"x": [2, 3, 8, 9]})["x"].shape == (2, 3, 8, 9)


def test_generated_waveforms_are_long_enough_for_a_reflect_pad():
    # silero VAD's STFT front end: a reflect Pad of 64 on each side of [batch, samples]; one sample fails it.
    g = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"), helper.make_node("ReduceSum", ["p"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.array([0, 64, 0, 64], np.int64), "pads")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = make_inputs(m)
    assert feeds["x"].shape == (1, SIGNAL_DIM) and SIGNAL_DIM > 64
    res = compare_models(m, m, feeds)
    assert res.passed
    assert make_inputs(m, {"x": [2, 100]})["x"].shape == (2, 100)  # --input-shape still decides


def test_a_refused_run_reports_where_its_time_went(tmp_path):
    model = Path(__file__).resolve().parent.parent / "models" / "cnn_bn.onnx"
    with pytest.raises(GateError) as e:
        optimize(model, tmp_path / "o.onnx", passes="fp16", min_cosine=1.0, latency=False)
    timing = e.value.report.extra["timing"]
    assert {"passes", "validation"} <= set(timing) and not (tmp_path / "o.onnx").exists()
