"""The CLI a newcomer expects (issue 14): every path and value checked before any work (exit 2, one line,
nothing written, input unchanged), validation that says what it ran on, a table that survives a refused
gate, standard JSON, folder mode, plugins, help and version."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CNN = MODELS / "cnn_bn.onnx"
DIGITS = MODELS / "digits_cnn.onnx"


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxslim.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def strict_loads(text: str):
    def bad(c: str):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def _bad_inputs(d: Path) -> list[tuple[list[str], str]]:
    np.savez(d / "rank.npz", input=np.zeros((3, 16, 16), np.float32))
    np.savez(d / "dtype.npz", input=np.zeros((1, 3, 16, 16), np.bool_))
    np.savez(d / "dims.npz", input=np.zeros((1, 4, 16, 16), np.float32))
    np.save(d / "arr.npy", np.zeros((1, 3, 16, 16), np.float64))
    nan = np.full((20, 3, 16, 16), np.nan, np.float32)
    np.savez(d / "nan.npz", input=nan)
    (d / "notnpz.npz").write_text("hello")
    return [
        (["--inputs", d / "rank.npz"], "has shape [3, 16, 16] (rank 3), the model expects rank 4"),
        (["--inputs", d / "dtype.npz"], "input 'input' is bool, the model expects float32"),
        (["--inputs", d / "dims.npz"], "the model fixes dim 1 to 3"),
        (["--inputs", d / "missing.npz"], "no such file or folder"),
        (["--inputs", d / "notnpz.npz"], "cannot read as .npz"),
        (["--json", d / "nodir" / "r.json"], "does not exist"),
        (["--json", d], "is a folder"),
        (["--passes", "lossless,prune", "--prune-ratio", "0.3", "--calib", d / "nan.npz"], "NaN/Inf value(s)"),
        (["--passes", "lossless", "--prune-ratio", "0.3"], "not in the pipeline"),
        (["--passes", "lossless,prune", "--prune-ratio", "1.5", "--calib", "random"], "--prune-ratio"),
        (["--passes", "lossless,prune", "--prune-target", "flops=2"], "--prune-target 'flops=2'"),
        (["--fold-size-limit", "lots"], "--fold-size-limit 'lots'"),
        (["--val-shape", "input:0,3"], "--val-shape 'input:0,3': dimensions must be positive"),
        (["--val-range", "1,0"], "--val-range '1,0': LOW must be below HIGH"),
        (["--val-shape", "input:2,3,20,20"], "--val-shape input: [2, 3, 20, 20] conflicts with the model's fixed"),
        (["--val-range", "a"], "--val-range 'a': expected LOW,HIGH"),
        (["--plugin", d / "nope.py"], "--plugin"),
    ]


def test_every_bad_value_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    cases = _bad_inputs(tmp_path)
    before = hashlib.sha256(CNN.read_bytes()).hexdigest()
    for extra, expect in cases:
        out = tmp_path / "out.onnx"
        r = cli(CNN, out, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (extra, r.stderr)
        assert expect in lines[0], (extra, lines[0])
        assert not out.exists() and not (tmp_path / "nodir").exists()
    assert hashlib.sha256(CNN.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["rank.npz", "dtype.npz", "dims.npz", "arr.npy", "nan.npz", "notnpz.npz"])


def test_dash_as_out_is_refused_and_json_dash_is_stdout(tmp_path: Path) -> None:
    r = cli(CNN, "-", cwd=tmp_path)
    assert r.returncode == 2 and "cannot be written to standard output" in r.stderr and not list(tmp_path.iterdir())
    r = cli(CNN, tmp_path / "o.onnx", "--json", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = strict_loads(r.stdout)  # stdout carries only the JSON; the table went to stderr
    assert report["written"] and report["after"]["nodes"] < report["before"]["nodes"]
    assert "interface unchanged" in r.stderr and not (tmp_path / "-").exists()


def test_npy_and_onnx_test_data_folders_as_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 16, 16)))  # float64: cast
    r = cli(CNN, tmp_path / "a.onnx", "--inputs", tmp_path / "x.npy", "--json", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    rep = strict_loads((tmp_path / "a.json").read_text())
    assert rep["validation"]["samples"] == 4 and rep["validation"]["data"]["inputs"][0]["shape"] == [4, 3, 16, 16]
    ds = tmp_path / "test_data_set_0"
    ds.mkdir()
    t = onnx.numpy_helper.from_array(np.ones((2, 3, 16, 16), np.float32), "input")
    (ds / "input_0.pb").write_bytes(t.SerializeToString())
    r = cli(CNN, tmp_path / "b.onnx", "--inputs", tmp_path, "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    assert strict_loads((tmp_path / "b.json").read_text())["validation"]["samples"] == 2


def test_validation_says_what_it_ran_on(tmp_path: Path) -> None:
    r = cli(CNN, tmp_path / "o.onnx", "--val-samples", "3", "--val-seed", "7", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    data = strict_loads((tmp_path / "r.json").read_text())["validation"]["data"]
    assert data["source"] == "random" and data["samples"] == 3
    assert data["inputs"][0]["shape"] == [3, 3, 16, 16] and data["inputs"][0]["min"] < 0 < data["inputs"][0]["max"]
    assert "validation inputs: random: input [3, 3, 16, 16] float32 in [" in r.stdout
    r = cli(CNN, tmp_path / "o.onnx", "--val-range", "0,1", "--val-shape", "input:2,3,16,16", "--json",
            tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    data = strict_loads((tmp_path / "r.json").read_text())["validation"]["data"]["inputs"][0]
    assert data["shape"] == [2, 3, 16, 16] and 0 <= data["min"] < data["max"] <= 1
    assert strict_loads((tmp_path / "r.json").read_text())["after"]["io"][0]["shape"] == ["N", 3, 16, 16]


def test_degenerate_outputs_warn(tmp_path: Path) -> None:
    """An output that is all zero on the validation inputs cannot show a wrong rewrite: say so."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["n"]),
                           helper.make_node("Relu", ["n"], ["y"]), helper.make_node("Mul", ["y", "z"], ["out"])],
                          "degenerate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])])
    m = tmp_path / "d.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), m)
    r = cli(m, tmp_path / "o.onnx")
    assert r.returncode == 0, r.stderr
    assert "warning: output 'out' of the original is all zero on the validation inputs" in r.stderr
    assert "warning:" not in r.stdout  # stdout is the table


