"""The machinery around onnxruntime.quantization: latency search (with scripted timings, so the logic is
tested and not the machine), speed gate, pre-processing fallbacks, machine defaults, error ranking."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxslim.quantization as q
from onnxslim.api import optimize
from onnxslim.calibration import CalibrationData
from onnxslim.errors import GateError
from onnxslim.manager import load_passes
from quant_helpers import MODELS, outlier_block, quant_details

MOBILENET = MODELS / "struct_mobilenetv2.onnx"


def _quantized_depthwise(model: onnx.ModelProto) -> int:
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in n.attribute)
               and producers.get(n.input[1]) == "DequantizeLinear")


def scripted_latency(rule):
    """time_pair replacement (the search's one timing call): the latency ratio INT8/float is a function
    of the candidate model, so the search logic is tested and not the machine."""
    def fake(reference, candidate, feeds_by_batch, seconds=None, custom_op_library=None):
        r = rule(candidate)
        return {f"batch{b}": {"before_ms": 1.0, "after_ms": r, "ratio": r} for b in feeds_by_batch}
    return fake


@pytest.fixture
def mobilenet_data(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    return tmp_path / "calib.npz"


def test_search_leaves_depthwise_in_float_when_it_is_what_is_slow(tmp_path, monkeypatch, mobilenet_data):
    monkeypatch.setattr(q, "time_pair", scripted_latency(lambda m: 1.6 if _quantized_depthwise(m) else 0.7))
    out = tmp_path / "mb.onnx"
    _, report = optimize(MOBILENET, out, passes="lossless,quantize-static", inputs=mobilenet_data, latency=False,
                         options={"calib": str(mobilenet_data)})
    d = quant_details(report)
    assert d["candidates"][0]["latency"]["batch1"]["ratio"] == 1.6  # the default was slower: the search ran
    assert "DepthwiseConv" in d["settings"]["float_op_types"]
    assert _quantized_depthwise(onnx.load(out)) == 0
    assert "float DepthwiseConv" in d["config"] and report.written


def test_no_search_when_default_is_faster(tmp_path, monkeypatch, mobilenet_data):
    monkeypatch.setattr(q, "time_pair", scripted_latency(lambda m: 0.6))
    _, report = optimize(MOBILENET, tmp_path / "mb.onnx", passes="quantize-static", inputs=mobilenet_data,
                         latency=False, options={"calib": str(mobilenet_data)})
    assert len(quant_details(report)["candidates"]) == 1


def test_speed_gate_refuses_a_slower_model_and_objective_size_keeps_it(tmp_path, monkeypatch, mobilenet_data):
    monkeypatch.setattr(q, "time_pair", scripted_latency(lambda m: 1.25))
    out = tmp_path / "mb.onnx"
    with pytest.raises(GateError) as e:
        optimize(MOBILENET, out, passes="quantize-static", inputs=mobilenet_data, latency=False,
                 options={"calib": str(mobilenet_data)})
    assert "min-speedup" in str(e.value) and "configuration(s) tried" in str(e.value) and not out.exists()
    tried = len(quant_details(e.value.report)["candidates"])
    assert 1 < tried <= q.SEARCH_BUDGET
    _, report = optimize(MOBILENET, out, passes="quantize-static", inputs=mobilenet_data, latency=False,
                         options={"calib": str(mobilenet_data), "objective": "size"})
    assert out.exists() and any("NOT FASTER" in w for w in report.warnings)
    assert len(quant_details(report)["candidates"]) == 1  # --objective size: no latency search


def test_user_settings_are_not_searched_over(tmp_path, monkeypatch, mobilenet_data):
    monkeypatch.setattr(q, "time_pair", scripted_latency(lambda m: 1.25))
    with pytest.raises(GateError) as e:
        optimize(MOBILENET, tmp_path / "mb.onnx", passes="quantize-static", inputs=mobilenet_data, latency=False,
                 options={"calib": str(mobilenet_data), "activation_type": "uint8", "per_channel": True})
    for c in quant_details(e.value.report)["candidates"]:
        assert "uint8 activations" in c["config"] and "per-channel" in c["config"]


def test_preprocess_falls_back_and_says_why(monkeypatch):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(MODELS / "digits_cnn.onnx")

    def boom(*a, **k):
        raise RuntimeError("symbolic shape inference exploded")

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(boom))
    out, note = q.preprocess(model)
    assert "exploded" in note and "symbolic shape inference skipped" in note
    assert len(out.graph.node) <= len(model.graph.node)  # ORT optimization still ran (BN fused)

    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime.tools.symbolic_shape_infer", None)  # as without sympy
    out, note = q.preprocess(model)
    assert "unavailable" in note and "symbolic shape inference skipped" in note


def test_machine_defaults(monkeypatch):
    monkeypatch.setattr(q.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(q, "has_vnni", lambda: True)
    d = q.machine_defaults()
    assert (d["activation"], d["weight"], d["per_channel"], d["reduce_range"]) == ("uint8", "int8", True, False)
    monkeypatch.setattr(q, "has_vnni", lambda: False)
    assert q.machine_defaults()["reduce_range"] is True
    monkeypatch.setattr(q.platform, "machine", lambda: "aarch64")
    assert q.machine_defaults()["activation"] == "int8"


def test_rank_nodes_finds_the_outlier(tmp_path):
    m = outlier_block()
    x = np.random.default_rng(1).standard_normal((32, 8, 32)).astype(np.float32)
    data = CalibrationData({"x": x}, batch_size=16)
    quant = q.Quantizer(m, data, tmp_path).quantize(q.QuantConfig())
    ranked = q.rank_nodes(m, quant, data, q._quantizable_nodes(m, q.QuantConfig()))
    top = ranked[0]
    assert top["node"] == "outlier_add" and "proj" in top["nodes"]  # the pair on res_o is the problem
    assert top["sqnr_out"] < 20 and top["sqnr_in"] > 30


def test_channel_sqnr_sees_what_tensor_sqnr_hides():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 8)).astype(np.float32)
    ref[:, 3] += 300
    noisy = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.5  # noise ~ the small channels' size
    assert q.sqnr_db(ref, noisy) > 25  # looks fine as one tensor
    assert q.channel_sqnr_db(ref, noisy) < 15  # per channel, most of the signal is lost


def test_rank_nodes_streams_one_batch_at_a_time(tmp_path, monkeypatch):
    m = outlier_block()
    x = np.random.default_rng(1).standard_normal((32, 8, 32)).astype(np.float32)
    quant = q.Quantizer(m, CalibrationData({"x": x}, batch_size=16), tmp_path).quantize(q.QuantConfig())
    cands = q._quantizable_nodes(m, q.QuantConfig())
    whole = q.rank_nodes(m, quant, CalibrationData({"x": x}, batch_size=32), cands)
    seen = []
    real_add = q.ChannelSqnr.add

    def add(self, ref, test):
        seen.append(ref.shape[0] if ref.ndim else 1)
        real_add(self, ref, test)

    monkeypatch.setattr(q.ChannelSqnr, "add", add)
    streamed = q.rank_nodes(m, quant, CalibrationData({"x": x}, batch_size=4), cands)
    assert seen and max(seen) <= 4  # activations of one batch at a time, never the whole set
    assert [r["node"] for r in streamed] == [r["node"] for r in whole]
    for a, b in zip(streamed, whole):  # sums over batches = the one-shot result
        assert a["sqnr_out"] == pytest.approx(b["sqnr_out"], abs=0.02)


MLP = MODELS / "digits_mlp.onnx"


def _per_channel(model: onnx.ModelProto) -> bool:
    return any(a.name == "axis" for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)


def test_search_tries_per_tensor_first_when_per_channel_is_slow(tmp_path, monkeypatch):
    # Measured on AVX2 (tools/bench_quant.py --forms): digits MLP static per-channel 1.03x at batch 1,
    # per-tensor 0.87x. Scripted here so that the order is tested, not the machine.
    monkeypatch.setattr(q, "time_pair", scripted_latency(lambda m: 1.03 if _per_channel(m) else 0.87))
    _, report = optimize(MLP, tmp_path / "mlp.onnx", passes="quantize-static", latency=False,
                         options={"calib": str(MODELS / "digits_calib.npz")})
    d = quant_details(report)
    assert [c["config"] for c in d["candidates"]][1] == q.replace(
        q.config_from_options(load_passes()["quantize-static"].Options(), "static", onnx.load(MLP))[0], per_channel=False).label()
    assert not d["settings"]["per_channel"] and len(d["candidates"]) == 2 and report.written


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_activations_are_tried_only_where_they_can_win(tmp_path, monkeypatch, vnni):
    monkeypatch.setattr(q.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(q, "has_vnni", lambda: vnni)
    search = q.QuantSearch(onnx.load(MLP), None, onnx.load(MLP), {}, None, q.Gate(), set(), {})
    moves = search.moves(q.QuantConfig(activation="uint8"))
    assert any(m.activation == "int8" for m in moves) == vnni  # AVX2: int8 activations ran 1.5-4.6x slower
    assert moves[0].per_channel is False  # per-tensor first
