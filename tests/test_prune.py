"""Structured pruning: dependency tracing proven by the zero-channel oracle, ratios, rounding, shapes,
validity, skip reasons, refit, targets, CLI errors.

The oracle: zero some channels at their source (weights, bias, BatchNorm scale and shift, per-channel
constants, everything that feeds the channel before it is read) so that they are exactly 0 wherever
they are read, then prune with the pass. The zeroed channels have zero importance, so the pass must
remove exactly them; if any rewrite were inconsistent (a Concat offset, a Split size, a block of
Flatten features, a depthwise conv's group, a residual branch) the outputs would change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxslim import prune as ch
from onnxslim.api import optimize
from onnxslim.graph import const_value, to_proto
from onnxslim.runtime import make_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
STRUCT = ["struct_resnet", "struct_mobilenetv2", "struct_unet", "struct_transformer", "struct_detector", "struct_ops"]
TRAINED = ["digits_cnn", "digits_mlp"]


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / f"{name}.onnx"))


def feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [batch if d.dim_param or not d.dim_value else d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def run(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model).run(None, x)


def prune(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    options.setdefault("round_to", 1)
    out, report = optimize(model, None, passes="prune", validate=False, latency=False, auto_lossless=False,
                           options={"latency": False, **options})
    return out, report.extra.get("prune", {})


def zero_units(model: onnx.ModelProto, ratio: float, seed: int = 0) -> tuple[onnx.ModelProto, ch.Analysis, np.ndarray]:
    """Zero random units of every prunable group (as many as ``ratio`` removes). Returns the model and the
    keep mask of the zeroed atoms."""
    an = ch.analyze(ch.traced_graph(model))
    rng = np.random.default_rng(seed)
    keep = np.ones(an.n_atoms, bool)
    for g in an.groups:
        if not g.prunable:
            continue
        k = ch.kept_count(g.channels, ratio)
        for u in rng.choice(g.channels, g.channels - k, replace=False):
            keep[g.units[u]] = False
    consumer_side = {(c.node, c.weight_axis) for c in an.consumers}
    graph = an.graph
    by_input: dict[tuple[int, int], list[ch.SliceEdit]] = {}
    for e in an.edits:
        node = graph.nodes[e.node]
        if node.op in WEIGHTED_WITH_INPUT_EDITS and e.index == 1 and (e.node, e.axis) in consumer_side:
            continue  # a reader's input channels: left as they are
        if node.op == "BatchNormalization" and e.index > 2:
            continue  # mean and variance: gamma = beta = 0 already makes the output 0
        if node.op in ("Div", "Pow"):
            continue
        by_input.setdefault((e.node, e.index), []).append(e)
    for (i, k), edits in by_input.items():
        node = graph.nodes[i]
        v = np.array(const_value(node.inputs[k]), copy=True)
        for e in edits:
            dead = ~ch.keep_positions(e.ids, keep)
            idx = [slice(None)] * v.ndim
            idx[e.axis] = dead
            v[tuple(idx)] = 0
        node.inputs[k] = gs.Constant(f"{node.inputs[k].name}_zeroed_{i}_{k}", v)
    return to_proto(graph, model), an, keep


WEIGHTED_WITH_INPUT_EDITS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@pytest.mark.parametrize("name", STRUCT + TRAINED)
def test_zero_channel_oracle(name: str) -> None:
    zeroed, an, dead_keep = zero_units(load(name), 0.25)
    assert (~dead_keep).any(), "nothing zeroed: the oracle would prove nothing"
    x = feeds(zeroed)
    ref = run(zeroed, x)
    assert all(np.abs(r).max() > 1e-3 for r in ref)
    pruned, rep = prune(zeroed, prune_ratio=0.25)
    onnx.checker.check_model(pruned, full_check=True)
    out = run(pruned, x)
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert rep["params"]["after"] < rep["params"]["before"]
    # The pass removed exactly the zeroed channels: same count per group as the oracle zeroed.
    for row, g in zip(rep["groups"], an.groups):
        if g.prunable:
            assert row["kept"] == sum(bool(dead_keep[u[0]]) for u in g.units)


@pytest.mark.parametrize("name", ["struct_detector", "struct_mobilenetv2", "struct_ops"])
def test_oracle_can_fail(name: str) -> None:
    """Control: pruning channels other than the zeroed ones must change the outputs."""
    zeroed, _, dead_keep = zero_units(load(name), 0.25)
    an = ch.analyze(ch.traced_graph(zeroed))
    wrong = np.ones(an.n_atoms, bool)
    for g in an.groups:
        if g.prunable:
            dead = [u for u in range(g.channels) if not dead_keep[g.units[u][0]]]
            for u in dead:
                wrong[g.units[(u + 1) % g.channels]] = False
    graph, _ = ch.pruned_copy(an, wrong)
    x = feeds(zeroed)
    ref, out = run(zeroed, x), run(ch.export(graph, zeroed), x)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, out)) > 1e-3


@pytest.mark.parametrize("name", STRUCT + TRAINED)
def test_ratio_zero_changes_nothing(name: str) -> None:
    model = load(name)
    out, rep = prune(model, prune_ratio=0.0)
    assert rep["params"]["before"] == rep["params"]["after"]
    assert all(r["kept"] == r["channels"] for r in rep["groups"])
    x = feeds(model)
    for a, b in zip(run(model, x), run(out, x)):
        np.testing.assert_array_equal(a, b)


def _io(model: onnx.ModelProto) -> list:
    return [(v.name, str(v.type)) for v in list(model.graph.input) + list(model.graph.output)]


@pytest.mark.parametrize("name", STRUCT + TRAINED)
@pytest.mark.parametrize("ratio,round_to", [(0.3, 1), (0.6, 8)])
def test_shapes_counts_validity(name: str, ratio: float, round_to: int) -> None:
    model = load(name)
    out, rep = prune(model, prune_ratio=ratio, round_to=round_to)
    onnx.checker.check_model(out, full_check=True)
    assert _io(out) == _io(model), "graph inputs/outputs changed"
    x = feeds(model, batch=3)
    for a, b in zip(run(model, x), run(out, x)):
        assert a.shape == b.shape and np.isfinite(b).all()
    an = ch.analyze(ch.traced_graph(model))
    inits = {t.name: tuple(t.dims) for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    pruned_any = False
    for row, g in zip(rep["groups"], an.groups):
        if not g.prunable:
            assert row["kept"] == row["channels"] and row["skipped"]
            continue
        want = ch.kept_count(g.channels, ratio, round_to)
        assert row["kept"] == want
        assert want <= g.channels and (want % round_to == 0 or g.channels < round_to)
        # nearest multiple, except that a group keeps at least one multiple (or, below it, is not rounded)
        assert abs(want - g.channels * (1 - ratio)) <= round_to / 2 + 1e-9 or want == round_to
        pruned_any |= want < g.channels
        for s in g.sources:  # the weights of every layer of the group really shrank
            src = an.sources[s]
            w = nodes[src.name].input[src.weight_index]
            units_per_atom = src.count // g.channels
            assert inits[w][src.weight_axis] == want * units_per_atom
    assert pruned_any


@pytest.mark.parametrize("name,expect", [
    ("struct_resnet", "reaches graph output 'logits'"),  # its grouped conv is pruned (whole groups)
    ("struct_transformer", "cannot be pruned"),
    ("struct_detector", "reaches graph output 'detections'"),
    ("struct_unet", "reaches graph output 'mask'"),
])
def test_skipped_groups_have_reasons(name: str, expect: str) -> None:
    _, rep = prune(load(name), prune_ratio=0.3)
    reasons = [r["skipped"] for r in rep["groups"] if r["skipped"]]
    assert any(expect in r for r in reasons), reasons
    assert any(r["kept"] < r["channels"] for r in rep["groups"])
    assert any(expect in line for line in rep["summary"])


def test_transformer_ffn_pruned_layernorm_group_kept() -> None:
    out, rep = prune(load("struct_transformer"), prune_ratio=0.5)
    ffn = [r for r in rep["groups"] if r["channels"] == 256]
    assert ffn and ffn[0]["kept"] == 128
    assert all(r["skipped"] for r in rep["groups"] if r["channels"] == 64)


def _digits(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    test = np.load(MODELS / "digits_test.npz")
    return load(name), {"input": test["input"]}, test["labels"]


def _acc(model: onnx.ModelProto, x, labels) -> float:
    return float((run(model, x)[0].argmax(1) == labels).mean() * 100)


def _cos(model: onnx.ModelProto, ref: np.ndarray, x) -> float:
    out = run(model, x)[0]
    return float(np.mean(np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)))


@pytest.mark.parametrize("name,ratio", [("digits_mlp", 0.5),
                                        pytest.param("digits_cnn", 0.5, marks=pytest.mark.slow)])  # ~25 s
def test_refit_beats_no_refit(name: str, ratio: float) -> None:
    model, x, labels = _digits(name)
    ref = run(model, x)[0]
    calib = str(MODELS / "digits_calib.npz")
    plain, _ = prune(model, prune_ratio=ratio, calib=calib, prune_refit=False, round_to=8)
    fitted, rep = prune(model, prune_ratio=ratio, calib=calib, round_to=8)
    assert rep["refit"] and rep["refit_layers"]
    assert all(f["error_after"] <= f["error_before"] for f in rep["refit_layers"])
    assert _cos(fitted, ref, x) > _cos(plain, ref, x) + 0.01
    acc0, acc_plain, acc_fit = _acc(model, x, labels), _acc(plain, x, labels), _acc(fitted, x, labels)
    assert acc_fit > acc_plain
    assert acc_fit >= acc0 - 3.0


def _random_mlp(d: int = 64, hidden: int = 256, classes: int = 10) -> onnx.ModelProto:
    """Gemm-Relu-Gemm with random weights and full-rank Gaussian inputs: unlike the digits models (whose
    activations live in a low-dimensional subspace), what the removed units carried cannot be rebuilt
    from a few rows, so a near-exact fit on them generalizes badly."""
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((d, hidden)) / np.sqrt(d), rng.standard_normal(hidden) * 0.5,
         rng.standard_normal((hidden, classes)) / np.sqrt(hidden), np.zeros(classes)]
    inits = [onnx.numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(w, ["w1", "b1", "w2", "b2"])]
    h = onnx.helper
    g = h.make_graph([h.make_node("Gemm", ["x", "w1", "b1"], ["h"]), h.make_node("Relu", ["h"], ["r"]),
                      h.make_node("Gemm", ["r", "w2", "b2"], ["y"])], "mlp",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", d])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", classes])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


def test_refit_ridge_by_rows_generalizes(tmp_path: Path) -> None:
    """160 calibration rows for a Gemm with 129 inputs (the worst case of a near-exact fit: rows ~ inputs).
    The cross-validated ridge must beat the old fixed one (0.01) on fresh inputs, and the report says
    what it chose and its held-out error."""
    model = _random_mlp()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((160, 64)).astype(np.float32))
    x = {"x": rng.standard_normal((2000, 64)).astype(np.float32)}
    ref = run(model, x)[0]

    def fresh_error(ridge):
        out, rep = prune(model, prune_ratio=0.5, calib=str(tmp_path / "c.npz"), prune_importance="l1",
                         prune_ridge=ridge)
        y = run(out, x)[0]
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref - ref.mean(0))), rep["refit_layers"][0]

    fixed, f_fixed = fresh_error(0.01)
    chosen, f_cv = fresh_error(None)
    assert f_fixed["ridge"] == 0.01 and f_fixed["heldout_after"] is None
    assert f_cv["ridge"] > 0.01 and f_cv["heldout_after"] < f_cv["heldout_before"]
    assert f_cv["error_after"] > f_fixed["error_after"]  # fits its own rows less closely ...
    assert chosen < 0.9 * fixed  # ... and generalizes better (measured 0.53 vs 0.69)


def test_target_params_reached() -> None:
    model, x, labels = _digits("digits_mlp")
    out, rep = prune(model, prune_target="params=0.5", calib=str(MODELS / "digits_calib.npz"), round_to=8,
                     calib_size=128)
    assert rep["target"]["reached"] >= 0.5
    assert rep["params"]["after"] <= 0.5 * rep["params"]["before"] + 1
    assert _acc(out, x, labels) >= _acc(model, x, labels) - 2.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxslim.cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("args,expect", [
    ([], "--prune-ratio"),
    (["--prune-target", "flops=0.5"], "--prune-target"),
    (["--prune-target", "params=1.5"], "--prune-target"),
    (["--prune-target", "params=0.5"], "calibration"),
    (["--prune-ratio", "0.3", "--prune-target", "params=0.5"], "either"),
    (["--prune-ratio", "0.3", "--prune-refit"], "calibration"),
])
def test_cli_bad_options(tmp_path: Path, args: list[str], expect: str) -> None:
    out = tmp_path / "o.onnx"
    p = _cli(str(MODELS / "digits_mlp.onnx"), str(out), "--passes", "prune", *args)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_gate_refuses_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    p = _cli(str(MODELS / "digits_cnn.onnx"), str(out), "--passes", "prune", "--prune-ratio", "0.7",
             "--calib", str(MODELS / "digits_calib.npz"), "--no-prune-refit", "--no-latency", "--quiet")
    assert p.returncode == 1 and "accuracy" in p.stderr
    assert not out.exists()


def test_cli_prune_reports_groups(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    p = _cli(str(MODELS / "digits_mlp.onnx"), str(out), "--passes", "lossless,prune", "--prune-ratio", "0.5",
             "--calib", str(MODELS / "digits_calib.npz"), "--no-latency")
    assert p.returncode == 0, p.stderr
    assert "256 -> 128" in p.stdout and "reaches graph output 'logits'" in p.stdout
    assert out.exists()


def test_cli_no_latency_reaches_prune(tmp_path: Path) -> None:
    """--no-latency: prune measures nothing (it read an option the CLI never set), and its report still
    gives seconds per stage."""
    out, js = tmp_path / "o.onnx", tmp_path / "r.json"
    p = _cli(str(MODELS / "digits_mlp.onnx"), str(out), "--passes", "prune", "--prune-ratio", "0.3",
             "--calib", str(MODELS / "digits_calib.npz"), "--no-latency", "--json", str(js))
    assert p.returncode == 0, p.stderr
    rep = json.loads(js.read_text())
    section = rep["extra"]["prune"]
    assert "latency" not in section and "latency" not in section["seconds"]
    assert {"trace", "select", "rewrite", "refit"} <= set(section["seconds"]) == set(section["cpu_seconds"])
    assert rep["latency"] is None and all(s["latency"] is None for s in rep["stages"])
    assert "prune: latency" not in p.stdout and "prune: seconds trace" in p.stdout


def test_fixed_batch_model_refit_and_target() -> None:
    """A model whose batch is fixed (8) is fed whole batches of 8 by refit and sensitivity."""
    model = load("digits_mlp")
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 8
    calib = str(MODELS / "digits_calib.npz")
    out, rep = prune(model, prune_ratio=0.5, calib=calib, round_to=8, calib_size=64)
    assert rep["refit_layers"] and all(not f["skipped"] for f in rep["refit_layers"])
    out, rep = prune(model, prune_target="macs=0.4", calib=calib, round_to=8, calib_size=64)
    assert rep["target"]["reached"] >= 0.4
    test = np.load(MODELS / "digits_test.npz")
    x = {"input": test["input"][:8]}
    assert run(out, x)[0].shape == (8, 10)


def test_l2_importance_and_min_channels() -> None:
    model = load("digits_mlp")
    out, rep = prune(model, prune_ratio=0.9, prune_importance="l2", prune_min_channels=40, round_to=1)
    assert rep["importance"] == "l2"
    kept = [r["kept"] for r in rep["groups"] if not r["skipped"]]
    assert kept == [40, 40]
    onnx.checker.check_model(out, full_check=True)
    # L2 and L1 rank channels differently on trained weights: the kept sets differ somewhere
    an = ch.analyze(ch.traced_graph(model))
    k1 = ch.plan(an, 0.5, ch.importance(an, "l1"), round_to=1)
    k2 = ch.plan(an, 0.5, ch.importance(an, "l2"), round_to=1)
    assert k1.sum() == k2.sum() and not np.array_equal(k1, k2)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_recon_selection_beats_weight_norm(ratio: float) -> None:
    """Choosing channels by what the refit can rebuild leaves less to rebuild than choosing by L1 norm."""
    model, x, labels = _digits("digits_mlp")
    calib = str(MODELS / "digits_calib.npz")
    err, acc = {}, {}
    for imp in ("recon", "l1"):
        out, rep = prune(model, prune_ratio=ratio, prune_importance=imp, calib=calib, round_to=8)
        err[imp] = float(np.mean([f["error_after"] for f in rep["refit_layers"]]))
        acc[imp] = _acc(out, x, labels)
    assert err["recon"] < 0.8 * err["l1"], err
    assert acc["recon"] >= acc["l1"] - 0.5, acc


def test_recon_unit_costs_match_per_unit_solve_and_budget() -> None:
    """The batched per-unit costs equal one solve per unit (the formula they replaced); past the downdate
    budget a group is chosen in one step, removing as many channels and still valid."""
    from onnxslim.prune import refit
    from onnxslim.calibration import load_calibration

    model = load("struct_resnet")
    calib = load_calibration("random", model, size=32)
    an = ch.analyze(ch.traced_graph(model))
    imp = ch.importance(an, "l1")
    sel = refit.ReconSelector(an, model, calib, imp, batch=16)
    dense = [r for r in sel.readers if "P" in r]
    assert dense
    for r in dense[:4]:
        gi = min(r["groups"])
        n = len(an.groups[gi].units)
        want = np.zeros(n)
        for u in range(n):
            f = np.flatnonzero(r["feat"] == (gi << 32) + u)
            if len(f):
                bf = r["beta"][f]
                want[u] = r["scale"] * float(np.sum(bf * np.linalg.solve(r["P"][np.ix_(f, f)], bf)))
        np.testing.assert_allclose(refit._unit_costs(r, gi, n), want, rtol=1e-9, atol=1e-12)
    ratios = {g.id: 0.5 for g in an.groups if g.prunable}
    greedy = ch.plan(an, ratios, imp, round_to=1, select=sel)
    budget = refit.DOWNDATE_BUDGET
    try:
        refit.DOWNDATE_BUDGET = 0
        one_step = ch.plan(an, ratios, imp, round_to=1, select=sel)
    finally:
        refit.DOWNDATE_BUDGET = budget
    assert (~one_step).sum() == (~greedy).sum() > 0
    graph, _ = ch.pruned_copy(an, one_step)
    out = ch.export(graph, model)
    onnx.checker.check_model(out)


def test_zero_channel_oracle_opset11_split_attribute() -> None:
    """Opset 11 keeps Split sizes in an attribute: the rewrite must update it too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("msm", ROOT / "tools" / "make_structure_models.py")
    msm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(msm)
    zeroed, _, dead_keep = zero_units(msm.detector(opset=11), 0.25)
    x = feeds(zeroed)
    ref = run(zeroed, x)
    pruned, rep = prune(zeroed, prune_ratio=0.25)
    onnx.checker.check_model(pruned, full_check=True)
    for a, b in zip(ref, run(pruned, x)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    sizes = [list(a.ints) for n in pruned.graph.node if n.op_type == "Split" for a in n.attribute if a.name == "split"]
    assert sizes and sum(sizes[0]) < 64
