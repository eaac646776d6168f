"""Large generated models for the memory benchmarks, streamed to disk tensor by tensor.

  conv    a deep Conv+BatchNorm+Relu stack with residual Adds every other block, Identity and Dropout
          no-ops, and a dead branch (a Conv sharing a live weight, then a Relu nobody reads): bn-fold
          rewrites every conv weight, so no weight leaves onnxslim as it came in.
  matmul  the MatMul stack of tools/make_models.py --big (no pass rewrites its weights), for comparison.

Either kind with external data (DIR/big.onnx + DIR/big.onnx.data) or embedded (--embedded: one
DIR/big.onnx, written in protobuf wire format by hand so that only one weight is ever in memory; an
embedded model must stay below protobuf's 2 GB message limit).

    python tools/make_big_models.py DIR --mb 300 [--embedded] [--kind conv|matmul] [--width 512] [--spatial 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxslim import weights

F = TensorProto.FLOAT
PROTO_LIMIT = 2**31 - 2**26  # below protobuf's 2 GiB message limit, as onnxslim.model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _key(num: int) -> bytes:  # a length-delimited field
    return _varint((num << 3) | 2)


_partial = weights._partial  # one serializer of message parts: the one onnxslim saves with


class Weights:
    """Initializers declared up front (name, shape, a function making the array), made one at a time."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.specs: list[tuple[str, tuple[int, ...], object]] = []

    def add(self, name: str, shape: tuple[int, ...], make) -> str:
        self.specs.append((name, shape, make))
        return name

    def arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, shape, make in self.specs:
            arr = np.ascontiguousarray(make(self.rng, shape), dtype=np.float32)
            assert arr.shape == shape, (name, arr.shape, shape)
            yield name, arr

    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * 4 for _, s, _ in self.specs)


