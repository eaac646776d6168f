"""Bad input gets exit 2, exactly one line on stderr naming the problem, no traceback, no output
file (nor temporary litter), and the input bytes unchanged (issue 3, section 2)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402  (tools/fuzz.py: base models and the in-process CLI runner)


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(folder))] = "special"
    return out


def _valid(path: Path) -> Path:
    path.write_bytes(fuzz.base_mlp().SerializeToString())
    return path


def _case_missing(d: Path) -> tuple[str, str]:
    return str(d / "nope.onnx"), "no such file"


def _case_directory(d: Path) -> tuple[str, str]:
    (d / "adir.onnx").mkdir()
    return str(d / "adir.onnx"), "is a directory"


def _case_empty(d: Path) -> tuple[str, str]:
    (d / "empty.onnx").write_bytes(b"")
    return str(d / "empty.onnx"), "is empty"


def _case_random(d: Path) -> tuple[str, str]:
    (d / "random.onnx").write_bytes(bytes((i * 7919 + 13) % 256 for i in range(5000)))
    return str(d / "random.onnx"), "not an ONNX model"


def _case_truncated(d: Path) -> tuple[str, str]:
    data = fuzz.base_cnn().SerializeToString()
    (d / "trunc.onnx").write_bytes(data[: len(data) // 2])
    return str(d / "trunc.onnx"), "not an ONNX model"


def _case_text(d: Path) -> tuple[str, str]:
    (d / "text.onnx").write_text("graph {\n  node { op_type: 'Relu' }\n}\n")
    return str(d / "text.onnx"), "not an ONNX model"


def _case_checker(d: Path) -> tuple[str, str]:
    m = fuzz.base_mlp()
    m.graph.node[0].input[0] = "undefined_tensor"
    (d / "bad.onnx").write_bytes(m.SerializeToString())
    return str(d / "bad.onnx"), "fails onnx.checker"


def _case_opset(d: Path) -> tuple[str, str]:
    m = fuzz.base_mlp()
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    (d / "new.onnx").write_bytes(m.SerializeToString())
    return str(d / "new.onnx"), "newer than the installed onnx supports"


def _case_ir(d: Path) -> tuple[str, str]:
    m = fuzz.base_mlp()
    m.ir_version = onnx.IR_VERSION + 1
    (d / "ir.onnx").write_bytes(m.SerializeToString())
    return str(d / "ir.onnx"), "IR version"


def _case_fifo(d: Path) -> tuple[str, str]:
    os.mkfifo(d / "pipe.onnx")  # reading it would block forever
    return str(d / "pipe.onnx"), "not a regular file"


def _case_no_outputs(d: Path) -> tuple[str, str]:
    m = fuzz.base_mlp()
    del m.graph.output[:]
    (d / "noout.onnx").write_bytes(m.SerializeToString())
    return str(d / "noout.onnx"), "no graph outputs"


def _case_size_mismatch(d: Path) -> tuple[str, str]:
    m = fuzz.base_mlp()
    w = next(t for t in m.graph.initializer if t.name == "W1")  # large: left on disk, hidden from the checker
    w.raw_data = w.raw_data[:-4]
    (d / "short.onnx").write_bytes(m.SerializeToString())
    return str(d / "short.onnx"), "bytes of data"


BAD_INPUTS = {
    "missing": _case_missing, "directory": _case_directory, "empty": _case_empty, "random-bytes": _case_random,
    "truncated": _case_truncated, "text": _case_text, "checker": _case_checker, "opset-too-new": _case_opset,
    "ir-too-new": _case_ir, "fifo": _case_fifo, "no-outputs": _case_no_outputs, "size-mismatch": _case_size_mismatch,
}


def _assert_one_line(code, stderr: str, expect: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxslim: error: "), lines[0]
    assert expect in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case: str, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    inp, expect = BAD_INPUTS[case](src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = _digest(src)
    code, _, err = fuzz.run_cli_inprocess([inp, str(outdir / "o.onnx")])
    _assert_one_line(code, err, expect)
    assert list(outdir.iterdir()) == []  # no output, no temporary files
    assert _digest(src) == before


def _case_out_missing_dir(d: Path, inp: Path) -> tuple[str, str]:
    return str(d / "no" / "such" / "dir" / "o.onnx"), "does not exist"


def _case_out_same(d: Path, inp: Path) -> tuple[str, str]:
    return str(inp), "is the input file"


def _case_out_symlink(d: Path, inp: Path) -> tuple[str, str]:
    os.symlink(inp, d / "link.onnx")
    return str(d / "link.onnx"), "is the input file"


def _case_out_hardlink(d: Path, inp: Path) -> tuple[str, str]:
    os.link(inp, d / "hard.onnx")
    return str(d / "hard.onnx"), "is the input file"


def _case_out_relative_same(d: Path, inp: Path) -> tuple[str, str]:
    return str(d / "." / "sub" / ".." / inp.name), "is the input file"


def _case_out_is_dir(d: Path, inp: Path) -> tuple[str, str]:
    (d / "outdir").mkdir()
    return str(d / "outdir"), "is a directory"


def _case_out_not_writable(d: Path, inp: Path) -> tuple[str, str]:
    if os.geteuid() == 0:  # root writes into mode-0555 folders; /proc refuses everyone
        return "/proc/onnxslim-test.onnx", "cannot write"
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro / "o.onnx"), "not writable"


BAD_OUTPUTS = {
    "missing-dir": _case_out_missing_dir, "same-file": _case_out_same, "symlink-to-input": _case_out_symlink,
    "hardlink-to-input": _case_out_hardlink, "same-file-other-spelling": _case_out_relative_same,
    "directory": _case_out_is_dir, "not-writable": _case_out_not_writable,
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_bad_output(case: str, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    inp = _valid(tmp_path / "model.onnx")
    out, expect = BAD_OUTPUTS[case](tmp_path, inp)
    before = _digest(tmp_path)
    code, _, err = fuzz.run_cli_inprocess([str(inp), out])
    _assert_one_line(code, err, expect)
    assert _digest(tmp_path) == before  # nothing written anywhere, input unchanged
    if case == "not-writable" and out.startswith("/proc"):
        assert not Path(out).exists()


def test_unknown_option_and_pass_are_one_line(tmp_path: Path) -> None:
    inp = _valid(tmp_path / "m.onnx")
    for argv, expect in (([str(inp), str(tmp_path / "o.onnx"), "--passes", "nosuchpass"], "unknown pass"),
                         ([str(inp), str(tmp_path / "o.onnx"), "--input-shape", "x:a,b"], "--input-shape"),
                         ([str(inp), str(tmp_path / "o.onnx"), "--no-such-option"], "no-such-option")):
        code, _, err = fuzz.run_cli_inprocess(argv)
        _assert_one_line(code, err, expect)
        assert not (tmp_path / "o.onnx").exists()


def _onnxslim() -> list[str]:
    exe = Path(sys.executable).with_name("onnxslim")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "onnxslim.cli"]


def test_console_script_one_line_and_debug_traceback(tmp_path: Path) -> None:
    """The real entry point: nothing but the one line (no C++ or warnings output); --debug adds the traceback."""
    bad = tmp_path / "trunc.onnx"
    data = fuzz.base_cnn().SerializeToString()
    bad.write_bytes(data[:100])
    p = subprocess.run([*_onnxslim(), str(bad), str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120)
    _assert_one_line(p.returncode, p.stderr, "not an ONNX model")
    assert p.stdout == ""
    p = subprocess.run([*_onnxslim(), str(bad), str(tmp_path / "o.onnx"), "--debug"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert "Traceback" in p.stderr and p.stderr.strip().splitlines()[-1].startswith("onnxslim: error: ")
    assert not (tmp_path / "o.onnx").exists()


def test_valid_model_still_works(tmp_path: Path) -> None:
    """The guard rails do not refuse a good model (and the good path leaves no temporary files)."""
    inp = _valid(tmp_path / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = fuzz.run_cli_inprocess([str(inp), str(out_dir / "o.onnx"), "--quiet"])
    assert code == 0, err
    assert [p.name for p in out_dir.iterdir()] == ["o.onnx"]
    category, problems = fuzz.independent_check(inp, out_dir / "o.onnx")
    assert category == "written-valid", problems


def test_custom_op_library_loaded_only_when_named(tmp_path: Path, monkeypatch) -> None:
    """Besides onnxruntime-extensions' own library, the only library loaded is --custom-op-library's,
    by absolute path; nothing in the model (custom domains, metadata naming a library) loads one."""
    import onnxruntime as ort

    from onnxslim.runtime import _extensions_library

    m = fuzz.base_shape()  # has a com.microsoft op
    m.metadata_props.add(key="custom_op_library", value=str(tmp_path / "evil.so"))
    m.doc_string = "load ./evil.so"
    (tmp_path / "evil.so").write_bytes(b"not a library")
    inp = tmp_path / "m.onnx"
    inp.write_bytes(m.SerializeToString())
    loaded: list[str] = []
    real = ort.SessionOptions.register_custom_ops_library

    def spy(self, path):
        loaded.append(path)
        return real(self, path)

    monkeypatch.setattr(ort.SessionOptions, "register_custom_ops_library", spy)
    code, _, err = fuzz.run_cli_inprocess([str(inp), str(tmp_path / "o.onnx"), "--quiet"])
    assert code == 0, err
    assert set(loaded) == {_extensions_library()}
    # Named by the user with a relative path: registered by its absolute path (a bare name would make
    # the loader search system folders instead).
    lib = tmp_path / "mine.so"
    lib.write_bytes(Path(_extensions_library()).read_bytes())
    loaded.clear()
    monkeypatch.chdir(tmp_path)
    code, _, err = fuzz.run_cli_inprocess(["m.onnx", "o2.onnx", "--quiet", "--custom-op-library", "mine.so"])
    assert code == 0, err
    assert set(loaded) == {_extensions_library(), str(lib)}


@pytest.mark.parametrize("lib", ["missing.so", "junk.so"])
def test_bad_custom_op_library_is_one_line(lib: str, tmp_path: Path) -> None:
    inp = _valid(tmp_path / "m.onnx")
    (tmp_path / "junk.so").write_bytes(b"\x7fELF junk")
    code, _, err = fuzz.run_cli_inprocess([str(inp), str(tmp_path / "o.onnx"), "--custom-op-library",
                                           str(tmp_path / lib)])
    _assert_one_line(code, err, "--custom-op-library")
    assert not (tmp_path / "o.onnx").exists()
