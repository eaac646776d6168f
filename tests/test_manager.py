"""The pass manager itself: fixed point and round limit, errors naming the pass, check-each-pass,
protection of the caller's model, one statistics scope, typed options and their ownership (issue 9)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxslim
from onnxslim import manager
from onnxslim.errors import InputError, PassError
from onnxslim.manager import REGISTRY, Context, Pass, PassManager, PassResult, resolve_options
from onnxslim.options import RunOptions, option
from onnxslim.protowalk import model_stats

MODELS = Path(__file__).resolve().parents[1] / "models"


def relu_chain(n: int = 3) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"r{i}") for i in range(n)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def temp_pass():
    """Register passes for one test and remove them afterwards."""
    added: list[str] = []

    def add(cls: type[Pass]) -> type[Pass]:
        manager.register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        REGISTRY.pop(name, None)


def test_fixed_point_stops_when_nothing_changes(temp_pass) -> None:
    calls = []

    @temp_pass
    class CountDown(Pass):
        name, description, lossless = "t-countdown", "changes twice, then nothing", True

        def run(self, graph, ctx):
            calls.append(1)
            return PassResult(changed=len(calls) <= 2)

    pm = PassManager(["t-countdown"])
    pm.run(relu_chain(), Context())
    assert len(calls) == 3  # two changing rounds and the one that proves the fixed point
    assert not pm.warnings


def test_round_limit_is_reported(temp_pass) -> None:
    @temp_pass
    class Always(Pass):
        name, description, lossless = "t-always", "always claims a change", True

        def run(self, graph, ctx):
            return PassResult(changed=True)

    pm = PassManager(["t-always"], max_rounds=3)
    pm.run(relu_chain(), Context())
    assert [r.round for r in pm.records] == [1, 2, 3]
    assert len(pm.warnings) == 1 and "round 3" in pm.warnings[0] and "t-always" in pm.warnings[0]


def test_a_round_where_only_annotations_changed_is_a_fixed_point(temp_pass) -> None:
    calls = []

    @temp_pass
    class Annotate(Pass):
        name, description, lossless, annotates_only = "t-annotate", "rewrites value_info every time", True, True

        def run(self, graph, ctx):
            calls.append("a")
            return PassResult(changed=True)

    @temp_pass
    class Once(Pass):
        name, description, lossless = "t-once", "changes in the first round only", True

        def run(self, graph, ctx):
            calls.append("o")
            return PassResult(changed=calls.count("o") == 1)

    pm = PassManager(["t-annotate", "t-once"], max_rounds=5)
    pm.run(relu_chain(), Context())
    assert calls == ["a", "o", "a", "o"] and not pm.warnings
    assert manager.load_passes()["shape-inference"].annotates_only


def test_failing_pass_is_named_with_what_ran_before(temp_pass) -> None:
    @temp_pass
    class Boom(Pass):
        name, description, lossless = "t-boom", "raises", False
        level = "model"

        def run(self, model, ctx):
            raise ZeroDivisionError("division by zero")

    with pytest.raises(PassError) as e:
        PassManager(["dce", "t-boom"]).run(relu_chain(), Context())
    msg = str(e.value)
    assert "pass 't-boom' failed (ZeroDivisionError: division by zero)" in msg and "dce" in msg


def test_model_pass_never_edits_the_callers_model(temp_pass) -> None:
    @temp_pass
    class EditInPlace(Pass):
        name, description, lossless = "t-edit", "edits the proto it receives", True
        level = "model"

        def run(self, model, ctx):
            model.graph.node[0].op_type = "Sigmoid"  # a lossless pass that lies
            return PassResult(changed=True)

    original = relu_chain()
    before = original.SerializeToString()
    out = PassManager(["t-edit"], max_rounds=1).run(original, Context())
    assert original.SerializeToString() == before
    assert out.graph.node[0].op_type == "Sigmoid"


def test_check_each_pass_catches_a_pass_that_edits_in_place(temp_pass, tmp_path: Path) -> None:
    @temp_pass
    class EditInPlace(Pass):
        name, description, lossless = "t-edit2", "edits the proto it receives", True
        level = "model"

        def run(self, model, ctx):
            model.graph.node[0].op_type = "Sigmoid"
            return PassResult(changed=True)

    original = relu_chain()
    before = original.SerializeToString()
    with pytest.raises(PassError, match="pass 't-edit2' changed the outputs"):
        onnxslim.optimize(original, tmp_path / "o.onnx", passes="t-edit2", check_each_pass=True)
    assert original.SerializeToString() == before  # the API's caller keeps an untouched model
    assert not (tmp_path / "o.onnx").exists()


def test_stats_have_one_scope_across_representations() -> None:
    """A pass that changes nothing shows the same counts before and after, graph or proto."""
    m = onnx.load(MODELS / "if_model.onnx")
    m, _ = onnxslim.optimize(m, None, passes="lossless", validate=False)
    pm = PassManager(["dce", "shape-inference", "cse"], max_rounds=1)
    pm.run(m, Context())
    for rec in pm.records:
        if not rec.changed:
            assert rec.before == rec.after, rec
    g = onnxslim.graph.to_gs(m)
    assert manager.graph_stats(g) == model_stats(m)


@dataclass(frozen=True)
class _Opts:
    t_level: int = option(3, "A level.", min=1, max=5)
    t_mode: str = option("a", "A mode.", choices=("a", "b"))
    t_flag: bool = option(False, "A flag.")


def test_options_are_typed_checked_and_owned(temp_pass) -> None:
    @temp_pass
    class WithOptions(Pass):
        name, description, lossless = "t-opts", "declares options", True
        Options = _Opts

        def run(self, graph, ctx):
            seen.append(self.options)
            return PassResult(changed=False)

    seen: list = []
    run, per_pass = resolve_options(["t-opts"], {"t_level": "4", "t_flag": "yes"})
    assert per_pass["t-opts"] == _Opts(t_level=4, t_mode="a", t_flag=True)
    PassManager(["t-opts"], options=per_pass).run(relu_chain(), Context(run=run))
    assert seen == [_Opts(t_level=4, t_mode="a", t_flag=True)]
    assert PassManager(["t-opts"]).passes[0].options == _Opts()  # defaults when nothing is given
    for values, message in (({"t_level": 9}, "--t-level 9: must be <= 5"),
                            ({"t_level": "x"}, "--t-level 'x': expected a number"),
                            ({"t_mode": "c"}, "--t-mode 'c': expected one of a, b"),
                            ({"t_levle": 2}, "unknown option 't_levle' (did you mean 't_level'?)"),
                            ({"prune_ratio": 0.3}, "--prune-ratio is an option of pass 'prune', which is not in"),
                            ({"calib": "x.npz"}, "--calib is for lossy passes")):
        with pytest.raises(InputError, match=re.escape(message)):
            resolve_options(["t-opts"], values)


def test_run_options_defaults_are_declared_once() -> None:
    run, _ = resolve_options(["prune"], {})
    assert run == RunOptions() and run.min_cosine == 0.99 and run.max_acc_drop == 1.0
    from onnxslim.quantization import gate_from_options

    gate = gate_from_options(run)
    assert (gate.min_cosine, gate.max_acc_drop, gate.min_speedup) == (run.min_cosine, run.max_acc_drop, 1.0)


def test_api_rejects_misspelt_and_orphan_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown option 'prune_ration'"):
        onnxslim.optimize(MODELS / "cnn_bn.onnx", tmp_path / "o.onnx", passes="lossless,prune",
                          options={"prune_ration": 0.3})
    with pytest.raises(InputError, match="not in the pipeline"):
        onnxslim.optimize(MODELS / "cnn_bn.onnx", tmp_path / "o.onnx", passes="lossless",
                          options={"prune_ratio": 0.3})
    assert not (tmp_path / "o.onnx").exists()


def test_cli_options_are_generated_from_the_declarations() -> None:
    """Every declared option is a CLI flag of `optimize`, in its pass's help section."""
    from onnxslim import options as opts
    from onnxslim.cli import cli
    from onnxslim.manager import load_passes

    import click

    cmd = cli.commands["optimize"]
    flags = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
    for cls in [RunOptions] + [c.Options for c in load_passes().values() if c.Options is not None]:
        for f in opts.fields_of(cls):
            assert opts.cli_flag(f).split("/")[0] in flags, f.name
    out = subprocess.run([sys.executable, "-m", "onnxslim.cli", "optimize", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "Pass prune:" in out and "Pass quantize-static / quantize-dynamic:" in out
    assert "--prune-ratio X" in out and "[range: 0..0.95]" in out


def test_cli_orphan_option_exits_2_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxslim.cli", str(MODELS / "cnn_bn.onnx"), str(out),
                        "--passes", "lossless", "--prune-ratio", "0.3"], capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().count("\n") == 0 and "--prune-ratio is an option of pass 'prune'" in r.stderr


def test_no_module_of_the_core_imports_the_manager_or_the_api() -> None:
    """Engines return outcomes; only passes/, api and cli know the manager (and only cli the api)."""
    import ast

    core = Path(onnxslim.__file__).parent
    bad = []
    for path in core.rglob("*.py"):
        rel = path.relative_to(core).as_posix()
        if rel in ("api.py", "cli.py", "__init__.py", "manager.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{rel}: {m}" for m in mods if m in ("onnxslim.manager", "onnxslim.api")]
    assert bad == []


def test_no_pass_imports_the_api() -> None:
    passes = Path(onnxslim.__file__).parent.parent / "passes"
    assert not [p.name for p in passes.glob("*.py") if "onnxslim.api" in p.read_text()]


def test_protowalk_and_weights_have_no_import_cycle() -> None:
    """protowalk imports nothing from onnxslim; weights imports only protowalk."""
    core = Path(onnxslim.__file__).parent
    assert not [ln for ln in (core / "protowalk.py").read_text().splitlines()
                if ln.startswith(("from onnxslim", "import onnxslim"))]
    imports = [ln for ln in (core / "weights.py").read_text().splitlines() if "from onnxslim" in ln]
    assert imports == ["from onnxslim.protowalk import iter_tensors"]
    code = "import onnxslim.weights, onnxslim.model; print('ok')"  # either order, fresh interpreter
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    code = "import onnxslim.model, onnxslim.weights; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_latency_convention_is_one_number(tmp_path: Path) -> None:
    """The times and the ratio printed together agree (after = before x ratio)."""
    from onnxslim.runtime import latency_table, speed_gate
    from onnxslim.validate import latency_feeds

    m = onnx.load(MODELS / "digits_cnn.onnx")
    table = latency_table(m, m, latency_feeds(m, batches=(1, 4)), seconds=0.2)
    for row in table.values():
        assert row["after_ms"] == pytest.approx(row["before_ms"] * row["ratio"], rel=1e-3)
    assert speed_gate("x", {"batch1": {"ratio": 0.5}}, 1.0) is None
    msg = speed_gate("x", {"batch1": {"ratio": 2.0}, "batch64": {"ratio": 2.0}}, 1.0)
    assert msg is not None and "latency 2.00x" in msg and "batch 1 and 64" in msg


def test_generated_integer_inputs_stay_inside_their_tables() -> None:
    """A token-type id indexes a 2-row table: generated data must be valid data (issue 10)."""
    from onnxslim.validate import index_bounds, make_inputs

    table = helper.make_tensor("tt", TensorProto.FLOAT, [2, 4], np.ones(8, np.float32).tolist())
    nodes = [helper.make_node("Cast", ["token_type_ids"], ["c"], to=TensorProto.INT64),
             helper.make_node("Gather", ["tt", "c"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["y"])]
    g = helper.make_graph(nodes, "bert-ish", [
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table, helper.make_tensor("ax", TensorProto.INT64, [1], [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert index_bounds(m) == {"token_type_ids": 2, "attention_mask": 2}
    for seed in range(5):
        feeds = make_inputs(m, {"token_type_ids": [4, 16], "attention_mask": [4, 16]}, seed=seed)
        assert feeds["token_type_ids"].max() <= 1 and set(np.unique(feeds["attention_mask"])) <= {0, 1}
    model, report = onnxslim.optimize(m, None, passes="lossless", input_shapes={"token_type_ids": [2, 8],
                                                                                "attention_mask": [2, 8]})
    assert report.validation["passed"] and not report.validation.get("skipped")