def test_refused_gate_still_shows_the_candidate(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    r = cli(DIGITS, out, "--passes", "lossless,prune", "--prune-ratio", "0.7", "--round-to", "1",
            "--no-prune-refit", "--calib", MODELS / "digits_calib.npz", "--min-cosine", "0.9999",
            "--no-latency", "--json", tmp_path / "r.json")
    assert r.returncode == 1 and not out.exists()
    assert "result: REFUSED, nothing written" in r.stdout
    rep = strict_loads((tmp_path / "r.json").read_text())
    assert rep["refused"] and rep["after"]["params"] < rep["before"]["params"] and rep["after"]["nodes"] > 0
    assert len(r.stderr.strip().splitlines()) == 1


def test_no_arguments_prints_help_and_succeeds() -> None:
    r = cli()
    assert r.returncode == 0 and "Main job: onnxslim IN.onnx OUT.onnx" in r.stdout


def test_version_names_onnx_and_onnxruntime() -> None:
    r = cli("--version")
    assert r.returncode == 0 and "onnxruntime " in r.stdout and "onnx " in r.stdout


def test_verbose_logs_each_pass(tmp_path: Path) -> None:
    r = cli(CNN, tmp_path / "o.onnx", "-v")
    assert r.returncode == 0
    assert "onnxslim: pass bn-fold round 1: changed" in r.stderr


def test_piped_runs_print_plain_progress_lines(tmp_path: Path) -> None:
    r = cli(CNN, tmp_path / "o.onnx", env={"ONNXSLIM_PROGRESS_INTERVAL": "0"})
    assert r.returncode == 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("onnxslim: [")]
    assert lines and "\r" not in r.stderr and "\x1b" not in r.stderr


def test_folder_mode_survives_a_broken_model(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "cnn.onnx").write_bytes(CNN.read_bytes())
    (src / "sub" / "if.onnx").write_bytes((MODELS / "if_model.onnx").read_bytes())
    (src / "broken.onnx").write_bytes(b"not a model")
    r = cli(src, tmp_path / "out", "--jobs", "2", "--json", tmp_path / "all.json")
    assert r.returncode == 2  # the worst child's exit code
    rows = {m["model"]: m for m in strict_loads((tmp_path / "all.json").read_text())["models"]}
    assert rows["broken.onnx"]["exit_code"] == 2 and "not an ONNX model" in rows["broken.onnx"]["error"]
    assert rows["cnn.onnx"]["exit_code"] == 0 and rows["sub/if.onnx"]["exit_code"] == 0
    assert (tmp_path / "out" / "cnn.onnx").exists() and (tmp_path / "out" / "sub" / "if.onnx").exists()
    assert not (tmp_path / "out" / "broken.onnx").exists()
    assert "2 of 3 model(s) written" in r.stdout


