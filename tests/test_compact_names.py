"""compact-names: internal names shortened, interface and outputs unchanged, subgraph captures followed."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim.protowalk import iter_graphs, iter_nodes
from onnxslim.passes.compact_names import compact_names

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def run(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def captured_if() -> onnx.ModelProto:
    """An If whose branches read outer-scope tensors (one of them an initializer) by name."""
    then_b = h.make_graph([h.make_node("Mul", ["long_outer_activation_name", "outer_weight_scale"], ["then_out"])],
                          "then", [], [h.make_tensor_value_info("then_out", T.FLOAT, None)])
    else_b = h.make_graph([h.make_node("Neg", ["long_outer_activation_name"], ["else_out"])],
                          "else", [], [h.make_tensor_value_info("else_out", T.FLOAT, None)])
    nodes = [h.make_node("Add", ["x", "outer_weight_scale"], ["long_outer_activation_name"], name="first_add_node"),
             h.make_node("ReduceSum", ["x"], ["sum_of_x"], keepdims=0),
             h.make_node("Greater", ["sum_of_x", "zero_threshold"], ["condition_value"]),
             h.make_node("If", ["condition_value"], ["y"], then_branch=then_b, else_branch=else_b, name="the_if")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4])],
                     [nh.from_array(np.array([1.5, -2, 3, 0.5], np.float32), "outer_weight_scale"),
                      nh.from_array(np.array(0, np.float32), "zero_threshold")],
                     value_info=[h.make_tensor_value_info("long_outer_activation_name", T.FLOAT, [4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_outputs_interface_and_captures_survive_renaming():
    m = captured_if()
    out = copy.deepcopy(m)
    assert compact_names(out) > 0
    onnx.checker.check_model(out)
    assert [v.name for v in out.graph.input] == ["x"] and [v.name for v in out.graph.output] == ["y"]
    for x in (np.array([1, 2, 3, 4], np.float32), np.array([-5, 1, 1, 1], np.float32)):  # both branches
        np.testing.assert_array_equal(run(m, {"x": x})[0], run(out, {"x": x})[0])
    internal = [t.name for t in out.graph.initializer] + [o for n in iter_nodes(out.graph) for o in n.output
                                                          if o != "y"]
    assert internal and all(len(n) <= 2 for n in internal)
    assert all(len(n.name) <= 2 for n in iter_nodes(out.graph))
    assert {v.name for v in out.graph.value_info} <= set(internal)  # value_info followed its tensor
    assert out.ByteSize() < m.ByteSize()


def test_second_run_renames_nothing_and_names_stay_unique():
    out = copy.deepcopy(onnx.load(MODELS / "loop_model.onnx"))
    compact_names(out)
    again = copy.deepcopy(out)
    assert compact_names(again) == 0 and again == out
    outputs = [o for g in iter_graphs(out.graph) for n in g.node for o in n.output if o]
    assert len(outputs) == len(set(outputs))


def test_fresh_names_never_take_an_interface_name():
    """A graph input literally named '0' keeps it, and no internal tensor is renamed to it."""
    nodes = [h.make_node("Relu", ["0"], ["a_long_intermediate"]), h.make_node("Neg", ["a_long_intermediate"], ["1"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("0", T.FLOAT, [3])], [h.make_tensor_value_info("1", T.FLOAT, [3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    out = copy.deepcopy(m)
    compact_names(out)
    onnx.checker.check_model(out)
    assert out.graph.node[0].output[0] not in ("0", "1")
    x = np.array([-1, 0, 2], np.float32)
    np.testing.assert_array_equal(run(m, {"0": x})[0], run(out, {"0": x})[0])


def test_objective_size_appends_the_pass_and_the_file_shrinks(tmp_path):
    src = MODELS / "digits_mlp.onnx"
    outs = {}
    for objective in ("speed", "size"):
        out = tmp_path / f"{objective}.onnx"
        r = subprocess.run([sys.executable, "-m", "onnxslim.cli", str(src), str(out), "--passes", "quantize-dynamic",
                            "--objective", objective, "--force", "--no-latency"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs[objective] = onnx.load(out)
    assert all(len(n.name) <= 2 for n in outs["size"].graph.node)
    assert not all(len(n.name) <= 2 for n in outs["speed"].graph.node)
    assert outs["size"].ByteSize() < outs["speed"].ByteSize()
    feeds = {"input": np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(outs["speed"], feeds)[0], run(outs["size"], feeds)[0])
