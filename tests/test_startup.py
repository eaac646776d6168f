"""Start-up cost (issue 13): what a lossless run imports, and how many onnxruntime sessions it builds.

Asserted by looking at sys.modules in a fresh interpreter and by counting make_session calls, never by
timing (tools/bench_lossless.py measures the time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxslim
import onnxslim.runtime as runtime
from onnxslim.validate import ReferenceOutputs, compare_models, make_inputs

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "cnn_bn.onnx"

# Imported only by the runs that use them: quantization (onnxruntime.quantization, sympy through its
# shape inference), distillation (torch), and onnxruntime-extensions, whose library onnxslim registers
# by path (its package __init__ imports torch when torch is installed).
LOSSY_ONLY = ["onnxruntime.quantization", "torch", "onnxruntime_extensions", "sympy", "onnxslim.distill"]


def _imported_after(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps([m for m in {LOSSY_ONLY!r} if m in sys.modules]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_cli_import_leaves_out_what_lossless_runs_do_not_use() -> None:
    assert _imported_after("import onnxslim.cli") == []


def test_lossless_run_imports_nothing_lossy(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code = (f"from onnxslim.cli import main\n"
            f"try:\n    main([{str(CNN)!r}, {str(out)!r}, '--quiet'])\nexcept SystemExit as e:\n"
            f"    assert e.code == 0, e.code")
    assert _imported_after(code) == []
    assert out.exists()


@pytest.fixture()
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every session make_session builds: (source, prepack); validation sessions have prepack False."""
    built: list[tuple[str, bool]] = []
    real = runtime.make_session

    def counting(model, *args, **kwargs):
        src = os.path.realpath(model) if isinstance(model, (str, os.PathLike)) else "<proto>"
        built.append((src, kwargs.get("prepack", True)))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runtime, "make_session", counting)
    return built


def _original_validation_sessions(built: list[tuple[str, bool]], path: Path) -> int:
    return sum(1 for src, prepack in built if src == os.path.realpath(path) and not prepack)


def test_check_each_pass_builds_the_originals_session_once(tmp_path: Path, sessions) -> None:
    _, report = onnxslim.optimize(CNN, tmp_path / "o.onnx", check_each_pass=True)
    changed = sum(1 for p in report.passes if p["changed"])
    assert changed >= 2, "the model must give several per-pass checks for this test to mean anything"
    assert report.validation["passed"]
    assert _original_validation_sessions(sessions, CNN) == 1
    # and the candidate side still runs for every check: one per changed pass plus the final comparison
    assert sum(1 for src, prepack in sessions if not prepack) == 1 + changed + 1


def test_lossy_stages_and_final_check_share_the_originals_outputs(tmp_path: Path, sessions) -> None:
    _, report = onnxslim.optimize(CNN, tmp_path / "o.onnx", passes="lossless,fp16", latency=False)
    assert len(report.stages) >= 2 and report.stages[-1]["cosine"] is not None
    assert report.validation is not None and "outputs" in report.validation
    assert _original_validation_sessions(sessions, CNN) == 1


def _add_model(bias: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [bias] * 3)
    g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g", [x], [y], [b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_cached_reference_still_catches_a_changed_model() -> None:
    """The cache holds the original's outputs, never a candidate's: a later, different candidate fails."""
    original, same, changed = _add_model(1.0), _add_model(1.0), _add_model(1.5)
    feeds = make_inputs(original, seed=0)
    ref = ReferenceOutputs()
    assert compare_models(original, same, feeds, reference=ref).passed
    res = compare_models(original, changed, feeds, reference=ref)
    assert not res.passed and "differs" in res.reason
    # the second comparison used the cached outputs of the original
    assert ref.get(feeds, "extended", None) is not None


def test_cached_reference_matches_a_fresh_comparison() -> None:
    original, changed = _add_model(1.0), _add_model(1.0 + 2e-3)
    feeds = make_inputs(original, seed=0)
    ref = ReferenceOutputs()
    compare_models(original, original, feeds, reference=ref)
    cached = compare_models(original, changed, feeds, reference=ref)
    fresh = compare_models(original, changed, feeds)
    assert cached.passed == fresh.passed
    assert [o.max_abs for o in cached.outputs] == [o.max_abs for o in fresh.outputs]
    assert np.isclose(cached.outputs[0].max_abs, 2e-3, rtol=1e-3)
