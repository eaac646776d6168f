"""Interrupted and concurrent writes (issue 6).

A SIGKILL at any moment of the save leaves OUT absent, or a complete model: the previous output
(or, once the final rename happened, the new one), with its data file. Two processes writing one
OUT end with one complete valid model. Kill points are exact (a hook in the child kills it at a
chosen step) plus a few at random times.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402

CHILD = r'''
import os, signal, sys
import onnxslim.model as M, onnxslim.weights as W

point = os.environ["KILL_AT"]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-data":  # after the first tensor's bytes went to the staged data file
    real = W.copy_stub
    def copy_stub(*a, **k):
        real(*a, **k)
        die()
    W.copy_stub = copy_stub
elif point == "mid-model":  # half of an embedded model file written
    real_we = W.write_embedded
    class Half:
        def __init__(self, f): self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            self.f.write(b)
            if self.n > 100_000:
                die()
        def fileno(self):  # no fd: weight bytes come through write() too, so they are counted
            raise ValueError("no fd")
    M.weights.write_embedded = lambda proto, f: real_we(proto, Half(f))
elif point == "before-commit":
    real_commit = M.StagedModel.commit
    M.StagedModel.commit = lambda self, *a, **k: die()
elif point in ("between-renames", "after-rename"):
    real_replace = os.replace
    real_commit = M.StagedModel.commit
    state = {"in_commit": False, "n": 0}
    def commit(self, *a, **k):
        state["in_commit"] = True
        return real_commit(self, *a, **k)
    def replace(a, b):
        if state["in_commit"]:
            state["n"] += 1
            if point == "between-renames" and str(b) == os.environ["OUT"]:
                die()  # the data file is in place, the model rename not done
        real_replace(a, b)
        if state["in_commit"] and point == "after-rename" and str(b) == os.environ["OUT"]:
            die()  # the new model is in place, stale data files not yet removed
    M.StagedModel.commit = commit
    M.os.replace = replace

from onnxslim.cli import main
main(sys.argv[1:])
'''


def _mlp(path: Path, seed: int, external: bool) -> Path:
    """A ~6 MB model (several large tensors) so a save has distinct steps to interrupt."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array((rng.standard_normal((512, 1024)) * 0.02).astype(np.float32), f"w{i}a"))
        inits.append(numpy_helper.from_array((rng.standard_normal((1024, 512)) * 0.02).astype(np.float32), f"w{i}b"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}a"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}b"], [f"y{i}"])]
        x = f"y{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 512])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        fuzz._save_external(m, path.parent)
        os.replace(path.parent / "model.onnx", path)
    else:
        path.write_bytes(m.SerializeToString())
    return path


def _snapshot(out: Path) -> dict[str, bytes]:
    """OUT and the data files beside it named after it."""
    return {p.name: p.read_bytes() for p in out.parent.iterdir()
            if p.name == out.name or (p.name.startswith(out.name + ".") and p.name.endswith(".data"))}


def _complete(out: Path) -> bool:
    """OUT loads with all its data and passes the checker."""
    try:
        m = onnx.load(str(out))
        onnx.checker.check_model(m)
        return True
    except Exception:  # noqa: BLE001
        return False


def _onnxslim_args(inp: Path, out: Path) -> list[str]:
    return [str(inp), str(out), "--quiet", "--no-validate"]


def _expected(tmp: Path, inp: Path, name: str) -> dict[str, bytes]:
    """What a clean run writes for ``inp`` (outputs are deterministic, names included)."""
    d = tmp / f"expected-{inp.parent.name}-{inp.stem}"
    d.mkdir(parents=True, exist_ok=True)
    code, _, err = fuzz.run_cli_inprocess(_onnxslim_args(inp, d / name))
    assert code == 0, err
    return _snapshot(d / name)


def _child(inp: Path, out: Path, point: str) -> int:
    env = dict(os.environ, KILL_AT=point, OUT=str(out))
    p = subprocess.run([sys.executable, "-c", CHILD, *_onnxslim_args(inp, out)], env=env, capture_output=True,
                       text=True, timeout=120)
    return p.returncode


