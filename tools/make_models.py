"""Small deterministic ONNX models for the demo, the tests and the benchmarks (numpy + onnx.helper only).

  cnn_bn.onnx             the README demo: Conv+BN+Relu, residual Add, Concat, Identity/Dropout, a dead branch,
                          an unused initializer, a same-type Cast, a constant shape subgraph before Gemm
  transformer_block.onnx  attention + MLP block with LayerNorm, Softmax, Erf-gelu, residual Adds, dynamic dims
  if_model.onnx           an If whose branches read outer-scope values and hold foldable and dead nodes
  loop_model.onnx         a Loop whose body reads an outer-scope weight and holds a nested If
  custom_op.onnx          an onnxruntime-extensions op (ai.onnx.contrib Inverse) among standard ops

Also runs tools/make_structure_models.py (pruning structures). With ``--big DIR --big-mb N`` it writes
DIR/big.onnx, a deep MatMul stack of about N MB with external data, streamed to disk tensor by tensor so that a
2.5 GB model never sits in memory twice.

Run: python tools/make_models.py [--out models/]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
F = TensorProto.FLOAT


class Builder:
    """Unique names, initializers from numpy, one node per call. (Kept here rather than shared with
    make_structure_models.py: a change there must not silently change these committed models.)"""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count: dict[str, int] = {}

    def uid(self, base: str) -> str:
        self.count[base] = self.count.get(base, 0) + 1
        return f"{base}_{self.count[base]}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.uid(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self.uid(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def cbr(self, x: str, cin: int, cout: int, k: int = 3, act: str = "relu") -> str:
        """Conv + BatchNormalization (+ Relu), He-scaled weights and sane BN statistics."""
        r = self.rng
        w = (r.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        y = self.op("Conv", [x, self.const("w", w)], kernel_shape=[k, k], pads=[k // 2] * 4)
        stats = [r.uniform(0.5, 1.5, cout), r.standard_normal(cout) * 0.1, r.standard_normal(cout) * 0.1,
                 r.uniform(0.5, 1.5, cout)]
        y = self.op("BatchNormalization", [y] + [self.const(n, v.astype(np.float32)) for n, v in
                                                 zip(("gamma", "beta", "mean", "var"), stats)], epsilon=1e-5)
        return self.relu(y) if act == "relu" else y

    def dense_weight(self, cin: int, cout: int) -> np.ndarray:
        return (self.rng.standard_normal((cin, cout)) * np.sqrt(2.0 / cin)).astype(np.float32)

    def rename_output(self, tensor: str, new: str) -> str:
        for n in self.nodes:
            n.output[:] = [new if o == tensor else o for o in n.output]
            n.input[:] = [new if i == tensor else i for i in n.input]
        return new

    def model(self, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]], opset: int = 13) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, self.name,
                              [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, F, s) for n, s in outputs], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _finish(m: onnx.ModelProto, producer: str = "onnxslim tools/make_models.py") -> onnx.ModelProto:
    m.producer_name = producer
    m.ir_version = 8
    m.metadata_props.add(key="made_by", value="tools/make_models.py")
    onnx.checker.check_model(m, full_check=True)
    return m


def cnn_bn() -> onnx.ModelProto:
    b = Builder("cnn_bn", seed=1)
    x = b.cbr("input", 3, 16)
    x = b.op("Identity", [x])
    r = b.cbr(b.cbr(x, 16, 16), 16, 16, act="none")
    x = b.relu(b.op("Add", [x, r]))                      # residual
    x = b.op("Dropout", [x])                             # inference: identity
    side = b.cbr(x, 16, 8, k=1)
    x = b.op("Concat", [x, side], axis=1)                # 24 channels
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Cast", [x], to=F)                          # same-type cast
    b.op("Conv", [x, b.const("dead_w", np.ones((4, 24, 1, 1), np.float32))])  # dead branch
    b.const("unused", np.zeros(128, np.float32))         # unused initializer
    # Flatten through a shape subgraph, Shape->Gather->ReduceProd->Concat->Reshape: [N, C*H*W], with C*H*W
    # static (foldable) and N dynamic.
    shp = b.op("Shape", [x])
    chw = b.op("Gather", [shp, b.const("chw_idx", np.array([1, 2, 3], np.int64))], axis=0)
    prod = b.op("ReduceProd", [chw], keepdims=1)
    target = b.op("Concat", [b.const("neg1", np.array([-1], np.int64)), prod], axis=0)
    flat = b.op("Reshape", [x, target])
    w = b.rng.standard_normal((10, 24 * 8 * 8)).astype(np.float32) * 0.02
    scale = b.op("Sqrt", [b.const("four", np.array([4.0], np.float32))])   # constant arithmetic
    logits = b.op("Gemm", [flat, b.const("fc_w", w), b.const("fc_b", np.zeros(10, np.float32))], transB=1)
    b.rename_output(b.op("Div", [logits, scale]), "logits")
    return _finish(b.model([("input", ["N", 3, 16, 16])], [("logits", ["N", 10])]))


def transformer_block(d: int = 64, heads: int = 4, ffn: int = 128) -> onnx.ModelProto:
    b = Builder("transformer_block", seed=2)
    hd = d // heads

    def ln(x: str) -> str:
        return b.op("LayerNormalization", [x, b.const("ln_g", np.ones(d, np.float32)),
                                           b.const("ln_b", np.zeros(d, np.float32))], axis=-1)

    def dense(x: str, cin: int, cout: int) -> str:
        y = b.op("MatMul", [x, b.const("w", b.dense_weight(cin, cout) * 0.5)])
        return b.op("Add", [y, b.const("b", (b.rng.standard_normal(cout) * 0.02).astype(np.float32))])

    def heads_of(x: str) -> str:
        r = b.op("Reshape", [x, b.const("shape_bshd", np.array([0, 0, heads, hd], np.int64))])
        return b.op("Transpose", [r], perm=[0, 2, 1, 3])

    x = "input"
    h = ln(x)
    q, k, v = (heads_of(dense(h, d, d)) for _ in range(3))
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    scale = b.op("Sqrt", [b.const("hd", np.array(float(hd), np.float32))])   # foldable
    att = b.op("Softmax", [b.op("Div", [b.op("MatMul", [q, kt]), scale])], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.const("shape_bsd", np.array([0, 0, d], np.int64))])
    x = b.op("Add", [x, dense(ctx, d, d)])
    h = dense(ln(x), d, ffn)
    sqrt2 = b.op("Sqrt", [b.const("two", np.array(2.0, np.float32))])        # foldable
    erf = b.op("Erf", [b.op("Div", [h, sqrt2])])
    gelu = b.op("Mul", [b.op("Mul", [h, b.op("Add", [erf, b.const("one", np.array(1.0, np.float32))])]),
                        b.const("half", np.array(0.5, np.float32))])
    b.rename_output(b.op("Add", [x, dense(gelu, ffn, d)]), "output")
    return _finish(b.model([("input", ["batch", "seq", d])], [("output", ["batch", "seq", d])], opset=17))


def if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    c1 = numpy_helper.from_array(np.array([1.5], np.float32), "c1")
    c2 = numpy_helper.from_array(np.array([0.5], np.float32), "c2")
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t0"]),            # outer-scope x and W
         helper.make_node("Identity", ["t0"], ["t1"]),
         helper.make_node("Relu", ["x"], ["t_dead"]),               # dead inside the branch
         helper.make_node("Add", ["c1", "c2"], ["t_c"]),            # outer-scope constants: foldable
         helper.make_node("Mul", ["t1", "t_c"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", F, ["N", 8])])
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e0"]), helper.make_node("Dropout", ["e0"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", F, ["N", 8])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", F, ["N", 8])],
                          [helper.make_tensor_value_info("y", F, ["N", 8])],
                          [w, c1, c2, numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return _finish(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def loop_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "W")
    inner_then = helper.make_graph([helper.make_node("Relu", ["acc_next0"], ["it_out"])], "it", [],
                                   [helper.make_tensor_value_info("it_out", F, None)])
    inner_else = helper.make_graph([helper.make_node("Identity", ["acc_next0"], ["ie_out"])], "ie", [],
                                   [helper.make_tensor_value_info("ie_out", F, None)])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "W"], ["mm"]),                  # outer-scope W
         helper.make_node("Add", ["mm", "x"], ["acc_next0"]),                   # outer-scope x
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["i"], ["i_f"], to=F),
         helper.make_node("Greater", ["i_f", "half"], ["odd"]),
         helper.make_node("If", ["odd"], ["acc_out"], then_branch=inner_then, else_branch=inner_else)],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, ["N", 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, ["N", 8])])
    nodes = [helper.make_node("Loop", ["trip", "cond0", "x"], ["y"], body=body)]
    g = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", F, ["N", 8])],
                          [helper.make_tensor_value_info("y", F, ["N", 8])],
                          [w, numpy_helper.from_array(np.array(3, np.int64), "trip"),
                           numpy_helper.from_array(np.array(True), "cond0"),
                           numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    return _finish(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def custom_op() -> onnx.ModelProto:
    eye = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2.0, "eye2")
    one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
    nodes = [
        helper.make_node("Add", ["one", "one"], ["two"]),                          # foldable
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "eye2"], ["m"]),                            # well conditioned
        helper.make_node("Identity", ["m"], ["m_id"]),
        helper.make_node("Inverse", ["m_id"], ["inv"], domain="ai.onnx.contrib"),  # custom op
        helper.make_node("Relu", ["x"], ["dead"]),                                 # dead
        helper.make_node("MatMul", ["inv", "x"], ["y"]),
    ]
    g = helper.make_graph(nodes, "custom_op", [helper.make_tensor_value_info("x", F, [4, 4])],
                          [helper.make_tensor_value_info("y", F, [4, 4])], [eye, one])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    m.producer_name = "onnxslim tools/make_models.py"
    m.ir_version = 8
    onnx.checker.check_model(m)  # full_check would need the custom op's schema
    return m


MODELS = {"cnn_bn": cnn_bn, "transformer_block": transformer_block, "if_model": if_model,
          "loop_model": loop_model, "custom_op": custom_op}


def make_big(out_dir: Path, size_mb: int, width: int = 2048) -> Path:
    """A MatMul stack of ~size_mb MB with external data, streamed so memory stays ~one layer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layer_bytes = width * width * 4
    layers = max(1, int(size_mb * 2**20 // layer_bytes))
    data_name = "big.onnx.data"
    rng = np.random.default_rng(5)
    inits, nodes = [], []
    x = "input"
    offset = 0
    with open(out_dir / data_name, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) * (1.0 / np.sqrt(width))).astype(np.float32)
            raw = w.tobytes()
            f.write(raw)
            t = TensorProto(name=f"w{i}", data_type=F, dims=[width, width], data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
            inits.append(t)
            y = f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
            if i % 4 == 3:   # a no-op, a dead node and a foldable scale every few layers: work for the lossless passes
                nodes.append(helper.make_node("Identity", [y], [f"id{i}"]))
                nodes.append(helper.make_node("Relu", [y], [f"dead{i}"]))
                nodes.append(helper.make_node("Sqrt", ["one"], [f"scale{i}"]))
                nodes.append(helper.make_node("Mul", [f"id{i}", f"scale{i}"], [f"sc{i}"]))
                y = f"sc{i}"
            x = y
    nodes.append(helper.make_node("Tanh", [x], ["output"]))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", F, ["N", width])],
                          [helper.make_tensor_value_info("output", F, ["N", width])],
                          inits + [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxslim make_models --big")
    m.ir_version = 8
    path = out_dir / "big.onnx"
    onnx.save(m, str(path))
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--big", type=Path, help="write DIR/big.onnx with external data instead")
    ap.add_argument("--big-mb", type=int, default=300, help="approximate size of --big in MB")
    args = ap.parse_args(argv)
    if args.big:
        return [make_big(args.big, args.big_mb)]
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in MODELS.items():
        path = args.out / f"{name}.onnx"
        onnx.save(fn(), str(path))
        written.append(path)
    if (TOOLS / "make_structure_models.py").exists():  # the pruning models (another owner's script)
        sys.path.insert(0, str(TOOLS))
        import make_structure_models

        written += make_structure_models.main(["--out", str(args.out)])
    return written


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    for p in main():
        print(p)
