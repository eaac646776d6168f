"""Determinism (issue 6): the same input and options give byte-identical output files (model and
data files, names included) across runs and processes, whatever PYTHONHASHSEED is."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402

# Runs the CLI on many (IN, OUT) pairs in one process: two processes cover every model.
CHILD = r'''
import sys
from onnxslim.cli import main
args = sys.argv[1:]
extra = args[args.index("--") + 1:]
pairs = args[:args.index("--")]
for inp, out in zip(pairs[::2], pairs[1::2]):
    try:
        main([inp, out, "--quiet", *extra])
    except SystemExit as e:
        if e.code:
            sys.exit(f"{inp}: exit {e.code}")
'''


def _inputs(tmp: Path) -> list[Path]:
    """The shipped models, the fuzz bases, their valid-but-odd variants, and models with external data."""
    paths = sorted(p for p in (ROOT / "models").glob("*.onnx") if p.stat().st_size < 50 << 20)
    src = tmp / "src"
    for name, fn in sorted(fuzz.BASES.items()):
        d = src / name
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(fn().SerializeToString())
        paths.append(d / "model.onnx")
        for mut, mfn in sorted(fuzz.VALID_MUTATIONS.items()):
            m = fn()
            mfn(m, random.Random(f"{name}:{mut}"))
            d = src / f"{name}-{mut}"
            d.mkdir()
            (d / "model.onnx").write_bytes(m.SerializeToString())
            paths.append(d / "model.onnx")
        d = src / f"{name}-external"
        d.mkdir()
        fuzz._save_external(fn(), d)
        paths.append(d / "model.onnx")
    return paths


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(paths: list[Path], out: Path, seed: str, extra: list[str]) -> dict[str, bytes]:
    args = []
    for i, p in enumerate(paths):
        (out / f"{i:03d}").mkdir(parents=True, exist_ok=True)
        args += [str(p), str(out / f"{i:03d}" / "slim.onnx")]
    env = dict(os.environ, PYTHONHASHSEED=seed)
    r = subprocess.run([sys.executable, "-c", CHILD, *args, "--", *extra], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return _outputs(out)


@pytest.mark.parametrize("extra", [[], ["--no-validate"]], ids=["default", "no-validate"])
def test_byte_identical_across_processes(tmp_path: Path, extra: list[str]) -> None:
    paths = _inputs(tmp_path)
    assert len(paths) >= 20
    first = _run(paths, tmp_path / "run1", "1", extra)
    second = _run(paths, tmp_path / "run2", "12345", extra)
    assert len(first) >= len(paths)  # every model written (plus data files)
    assert first.keys() == second.keys()
    differ = [k for k in first if first[k] != second[k]]
    assert not differ, f"outputs differ between processes: {differ[:10]}"
    # And in this process (a third hash seed), through the API path the CLI uses.
    third = tmp_path / "run3"
    for i, p in enumerate(paths):
        (third / f"{i:03d}").mkdir(parents=True)
        code, _, err = fuzz.run_cli_inprocess([str(p), str(third / f"{i:03d}" / "slim.onnx"), "--quiet", *extra])
        assert code == 0, err
    assert _outputs(third) == first


def test_lazy_and_in_memory_loading_give_the_same_model(tmp_path: Path) -> None:
    """Weights left on disk (lazy, from a path) and a ModelProto in memory: the same optimized model."""
    import onnxslim

    for p in _inputs(tmp_path):
        if any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(p), load_external_data=False).graph.initializer):
            continue  # an in-memory model cannot refer to external data
        a, _ = onnxslim.optimize(p, validate=False)
        b, _ = onnxslim.optimize(onnx.load(str(p)), validate=False)
        assert a.SerializeToString() == b.SerializeToString(), p
