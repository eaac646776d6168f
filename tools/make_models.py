"""Small deterministic ONNX models for the demo, the tests and the benchmarks (numpy + onnx.helper only).

  cnn_bn.onnx             the README demo: Conv+BN+Relu, residual Add, Concat, Identity/Dropout, a dead branch,
                          an unused initializer, a same-type Cast, a constant shape subgraph before Gemm
  transformer_block.onnx  attention + MLP block with LayerNorm, Softmax, Erf-gelu, residual Adds, dynamic dims
  if_model.onnx           an If whose branches read outer-scope values and hold foldable and dead nodes
  loop_model.onnx         a Loop whose body reads an outer-scope weight and holds a nested If
  custom_op.onnx          an onnxruntime-extensions op (ai.onnx.contrib Inverse) among standard ops
  bert_tiny.onnx          a BERT-family encoder shaped like a PyTorch/Hugging Face export (opset 14): int64
                          input_ids/attention_mask/token_type_ids [batch, sequence], word/position/token-type
                          (2-row) embeddings, additive mask bias, decomposed LayerNorm, Erf GELU, Shape/Gather/
                          Concat reshapes, pooled output; bert_calib.npz holds 64 valid token batches for it.
                          ``bert_tiny(opset=17 or 20)`` builds the same graph at a newer opset (tests).

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

    def model(self, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]], opset: int = 13,
              types: dict[str, int] | None = None) -> onnx.ModelProto:
        types = types or {}
        g = helper.make_graph(self.nodes, self.name,
                              [helper.make_tensor_value_info(n, types.get(n, F), s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, types.get(n, F), s) for n, s in outputs], self.inits)
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


# -- BERT-family encoder, shaped like a torch.onnx export of a Hugging Face BertModel ---------------------

BERT_VOCAB, BERT_POSITIONS, BERT_TYPES = 1000, 128, 2
BERT_HIDDEN, BERT_HEADS, BERT_FFN, BERT_LAYERS = 64, 4, 256, 2
BERT_PAD, BERT_CLS, BERT_SEP = 0, 1, 2
# Trained BERTs carry a few residual-stream "outlier dimensions" (LayerNorm gains far above the rest,
# Kovaleva et al. 2021): they are what breaks naive static INT8, so the tiny model has them too.
BERT_OUTLIER_DIMS = (5, 37)
I64 = TensorProto.INT64


class _ExportBuilder(Builder):
    """Node names ``/scope/Op_k`` with outputs ``…_output_0``, scalars as Constant nodes and weights as
    named initializers, the way torch.onnx's exporter writes a Hugging Face model."""

    def __init__(self, name: str, seed: int, opset: int) -> None:
        super().__init__(name, seed)
        self.opset = opset

    def node(self, scope: str, op_type: str, inputs: list[str], **attrs) -> str:
        base = f"{scope}/{op_type}"
        k = self.count.get(base, 0)
        self.count[base] = k + 1
        name = base if k == 0 else f"{base}_{k}"
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def constant(self, scope: str, value) -> str:
        return self.node(scope, "Constant", [], value=numpy_helper.from_array(np.asarray(value)))

    def weight(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def normal(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def unsqueeze(self, scope: str, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.node(scope, "Unsqueeze", [x, self.constant(scope, np.array(axes, np.int64))])
        return self.node(scope, "Unsqueeze", [x], axes=axes)

    def reduce_mean_last(self, scope: str, x: str) -> str:
        if self.opset >= 18:
            return self.node(scope, "ReduceMean", [x, self.constant(scope, np.array([-1], np.int64))], keepdims=1)
        return self.node(scope, "ReduceMean", [x], axes=[-1], keepdims=1)

    def dim(self, scope: str, x: str, i: int) -> str:
        """``x.size(i)`` as a 1-element int64 tensor: Shape -> Gather(i) -> Unsqueeze, as traced."""
        d = self.node(scope, "Gather", [self.node(scope, "Shape", [x]), self.constant(scope, np.array(i, np.int64))],
                      axis=0)
        return self.unsqueeze(scope, d, [0])

    def layer_norm(self, scope: str, x: str, prefix: str, d: int, eps: float = 1e-12) -> str:
        """LayerNorm as exported below opset 17: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add."""
        gamma = 1.0 + self.normal(d, 0.1)
        gamma[list(BERT_OUTLIER_DIMS)] = 6.0
        beta = self.normal(d, 0.05)
        diff = self.node(scope, "Sub", [x, self.reduce_mean_last(scope, x)])
        var = self.reduce_mean_last(scope, self.node(scope, "Pow", [diff, self.constant(scope, np.array(2.0, np.float32))]))
        std = self.node(scope, "Sqrt", [self.node(scope, "Add", [var, self.constant(scope, np.array(eps, np.float32))])])
        y = self.node(scope, "Mul", [self.node(scope, "Div", [diff, std]), self.weight(f"{prefix}.weight", gamma)])
        return self.node(scope, "Add", [y, self.weight(f"{prefix}.bias", beta)])

    def linear(self, scope: str, x: str, prefix: str, cin: int, cout: int, gain: float = 1.0) -> str:
        """nn.Linear on a 3-D input: MatMul by the transposed weight, then Add(bias, ·) (bias first, as exported)."""
        y = self.node(scope, "MatMul", [x, self.weight(f"onnx::MatMul_{prefix}.weight", self.normal((cin, cout), gain / np.sqrt(cin)))])
        return self.node(scope, "Add", [self.weight(f"{prefix}.bias", self.normal(cout, 0.02)), y])

    def gelu(self, scope: str, x: str, kind: str) -> str:
        if kind == "erf":  # x * 0.5 * (1 + erf(x / sqrt(2))), as F.gelu exports
            erf = self.node(scope, "Erf", [self.node(scope, "Div", [x, self.constant(scope, np.array(np.sqrt(2.0), np.float32))])])
            y = self.node(scope, "Mul", [x, self.node(scope, "Add", [erf, self.constant(scope, np.array(1.0, np.float32))])])
            return self.node(scope, "Mul", [y, self.constant(scope, np.array(0.5, np.float32))])
        # tanh approximation (GPT-2 / "gelu_new"): 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        cube = self.node(scope, "Pow", [x, self.constant(scope, np.array(3.0, np.float32))])
        inner = self.node(scope, "Add", [x, self.node(scope, "Mul", [self.constant(scope, np.array(0.044715, np.float32)), cube])])
        t = self.node(scope, "Tanh", [self.node(scope, "Mul", [self.constant(scope, np.array(np.sqrt(2.0 / np.pi), np.float32)), inner])])
        half_x = self.node(scope, "Mul", [self.constant(scope, np.array(0.5, np.float32)), x])
        return self.node(scope, "Mul", [half_x, self.node(scope, "Add", [self.constant(scope, np.array(1.0, np.float32)), t])])

    def heads(self, scope: str, x: str, heads: int, hd: int, perm: list[int]) -> str:
        """transpose_for_scores: view(x.size()[:-1] + (heads, hd)) then permute (keys: straight to [b, h, d, s])."""
        shape = self.node(scope, "Concat", [self.dim(scope, x, 0), self.dim(scope, x, 1),
                                            self.constant(scope, np.array([heads], np.int64)),
                                            self.constant(scope, np.array([hd], np.int64))], axis=0)
        return self.node(scope, "Transpose", [self.node(scope, "Reshape", [x, shape])], perm=perm)


def bert_tiny(opset: int = 14, gelu: str = "erf", layers: int = BERT_LAYERS) -> onnx.ModelProto:
    """A 2-layer BERT (hidden 64, 4 heads, FFN 256) with inputs and outputs named as a BertModel export."""
    b = _ExportBuilder("main_graph", seed=12, opset=opset)
    d, nh, hd = BERT_HIDDEN, BERT_HEADS, BERT_HIDDEN // BERT_HEADS
    e = "/embeddings"
    words = b.node(f"{e}/word_embeddings", "Gather",
                   [b.weight("embeddings.word_embeddings.weight", b.normal((BERT_VOCAB, d), 1.0)), "input_ids"])
    types = b.node(f"{e}/token_type_embeddings", "Gather",
                   [b.weight("embeddings.token_type_embeddings.weight", b.normal((BERT_TYPES, d), 0.3)), "token_type_ids"])
    # position_ids = self.position_ids[:, :seq_length]
    pos_ids = b.node(e, "Slice", [b.weight("embeddings.position_ids", np.arange(BERT_POSITIONS, dtype=np.int64)[None]),
                                  b.constant(e, np.array([0], np.int64)), b.dim(e, "input_ids", 1),
                                  b.constant(e, np.array([1], np.int64)), b.constant(e, np.array([1], np.int64))])
    pos = b.node(f"{e}/position_embeddings", "Gather",
                 [b.weight("embeddings.position_embeddings.weight", b.normal((BERT_POSITIONS, d), 0.3)), pos_ids])
    h = b.node(e, "Add", [b.node(e, "Add", [words, types]), pos])
    h = b.layer_norm(f"{e}/LayerNorm", h, "embeddings.LayerNorm", d)
    # extended mask: (1.0 - mask[:, None, None, :]) * finfo(float32).min, added to every score
    m = b.node("", "Cast", [b.unsqueeze("", b.unsqueeze("", "attention_mask", [1]), [2])], to=F)
    m = b.node("", "Sub", [b.constant("", np.array(1.0, np.float32)), m])
    bias = b.node("", "Mul", [m, b.constant("", np.array(np.finfo(np.float32).min, np.float32))])
    for i in range(layers):
        s, p = f"/encoder/layer.{i}", f"encoder.layer.{i}"
        sa = f"{s}/attention/self"
        q, k, v = (b.linear(f"{sa}/{n}", h, f"{p}.attention.self.{n}", d, d, gain=1.5 if n != "value" else 1.0)
                   for n in ("query", "key", "value"))
        q, v = b.heads(sa, q, nh, hd, [0, 2, 1, 3]), b.heads(sa, v, nh, hd, [0, 2, 1, 3])
        k = b.heads(sa, k, nh, hd, [0, 2, 3, 1])
        scores = b.node(sa, "Div", [b.node(sa, "MatMul", [q, k]), b.constant(sa, np.array(np.sqrt(hd), np.float32))])
        probs = b.node(sa, "Softmax", [b.node(sa, "Add", [scores, bias])], axis=-1)
        c = b.node(sa, "Transpose", [b.node(sa, "MatMul", [probs, v])], perm=[0, 2, 1, 3])
        c = b.node(sa, "Reshape", [c, b.node(sa, "Concat", [b.dim(sa, c, 0), b.dim(sa, c, 1),
                                                            b.constant(sa, np.array([d], np.int64))], axis=0)])
        o = b.linear(f"{s}/attention/output/dense", c, f"{p}.attention.output.dense", d, d)
        h = b.layer_norm(f"{s}/attention/output/LayerNorm", b.node(f"{s}/attention/output", "Add", [o, h]),
                         f"{p}.attention.output.LayerNorm", d)
        f = b.linear(f"{s}/intermediate/dense", h, f"{p}.intermediate.dense", d, BERT_FFN)
        f = b.gelu(f"{s}/intermediate/intermediate_act_fn", f, gelu)
        o = b.linear(f"{s}/output/dense", f, f"{p}.output.dense", BERT_FFN, d)
        h = b.layer_norm(f"{s}/output/LayerNorm", b.node(f"{s}/output", "Add", [o, h]), f"{p}.output.LayerNorm", d)
    h = b.rename_output(h, "last_hidden_state")
    first = b.node("/pooler", "Gather", [h, b.constant("/pooler", np.array(0, np.int64))], axis=1)  # hidden[:, 0]
    pooled = b.node("/pooler/dense", "Gemm", [first, b.weight("pooler.dense.weight", b.normal((d, d), 0.3 / np.sqrt(d))),
                                              b.weight("pooler.dense.bias", b.normal(d, 0.02))],
                    alpha=1.0, beta=1.0, transB=1)
    b.rename_output(b.node("/pooler/activation", "Tanh", [pooled]), "pooler_output")
    io = ["input_ids", "attention_mask", "token_type_ids"]
    m = b.model([(n, ["batch", "sequence"]) for n in io],
                [("last_hidden_state", ["batch", "sequence", d]), ("pooler_output", ["batch", d])],
                opset=opset, types={n: I64 for n in io})
    return _finish(m, producer="pytorch")


def bert_calib(n: int = 64, seq: int = 16, seed: int = 13) -> dict[str, np.ndarray]:
    """Token batches a tokenizer could have made: [CLS] ids [SEP] (and a second segment of token type 1
    in every other sample), then padding with id 0 and mask 0; a few samples fill the whole sequence."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, seq), BERT_PAD, np.int64)
    mask = np.zeros((n, seq), np.int64)
    types = np.zeros((n, seq), np.int64)
    for i in range(n):
        length = seq if i % 8 == 0 else int(rng.integers(5, seq + 1))
        ids[i, 0], ids[i, 1:length - 1], ids[i, length - 1] = BERT_CLS, rng.integers(3, BERT_VOCAB, length - 2), BERT_SEP
        mask[i, :length] = 1
        if i % 2:
            cut = int(rng.integers(2, length - 1))
            ids[i, cut - 1] = BERT_SEP
            types[i, cut:length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez with fixed zip timestamps, so that the file is byte-identical on every run."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    return path


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
          "loop_model": loop_model, "custom_op": custom_op, "bert_tiny": bert_tiny}


def make_big(out_dir: Path, size_mb: int, width: int = 2048) -> Path:
    """A MatMul stack of ~size_mb MB with external data, streamed so memory stays ~one layer
    (built by tools/make_big_models.py, which also makes the Conv+BatchNorm kind and embedded files)."""
    sys.path.insert(0, str(TOOLS))
    import make_big_models

    return make_big_models.make_matmul(out_dir, size_mb, width=width)


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
    written.append(save_npz(args.out / "bert_calib.npz", bert_calib()))
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
