"""prune and sensitivity on the shapes real exports have: a fixed batch of 1 with a dynamic width
(OCR models), calibration from an .npz of [N, 3, 48, 192], from an image folder with
``--input-shape x:1,3,48,192`` and ``--calib-batch 1``; and the PP-OCR cls model shipped in the
``rapidocr-onnxruntime`` wheel (skipped when it is not installed).

The reported failure: ``--input-shape`` fixes the input of the *result* to [1, 3, 48, 192] while the
original's batch stays dynamic, and the gate then fed the result all held-out samples in one batch
(``Got invalid dimensions for input: x``). Every run here must write a model that runs, or refuse with
one line and exit 1 - never crash, never fail on its own shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.runtime import make_session
from test_calibration import png_bytes  # the one tiny PNG encoder of the tests

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxslim.cli", *args], capture_output=True, text=True, cwd=cwd)


def fixed_batch_ocr_like(path: Path, batch: int | str = 1) -> Path:
    """Conv-ReLU-Conv-ReLU-GAP-MatMul-Softmax with input x [batch, 3, 48, W]: width dynamic, batch fixed
    (1) or dynamic (a name, like the PP-OCR exports)."""
    rng = np.random.default_rng(0)

    def c(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(a.astype(np.float32), name)

    inits = [c("w1", rng.standard_normal((16, 3, 3, 3)) * 0.3), c("b1", rng.standard_normal(16) * 0.1),
             c("w2", rng.standard_normal((24, 16, 3, 3)) * 0.1), c("b2", rng.standard_normal(24) * 0.1),
             c("wf", rng.standard_normal((24, 2)) * 0.3), c("bf", rng.standard_normal(2) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "wf"], ["mm"]), helper.make_node("Add", ["mm", "bf"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "ocr_like",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 48, "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def image_folder(folder: Path, n: int, size: tuple[int, int] = (48, 192)) -> Path:
    """Smooth random images (a few gradients), so that a 3x3 conv sees structure rather than noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / np.array(size).reshape(2, 1, 1)
    for i in range(n):
        a = rng.uniform(-3, 3, (3, 3))
        rgb = np.stack([np.sin(a[k, 0] * yy * 3 + a[k, 1] * xx * 5 + a[k, 2]) for k in range(3)], -1)
        (folder / f"im{i:03d}.png").write_bytes(png_bytes(((rgb + 1) * 127.5).astype(np.uint8)))
    return folder


def _runs_at(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    x = np.random.default_rng(0).random(shape, np.float32)
    return make_session(onnx.load(str(path))).run(None, {"x": x})[0].shape


def _one_line_refusal(p: subprocess.CompletedProcess) -> str:
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("onnxslim: error: validation failed: ") or "nothing written" in last, p.stderr[-2000:]
    assert "does not run" not in last and "Traceback" not in p.stderr, p.stderr[-2000:]
    return last


# Loose gates: the synthetic model is random, the point is that its shapes work end to end.
LOOSE = ["--min-cosine", "0", "--min-top1", "0", "--max-acc-drop", "100", "--no-latency"]


@pytest.mark.parametrize("calib", ["npz", "npz-batch1", "folder", "folder-dynamic-batch"])
def test_fixed_batch_dynamic_width_prune(tmp_path: Path, calib: str) -> None:
    """``folder-dynamic-batch``: the model's batch is dynamic and --input-shape fixes it to 1 in the result."""
    model = fixed_batch_ocr_like(tmp_path / "m.onnx", "N" if calib == "folder-dynamic-batch" else 1)
    out = tmp_path / "o.onnx"
    if calib.startswith("npz"):
        np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).random((40, 3, 48, 192), np.float32))
        extra = ["--calib", str(tmp_path / "c.npz")] + (["--calib-batch", "1"] if calib == "npz-batch1" else [])
    else:
        extra = ["--calib", str(image_folder(tmp_path / "imgs", 40)), "--input-shape", "x:1,3,48,192",
                 "--calib-batch", "1"]
    p = _cli(str(model), str(out), "--passes", "prune", "--prune-ratio", "0.3", "--round-to", "4", *extra, *LOOSE,
             "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    prune = rep["extra"]["prune"] if "extra" in rep else rep["prune"]
    assert prune["params"]["after"] < prune["params"]["before"]
    assert prune["refit_layers"] and not any(f["skipped"] for f in prune["refit_layers"])
    assert set(prune["seconds"]) >= {"trace", "select", "rewrite", "refit"}
    assert _runs_at(out, (1, 3, 48, 192)) == (1, 2)
    if not calib.startswith("folder"):  # no --input-shape: the width stays dynamic
        assert _runs_at(out, (1, 3, 48, 100)) == (1, 2)


def test_fixed_batch_dynamic_width_sensitivity(tmp_path: Path) -> None:
    model = fixed_batch_ocr_like(tmp_path / "m.onnx")
    folder = image_folder(tmp_path / "imgs", 12)
    p = _cli("sensitivity", str(model), "--calib", str(folder), "--input-shape", "x:1,3,48,192", "--calib-batch", "1",
             "--json", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())
    pts = [pt for g in res["groups"] if not g["skipped"] for pt in g["points"]]
    assert pts and all(np.isfinite(pt["drift"]) for pt in pts)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).random((12, 3, 48, 192), np.float32))
    p = _cli("sensitivity", str(model), "--calib", str(tmp_path / "c.npz"), "--json", str(tmp_path / "s2.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "s2.json").read_text())["samples"] == 12


# ------------------------------------------------------------------------------ PP-OCR cls (rapidocr wheel)

def _cls_model() -> Path:
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    path = Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.exists():
        pytest.skip(f"{path.name} is not in this rapidocr_onnxruntime wheel")
    return path


def _write_or_refuse(p: subprocess.CompletedProcess, out: Path) -> None:
    if p.returncode == 0:
        assert out.exists() and _runs_at(out, (1, 3, 48, 192))[0] == 1
    else:
        assert p.returncode == 1, p.stderr[-2000:]
        _one_line_refusal(p)
        assert not out.exists()


@pytest.mark.slow
def test_ppocr_cls_prune_npz(tmp_path: Path) -> None:
    model = _cls_model()
    folder = image_folder(tmp_path / "imgs", 40)
    # the same images as an .npz of [N, 3, 48, 192] in [-1, 1], PP-OCR's normalization
    from onnxslim.calibration import load_calibration

    x = load_calibration(str(folder), onnx.load(str(model)), input_shapes={"x": [1, 3, 48, 192]}).inputs["x"]
    np.savez(tmp_path / "c.npz", x=(x - x.mean()) / (x.std() + 1e-6))
    out = tmp_path / "o.onnx"
    p = _cli(str(model), str(out), "--passes", "prune", "--prune-ratio", "0.3", "--calib", str(tmp_path / "c.npz"),
             cwd=tmp_path)
    _write_or_refuse(p, out)
    # nothing stray in the working directory (it is tmp_path)
    want = ["imgs", "c.npz"] + (["o.onnx"] if out.exists() else [])
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(want)


@pytest.mark.slow
def test_ppocr_cls_prune_image_folder_fixed_batch(tmp_path: Path) -> None:
    """The reported failure: image folder, --input-shape x:1,3,48,192, --calib-batch 1."""
    model = _cls_model()
    folder = image_folder(tmp_path / "imgs", 40)
    out = tmp_path / "o.onnx"
    p = _cli(str(model), str(out), "--passes", "prune", "--prune-ratio", "0.3", "--calib", str(folder),
             "--input-shape", "x:1,3,48,192", "--calib-batch", "1", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")
    _write_or_refuse(p, out)
