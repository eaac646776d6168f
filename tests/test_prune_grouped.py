"""Grouped convolutions and channel shuffles under structured pruning (RegNet / ShuffleNet structures).

Same oracle as tests/test_prune.py: zero some units at their source (weights, bias, BatchNorm scale and
shift, per-channel constants) so that they are exactly 0 wherever they are read, then prune; the outputs
must not change. A grouped conv loses whole groups (the producer's channels of the group, its own output
channels, the SE gate's), so a wrong ``group`` attribute, a weight sliced on the wrong axis or a group
removed on one side only changes the outputs or breaks the model in onnxruntime. A channel shuffle
(Reshape -> Transpose -> Reshape) is a permutation: a channel mapped to the wrong place changes the outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim import prune as ch
from onnxslim.api import optimize
from onnxslim.graph import const_value, to_proto
from onnxslim.runtime import make_session

RNG = np.random.default_rng(0)


class _Builder:
    """A tiny NCHW model builder: every layer gets random weights (BatchNorm with random statistics)."""

    def __init__(self, cin: int, hw: int = 6) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.hw = hw
        self.n = 0
        self.x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])

    def _name(self, op: str) -> str:
        self.n += 1
        return f"{op}{self.n}"

    def const(self, v: np.ndarray, name: str | None = None) -> str:
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(v), name))
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        name = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, bn: bool = True, act: bool = True) -> str:
        w = (RNG.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype(np.float32)
        b = (RNG.standard_normal(cout) * 0.1).astype(np.float32)
        y = self.op("Conv", [x, self.const(w), self.const(b)], group=group, pads=[k // 2] * 4, kernel_shape=[k, k])
        if bn:
            p = [RNG.uniform(0.5, 1.5, cout), RNG.standard_normal(cout) * 0.1, RNG.standard_normal(cout) * 0.1,
                 RNG.uniform(0.5, 1.5, cout)]
            y = self.op("BatchNormalization", [y] + [self.const(v.astype(np.float32)) for v in p])
        return self.op("Relu", [y]) if act else y

    def model(self, y: str, cout: int) -> onnx.ModelProto:
        out = helper.make_tensor_value_info(y, TensorProto.FLOAT, None)
        g = helper.make_graph(self.nodes, "m", [self.x], [out], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return onnx.shape_inference.infer_shapes(m)


def regnet_like() -> onnx.ModelProto:
    """1x1 -> grouped 3x3 (8 groups of 4) -> SE gate (Mul) -> grouped 3x3 widening 4 -> 8 per group ->
    depthwise with channel multiplier 2 (group == C_in) -> 1x1 reader."""
    b = _Builder(4)
    a = b.conv("x", 4, 32)
    t = b.conv(a, 32, 32, k=3, group=8)
    s = b.op("GlobalAveragePool", [t])
    s = b.conv(s, 32, 8, bn=False)
    s = b.op("Sigmoid", [b.conv(s, 8, 32, bn=False, act=False)])
    u = b.op("Mul", [t, s])
    v = b.conv(u, 32, 64, k=3, group=8)
    y = b.conv(v, 64, 128, k=3, group=64)
    return b.model(b.conv(y, 128, 8, bn=False, act=False), 8)


def shuffle_net() -> onnx.ModelProto:
    """Two ShuffleNet-v2 units: halves by Slice, one branch conv, Concat, channel shuffle by
    Reshape [0, 2, 8, H, W] -> Transpose -> Reshape [0, 16, H, W]."""
    b = _Builder(4)
    r = b.conv("x", 4, 16)
    hw = b.hw
    for _ in range(2):
        x1 = b.op("Slice", [r, b.const(np.array([0])), b.const(np.array([8])), b.const(np.array([1]))])
        x2 = b.op("Slice", [r, b.const(np.array([8])), b.const(np.array([16])), b.const(np.array([1]))])
        c = b.op("Concat", [x1, b.conv(x2, 8, 8, k=3)], axis=1)
        c = b.op("Reshape", [c, b.const(np.array([0, 2, 8, hw, hw]))])
        c = b.op("Transpose", [c], perm=[0, 2, 1, 3, 4])
        r = b.op("Reshape", [c, b.const(np.array([0, 16, hw, hw]))])
    return b.model(b.conv(r, 16, 6, bn=False, act=False), 6)


def zeroed(model: onnx.ModelProto, keep: np.ndarray) -> onnx.ModelProto:
    """``model`` with the atoms ``keep`` drops zeroed at their sources (readers' input channels left)."""
    an = ch.analyze(ch.traced_graph(model))
    readers = {(c.node, c.weight_axis) for c in an.consumers}
    graph = an.graph
    by_input: dict[tuple[int, int], list] = {}
    for e in an.edits:
        node = graph.nodes[e.node]
        if node.op == "Conv" and e.index == 1 and (e.node, e.axis) in readers:
            continue
        if node.op == "BatchNormalization" and e.index > 2:
            continue  # mean and variance: gamma = beta = 0 already makes the output 0
        by_input.setdefault((e.node, e.index), []).append(e)
    for (i, k), edits in by_input.items():
        node = graph.nodes[i]
        v = np.array(const_value(node.inputs[k]), copy=True)
        for e in edits:
            idx = [slice(None)] * v.ndim
            idx[e.axis] = ~ch.keep_positions(e.ids, keep)
            v[tuple(idx)] = 0
        node.inputs[k] = gs.Constant(f"{node.inputs[k].name}_zeroed_{i}_{k}", v)
    return to_proto(graph, model)


def random_keep(an: ch.Analysis, ratio: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = np.ones(an.n_atoms, bool)
    for g in an.groups:
        if g.prunable:
            k = ch.kept_count(g.channels, ratio)
            for u in rng.choice(g.channels, g.channels - k, replace=False):
                keep[g.units[u]] = False
    return keep


def feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, 4, 6, 6)).astype(np.float32)}


