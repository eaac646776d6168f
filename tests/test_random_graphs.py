"""Hypothesis-generated random graphs: the lossless pipeline's outputs equal the original's.

The generator mixes elementwise ops, constants (including neutral ones and constant-only
subexpressions), Conv (+zero Pad, +BatchNormalization, +per-channel Mul/Add), MatMul (+bias),
Reshape/Transpose (including cancelling pairs), Unsqueeze->Reshape, Concat/Split, shape subgraphs
(batch and static dims), duplicated nodes and dead branches.
A second generator nests If nodes (two deep) whose conditions are constants, Constant nodes or
static-dim tests, plus data-dependent ones: every If with a known condition must be inlined.
Derandomized, so every run checks the same graphs; it stays well under a minute.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim

UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity", "Dropout", "Softplus"]
BINARY = ["Add", "Sub", "Mul"]


class Builder:
    def __init__(self, data, seed: int) -> None:
        self.data = data
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.pool: list[tuple[str, tuple[int, ...]]] = []
        self.count = 0

    def draw(self, strategy):
        return self.data.draw(strategy)

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        n = self.name(base)
        self.inits.append(nh.from_array(np.asarray(value), n))
        return n

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...] | None, n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(h.make_node(op, inputs, outs, **attrs))
        if shape is not None:
            for o in outs:
                self.pool.append((o, shape))
        return outs

    def pick(self, rank: int | None = None) -> tuple[str, tuple[int, ...]]:
        cands = [p for p in self.pool if rank is None or len(p[1]) == rank]
        if not cands:
            cands = self.pool
        return cands[self.draw(st.integers(0, len(cands) - 1))]

    def floats(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    # -- one random step ------------------------------------------------------------------------
    def step(self) -> None:
        kind = self.draw(st.sampled_from(["unary", "binary_const", "binary", "conv", "matmul", "transpose",
                                          "reshape", "concat_split", "const_expr", "shape_chain", "duplicate",
                                          "dead", "unsqueeze_reshape"]))
        getattr(self, kind)()

    def unary(self):
        x, s = self.pick()
        self.node(self.draw(st.sampled_from(UNARY)), [x], s)

    def binary_const(self):
        x, s = self.pick()
        op = self.draw(st.sampled_from(BINARY + ["Div"]))
        form = self.draw(st.sampled_from(["scalar", "last", "channel", "full", "neutral"]))
        if form == "scalar":
            c = np.float32(self.rng.uniform(0.5, 2.0))
        elif form == "last":
            c = self.rng.uniform(0.5, 2.0, s[-1:]).astype(np.float32)
        elif form == "channel" and len(s) >= 2:
            c = self.rng.uniform(0.5, 2.0, (s[1],) + (1,) * (len(s) - 2)).astype(np.float32)
        elif form == "neutral":
            c = np.full((1,) * min(len(s), 2), 0.0 if op in ("Add", "Sub") else 1.0, np.float32)
        else:
            c = self.rng.uniform(0.5, 2.0, s).astype(np.float32)
        ins = [x, self.const(c)] if self.draw(st.booleans()) or op in ("Sub", "Div") else [self.const(c), x]
        self.node(op, ins, s)

    def binary(self):
        x, s = self.pick()
        same = [p for p in self.pool if p[1] == s]
        y, _ = same[self.draw(st.integers(0, len(same) - 1))]
        self.node(self.draw(st.sampled_from(BINARY)), [x, y], s)

    def conv(self):
        x, s = self.pick(4)
        if len(s) != 4:
            return self.unary()
        c = s[1]
        group = self.draw(st.sampled_from([g for g in (1, 2) if c % g == 0]))
        m = group * self.draw(st.integers(1, 3))
        if self.draw(st.booleans()):  # an explicit zero Pad in front (fused into the Conv's pads)
            (x,) = self.node("Pad", [x, self.const(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads")], None)
            s = (s[0], s[1], s[2] + 1, s[3] + 1)
        ins = [x, self.const(self.floats((m, c // group, 3, 3)) * 0.3, "w")]
        if self.draw(st.booleans()):
            ins.append(self.const(self.floats((m,)), "b"))
        (y,) = self.node("Conv", ins, (s[0], m, s[2], s[3]), pads=[1, 1, 1, 1], group=group)
        after = self.draw(st.sampled_from(["bn", "mul", "add", "none"]))
        if after == "bn":
            bn = [self.const(self.rng.uniform(0.5, 1.5, m).astype(np.float32)), self.const(self.floats((m,))),
                  self.const(self.floats((m,))), self.const(self.rng.uniform(0.5, 2.0, m).astype(np.float32))]
            self.pool.pop()
            self.node("BatchNormalization", [y] + bn, (s[0], m, s[2], s[3]))
        elif after in ("mul", "add"):
            self.pool.pop()
            c = self.rng.uniform(0.5, 2.0, (m, 1, 1)).astype(np.float32)
            self.node("Mul" if after == "mul" else "Add", [y, self.const(c)], (s[0], m, s[2], s[3]))

    def matmul(self):
        x, s = self.pick(2)
        if len(s) != 2:
            x, s = self.pick()
            (x,) = self.node("Flatten", [x], None, axis=1)
            s = (s[0], int(np.prod(s[1:])))
        k = self.draw(st.integers(2, 6))
        (y,) = self.node("MatMul", [x, self.const(self.floats((s[1], k)) * 0.3, "w")], (s[0], k))
        if self.draw(st.booleans()):
            self.pool.pop()
            self.node("Add", [y, self.const(self.floats((k,)), "bias")], (s[0], k))

    def transpose(self):
        x, s = self.pick()
        perm = list(self.draw(st.permutations(list(range(len(s))))))
        (y,) = self.node("Transpose", [x], tuple(s[p] for p in perm), perm=perm)
        if self.draw(st.booleans()):  # the inverse: a cancelling pair
            inv = [perm.index(i) for i in range(len(perm))]
            self.node("Transpose", [y], s, perm=inv)

    def reshape(self):
        x, s = self.pick()
        target = self.draw(st.sampled_from(["same", "flat", "minus1"]))
        if target == "same":
            shape = list(s)
        elif target == "flat":
            shape = [s[0], -1]
        else:
            shape = [-1] + list(s[1:])
        new = tuple(s) if target != "flat" else (s[0], int(np.prod(s[1:])))
        (y,) = self.node("Reshape", [x, self.const(np.array(shape, np.int64), "shape")], new)
        if target == "flat" and self.draw(st.booleans()):
            self.node("Reshape", [y, self.const(np.array(s, np.int64), "shape")], s)

    def concat_split(self):
        x, s = self.pick()
        axis = self.draw(st.integers(0, len(s) - 1))
        (y,) = self.node("Concat", [x, x], tuple(d * 2 if i == axis else d for i, d in enumerate(s)), axis=axis)
        self.pool.pop()
        self.node("Split", [y, self.const(np.array([s[axis], s[axis]], np.int64), "split")], s, n_out=2, axis=axis)

    def const_expr(self):
        x, s = self.pick()
        a = self.const(self.rng.uniform(0.5, 1.5, s[-1:]).astype(np.float32))
        b = self.const(self.rng.uniform(0.5, 1.5, s[-1:]).astype(np.float32))
        (ab,) = self.node("Mul", [a, b], None)
        (e,) = self.node("Exp", [ab], None)
        self.node("Add", [x, e], s)

    def shape_chain(self):
        x, s = self.pick()
        (sh,) = self.node("Shape", [x], None)
        if self.draw(st.booleans()):  # the batch dim (symbolic or not) and -1
            (g,) = self.node("Gather", [sh, self.const(np.array([0], np.int64), "idx")], None, axis=0)
            (t,) = self.node("Concat", [g, self.const(np.array([-1], np.int64), "m1")], None, axis=0)
            self.node("Reshape", [x, t], (s[0], int(np.prod(s[1:]))))
        else:  # -1 and the product of the other (static) dims
            (tail,) = self.node("Slice", [sh, self.const(np.array([1], np.int64), "st"),
                                          self.const(np.array([2**63 - 1], np.int64), "en")], None)
            (p,) = self.node("ReduceProd", [tail], None, keepdims=1)
            (t,) = self.node("Concat", [self.const(np.array([-1], np.int64), "m1"), p], None, axis=0)
            self.node("Reshape", [x, t], (s[0], int(np.prod(s[1:]))))

    def unsqueeze_reshape(self):
        x, s = self.pick()
        (u,) = self.node("Unsqueeze", [x, self.const(np.array([1], np.int64), "ax")], None)
        self.node("Reshape", [u, self.const(np.array([-1] + list(s[1:]), np.int64), "shape")], s)

    def duplicate(self):
        if not self.nodes:
            return self.unary()
        src = self.nodes[self.draw(st.integers(0, len(self.nodes) - 1))]
        if src.op_type in ("Split",):
            return self.unary()
        shape = next((p[1] for p in self.pool if p[0] == src.output[0]), None)
        self.node(src.op_type, list(src.input), shape, n_out=len(src.output),
                  **{a.name: h.get_attribute_value(a) for a in src.attribute})

    def dead(self):
        x, s = self.pick()
        (y,) = self.node("Exp", [x], None)
        self.node("Log", [y], None)


def build(data) -> onnx.ModelProto:
    b = Builder(data, data.draw(st.integers(0, 2**16)))
    shape = (2, data.draw(st.integers(2, 4)), data.draw(st.integers(2, 4)), data.draw(st.integers(2, 4)))
    b.pool.append(("x", shape))
    for _ in range(data.draw(st.integers(3, 12))):
        b.step()
    outs = [b.pool[-1]]
    if len(b.pool) > 2 and data.draw(st.booleans()):
        extra = b.pool[data.draw(st.integers(1, len(b.pool) - 2))]
        if extra[0] != outs[0][0]:
            outs.append(extra)
    batch = data.draw(st.sampled_from([2, "N"]))  # a symbolic batch keeps shape folding honest
    inputs = [h.make_tensor_value_info("x", T.FLOAT, (batch,) + shape[1:])]
    outputs = [h.make_tensor_value_info(n, T.FLOAT, None) for n, _ in outs]
    m = h.make_model(h.make_graph(b.nodes, "random", inputs, outputs, initializer=b.inits),
                     opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)
    for o, io in zip(m.graph.output, inferred.graph.output):
        o.CopyFrom(io)
    onnx.checker.check_model(m)
    return m


def run(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_lossless_pipeline_keeps_outputs(data):
    m = build(data)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"], report.validation
    assert [o.name for o in result.graph.output] == [o.name for o in m.graph.output]
    assert sum(1 for _ in result.graph.node) <= len(m.graph.node)
    x = np.random.default_rng(7).standard_normal((2,) + tuple(
        d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:])).astype(np.float32)
    for a, b in zip(run(m, x), run(result, x)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# -- If nodes whose condition is known ---------------------------------------------------------------

class IfBuilder(Builder):
    """Steps that include If nodes whose condition is a constant, a Constant node or a static-shape test,
    nested up to two deep, with branches that read outer values and hold their own initializers.
    Sibling branches reuse the same local names (L<depth>_<k>), so inlining them must rename."""

    def __init__(self, data, seed: int, parent: "IfBuilder | None" = None) -> None:
        super().__init__(data, seed)
        self.depth = 0 if parent is None else parent.depth + 1
        self.dynamic = 0  # Ifs whose condition depends on the data (they must stay)
        self.local = 0
        if parent is not None:
            self.rng = parent.rng
            self.pool = list(parent.pool)  # outer values the branch may read

    def name(self, base: str) -> str:
        if self.depth == 0:
            return super().name(base)
        self.local += 1
        return f"L{self.depth}_{self.local}"

    def step(self) -> None:
        kinds = ["unary", "binary_const", "binary", "const_expr", "if_const", "if_shape"]
        if self.depth == 0:
            kinds += ["transpose", "reshape", "shape_chain", "if_const", "if_dynamic"]
        elif self.depth >= 2:
            kinds = kinds[:4]
        kind = self.draw(st.sampled_from(kinds))
        if kind.startswith("if_"):
            return self.if_step(kind[3:])
        getattr(self, kind)()

    def condition(self, kind: str, x: str, s: tuple[int, ...]) -> str:
        if kind == "const":
            value = np.array(self.draw(st.booleans()))
            if self.draw(st.booleans()):
                return self.const(value, "cond")
            return self.node("Constant", [], None, value=nh.from_array(value, self.name("cv")))[0]
        if kind == "shape" and len(s) > 1:  # a static dim (the batch may be symbolic) against a constant
            axis = self.draw(st.integers(1, len(s) - 1))
            (sh,) = self.node("Shape", [x], None)
            (d,) = self.node("Gather", [sh, self.const(np.array(axis, np.int64), "ax")], None, axis=0)
            want = s[axis] + self.draw(st.sampled_from([0, 1]))
            return self.node("Equal", [d, self.const(np.array(want, np.int64), "dim")], None)[0]
        self.dynamic += 1
        (r,) = self.node("ReduceSum", [x], None, keepdims=0)
        return self.node("Greater", [r, self.const(np.float32(0), "zero")], None)[0]

    def if_step(self, kind: str) -> None:
        x, s = self.pick()
        cond = self.condition(kind, x, s)
        bodies = []
        for side in ("then", "else"):
            sub = IfBuilder(self.data, 0, parent=self)
            for _ in range(self.draw(st.integers(1, 3))):
                sub.step()
            self.dynamic += sub.dynamic
            local = [p for p in sub.pool[len(self.pool):] if p[1] == s and not any(p[0] == t.name for t in sub.inits)]
            out = local[-1][0] if local else sub.node("Identity", [x], s)[0]
            bodies.append(h.make_graph(sub.nodes, f"{side}{self.count}", [],
                                       [h.make_tensor_value_info(out, T.FLOAT, (None,) + tuple(s[1:]))],
                                       initializer=sub.inits))
        self.node("If", [cond], s, then_branch=bodies[0], else_branch=bodies[1])


def build_with_ifs(data) -> tuple[onnx.ModelProto, int]:
    b = IfBuilder(data, data.draw(st.integers(0, 2**16)))
    shape = (2, data.draw(st.integers(2, 4)), data.draw(st.integers(2, 4)))
    b.pool.append(("x", shape))
    for _ in range(data.draw(st.integers(2, 8))):
        b.step()
    if not any(n.op_type == "If" for n in b.nodes):
        b.if_step("const")
    batch = data.draw(st.sampled_from([2, "N"]))
    inputs = [h.make_tensor_value_info("x", T.FLOAT, (batch,) + shape[1:])]
    outputs = [h.make_tensor_value_info(b.pool[-1][0], T.FLOAT, None)]
    m = h.make_model(h.make_graph(b.nodes, "random_if", inputs, outputs, initializer=b.inits),
                     opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)
    for o, io in zip(m.graph.output, inferred.graph.output):
        o.CopyFrom(io)
    onnx.checker.check_model(m)
    return m, b.dynamic


def _ifs(g: onnx.GraphProto) -> int:
    return sum(1 + sum(_ifs(a.g) for a in n.attribute if a.HasField("g")) if n.op_type == "If"
               else sum(_ifs(a.g) for a in n.attribute if a.HasField("g")) for n in g.node)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_lossless_pipeline_inlines_ifs_with_known_conditions(data):
    m, dynamic = build_with_ifs(data)
    x = np.random.default_rng(7).standard_normal((2,) + tuple(
        d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:])).astype(np.float32)
    want = run(m, x)
    result, report = onnxslim.optimize(m, passes="lossless")
    assert report.validation["passed"], report.validation
    onnx.checker.check_model(result, full_check=True)
    # Ifs with data-dependent conditions stay (those nested in a dropped branch go with it).
    assert _ifs(result.graph) <= dynamic
    if dynamic == 0:
        assert _ifs(result.graph) == 0
    for a, b in zip(want, run(result, x)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
