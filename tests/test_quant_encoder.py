"""Static INT8 for BERT-family encoders (models/bert_tiny.onnx): calibration outlier statistics, SmoothQuant
migration (lossless in float), and the gate: meet it or refuse naming the tensors that broke it.

Nothing here asserts a latency or a result that depends on the CPU's INT8 kernels: only float equality,
what the statistics find, and the exit contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxslim.quantization as q
from onnxslim import smoothquant as sq
from onnxslim.api import optimize
from quant_helpers import MODELS, quant_details, run

BERT, CALIB = MODELS / "bert_tiny.onnx", MODELS / "bert_calib.npz"


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    monkeypatch.setattr(q, "LATENCY_SECONDS", 0.1)


def _calib() -> dict[str, np.ndarray]:
    d = np.load(CALIB)
    return {k: d[k] for k in d.files}


def _batches(data: dict[str, np.ndarray], size: int = 16):
    n = len(next(iter(data.values())))
    return ({k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size))


def _stats(model: onnx.ModelProto) -> dict[str, sq.TensorStats]:
    return sq.collect_stats(model, _batches(_calib()), [s.tensor for s in sq.sites(model)])


def _with_outlier_channel(channel: int = 5, factor: float = 60.0) -> tuple[onnx.ModelProto, str]:
    """bert_tiny with one channel of the embedding LayerNorm's gamma scaled up: its output (read by the
    first layer's Q/K/V projections) gets the outlier channel real encoders have."""
    m = onnx.load(str(BERT))
    gamma = "embeddings.LayerNorm.weight"
    init = next(t for t in m.graph.initializer if t.name == gamma)
    g = numpy_helper.to_array(init).copy()
    g[channel] *= factor
    init.CopyFrom(numpy_helper.from_array(g, gamma))
    mul = next(n for n in m.graph.node if gamma in n.input)
    ln_out = next(n for n in m.graph.node if mul.output[0] in n.input).output[0]  # Add(Mul(., gamma), beta)
    return m, ln_out