def conv_bn_graph(size_mb: float, width: int = 512, spatial: int = 4, seed: int = 7):
    """Nodes, inputs, outputs and weight specs of a Conv+BN+Relu stack of about ``size_mb`` MB."""
    w = Weights(seed)
    k = 3
    per_block = width * width * k * k * 4
    blocks = max(2, int(size_mb * 2**20 // per_block))
    nodes: list[onnx.NodeProto] = []
    scale = 1.0 / np.sqrt(width * k * k)

    def he(rng, shape):  # small enough that 100s of residual blocks stay finite
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    def near(c, spread):
        return lambda rng, shape: (c + spread * rng.standard_normal(shape)).astype(np.float32)

    def positive(rng, shape):
        return (0.5 + rng.random(shape)).astype(np.float32)

    x = "input"
    residual = x
    for i in range(blocks):
        wt = w.add(f"conv{i}.weight", (width, width, k, k), he)
        bias = w.add(f"conv{i}.bias", (width,), near(0.0, 0.01))
        gamma = w.add(f"bn{i}.weight", (width,), near(1.0, 0.1))
        beta = w.add(f"bn{i}.bias", (width,), near(0.0, 0.05))
        mean = w.add(f"bn{i}.running_mean", (width,), near(0.0, 0.05))
        var = w.add(f"bn{i}.running_var", (width,), positive)
        nodes.append(helper.make_node("Conv", [x, wt, bias], [f"c{i}"], pads=[1, 1, 1, 1], kernel_shape=[k, k]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", gamma, beta, mean, var], [f"b{i}"],
                                      epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"]))
        y = f"r{i}"
        if i % 2 == 1:  # residual every other block, scaled so that a deep stack stays in range
            nodes.append(helper.make_node("Add", [y, residual], [f"res{i}"]))
            nodes.append(helper.make_node("Mul", [f"res{i}", "half"], [f"h{i}"]))
            y = residual = f"h{i}"
        if i % 4 == 0:  # no-ops and a dead branch: work for the lossless passes
            nodes.append(helper.make_node("Identity", [y], [f"id{i}"]))
            nodes.append(helper.make_node("Dropout", [f"id{i}"], [f"drop{i}"]))
            nodes.append(helper.make_node("Conv", [x, wt], [f"dead_c{i}"], pads=[1, 1, 1, 1], kernel_shape=[k, k]))
            nodes.append(helper.make_node("Relu", [f"dead_c{i}"], [f"dead{i}"]))
            y = f"drop{i}"
        x = y
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["output"], axis=1))
    small = [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    inputs = [helper.make_tensor_value_info("input", F, ["N", width, spatial, spatial])]
    outputs = [helper.make_tensor_value_info("output", F, ["N", width])]
    return nodes, inputs, outputs, w, small


def write_model(folder: Path, nodes, inputs, outputs, w: Weights, small: list[TensorProto], *, embedded: bool,
                producer: str) -> Path:
    """Write DIR/big.onnx with the weights streamed in (embedded) or into DIR/big.onnx.data."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "big.onnx"
    graph = helper.make_graph(nodes, "big", inputs, outputs, small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=producer)
    model.ir_version = 8
    if embedded:
        if w.nbytes() >= PROTO_LIMIT:
            sys.exit(f"an embedded model must stay below 2 GB ({w.nbytes() / 2**20:.0f} MB asked); drop --embedded")
        with open(path, "wb") as f:
            _write_embedded(f, model, w)
        return path
    data_name = "big.onnx.data"
    offset = 0
    with open(folder / data_name, "wb") as f:
        for name, arr in w.arrays():
            pad = (-offset) % 4096  # page-aligned, as onnx.save and onnxslim write them
            f.write(b"\0" * pad)
            offset += pad
            raw = arr.tobytes()
            f.write(raw)
            t = TensorProto(name=name, data_type=F, dims=arr.shape, data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            model.graph.initializer.append(t)
            offset += len(raw)
    onnx.save(model, str(path))
    return path


def _write_embedded(f: BinaryIO, model: onnx.ModelProto, w: Weights) -> None:
    """The bytes model.SerializeToString() would give with the weights appended to graph.initializer,
    one tensor in memory at a time: lengths are known from the shapes before any weight is made."""
    g = model.graph

    def header(name: str, shape) -> bytes:  # TensorProto fields before raw_data (9): dims, data_type, name
        return TensorProto(name=name, data_type=F, dims=shape).SerializeToString()

    def body_len(name: str, shape) -> int:
        n = int(np.prod(shape)) * 4
        return len(header(name, shape)) + len(_key(9)) + len(_varint(n)) + n

    big = [body_len(n, s) for n, s, _ in w.specs]
    g_head = _partial(g, lambda k: k < 5)
    g_inits = _partial(g, lambda k: k == 5)  # the small ones come first, as in graph.initializer order
    g_tail = _partial(g, lambda k: k > 5)
    g_len = len(g_head) + len(g_inits) + len(g_tail) + sum(len(_key(5)) + len(_varint(b)) + b for b in big)
    f.write(_partial(model, lambda k: k < 7))
    f.write(_key(7) + _varint(g_len) + g_head + g_inits)
    for (name, arr), b in zip(w.arrays(), big):
        raw = arr.tobytes()
        f.write(_key(5) + _varint(b) + header(name, arr.shape) + _key(9) + _varint(len(raw)))
        f.write(raw)
    f.write(g_tail)
    f.write(_partial(model, lambda k: k > 7))


def make_conv_bn(folder: Path, size_mb: float, *, embedded: bool = False, width: int = 512, spatial: int = 4) -> Path:
    """DIR/big.onnx: the Conv+BN stack of about ``size_mb`` MB."""
    nodes, inputs, outputs, w, small = conv_bn_graph(size_mb, width, spatial)
    return write_model(folder, nodes, inputs, outputs, w, small, embedded=embedded,
                       producer="onnxslim make_big_models conv")


def make_matmul(folder: Path, size_mb: float, *, embedded: bool = False, width: int = 2048) -> Path:
    """DIR/big.onnx: the MatMul stack of tools/make_models.py --big, here also embedded."""
    nodes: list[onnx.NodeProto] = []
    w = Weights(5)
    layers = max(1, int(size_mb * 2**20 // (width * width * 4)))

    def weight(rng, shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(width))

    x = "input"
    for i in range(layers):
        w.add(f"w{i}", (width, width), weight)
        y = f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        if i % 4 == 3:
            nodes.append(helper.make_node("Identity", [y], [f"id{i}"]))
            nodes.append(helper.make_node("Relu", [y], [f"dead{i}"]))
            nodes.append(helper.make_node("Sqrt", ["one"], [f"scale{i}"]))
            nodes.append(helper.make_node("Mul", [f"id{i}", f"scale{i}"], [f"sc{i}"]))
            y = f"sc{i}"
        x = y
    nodes.append(helper.make_node("Tanh", [x], ["output"]))
    small = [onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    return write_model(folder, nodes, [helper.make_tensor_value_info("input", F, ["N", width])],
                       [helper.make_tensor_value_info("output", F, ["N", width])], w, small, embedded=embedded,
                       producer="onnxslim make_big_models matmul")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="writes FOLDER/big.onnx (and big.onnx.data unless --embedded)")
    ap.add_argument("--mb", type=float, default=300, help="approximate size of the weights in MB")
    ap.add_argument("--kind", choices=("conv", "matmul"), default="conv")
    ap.add_argument("--embedded", action="store_true", help="weights inside the .onnx (below 2 GB only)")
    ap.add_argument("--width", type=int, help="channels (conv, default 512) or features (matmul, default 2048)")
    ap.add_argument("--spatial", type=int, default=4, help="conv: height and width of the input")
    args = ap.parse_args(argv)
    if args.kind == "conv":
        path = make_conv_bn(args.folder, args.mb, embedded=args.embedded, width=args.width or 512,
                            spatial=args.spatial)
    else:
        path = make_matmul(args.folder, args.mb, embedded=args.embedded, width=args.width or 2048)
    print(path)
    return path


if __name__ == "__main__":
    main()