def run(model: onnx.ModelProto) -> np.ndarray:
    return make_session(model).run(None, feeds())[0]


def prune_pass(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    options.setdefault("round_to", 1)
    out, report = optimize(model, None, passes="prune", validate=False, latency=False, auto_lossless=False,
                           options={"latency": False, **options})
    return out, report.extra.get("prune", {})


def convs(model: onnx.ModelProto) -> list[tuple[int, tuple]]:
    init = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            out.append((group, tuple(init[n.input[1]].dims)))
    return out


def test_grouped_conv_loses_whole_groups_exactly() -> None:
    model = regnet_like()
    an = ch.analyze(ch.traced_graph(model))
    grouped = [g for g in an.groups if g.width > 1]
    assert len(grouped) == 1 and grouped[0].prunable, [(g.id, g.reasons) for g in an.groups]
    g = grouped[0]
    # One unit per conv group: 4 + 4 channels of the 1x1 and the grouped 3x3, 4 of the SE gate, 8 of the
    # widening grouped conv, 16 of the depthwise multiplier.
    assert g.channels == 8 and g.width == 16 and all(len(u) == 4 + 4 + 4 + 8 + 16 for u in g.units)
    keep = random_keep(an, 0.25)
    z = zeroed(model, keep)
    ref = run(z)
    assert np.abs(ref).max() > 1e-2
    pruned, rep = prune_pass(z, prune_ratio=0.25)
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run(pruned), ref, rtol=1e-4, atol=1e-5)
    kept_groups = sum(bool(keep[u[0]]) for u in g.units)
    assert kept_groups == 6
    # group attribute and weight shapes agree: every grouped conv keeps its in-group widths.
    before, after = convs(model), convs(pruned)
    assert len(before) == len(after)
    for (g0, w0), (g1, w1) in zip(before, after):
        if g0 > 1:
            assert g1 == g0 * kept_groups // 8 and w1[1] == w0[1] and w1[0] == w0[0] * kept_groups // 8
    assert rep["params"]["after"] < rep["params"]["before"] and rep["macs"]["after"] < rep["macs"]["before"]


def test_grouped_conv_oracle_can_fail() -> None:
    """Control: removing groups other than the zeroed ones changes the outputs."""
    model = regnet_like()
    an = ch.analyze(ch.traced_graph(model))
    keep = random_keep(an, 0.25)
    z = zeroed(model, keep)
    an = ch.analyze(ch.traced_graph(z))
    g = next(g for g in an.groups if g.width > 1)
    wrong = keep.copy()
    wrong[np.concatenate(g.units)] = True
    dead = [k for k, u in enumerate(g.units) if not keep[u[0]]]
    for k in dead:
        wrong[g.units[(k + 1) % g.channels if (k + 1) % g.channels not in dead else (k + 2) % g.channels]] = False
    graph, _ = ch.pruned_copy(an, wrong)
    out = make_session(ch.export(graph, z)).run(None, feeds())[0]
    assert np.abs(out - run(z)).max() > 1e-3


