"""fp16: half the file, float32 I/O kept by default, block list honoured, validated."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxslim.quantization as q
from onnxslim.api import optimize
from quant_helpers import MODELS, accuracy, run

CNN, TEST = MODELS / "digits_cnn.onnx", MODELS / "digits_test.npz"


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    monkeypatch.setattr(q, "LATENCY_SECONDS", 0.1)


def _elem(vi) -> int:
    return vi.type.tensor_type.elem_type


def test_fp16_halves_file_keeps_io_and_accuracy(tmp_path):
    out = tmp_path / "cnn16.onnx"
    _, report = optimize(CNN, out, passes="fp16", inputs=TEST)  # timed: fp16 reports its latency ratio
    m = onnx.load(out)
    assert out.stat().st_size <= 0.55 * CNN.stat().st_size
    assert _elem(m.graph.input[0]) == onnx.TensorProto.FLOAT and _elem(m.graph.output[0]) == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    assert abs(accuracy(out, TEST) - accuracy(CNN, TEST)) <= 0.5
    assert report.validation["passed"] and report.extra["fp16"]["latency"]["batch1"]["ratio"] > 0


def test_fp16_io_and_block_ops(tmp_path):
    out = tmp_path / "io16.onnx"
    optimize(CNN, out, passes="lossless,fp16", latency=False, options={"fp16_keep_io": False})
    m = onnx.load(out)
    assert _elem(m.graph.input[0]) == onnx.TensorProto.FLOAT16
    x = np.load(TEST)["input"][:4].astype(np.float16)
    assert run(out, {"input": x})[0].dtype == np.float16

    out2 = tmp_path / "blocked.onnx"
    optimize(CNN, out2, passes="lossless,fp16", latency=False, options={"fp16_block_ops": "Conv"})
    m2 = onnx.load(out2)
    inits = {t.name: t.data_type for t in m2.graph.initializer}
    conv_w = [n.input[1] for n in m2.graph.node if n.op_type == "Conv"]
    assert conv_w and all(inits.get(w) == onnx.TensorProto.FLOAT for w in conv_w)
    gemm_w = [n.input[1] for n in m2.graph.node if n.op_type == "Gemm"]
    assert all(inits.get(w) == onnx.TensorProto.FLOAT16 for w in gemm_w)
