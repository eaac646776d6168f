"""External data: round trips keep it external and beside the output; locations that leave the
model's folder are refused before any file is opened; a missing data file is one line."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402

from onnxslim.errors import InputError  # noqa: E402
from onnxslim.model import load_model  # noqa: E402


def _external_model(folder: Path, base=fuzz.base_cnn, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fuzz._save_external(base(), folder, location)
    return folder / "model.onnx"


def _data_files(folder: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(out_name + ".") and p.name.endswith(".data"))


def test_round_trip_stays_external(tmp_path: Path) -> None:
    inp = _external_model(tmp_path / "in")
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = fuzz.run_cli_inprocess([str(inp), str(out_dir / "slim.onnx"), "--quiet"])
    assert code == 0, err
    data = _data_files(out_dir, "slim.onnx")
    assert len(data) == 1 and set(p.name for p in out_dir.iterdir()) == {"slim.onnx", data[0]}
    m = onnx.load(str(out_dir / "slim.onnx"), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert ext, "weights were inlined"
    assert {e.value for t in ext for e in t.external_data if e.key == "location"} == {data[0]}
    # Offsets are page-aligned so onnxruntime can map the tensors.
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in ext)
    onnx.checker.check_model(str(out_dir / "slim.onnx"))
    category, problems = fuzz.independent_check(inp, out_dir / "slim.onnx")
    assert category == "written-valid", problems
    # The input folder is untouched.
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    # onnxslim validate agrees.
    code, _, err = fuzz.run_cli_inprocess(["validate", str(inp), str(out_dir / "slim.onnx")])
    assert code == 0, err


def test_overwrite_replaces_data_file(tmp_path: Path) -> None:
    """Writing OUT again with other content leaves exactly one data file: the new one."""
    a = _external_model(tmp_path / "a", fuzz.base_cnn)
    b = _external_model(tmp_path / "b", fuzz.base_mlp)
    out = tmp_path / "out.onnx"
    for src in (a, b):
        code, _, err = fuzz.run_cli_inprocess([str(src), str(out), "--quiet"])
        assert code == 0, err
    data = _data_files(tmp_path, "out.onnx")
    assert len(data) == 1
    category, problems = fuzz.independent_check(b, out)
    assert category == "written-valid", problems


def test_input_data_file_is_never_deleted(tmp_path: Path) -> None:
    """IN refers to data named like OUT's (e.g. a copy of an earlier output): overwriting OUT keeps it."""
    src = _external_model(tmp_path / "src")
    out = tmp_path / "out.onnx"
    code, _, err = fuzz.run_cli_inprocess([str(src), str(out), "--quiet"])
    assert code == 0, err
    (data_name,) = _data_files(tmp_path, "out.onnx")
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(out.read_bytes())  # copy.onnx uses out.onnx.<hash>.data too
    other = _external_model(tmp_path / "other", fuzz.base_mlp)
    code, _, err = fuzz.run_cli_inprocess([str(other), str(out), "--quiet"])
    assert code == 0, err
    assert not (tmp_path / data_name).exists()  # nobody we know of protects it: tidied away
    # Now the protected case: IN is copy.onnx, whose data file is OUT's current one.
    code, _, err = fuzz.run_cli_inprocess([str(src), str(out), "--quiet"])
    assert code == 0, err
    (data_name,) = _data_files(tmp_path, "out.onnx")
    copy.write_bytes(out.read_bytes())
    code, _, err = fuzz.run_cli_inprocess([str(copy), str(out), "--quiet", "--passes", "dce"])
    assert code == 0, err
    assert (tmp_path / data_name).exists()
    code, _, err = fuzz.run_cli_inprocess(["validate", str(src), str(copy)])
    assert code == 0, err


def test_output_onto_input_data_file_is_refused(tmp_path: Path) -> None:
    inp = _external_model(tmp_path)
    data = (tmp_path / "weights.bin").read_bytes()
    code, _, err = fuzz.run_cli_inprocess([str(inp), str(tmp_path / "weights.bin")])
    assert code == 2 and "external data file of the input" in err
    assert (tmp_path / "weights.bin").read_bytes() == data