POINTS = ["mid-data", "mid-model", "before-commit", "between-renames", "after-rename"]


@pytest.mark.parametrize("external", [True, False], ids=["external", "embedded"])
@pytest.mark.parametrize("first", [True, False], ids=["fresh", "overwrite"])
def test_sigkill_during_save(tmp_path: Path, external: bool, first: bool) -> None:
    a = _mlp(tmp_path / "a" / "a.onnx", 1, external)
    b = _mlp(tmp_path / "b" / "b.onnx", 2, external)
    new = _expected(tmp_path, b, "out.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    killed = 0
    for point in POINTS:
        if point == "mid-data" and not external or point == "mid-model" and external:
            continue
        for p in out_dir.iterdir():  # start each kill from the same state
            p.unlink() if p.is_file() else None
        if not first:
            code, _, err = fuzz.run_cli_inprocess(_onnxslim_args(a, out))
            assert code == 0, err
        before = _snapshot(out)
        rc = _child(b, out, point)
        assert rc == -signal.SIGKILL, (point, rc)
        killed += 1
        after = _snapshot(out)
        # OUT: still absent or the previous model, except once its own rename happened.
        assert after.get(out.name) == (new if point == "after-rename" else before).get(out.name), point
        # Nothing that existed was changed or removed (the previous model keeps its data file).
        assert all(after.get(k) == v for k, v in before.items() if k != out.name), point
        # Anything new is a complete file of the new output, never a partial one.
        assert all(new.get(k) == v for k, v in after.items() if k not in before), point
        if out.exists():
            assert _complete(out), point
        # The next run succeeds and clears the killed run's staging folder. (After "after-rename" the
        # previous data file stays: complete, unreferenced, and only ever removed as OUT's own.)
        code, _, err = fuzz.run_cli_inprocess(_onnxslim_args(b, out))
        assert code == 0, err
        now = _snapshot(out)
        assert all(now.get(k) == v for k, v in new.items())
        if point != "after-rename":
            assert now == new
        assert [p.name for p in out_dir.iterdir() if ".onnxslim-tmp-" in p.name] == []
    assert killed >= 4


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    """Kills at arbitrary times of a whole run (load, passes, validation, save)."""
    a = _mlp(tmp_path / "a" / "a.onnx", 1, True)
    b = _mlp(tmp_path / "b" / "b.onnx", 2, True)
    new = _expected(tmp_path, b, "out.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    old = _expected(tmp_path, a, "out.onnx")
    rng = random.Random(0)
    for i in range(6):
        for p in out_dir.iterdir():  # a SIGKILL during staging leaves the private folder behind
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if i % 2:  # half the time there is a previous output to keep
            code, _, err = fuzz.run_cli_inprocess(_onnxslim_args(a, out))
            assert code == 0, err
        p = subprocess.Popen([sys.executable, "-m", "onnxslim.cli", str(b), str(out), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        if not out.exists():
            assert i % 2 == 0
            continue
        assert out.read_bytes() in (old[out.name], new[out.name])
        assert _complete(out)  # with the data file it names


def test_concurrent_writers_end_with_one_complete_model(tmp_path: Path) -> None:
    a = _mlp(tmp_path / "a" / "a.onnx", 1, True)
    b = _mlp(tmp_path / "b" / "b.onnx", 2, True)
    exp = {"a": _expected(tmp_path, a, "out.onnx"), "b": _expected(tmp_path, b, "out.onnx")}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    for round_ in range(3):
        procs = [subprocess.Popen([sys.executable, "-m", "onnxslim.cli", *_onnxslim_args(src, out)],
                                  stderr=subprocess.PIPE, text=True) for src in (a, b, a, b)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        snap = _snapshot(out)
        assert snap in (exp["a"], exp["b"]), round_  # one complete model and only its data file
        assert _complete(out)
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(snap)  # nothing else left behind