def test_grouped_rounding_counts_channels() -> None:
    """round_to counts channels: 16 groups of 4 at ratio 0.3 keep 48 channels (12 groups), the multiple of 8
    nearest 44.8, not 8 groups (rounding the group count to 8)."""
    b = _Builder(4)
    t = b.conv(b.conv("x", 4, 64), 64, 64, k=3, group=16)
    model = b.model(b.conv(t, 64, 8, bn=False, act=False), 8)
    pruned, rep = prune_pass(model, prune_ratio=0.3, round_to=8)
    row = next(r for r in rep["groups"] if r["width"] > 1)
    assert row["width"] == 4 and row["channels"] == 16
    assert row["kept"] * row["width"] == int(np.floor(64 * 0.7 / 8 + 0.5)) * 8
    assert [c for c in convs(pruned) if c[0] > 1] == [(row["kept"], (row["kept"] * 4, 4, 3, 3))]
    assert any(f"16 -> {row['kept']} groups of 4" in line for line in rep["summary"])
    make_session(pruned).run(None, feeds())


def _shuffle_keep(an: ch.Analysis, drop: dict[str, list[int]]) -> np.ndarray:
    """Keep mask dropping output channels of sources by their position in the graph: 'A' the stem conv,
    'B'/'D' the branch convs of the first/second unit."""
    srcs = {name: an.sources[k] for name, k in zip("ABD", range(3))}
    keep = np.ones(an.n_atoms, bool)
    for name, pos in drop.items():
        keep[srcs[name].out_ids[pos]] = False
    return keep


@pytest.mark.parametrize("drop, gathers", [
    # The same columns of both rows of the [2, 8] grid in both units: still shuffles, of 14 and 12 channels.
    ({"A": [1], "B": [1], "D": [2, 3]}, 0),
    # Unit 1: column 0 of row 0, column 5 of row 1 -> one Gather in shuffled order; unit 2 drops column 0 of
    # both rows (position 0 of the first shuffle's output is A's channel 0) -> still a shuffle.
    ({"A": [0, 12], "B": [5], "D": [0]}, 1),
])
def test_channel_shuffle_pruned_across(drop: dict[str, list[int]], gathers: int) -> None:
    model = shuffle_net()
    an = ch.analyze(ch.traced_graph(model))
    assert [g.prunable for g in an.groups] == [True, True, True, False], [g.reasons for g in an.groups]
    keep = _shuffle_keep(an, drop)
    z = zeroed(model, keep)
    ref = run(z)
    an = ch.analyze(ch.traced_graph(z))
    graph, _ = ch.pruned_copy(an, keep)
    pruned = ch.export(graph, z)
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(make_session(pruned).run(None, feeds())[0], ref, rtol=1e-4, atol=1e-5)
    ops = [n.op_type for n in pruned.graph.node]
    assert ops.count("Gather") == gathers and ops.count("Transpose") == 2 - gathers
    assert ops.count("Reshape") == 2 * (2 - gathers)


def test_channel_shuffle_prune_pass_oracle() -> None:
    model = shuffle_net()
    an = ch.analyze(ch.traced_graph(model))
    keep = random_keep(an, 0.25, seed=3)
    z = zeroed(model, keep)
    ref = run(z)
    pruned, rep = prune_pass(z, prune_ratio=0.25)
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run(pruned), ref, rtol=1e-4, atol=1e-5)
    assert [r["kept"] for r in rep["groups"][:3]] == [12, 6, 6]


def test_cases_left_whole_with_reasons() -> None:
    # A grouped conv reading the graph input: its groups cannot go (the input is never changed).
    b = _Builder(4)
    t = b.conv("x", 4, 8, k=3, group=2)
    an = ch.analyze(ch.traced_graph(b.model(b.conv(t, 8, 4, bn=False, act=False), 4)))
    g = an.groups[0]
    assert not g.prunable and "grouped convolution (group=2)" in g.reasons[0]
    # A reshape -> transpose -> reshape that is not a channel shuffle (the spatial axes are swapped too).
    b = _Builder(4)
    r = b.conv("x", 4, 16)
    r = b.op("Reshape", [r, b.const(np.array([0, 2, 8, 6, 6]))])
    r = b.op("Transpose", [r], perm=[0, 2, 1, 4, 3])
    r = b.op("Reshape", [r, b.const(np.array([0, 16, 6, 6]))])
    an = ch.analyze(ch.traced_graph(b.model(b.conv(r, 16, 4, bn=False, act=False), 4)))
    g = an.groups[0]
    assert not g.prunable and "reshapes the channel axis" in g.reasons[0]
