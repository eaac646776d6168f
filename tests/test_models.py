"""The committed models: reproducible from tools/make_models.py, valid, runnable, and safe under the lossless pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim import optimize
from onnxslim.runtime import make_session, run
from onnxslim.validate import DEFAULT_ATOL, DEFAULT_RTOL, make_inputs, output_metrics

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models").glob("*.onnx"))
sys.path.insert(0, str(ROOT / "tools"))
# Models whose integer inputs index tables (token ids, a 2-row token-type table): random integers are not
# valid inputs for them, so they run on the token batches committed beside them.
DATA = {"bert_tiny": "bert_calib.npz"}


def feeds_for(path: Path, m: onnx.ModelProto, seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    if path.stem not in DATA:
        return make_inputs(m, seed=seed, batch=batch)
    data = np.load(ROOT / "models" / DATA[path.stem])
    rows = np.random.default_rng(seed).choice(data["input_ids"].shape[0], size=batch or 1, replace=False)
    return {k: data[k][rows] for k in data.files}


def _node_count(g: onnx.GraphProto) -> int:
    n = len(g.node)
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += _node_count(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                n += sum(_node_count(s) for s in a.graphs)
    return n


def node_count(m: onnx.ModelProto) -> int:
    return _node_count(m.graph) + sum(len(f.node) for f in m.functions)


def outputs(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    sess = make_session(model if isinstance(model, onnx.ModelProto) else str(model))
    return [o.name for o in sess.get_outputs()], run(sess, feeds)


def test_models_folder_is_not_empty() -> None:
    names = {p.stem for p in MODELS}
    assert {"cnn_bn", "transformer_block", "if_model", "loop_model", "custom_op", "bert_tiny"} <= names


def test_make_models_is_deterministic_and_matches_the_committed_files(tmp_path: Path) -> None:
    import make_models

    a = make_models.main(["--out", str(tmp_path / "a")])
    b = make_models.main(["--out", str(tmp_path / "b")])
    assert [p.name for p in a] == [p.name for p in b] and len(a) >= 5
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), f"{pa.name} differs between two runs"
        committed = ROOT / "models" / pa.name
        assert committed.exists(), f"{pa.name} is generated but not committed"
        assert pa.read_bytes() == committed.read_bytes(), \
            f"models/{pa.name} is stale: rerun python tools/make_models.py and commit"


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_model_loads_checks_and_runs(path: Path) -> None:
    m = onnx.load(str(path))
    custom = any(o.domain not in ("", "ai.onnx", "ai.onnx.ml") for o in m.opset_import)
    onnx.checker.check_model(m, full_check=not custom)  # full_check needs schemas a custom domain lacks
    names, outs = outputs(path, feeds_for(path, m, seed=0))
    assert names == [o.name for o in m.graph.output]
    for o in outs:
        assert o.size > 0 and (o.dtype.kind != "f" or np.all(np.isfinite(o)))


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_lossless_pipeline_keeps_outputs_and_never_adds_nodes(path: Path) -> None:
    original = onnx.load(str(path))
    before = original.SerializeToString()
    slim, _ = optimize(original, None, passes="lossless", validate=False, latency=False)
    assert original.SerializeToString() == before, "optimize modified its input model"
    assert node_count(slim) <= node_count(original)
    assert [o.name for o in slim.graph.output] == [o.name for o in original.graph.output]
    for seed in (0, 1):
        feeds = feeds_for(path, original, seed=seed, batch=2 if seed else None)
        names_a, a = outputs(original, feeds)
        names_b, b = outputs(slim, feeds)
        assert names_a == names_b
        for name, x, y in zip(names_a, a, b):
            m = output_metrics(name, x, y, DEFAULT_ATOL, DEFAULT_RTOL)
            assert m.shape == m.shape_optimized, f"{name}: shape {m.shape_optimized} != {m.shape}"
            assert m.within_tolerance, f"{name}: max abs {m.max_abs:.3g}, max rel {m.max_rel:.3g}"