ESCAPES = {
    # mutation name in tools/fuzz.py -> words the one-line error must contain
    "dotdot": "leaves the model's folder",
    "absolute": "absolute path",
    "symlink-out": "outside",
    "symlink-dir-out": "outside",
    "fifo-outside": "leaves the model's folder",
    "backslash": "leaves the model's folder",
    "nul-location": "NUL",
    "forged-stub": "NUL",
    "fifo-inside": "not a regular file",
    "directory": "not a regular file",
    "missing-file": "missing",
    "offset-past-end": "past the end",
    "length-past-end": "past the end",
    "negative-offset": "past the end",
    "bad-offset": "malformed",
    "no-location": "no data location",
}


class _OpenSpy:
    """Records every path opened (builtins.open, io.open, os.open) while active."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __enter__(self) -> "_OpenSpy":
        self._saved = (builtins.open, io.open, os.open)
        real_open, real_io_open, real_os_open = self._saved
        spy = self

        def b_open(file, *a, **k):
            spy.paths.append(os.fspath(file) if not isinstance(file, int) else f"fd:{file}")
            return real_open(file, *a, **k)

        def o_open(path, *a, **k):
            spy.paths.append(os.fspath(path))
            return real_os_open(path, *a, **k)

        builtins.open, io.open, os.open = b_open, b_open, o_open
        return self

    def __exit__(self, *exc) -> None:
        builtins.open, io.open, os.open = self._saved


@pytest.mark.parametrize("mutation", sorted(ESCAPES))
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "loaded"])
def test_unsafe_locations_refused_before_any_open(mutation: str, lazy: bool, tmp_path: Path) -> None:
    """Each bad location is refused with one line; the loader opens the model file and nothing else.

    The 'outside' folder holds a FIFO: opening it would block this test (it would time out), so
    refusing it in time is itself the proof for the FIFO cases; the spy proves it for the rest.
    """
    import random

    case = tmp_path / "case"
    case.mkdir()
    fuzz._external_case(fuzz.base_cnn(), case, mutation, random.Random(mutation), tmp_path)
    model = case / "model.onnx"
    # The other tensors keep their legitimate location (weights.bin): it must not be opened either.
    with _OpenSpy() as spy:
        with pytest.raises(InputError) as e:
            load_model(model, lazy=lazy)
    msg = str(e.value)
    assert "\n" not in msg and ESCAPES[mutation] in msg, msg
    opened = {p if p.startswith("fd:") else os.path.realpath(p) for p in spy.paths}
    assert opened <= {os.path.realpath(model)}, opened
    # And through the CLI: exit 2, one line, nothing written, input unchanged.
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in case.iterdir() if p.is_file()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = fuzz.run_cli_inprocess([str(model), str(out_dir / "o.onnx")], timeout=20)
    assert code == 2, (code, err)
    assert len(err.strip().splitlines()) == 1 and ESCAPES[mutation] in err
    assert list(out_dir.iterdir()) == []
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in case.iterdir() if p.is_file()} == digest


def test_nested_folder_location_is_fine(tmp_path: Path) -> None:
    import random

    case = tmp_path / "case"
    case.mkdir()
    fuzz._external_case(fuzz.base_mlp(), case, "ok-nested-dir", random.Random(0), tmp_path)
    out = tmp_path / "o.onnx"
    code, _, err = fuzz.run_cli_inprocess([str(case / "model.onnx"), str(out), "--quiet"])
    assert code == 0, err
    category, problems = fuzz.independent_check(case / "model.onnx", out)
    assert category == "written-valid", problems


def test_lazy_values_match_onnx_load(tmp_path: Path) -> None:
    """Weights left on disk read back exactly as onnx.load reads them (embedded and external)."""
    from onnxslim.weights import is_stub, stub_array

    ext = _external_model(tmp_path / "ext")
    emb = tmp_path / "emb.onnx"
    emb.write_bytes(fuzz.base_cnn().SerializeToString())
    for path in (ext, emb):
        ref = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        m = load_model(path, lazy=True)
        stubs = [t for t in m.proto.graph.initializer if is_stub(t)]
        assert stubs
        for t in stubs:
            arr = stub_array(t)
            assert not arr.flags.writeable  # a pass must copy before it changes values
            np.testing.assert_array_equal(arr, ref[t.name])
        m.close()