PLUGIN = '''
from dataclasses import dataclass
from onnxslim import Pass, PassResult, register
from onnxslim.options import option

@dataclass(frozen=True)
class DropReluOptions:
    drop_relu_max: int = option(100, "Most Relu nodes to drop.", min=0)

@register
class CountRelu(Pass):
    name, description, lossless = "count-relu", "counts Relu nodes (a plugin)", True
    Options = DropReluOptions

    def run(self, graph, ctx):
        n = sum(1 for node in graph.nodes if node.op == "Relu")
        return PassResult(changed=False, stats={"relu": n, "max": self.options.drop_relu_max})
'''


def test_plugin_passes_and_their_options_join_the_cli(tmp_path: Path) -> None:
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(PLUGIN)
    r = cli("--plugin", plugin, "passes")
    assert r.returncode == 0 and "count-relu" in r.stdout
    r = cli("--plugin", plugin, CNN, tmp_path / "o.onnx", "--passes", "lossless,count-relu", "--drop-relu-max", "7",
            "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rec = [p for p in strict_loads((tmp_path / "r.json").read_text())["passes"] if p["name"] == "count-relu"]
    assert rec and rec[0]["stats"]["max"] == 7
    (tmp_path / "broken.py").write_text("raise RuntimeError('nope')")
    r = cli("--plugin", tmp_path / "broken.py", "passes")
    assert r.returncode == 2 and "failed to load (RuntimeError: nope)" in r.stderr


@pytest.mark.parametrize("cmd", [["validate", CNN, CNN], ["sensitivity", DIGITS, "--calib", MODELS / "digits_calib.npz",
                                                          "--ratios", "0.5", "--no-refit"]])
def test_json_of_other_commands_is_standard(cmd: list, tmp_path: Path) -> None:
    r = cli(*cmd, "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    strict_loads((tmp_path / "r.json").read_text())


def test_validate_uses_the_shape_the_optimized_model_fixed(tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.onnx"
    assert cli(CNN, fixed, "--input-shape", "input:2,3,16,16", "-q").returncode == 0
    r = cli("validate", CNN, fixed, "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    assert strict_loads((tmp_path / "v.json").read_text())["samples"] == 2


def test_sensitivity_counts_macs_at_the_data_size_on_dynamic_models(tmp_path: Path) -> None:
    """MACs per sample of a model with dynamic H/W are those of the calibration data's size."""
    m = onnx.load(DIGITS)
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.ClearField("dim_value")
        d.dim_param = name
    dyn = tmp_path / "dyn.onnx"
    onnx.save(m, dyn)
    res = {}
    for name, path in (("static", DIGITS), ("dynamic", dyn)):
        r = cli("sensitivity", path, "--calib", MODELS / "digits_calib.npz", "--ratios", "0.5", "--no-refit",
                "--calib-size", "32", "--json", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
        res[name] = strict_loads((tmp_path / f"{name}.json").read_text())
        assert "(channels kept after rounding in parentheses)" in r.stdout
    assert res["dynamic"]["macs"] == res["static"]["macs"] > 1_000_000
    r = cli("sensitivity", DIGITS, "--calib", "random", "--ratios", "0.5", "--no-refit", "--calib-size", "16")
    assert r.returncode == 0 and "random calibration data" in r.stderr


def test_progress_estimates_the_time_left_on_counted_work() -> None:
    from onnxslim.report import Progress

    p = Progress(enabled=True, interval=1e9)
    assert p.eta("prune: refit 1/10 layers", 0.0) == ""  # first sighting: no rate yet
    assert p.eta("prune: refit 3/10 layers", 4.0) == " (ETA 14s)"  # 2 layers in 4 s, 7 left
    assert p.eta("distill: step 50/300 loss 0.1", 10.0) == ""
    assert p.eta("distill: step 100/300 loss 0.09", 110.0) == " (ETA 6m40s)"
    assert p.eta("fold (round 2)", 5.0) == ""
