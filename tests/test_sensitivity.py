"""`onnxslim sensitivity` and the target allocation built on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxslim import prune as ch
from onnxslim.prune.sensitivity import allocate

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CALIB = str(MODELS / "digits_calib.npz")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxslim.cli", "sensitivity", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_sensitivity_cli_json(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    p = _cli(str(MODELS / "digits_mlp.onnx"), "--calib", CALIB, "--calib-size", "128", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "r=0.7" in p.stdout and "left whole" in p.stdout and "reaches graph output" in p.stdout
    res = json.loads(out.read_text())
    assert res["ratios"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] and res["accuracy"] is not None
    prunable = [g for g in res["groups"] if not g["skipped"]]
    skipped = [g for g in res["groups"] if g["skipped"]]
    assert len(prunable) == 2 and len(skipped) == 1 and not skipped[0]["points"]
    for g in prunable:
        assert len(g["points"]) == 7 and 0 < g["params_share"] <= 1 and 0 < g["macs_share"] <= 1
        kept = [p["kept"] for p in g["points"]]
        assert kept == sorted(kept, reverse=True) and kept[-1] < g["channels"]
        assert all(p["accuracy"] is not None and -1e-6 <= p["drift"] <= 2 for p in g["points"])


def test_sensitivity_drift_grows_without_refit(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    p = _cli(str(MODELS / "digits_cnn.onnx"), "--calib", CALIB, "--calib-size", "128", "--no-refit",
             "--ratios", "0.2,0.7", "--round-to", "8",
             "--json", str(out))
    assert p.returncode == 0, p.stderr
    for g in json.loads(out.read_text())["groups"]:
        if g["points"]:
            lo, hi = g["points"]
            assert hi["cosine"] < lo["cosine"] and hi["params_removed"] > lo["params_removed"]


@pytest.mark.parametrize("args,expect", [
    (["--ratios", "0.2,x"], "--ratios"),
    (["--ratios", "1.5"], "--ratios"),
])
def test_sensitivity_bad_args(args: list[str], expect: str) -> None:
    p = _cli(str(MODELS / "digits_mlp.onnx"), "--calib", CALIB, *args)
    assert p.returncode == 2 and expect in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sensitivity_missing_calib() -> None:
    p = _cli(str(MODELS / "digits_mlp.onnx"), "--calib", str(MODELS / "nope.npz"))
    assert p.returncode == 2 and "nope.npz" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_allocate_prefers_insensitive_group() -> None:
    """Synthetic drift: g1 costs nothing to prune, g0 a lot. The allocation must take from g1 first."""
    an = ch.analyze(ch.traced_graph(onnx.load(str(MODELS / "digits_mlp.onnx"))))
    imp = ch.importance(an)
    base = ch.cost(an)
    sens = {"groups": []}
    for g in an.groups:
        pts = []
        if g.prunable:
            for r in (0.1, 0.3, 0.5, 0.7):
                keep = ch.plan(an, {g.id: r}, imp, round_to=8)
                c = ch.cost(an, keep)
                pts.append({"ratio": r, "drift": (0.5 * r if g.id == "g0" else 0.001 * r),
                            "params_removed": 1 - c.params / base.params, "macs_removed": 1 - c.macs / base.macs})
        sens["groups"].append({"group": g.id, "points": pts})
    ratios, reached = allocate(sens, an, imp, "params", 0.3, round_to=8)
    assert reached >= 0.3
    assert ratios["g1"] > ratios["g0"]
    ratios, reached = allocate(sens, an, imp, "macs", 0.9, round_to=8)  # unreachable: best effort
    assert reached < 0.9 and ratios["g0"] == ratios["g1"] == 0.7
