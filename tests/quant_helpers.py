"""Small models and helpers shared by the quantization tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def accuracy(model, npz: Path) -> float:
    d = np.load(npz)
    out = run(model, {"input": d["input"]})[0]
    return float((out.argmax(1) == d["labels"]).mean() * 100)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def outlier_block(d: int = 32, t: int = 8, outlier: float = 300.0, seed: int = 0) -> onnx.ModelProto:
    """An FFN with a residual stream that carries one huge channel (as real transformers do).

    ``res_o`` has values near 1 plus one channel at ``outlier``; the projection after it ignores that
    channel. One INT8 scale for ``res_o`` drowns every other channel in rounding noise: static per-tensor
    quantization destroys the output unless the nodes around ``res_o`` stay in float."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def c(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    spike = np.zeros(d, np.float32)
    spike[3] = outlier
    w3 = rng.standard_normal((d, d)) / np.sqrt(d)
    w3[3] = 0
    nodes = [
        helper.make_node("MatMul", ["x", c("w1", rng.standard_normal((d, 2 * d)) / np.sqrt(d))], ["h1"], name="ffn_up"),
        helper.make_node("Relu", ["h1"], ["h1r"], name="ffn_act"),
        helper.make_node("MatMul", ["h1r", c("w2", rng.standard_normal((2 * d, d)) / np.sqrt(2 * d))], ["h2"],
                         name="ffn_down"),
        helper.make_node("Add", ["x", "h2"], ["res"], name="residual"),
        helper.make_node("Add", ["res", c("spike", spike)], ["res_o"], name="outlier_add"),
        helper.make_node("MatMul", ["res_o", c("w3", w3)], ["y"], name="proj"),
    ]
    g = helper.make_graph(nodes, "outlier_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", t, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", t, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def quant_details(report) -> dict:
    return report.extra["quantize"]
