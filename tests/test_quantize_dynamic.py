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


def test_dynamic_conv_is_timed_warned_and_left_in_float(tmp_path, monkeypatch):
    # ConvInteger ran 7-15x slower than float Conv on every machine measured; the timing is scripted so
    # that the test checks what the pass does with a slow ConvInteger, not how fast this CPU is.
    def latency(reference, candidate, feeds_by_batch, seconds=None, custom_op_library=None):
        r = 3.0 if "ConvInteger" in {n.op_type for n in candidate.graph.node} else 0.9
        return {f"batch{b}": {"before_ms": 1.0, "after_ms": r, "ratio": r} for b in feeds_by_batch}

    monkeypatch.setattr(q, "time_pair", latency)
    out = tmp_path / "cnn_dyn.onnx"
    _, report = optimize(CNN, out, passes="quantize-dynamic", latency=False, force=True)
    d = quant_details(report)
    first = d["candidates"][0]
    assert "float Conv" not in first["config"]  # the default quantizes Conv
    assert first["latency"]["batch1"]["ratio"] == 3.0
    warn = [w for w in report.warnings if "ConvInteger" in w]
    assert warn and "quantize-static" in warn[0] and "slower" in warn[0]
    assert "Conv" in d["settings"]["float_op_types"]
    assert "ConvInteger" not in {n.op_type for n in onnx.load(out).graph.node}


def test_accuracy_fallback_tries_per_channel_before_float(tmp_path):
    x = np.random.default_rng(0).standard_normal((32, 16, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    out = tmp_path / "tr.onnx"
    # The per-tensor cosine depends on the CPU's INT8 kernels (AVX2 saturates u8*s8 sums, VNNI does not):
    # read it on this CPU, then set the gate just above it so that per-tensor misses on every CPU.
    _, loose = optimize(TRANSFORMER, out, passes="quantize-dynamic", inputs=tmp_path / "x.npz", min_cosine=0.9,
                        latency=False, options={"objective": "size"})
    per_tensor = quant_details(loose)["quality"]["cosine"]
    assert not quant_details(loose)["settings"]["per_channel"] and quant_details(loose)["fallback"] == []
    gate = per_tensor + 0.2 * (1 - per_tensor)
    _, report = optimize(TRANSFORMER, out, passes="quantize-dynamic", inputs=tmp_path / "x.npz", min_cosine=gate,
                         latency=False, force=True, options={"objective": "size"})
    d = quant_details(report)
    assert d["candidates"][0]["quality"]["cosine"] < gate
    steps = d["fallback"]
    assert steps[0]["change"] == "per-channel weights"  # before any node goes to float
    pc_steps = [s for s in steps if s.get("change") == "per-channel weights"]
    assert steps[:len(pc_steps)] == pc_steps  # all per-channel forms come first
    assert [s["form"] for s in pc_steps] == [c.label() for c in q.per_channel_forms(
        q.QuantConfig(kind="dynamic", fmt="qoperator", per_channel=False), set())][:len(pc_steps)]
    if any(s["quality"]["passed"] for s in pc_steps):
        # a per-channel form met the gate: nothing is moved to float
        assert d["settings"]["per_channel"] and d["nodes_in_float"] == [] and len(steps) == len(pc_steps)
    else:
        assert len(steps) > len(pc_steps) and d["nodes_in_float"]
    assert d["quality"]["passed"] and d["quality"]["cosine"] >= gate
    (ref,), (got,) = run(TRANSFORMER, {"input": x}), run(out, {"input": x})
    assert mean_cosine(ref, got) >= gate - 1e-6  # checked independently of the tool's own numbers


@pytest.mark.parametrize("vnni", [True, False])
def test_per_channel_forms_follow_the_cpu(monkeypatch, vnni):
    monkeypatch.setattr(q.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(q, "has_vnni", lambda: vnni)
    cfg = q.QuantConfig(kind="dynamic", fmt="qoperator", per_channel=False)
    forms = q.per_channel_forms(cfg, set())
    assert all(f.per_channel for f in forms)
    if vnni:
        assert forms == [q.replace(cfg, per_channel=True)]
    else:  # saturation-free forms on AVX2: 7-bit s8 weights, then u8 weights
        assert [(f.weight, f.reduce_range) for f in forms] == [("int8", True), ("uint8", False)]
        assert [(f.weight, f.reduce_range) for f in q.per_channel_forms(cfg, {"weight"})] == [("int8", True)]
