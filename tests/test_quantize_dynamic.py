"""quantize-dynamic: MLP (Gemm rewritten to MatMul), transformer block, Conv warning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxslim.quantization as q
from onnxslim.api import optimize
from quant_helpers import MODELS, accuracy, mean_cosine, quant_details, run

MLP, CNN, TEST = MODELS / "digits_mlp.onnx", MODELS / "digits_cnn.onnx", MODELS / "digits_test.npz"
TRANSFORMER = MODELS / "struct_transformer.onnx"


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    monkeypatch.setattr(q, "LATENCY_SECONDS", 0.15)


def test_mlp_dynamic_small_and_accurate(tmp_path):
    out = tmp_path / "mlp_int8.onnx"
    _, report = optimize(MLP, out, passes="quantize-dynamic", inputs=TEST, latency=False, options={"objective": "size"})
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    assert out.stat().st_size <= 0.30 * MLP.stat().st_size
    assert accuracy(out, TEST) >= accuracy(MLP, TEST) - 0.5


def test_excluded_gemm_stays_float(tmp_path):
    # onnxruntime rewrites Gemm 'g' as MatMul 'g_MatMul' before quantizing: an exclusion by the
    # model's own node name must still hold.
    gemms = [n.name for n in onnx.load(MLP).graph.node if n.op_type == "Gemm"]
    out = tmp_path / "mlp.onnx"
    _, report = optimize(MLP, out, passes="quantize-dynamic", inputs=TEST, latency=False,
                         options={"objective": "size", "quant_exclude": gemms[0]})
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulInteger") == len(gemms) - 1
    assert "1 node(s) in float" in quant_details(report)["config"]


def test_transformer_block_dynamic_keeps_cosine(tmp_path):
    out = tmp_path / "tr_int8.onnx"
    x = np.random.default_rng(0).standard_normal((16, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    _, report = optimize(TRANSFORMER, out, passes="quantize-dynamic", inputs=tmp_path / "x.npz", latency=False,
                         options={"objective": "size"})
    assert "MatMulInteger" in {n.op_type for n in onnx.load(out).graph.node}
    (ref,), (got,) = run(TRANSFORMER, {"input": x}), run(out, {"input": x})
    assert mean_cosine(ref, got) >= 0.99
    assert quant_details(report)["quality"]["cosine"] >= 0.99


def test_dynamic_conv_is_timed_warned_and_left_in_float(tmp_path):
    # Real timings: ConvInteger ran 7-15x slower than float Conv on every machine measured.
    out = tmp_path / "cnn_dyn.onnx"
    _, report = optimize(CNN, out, passes="quantize-dynamic", latency=False, force=True)
    d = quant_details(report)
    first = d["candidates"][0]
    assert first["speedup"]["batch1"] < 0.8 and first["speedup"]["batch64"] < 0.8  # ConvInteger: much slower
    warn = [w for w in report.warnings if "ConvInteger" in w]
    assert warn and "quantize-static" in warn[0] and "slower" in warn[0]
    assert "Conv" in d["settings"]["float_op_types"]
    assert "ConvInteger" not in {n.op_type for n in onnx.load(out).graph.node}


def test_accuracy_fallback_tries_per_channel_before_float(tmp_path):
    x = np.random.default_rng(0).standard_normal((32, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    out = tmp_path / "tr.onnx"
    # per-tensor: cosine ~0.99991, per-channel ~0.99994 (deterministic for this seed); gate in between
    _, report = optimize(TRANSFORMER, out, passes="quantize-dynamic", inputs=tmp_path / "x.npz", min_cosine=0.99993,
                         latency=False, options={"objective": "size"})
    d = quant_details(report)
    assert d["candidates"][0]["quality"]["cosine"] < 0.99993 <= d["quality"]["cosine"]
    assert d["fallback"][0]["change"] == "per-channel weights"
    assert d["settings"]["per_channel"] and d["nodes_in_float"] == []
    (ref,), (got,) = run(TRANSFORMER, {"input": x}), run(out, {"input": x})
    assert mean_cosine(ref, got) >= 0.99993