def test_smoothquant_keeps_float_outputs():
    m = onnx.load(str(BERT))
    stats = _stats(m)
    smoothed, records = sq.smooth(m, stats, alpha=0.5)
    assert len(records) == len(sq.sites(m)) >= 8  # Q/K/V, attention output, FFN up and down of both layers
    assert any(r["applied"].startswith("folded") for r in records)  # GELU's constant factor takes the scale
    assert any(r["applied"].startswith("Mul") for r in records)  # post-LN: LayerNorm output also feeds the residual
    assert any(abs(r["act_max_after"] - r["act_max_before"]) > 1e-3 for r in records)  # it did move something
    changed = {t.name for t in smoothed.graph.initializer} - {t.name for t in m.graph.initializer}
    assert changed, "no weight was rewritten"
    onnx.checker.check_model(smoothed)
    feeds = _calib()
    for a, b in zip(run(m, feeds), run(smoothed, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_smoothquant_flattens_an_outlier_channel_and_stays_lossless():
    m, ln_out = _with_outlier_channel()
    stats = _stats(m)
    smoothed, records = sq.smooth(m, stats, alpha=0.5)
    rec = next(r for r in records if r["tensor"] == ln_out)
    assert rec["channel_spread_after"] < rec["channel_spread_before"] / 3
    feeds = _calib()
    for a, b in zip(run(m, feeds), run(smoothed, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_injected_outlier_channel_is_detected():
    clean = _stats(onnx.load(str(BERT)))
    m, ln_out = _with_outlier_channel(channel=11)
    stats = _stats(m)
    assert ln_out not in {s.name for s in sq.outliers(clean)} and clean[ln_out].outlier_channels() == []
    found = {s.name: s for s in sq.outliers(stats)}
    assert ln_out in found and found[ln_out].outlier_channels() == [11]
    assert found[ln_out].spread > 5 * clean[ln_out].spread
    # bert_tiny's later LayerNorms carry the outlier channels it was built with (5 and 37): found, not invented
    assert all(set(s.outlier_channels()) <= {5, 11, 37} for s in found.values())


def test_injected_outlier_is_reported_by_quantize_static(tmp_path):
    m, ln_out = _with_outlier_channel(channel=11)
    _, report = optimize(m, None, passes="quantize-static", latency=False, force=True,
                         options={"calib": str(CALIB), "objective": "size", "min_cosine": 0.9})
    d = quant_details(report)
    enc = d["encoder"]
    assert enc is not None and any(o["tensor"] == ln_out and 11 in o["outlier_channels"] for o in enc["outliers"])
    assert any(r["tensor"] == ln_out for r in enc["smoothing"])
    assert any(n.startswith("outliers: ") and "median channel" in n for n in d["notes"])
    # the residual stream stays float: nothing but MatMul/Gemm inputs is quantized
    assert set(d["settings"]["op_types"]) <= {"MatMul", "Gemm"}


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxslim.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "ONNXSLIM_QUANT_LATENCY_SECONDS": "0.1"})


@pytest.mark.slow  # ~20 s: the whole CLI pipeline with its fallback
def test_static_int8_meets_its_gate_or_refuses_naming_tensors(tmp_path):
    out = tmp_path / "bert_int8.onnx"
    p = _cli([str(BERT), str(out), "--passes", "lossless,quantize-static", "--calib", str(CALIB),
              "--objective", "size", "--min-cosine", "0.98"], tmp_path)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    if p.returncode == 0:
        assert out.exists()
        m = onnx.load(str(out))
        assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)
        feeds = _calib()
        for a, b in zip(run(BERT, feeds), run(m, feeds)):
            a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            assert cos.mean() >= 0.97
    else:
        _assert_refusal(p, out)


def _assert_refusal(p: subprocess.CompletedProcess, out) -> None:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("onnxslim: error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    assert "worst quantized:" in errors[0] and " dB" in errors[0]
    names = {n.name for n in onnx.load(str(BERT)).graph.node}
    named = errors[0].split("worst quantized:")[1]
    assert any(n in named for n in names if "MatMul" in n or "Gemm" in n)
    assert not out.exists()


@pytest.mark.slow  # ~20 s: the fallback runs until every MatMul is float
def test_static_int8_refuses_an_unreachable_gate_with_tensor_names(tmp_path):
    out = tmp_path / "bert_int8.onnx"
    p = _cli([str(BERT), str(out), "--passes", "lossless,quantize-static", "--calib", str(CALIB),
              "--objective", "size", "--min-cosine", "0.9999999"], tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    _assert_refusal(p, out)
    assert list(tmp_path.iterdir()) == []  # nothing written, no stray files of onnxruntime's helpers


def test_lossy_gate_judges_real_tokens_only():
    from onnxslim.validate import _real_tokens

    rng = np.random.default_rng(0)
    mask = np.ones((4, 6), np.int64)
    mask[1:, 4:] = 0
    a = rng.standard_normal((4, 6, 8)).astype(np.float32)
    pooled = rng.standard_normal((4, 8)).astype(np.float32)
    b = a.copy()
    b[~mask.astype(bool)] *= -1  # padded positions changed completely: read by nothing
    (ra, pa), (rb, pb) = _real_tokens({"attention_mask": mask}, [a, pooled], [b, pooled])
    np.testing.assert_array_equal(ra, rb)
    assert ra.shape == a.shape and pa.shape == pooled.shape  # ranks kept (score-output detection reads them)
    np.testing.assert_array_equal(ra[mask.astype(bool)], a[mask.astype(bool)])
    b[0, 0] += 1.0  # a real token changed: still seen
    (ra, _), (rb, _) = _real_tokens({"attention_mask": mask}, [a, pooled], [b, pooled])
    assert not np.array_equal(ra, rb)
    # no mask input, or a mask without padding: outputs compared whole
    assert _real_tokens({}, [a], [b])[0][0] is a
    assert _real_tokens({"attention_mask": np.ones((4, 6), np.int64)}, [a], [b])[0][0] is a


# -- folding the smoothing scale instead of inserting a Mul; the encoder's INT8 form ---------------------------------

def _context_tensors(m: onnx.ModelProto) -> list[str]:
    """The attention contexts (head-merge Reshape outputs) that feed the output projections."""
    return [s.tensor for s in sq.sites(m) if s.tensor.endswith("attention/self/Reshape_3_output_0")]


def test_attention_context_scale_folds_into_value_projection_losslessly():
    m = onnx.load(str(BERT))
    ctx = _context_tensors(m)
    assert len(ctx) == 2
    smoothed, records = sq.smooth(m, _stats(m), alpha=0.5, only=set(ctx), allow_mul=False)
    assert {r["tensor"] for r in records} == set(ctx)
    assert all("value/MatMul" in r["applied"] and "bias" in r["applied"] for r in records)
    ops = lambda g: sorted(n.op_type for n in g.graph.node)  # noqa: E731
    assert ops(smoothed) == ops(m)  # no node inserted: the value weight/bias and output weight carry the scale
    feeds = _calib()
    for a, b in zip(run(m, feeds), run(smoothed, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_without_mul_sites_that_cannot_fold_stay_unsmoothed():
    m = onnx.load(str(BERT))
    stats = _stats(m)
    _, with_mul = sq.smooth(m, stats, alpha=0.5)
    smoothed, records = sq.smooth(m, stats, alpha=0.5, allow_mul=False)
    assert records and all(r["applied"].startswith("folded") for r in records)
    mul_sites = {r["tensor"] for r in with_mul if r["applied"].startswith("Mul")}
    assert mul_sites and not mul_sites & {r["tensor"] for r in records}  # post-LN outputs: left alone
    assert sum(n.op_type == "Mul" for n in smoothed.graph.node) == sum(n.op_type == "Mul" for n in m.graph.node)


def _ln_block(decomposed: bool) -> onnx.ModelProto:
    """x -> LayerNorm (outlier channel 3 in gamma) -> two MatMuls only (pre-LN style: no residual reader)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    c = 16
    gamma = np.ones(c, np.float32)
    gamma[3] = 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(rng.normal(0, .1, c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, .3, (c, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .3, (c, 8)).astype(np.float32), "w2")]
    if decomposed:
        inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))
        nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], name="mean"),
                 helper.make_node("Sub", ["x", "mu"], ["d"], name="sub"),
                 helper.make_node("Mul", ["d", "d"], ["d2"], name="sq"),
                 helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], name="var"),
                 helper.make_node("Add", ["var", "eps"], ["ve"], name="veps"),
                 helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
                 helper.make_node("Div", ["d", "sd"], ["n"], name="div"),
                 helper.make_node("Mul", ["n", "gamma"], ["ng"], name="gamma_mul"),
                 helper.make_node("Add", ["ng", "beta"], ["ln"], name="beta_add")]
        opset = 14
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln")]
        opset = 17
    nodes += [helper.make_node("MatMul", ["ln", "w1"], ["y1"], name="mm1"),
              helper.make_node("MatMul", ["ln", "w2"], ["y2"], name="mm2"),
              helper.make_node("Add", ["y1", "y2"], ["y"], name="out")]
    g = helper.make_graph(nodes, "ln_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("decomposed", [False, True])
def test_layernorm_takes_the_scale_no_mul_inserted(decomposed):
    m = _ln_block(decomposed)
    x = np.random.default_rng(1).normal(0, 1, (32, 5, 16)).astype(np.float32)
    stats = sq.collect_stats(m, [{"x": x}], ["ln"])
    assert stats["ln"].outlier_channels() == [3]
    smoothed, records = sq.smooth(m, stats, alpha=0.5, allow_mul=False)
    assert len(records) == 1 and records[0]["applied"].startswith("folded into")
    assert records[0]["channel_spread_after"] < records[0]["channel_spread_before"] / 3
    assert sorted(n.op_type for n in smoothed.graph.node) == sorted(n.op_type for n in m.graph.node)
    np.testing.assert_allclose(run(smoothed, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def encoder_prepared(tmp_path_factory):
    """bert_tiny through the encoder preparation (statistics, SmoothQuant trial, site SQNRs), once; in a
    private folder, as the pass runs it (onnxruntime's helpers leave files in the working directory)."""
    from onnxslim.calibration import CalibrationData

    m = onnx.load(str(BERT))
    data = CalibrationData({k: v[:32] for k, v in _calib().items()}, None, "test")
    notes: list[str] = []
    cfg = q.QuantConfig(kind="static", per_channel=True)
    with q.private_workdir():
        prep, cfg = q._prepare(m, cfg, "static", notes)
        prep, cfg, info = q.encoder_static_prepare(prep, cfg, set(), data, notes)
    return prep, cfg, info, data


def test_encoder_prepare_makes_exactly_the_low_sqnr_sites_dynamic(encoder_prepared):
    prep, cfg, info, _ = encoder_prepared
    assert cfg.encoder_form and set(cfg.op_types) <= {"MatMul", "Gemm"}
    low = {x for s in info["sites"] if s["sqnr_u8_db"] < q.DYNAMIC_SITE_SQNR for x in s["matmuls"]}
    assert set(cfg.dynamic_nodes) == low - set(cfg.exclude)
    names = {n.name for n in prep.graph.node}
    assert set(cfg.dynamic_nodes) <= names


def test_encoder_form_quantizes_mixed_and_keeps_the_residual_float(encoder_prepared):
    prep, cfg, _, data = encoder_prepared
    ffn_down = tuple(n.name for n in prep.graph.node if n.name.endswith("/output/dense/MatMul") and "attention" not in n.name)
    assert len(ffn_down) == 2
    cfg = replace_cfg(cfg, dynamic_nodes=ffn_down)
    with q.private_workdir() as tmp:
        qm = q.Quantizer(prep, data, tmp).quantize(cfg)
    prod = {o: n for n in qm.graph.node for o in n.output}
    # the FFN down projections run dynamic INT8, not through QDQ
    integer = [n for n in qm.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == len(ffn_down)
    assert all(prod[n.input[0]].op_type == "DynamicQuantizeLinear" for n in integer)
    # every other weight MatMul reads DequantizeLinear; no MatMul output goes through Q (MatMulIntegerToFloat)
    qdq = [n for n in qm.graph.node if n.op_type == "MatMul" and n.input[0] in prod
           and prod[n.input[0]].op_type == "DequantizeLinear"]
    assert len(qdq) >= 8
    cons = {}
    for n in qm.graph.node:
        for t in n.input:
            cons.setdefault(t, []).append(n)
    assert not any(c.op_type == "QuantizeLinear" for n in qdq for c in cons.get(n.output[0], []))
    # nothing but a MatMul/Gemm reads a Q/DQ copy of an activation: the residual Adds read the float tensor
    for n in qm.graph.node:
        if n.op_type in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"):
            continue
        for t in n.input:
            d = prod.get(t)
            assert d is None or d.op_type != "DequantizeLinear" or prod.get(d.input[0]) is None, (n.name, t)
    feeds = _calib()
    a, b = run(prep, feeds)[0], run(qm, feeds)[0]
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.95


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_float_side_readers_rewires_only_non_quantized_readers():
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
             helper.make_node("Add", ["xd", "y"], ["r"], name="residual")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert q.float_side_readers(m, {"MatMul"}) == 1
    by = {n.name: n for n in m.graph.node}
    assert list(by["residual"].input) == ["x", "y"] and list(by["mm"].input) == ["xd", "w"]
    x = np.array([[0.123, -1.0, 2.06, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    got = run(m, {"x": x})[0]
    np.testing.assert_allclose(got - x, np.round(x / 0.1) * 0.1, atol=1e-6)  # the residual adds x itself
