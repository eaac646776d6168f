"""Pruning-structure models with random weights (numpy + onnx.helper, no torch).

Each model exercises a different way channels travel through a graph, so that the dependency
tracer of the `prune` pass is tested on the shapes real networks have:

  struct_resnet.onnx       bottlenecks, downsample shortcuts (1x1 stride-2 conv + BN), a grouped conv,
                           GlobalAveragePool -> Reshape(0,-1) -> MatMul + Add
  struct_mobilenetv2.onnx  inverted residuals: 1x1 expand, depthwise 3x3, 1x1 linear project, Clip(0,6)
  struct_unet.onnx         encoder/decoder with Concat skips, MaxPool, Resize and ConvTranspose upsampling
  struct_transformer.onnx  encoder block: LayerNormalization, multi-head attention (Reshape/Transpose),
                           MatMul FFN with the exported Gelu pattern (Div, Erf, Add, Mul, Mul)
  struct_detector.onnx     CSP-like Split and Slice along channels, Concat, a head with Split/Sigmoid/Concat,
                           and a side classifier Flatten(C*4*4) -> Gemm
  struct_ops.onnx          the tracer's other paths: PRelu, Pad, InstanceNorm, GLU, NHWC MatMul, squeeze-excite,
                           Resize sizes, ReduceMean, Unsqueeze, Reshape with an explicit channel count

Weights are He-scaled and BatchNorm statistics random but sane, so activations neither explode
nor vanish and pruning changes outputs measurably. Run: python tools/make_structure_models.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SEED = 0


class Builder:
    """Minimal graph builder: unique names, initializers from numpy, one node per call."""

    def __init__(self, name: str, seed: int = SEED) -> None:
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

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self.uid(op_type.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    # --- layers -------------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = False) -> str:
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        ins = [x, self.const("w", w)]
        if bias:
            ins.append(self.const("b", (self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        gamma = r.uniform(0.5, 1.5, c).astype(np.float32)
        beta = (r.standard_normal(c) * 0.1).astype(np.float32)
        mean = (r.standard_normal(c) * 0.1).astype(np.float32)
        var = r.uniform(0.5, 1.5, c).astype(np.float32)
        return self.op("BatchNormalization", [x, self.const("gamma", gamma), self.const("beta", beta),
                                              self.const("mean", mean), self.const("var", var)], epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, self.const("min", np.array(0, np.float32)),
                                self.const("max", np.array(6, np.float32))])

    def cbr(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, act: str = "relu",
            group: int = 1) -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride, group), cout)
        return {"relu": self.relu, "relu6": self.relu6, "none": lambda t: t}[act](y)

    def dense_weight(self, cin: int, cout: int) -> np.ndarray:
        return (self.rng.standard_normal((cin, cout)) * np.sqrt(2.0 / cin)).astype(np.float32)

    def model(self, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]], opset: int = 13) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxslim tools/make_structure_models.py")
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m, full_check=True)
        return m

    def rename_output(self, tensor: str, new: str) -> str:
        for n in self.nodes:
            n.output[:] = [new if o == tensor else o for o in n.output]
            n.input[:] = [new if i == tensor else i for i in n.input]
        return new


def resnet() -> onnx.ModelProto:
    b = Builder("struct_resnet")
    x = b.cbr("input", 3, 32, 3)

    def bottleneck(x: str, cin: int, mid: int, cout: int, stride: int, group: int = 1) -> str:
        y = b.cbr(x, cin, mid, 1)
        y = b.cbr(y, mid, mid, 3, stride, group=group)
        y = b.cbr(y, mid, cout, 1, act="none")
        short = x if (cin == cout and stride == 1) else b.cbr(x, cin, cout, 1, stride, act="none")
        return b.relu(b.op("Add", [y, short]))

    x = bottleneck(x, 32, 16, 64, 1)          # downsample shortcut (channel change)
    x = bottleneck(x, 64, 16, 64, 1)          # identity shortcut: residual group spans 3 producers
    x = bottleneck(x, 64, 32, 128, 2)         # stride-2 downsample shortcut
    x = bottleneck(x, 128, 32, 128, 1, group=4)  # ResNeXt-style grouped 3x3
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Reshape", [x, b.const("shape", np.array([0, -1], np.int64))])
    x = b.op("MatMul", [x, b.const("fc_w", b.dense_weight(128, 10))])
    x = b.op("Add", [x, b.const("fc_b", (b.rng.standard_normal(10) * 0.1).astype(np.float32))])
    b.rename_output(x, "logits")
    return b.model([("input", ["N", 3, 32, 32])], [("logits", ["N", 10])])


def mobilenetv2() -> onnx.ModelProto:
    b = Builder("struct_mobilenetv2")
    x = b.cbr("input", 3, 32, 3, 2, act="relu6")  # 32x32

    def inverted(x: str, cin: int, cout: int, stride: int, t: int) -> str:
        hid = cin * t
        y = b.cbr(x, cin, hid, 1, act="relu6") if t != 1 else x
        y = b.cbr(y, hid, hid, 3, stride, act="relu6", group=hid)  # depthwise
        y = b.cbr(y, hid, cout, 1, act="none")                     # linear bottleneck
        return b.op("Add", [x, y]) if (stride == 1 and cin == cout) else y

    x = inverted(x, 32, 16, 1, 1)
    x = inverted(x, 16, 24, 2, 6)   # 16x16
    x = inverted(x, 24, 24, 1, 6)
    x = inverted(x, 24, 32, 2, 6)   # 8x8
    x = inverted(x, 32, 32, 1, 6)
    x = inverted(x, 32, 32, 1, 6)
    x = inverted(x, 32, 64, 2, 6)   # 4x4
    x = inverted(x, 64, 64, 1, 6)
    x = b.cbr(x, 64, 256, 1, act="relu6")
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    x = b.op("Gemm", [x, b.const("fc_w", b.dense_weight(256, 10).T.copy()),
                      b.const("fc_b", np.zeros(10, np.float32))], transB=1)
    b.rename_output(x, "logits")
    return b.model([("input", ["N", 3, 64, 64])], [("logits", ["N", 10])])


def unet() -> onnx.ModelProto:
    b = Builder("struct_unet")
    e1 = b.cbr(b.cbr("input", 3, 16), 16, 16)                           # 32x32
    e2 = b.cbr(b.cbr(b.op("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2]), 16, 32), 32, 32)  # 16x16
    bott = b.cbr(b.op("MaxPool", [e2], kernel_shape=[2, 2], strides=[2, 2]), 32, 64)  # 8x8
    # up 1: ConvTranspose (weight layout Cin x Cout x k x k)
    wt = (b.rng.standard_normal((64, 32, 2, 2)) * np.sqrt(2.0 / 64)).astype(np.float32)
    u1 = b.op("ConvTranspose", [bott, b.const("wt", wt), b.const("bt", np.zeros(32, np.float32))],
              kernel_shape=[2, 2], strides=[2, 2])
    u1 = b.relu(u1)
    d1 = b.cbr(b.op("Concat", [u1, e2], axis=1), 64, 32)                # 16x16
    # up 2: Resize (nearest) then conv
    u2 = b.op("Resize", [d1, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    u2 = b.cbr(u2, 32, 16)
    d2 = b.cbr(b.op("Concat", [e1, u2], axis=1), 32, 16)                # 32x32
    out = b.conv(d2, 16, 2, 1, bias=True)
    b.rename_output(out, "mask")
    return b.model([("input", ["N", 3, 32, 32])], [("mask", ["N", 2, 32, 32])])


def transformer(d: int = 64, heads: int = 4, ffn: int = 256, seq: int = 16) -> onnx.ModelProto:
    b = Builder("struct_transformer")
    r = b.rng
    dh = d // heads

    def layernorm(x: str) -> str:
        return b.op("LayerNormalization", [x, b.const("ln_g", r.uniform(0.8, 1.2, d).astype(np.float32)),
                                           b.const("ln_b", (r.standard_normal(d) * 0.05).astype(np.float32))],
                    axis=-1, epsilon=1e-5)

    def linear(x: str, cin: int, cout: int) -> str:
        y = b.op("MatMul", [x, b.const("w", b.dense_weight(cin, cout) * 0.7)])
        return b.op("Add", [y, b.const("b", (r.standard_normal(cout) * 0.05).astype(np.float32))])

    def heads_split(x: str) -> str:
        x = b.op("Reshape", [x, b.const("shape", np.array([0, seq, heads, dh], np.int64))])
        return b.op("Transpose", [x], perm=[0, 2, 1, 3])

    x = "input"
    h = layernorm(x)
    q, k, v = (heads_split(linear(h, d, d)) for _ in range(3))
    s = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = b.op("Div", [s, b.const("sqrt_dh", np.array(np.sqrt(dh), np.float32))])
    a = b.op("MatMul", [b.op("Softmax", [s], axis=-1), v])
    a = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]), b.const("shape", np.array([0, seq, d], np.int64))])
    x = b.op("Add", [x, linear(a, d, d)])
    # FFN with the Gelu pattern torch exports: x * 0.5 * (1 + erf(x / sqrt(2)))
    f = linear(layernorm(x), d, ffn)
    e = b.op("Erf", [b.op("Div", [f, b.const("sqrt2", np.array(np.sqrt(2.0), np.float32))])])
    g = b.op("Mul", [b.op("Mul", [f, b.op("Add", [e, b.const("one", np.array(1.0, np.float32))])]),
                     b.const("half", np.array(0.5, np.float32))])
    x = b.op("Add", [x, linear(g, ffn, d)])
    out = layernorm(x)
    b.rename_output(out, "output")
    return b.model([("input", ["N", seq, d])], [("output", ["N", seq, d])], opset=17)


def detector(classes: int = 4, anchors: int = 3, opset: int = 13) -> onnx.ModelProto:
    """``opset`` < 13 writes Split sizes as an attribute (the pruning tests rewrite both forms)."""
    b = Builder("struct_detector")

    def split(x: str, sizes: list[int]) -> list[str]:
        if opset < 13:
            return b.op("Split", [x], n_out=len(sizes), axis=1, split=sizes)
        return b.op("Split", [x, b.const("split", np.array(sizes, np.int64))], n_out=len(sizes), axis=1)

    x = b.cbr("input", 3, 32, 3, 2)            # 16x16
    x = b.cbr(x, 32, 64, 3, 2)                 # 8x8
    # CSP-like block: Split into halves, transform one, Concat back
    p1, p2 = split(x, [32, 32])
    p2 = b.cbr(b.cbr(p2, 32, 32, 3), 32, 32, 3)
    x = b.cbr(b.op("Concat", [p1, p2], axis=1), 64, 64, 1)
    # second CSP block using Slice instead of Split
    s_axes = b.const("axes", np.array([1], np.int64))
    lo = b.op("Slice", [x, b.const("starts", np.array([0], np.int64)), b.const("ends", np.array([32], np.int64)), s_axes])
    hi = b.op("Slice", [x, b.const("starts", np.array([32], np.int64)),
                        b.const("ends", np.array([np.iinfo(np.int64).max], np.int64)), s_axes])
    hi = b.cbr(hi, 32, 32, 3)
    x = b.cbr(b.op("Concat", [lo, hi], axis=1), 64, 64, 3)
    # detection head: per anchor 4 box + 1 objectness + classes
    per = 5 + classes
    head = b.conv(b.cbr(x, 64, 64, 3), 64, anchors * per, 1, bias=True)
    box, obj, cls = split(head, [4 * anchors, anchors, classes * anchors])
    det = b.op("Concat", [box, b.op("Sigmoid", [obj]), b.op("Sigmoid", [cls])], axis=1)
    b.rename_output(det, "detections")
    # side classifier: Flatten keeps spatial positions, so each channel owns a block of 16 features
    c = b.op("MaxPool", [b.cbr(x, 64, 32, 3)], kernel_shape=[2, 2], strides=[2, 2])  # 4x4
    c = b.op("Flatten", [c], axis=1)
    c = b.op("Gemm", [c, b.const("fc_w", b.dense_weight(32 * 16, 10)), b.const("fc_b", np.zeros(10, np.float32))])
    b.rename_output(c, "scores")
    return b.model([("input", ["N", 3, 32, 32])], [("detections", ["N", anchors * per, 8, 8]), ("scores", ["N", 10])],
                   opset=opset)


def ops() -> onnx.ModelProto:
    """The tracer's remaining paths in one model (opset 18): PRelu slope, Pad, InstanceNormalization,
    a GLU (Split halves gated by Mul: channel i goes with channel i+16 of the same layer), NHWC
    Transpose + MatMul + bias, a squeeze-excite Mul (ReduceMean with axes input, excite conv unified
    with its input), Resize with explicit channel size, ReduceMean keepdims=0, Unsqueeze, and a
    Reshape with an explicit channel count into Gemm."""
    b = Builder("struct_ops")
    r = b.rng
    x = b.conv("input", 3, 32, 3, bias=True)
    x = b.op("PRelu", [x, b.const("slope", r.uniform(0.05, 0.3, (32, 1, 1)).astype(np.float32))])
    x = b.op("Pad", [x, b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="constant")
    wc = (r.standard_normal((32, 32, 3, 3)) * np.sqrt(2.0 / 288)).astype(np.float32)
    x = b.op("Conv", [x, b.const("w", wc)], kernel_shape=[3, 3])  # pads come from the Pad node
    x = b.relu(b.op("InstanceNormalization", [x, b.const("in_s", r.uniform(0.5, 1.5, 32).astype(np.float32)),
                                              b.const("in_b", (r.standard_normal(32) * 0.1).astype(np.float32))]))
    x = b.conv(x, 32, 32, 1, bias=True)
    a, g = b.op("Split", [x, b.const("split", np.array([16, 16], np.int64))], n_out=2, axis=1)
    x = b.op("Mul", [a, b.op("Sigmoid", [g])])                                      # GLU: 16 channels
    x = b.op("Transpose", [x], perm=[0, 2, 3, 1])                                   # NHWC
    x = b.op("MatMul", [x, b.const("w_nhwc", b.dense_weight(16, 24))])
    x = b.relu(b.op("Add", [x, b.const("b_nhwc", (r.standard_normal(24) * 0.1).astype(np.float32))]))
    x = b.op("Transpose", [x], perm=[0, 3, 1, 2])                                   # back to NCHW, 24 ch
    s = b.op("ReduceMean", [x, b.const("axes", np.array([2, 3], np.int64))], keepdims=1)
    s = b.relu(b.conv(s, 24, 8, 1, bias=True))
    s = b.op("Sigmoid", [b.conv(s, 8, 24, 1, bias=True)])
    x = b.op("Mul", [x, s])                                                         # squeeze-excite
    x = b.op("Resize", [x, "", "", b.const("sizes", np.array([24, 32, 32], np.int64))], axes=[1, 2, 3],
             mode="nearest")
    x = b.relu(b.conv(x, 24, 32, 3, bias=True))
    x = b.op("ReduceMean", [x, b.const("axes", np.array([2, 3], np.int64))], keepdims=0)  # (N, 32)
    x = b.op("Unsqueeze", [x, b.const("axes", np.array([2], np.int64))])                 # (N, 32, 1)
    x = b.op("Reshape", [x, b.const("shape", np.array([-1, 32], np.int64))])             # explicit 32
    x = b.op("Gemm", [x, b.const("fc_w", b.dense_weight(32, 10).T.copy()), b.const("fc_b", np.zeros(10, np.float32))],
             transB=1)
    b.rename_output(x, "logits")
    return b.model([("input", ["N", 3, 16, 16])], [("logits", ["N", 10])], opset=18)


MODELS = {
    "struct_resnet": resnet,
    "struct_mobilenetv2": mobilenetv2,
    "struct_unet": unet,
    "struct_transformer": transformer,
    "struct_detector": detector,
    "struct_ops": ops,
}


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    args = ap.parse_args(argv if argv is not None else [])
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in MODELS.items():
        path = args.out / f"{name}.onnx"
        onnx.save(fn(), str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for p in main(sys.argv[1:]):
        print(p)
