"""Fuzz corpus for onnxslim: valid models, mutated in ways real files break and hostile files attack.

    python tools/fuzz.py DIR [--cases 600] [--seed 0] [--run] [--subprocess N] [--json out.json]

Builds a deterministic corpus (same seed, same files) of at least 500 cases under DIR, one folder
per case (``model.onnx`` plus any data files), and with ``--run`` runs ``onnxslim IN OUT`` on each:
in-process (``onnxslim.cli.main`` with a fresh argv, stderr captured) for speed, and ``--subprocess N``
of them as real processes (catches anything printed by C++ code or a hard crash).

Every case must end in one of: the output written and it matches the original in onnxruntime (or
the original cannot run, then the output must keep the original's interface and pass the checker),
or exit 1/2 with exactly one line on stderr. Never a traceback, never past the timeout, never a
partial output, never a modified input. tests/test_fuzz.py imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TIMEOUT = 30.0
OPSET = 17


# ---------------------------------------------------------------------------------------------
# Valid base models (small, deterministic; weights >= 1 KB so that lazy loading is exercised)

def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def base_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(_w(rng, 16, 32), "W1"), numpy_helper.from_array(_w(rng, 32), "B1"),
             numpy_helper.from_array(_w(rng, 32, 8), "W2"), numpy_helper.from_array(np.array([2.0], np.float32), "two")]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["ri"], name="id"),
        helper.make_node("MatMul", ["ri", "W2"], ["m2"], name="mm2"),
        helper.make_node("Mul", ["m2", "two"], ["y"], name="mul"),
        helper.make_node("Sigmoid", ["x"], ["dead"], name="dead"),
    ]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuzz")


def base_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    c = 8
    inits = [numpy_helper.from_array(_w(rng, c, 3, 3, 3), "conv_w"), numpy_helper.from_array(_w(rng, c), "conv_b"),
             numpy_helper.from_array(np.abs(_w(rng, c)) + 1, "bn_s"), numpy_helper.from_array(_w(rng, c), "bn_b"),
             numpy_helper.from_array(_w(rng, c), "bn_m"), numpy_helper.from_array(np.abs(_w(rng, c)) + 0.5, "bn_v"),
             numpy_helper.from_array(_w(rng, 10, c * 4 * 4), "fc_w"), numpy_helper.from_array(_w(rng, 10), "fc_b"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape")]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["b1"], name="bn"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Reshape", ["p1", "flat_shape"], ["f1"], name="flat"),
        helper.make_node("Gemm", ["f1", "fc_w", "fc_b"], ["y"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuzz")


def base_if() -> onnx.ModelProto:
    """If whose branches read an outer-scope weight, inside a Loop body (nested subgraphs)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(_w(rng, 16, 16), "W")
    then_g = helper.make_graph([helper.make_node("MatMul", ["acc_in", "W"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["acc_in"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("If", ["flag"], ["acc_out"], then_branch=then_g, else_branch=else_g)],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["flag"]),
        helper.make_node("Loop", ["trip", "true", "x"], ["y"], body=body),
    ]
    inits = [w, numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(2, np.int64), "trip"), numpy_helper.from_array(np.array(True), "true")]
    g = helper.make_graph(nodes, "if_loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuzz")


def base_shape() -> onnx.ModelProto:
    """A constant shape subgraph (Shape -> Gather -> Concat -> Reshape) and a custom-domain op."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array([-1], np.int64), "m1"),
             numpy_helper.from_array(_w(rng, 24, 24), "W")]
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "i0"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "m1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["x", "newshape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Gelu", ["mm"], ["y"], domain="com.microsoft"),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axes"))
    g = helper.make_graph(nodes, "shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 24])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                             producer_name="fuzz")


BASES: dict[str, Callable[[], onnx.ModelProto]] = {"mlp": base_mlp, "cnn": base_cnn, "if": base_if, "shape": base_shape}


# ---------------------------------------------------------------------------------------------
# Mutations. Each takes (model, rng) and changes the model in place; some return a label suffix.

def _node(m: onnx.ModelProto, rng: random.Random) -> onnx.NodeProto:
    return m.graph.node[rng.randrange(len(m.graph.node))]


def _init(m: onnx.ModelProto, rng: random.Random) -> TensorProto:
    big = [t for t in m.graph.initializer if len(t.raw_data) >= 1024]
    pool = big if big and rng.random() < 0.6 else list(m.graph.initializer)
    return pool[rng.randrange(len(pool))]


def m_drop_node_input(m, rng):
    n = _node(m, rng)
    if n.input:
        del n.input[rng.randrange(len(n.input))]


def m_empty_node_input(m, rng):
    n = _node(m, rng)
    if n.input:
        n.input[rng.randrange(len(n.input))] = ""


def m_drop_node_output(m, rng):
    n = _node(m, rng)
    if n.output:
        del n.output[rng.randrange(len(n.output))]


def m_dangling_input(m, rng):
    n = _node(m, rng)
    if n.input:
        n.input[rng.randrange(len(n.input))] = f"ghost_{rng.randrange(100)}"


def m_cycle(m, rng):
    nodes = m.graph.node
    if len(nodes) < 2:
        return
    i = rng.randrange(len(nodes) - 1)
    j = rng.randrange(i + 1, len(nodes))
    if nodes[i].input and nodes[j].output:
        nodes[i].input[rng.randrange(len(nodes[i].input))] = nodes[j].output[0]


def m_self_loop(m, rng):
    n = _node(m, rng)
    if n.input and n.output:
        n.input[0] = n.output[0]


def m_dup_output_name(m, rng):
    nodes = m.graph.node
    if len(nodes) >= 2:
        a, b = rng.sample(range(len(nodes)), 2)
        nodes[b].output[0] = nodes[a].output[0]


def m_dup_initializer(m, rng):
    t = _init(m, rng)
    c = m.graph.initializer.add()
    c.CopyFrom(t)
    if rng.random() < 0.5 and c.raw_data:
        c.raw_data = bytes(reversed(c.raw_data))


def m_init_named_like_output(m, rng):
    t = _init(m, rng)
    t.name = _node(m, rng).output[0]


def m_input_named_like_output(m, rng):
    m.graph.input[0].name = _node(m, rng).output[0]


def m_dtype_mismatch(m, rng):
    t = _init(m, rng)
    t.data_type = rng.choice([TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.UINT8,
                              TensorProto.STRING, TensorProto.BOOL, 0, 99, TensorProto.INT4, TensorProto.BFLOAT16])


def m_size_mismatch(m, rng):
    t = _init(m, rng)
    if t.raw_data:
        cut = rng.randrange(len(t.raw_data))
        t.raw_data = t.raw_data[:cut] if rng.random() < 0.6 else t.raw_data + b"\x01" * rng.randrange(1, 64)


def m_dims_mismatch(m, rng):
    t = _init(m, rng)
    if t.dims:
        t.dims[rng.randrange(len(t.dims))] *= rng.choice([2, 3, 0])
    else:
        t.dims.append(rng.choice([0, 2, 5]))


def m_negative_dims(m, rng):
    if rng.random() < 0.5:
        t = _init(m, rng)
        if t.dims:
            t.dims[0] = -rng.randrange(1, 5)
        else:
            t.dims.append(-1)
    else:
        shape = m.graph.input[0].type.tensor_type.shape
        if shape.dim:
            shape.dim[rng.randrange(len(shape.dim))].dim_value = -rng.randrange(1, 5)


def m_enormous_dims(m, rng):
    huge = rng.choice([2**31, 2**40, 2**62, 10**12])
    choice = rng.random()
    if choice < 0.4:
        shape = m.graph.input[0].type.tensor_type.shape
        if shape.dim:
            shape.dim[rng.randrange(len(shape.dim))].dim_value = huge
    elif choice < 0.7:
        t = _init(m, rng)
        if t.dims:
            t.dims[0] = huge
        else:
            t.dims.append(huge)
    else:
        # A Constant-of-shape bomb feeding a real op (folding it must stay bounded).
        m.graph.node.append(helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])))
        m.graph.node.append(helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0))
        m.graph.initializer.append(numpy_helper.from_array(np.array([huge // 2**20, 2**20], np.int64), "bomb_shape"))
        m.graph.output.append(helper.make_tensor_value_info("bomb_sum", TensorProto.FLOAT, []))


def m_missing_opset(m, rng):
    del m.opset_import[:]


def m_opset_too_new(m, rng):
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = rng.choice([99, 1000, 2**31 - 1])


def m_opset_too_old(m, rng):
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = rng.choice([1, 6, 9])


def m_ir_version(m, rng):
    m.ir_version = rng.choice([0, 1, 2, 3, 99, -1])


def m_unknown_op(m, rng):
    _node(m, rng).op_type = rng.choice(["NoSuchOp", "", "Conv2D", "relu", "MatMul "])


def m_unknown_domain(m, rng):
    n = _node(m, rng)
    n.domain = rng.choice(["com.unknown", "ai.onnx.contrib", "com.microsoft", "x" * 300])
    if rng.random() < 0.5:
        m.opset_import.append(helper.make_opsetid(n.domain, 1))


def m_orphan_output(m, rng):
    m.graph.output.append(helper.make_tensor_value_info(f"nothing_makes_me_{rng.randrange(9)}", TensorProto.FLOAT, [1]))


def m_drop_outputs(m, rng):
    if rng.random() < 0.5:
        del m.graph.output[:]
    else:
        m.graph.output[0].name = "renamed_output"


def m_drop_inputs(m, rng):
    del m.graph.input[:]


def m_clear_types(m, rng):
    v = rng.choice(list(m.graph.input) + list(m.graph.output))
    v.type.Clear() if rng.random() < 0.5 else v.type.tensor_type.ClearField("elem_type")


def m_value_info_garbage(m, rng):
    name = _node(m, rng).output[0]
    m.graph.value_info.append(helper.make_tensor_value_info(name, rng.choice([TensorProto.STRING, TensorProto.INT8]),
                                                            [rng.randrange(1, 9)] * rng.randrange(0, 5)))


def m_attribute(m, rng):
    n = _node(m, rng)
    if n.attribute and rng.random() < 0.5:
        a = n.attribute[rng.randrange(len(n.attribute))]
        if rng.random() < 0.4:
            n.attribute.remove(a)
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[rng.randrange(len(a.ints))] = rng.choice([-5, 0, 2**40, 99])
        elif a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([-5, 0, 2**40, 99])
        else:
            a.type = rng.choice([onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING, onnx.AttributeProto.GRAPH])
    else:
        name = rng.choice(["axis", "pads", "kernel_shape", "perm", "to", "transB", "bogus"])
        n.attribute.append(helper.make_attribute(name, rng.choice([7, [1, 2, 3], -1, "s", 0.5])))


def m_empty_graph(m, rng):
    del m.graph.node[:]


def m_swap_ops(m, rng):
    nodes = m.graph.node
    if len(nodes) >= 2:
        a, b = rng.sample(range(len(nodes)), 2)
        nodes[a].op_type, nodes[b].op_type = nodes[b].op_type, nodes[a].op_type


def m_subgraph(m, rng):
    """Break something inside a subgraph (If/Loop bodies), when the model has one."""
    graphs = []

    def walk(g):
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    graphs.append(a.g)
                    walk(a.g)

    walk(m.graph)
    if not graphs:
        return m_dangling_input(m, rng)
    g = rng.choice(graphs)
    what = rng.randrange(4)
    if what == 0 and g.node and g.node[0].input:
        g.node[0].input[0] = "ghost_inner"
    elif what == 1:
        del g.output[:]
    elif what == 2 and g.node:
        g.node[0].op_type = "NoSuchInnerOp"
    else:
        g.output.append(helper.make_tensor_value_info("inner_orphan", TensorProto.FLOAT, None))


def m_string_tensor(m, rng):
    t = _init(m, rng)
    t.ClearField("raw_data")
    t.data_type = TensorProto.STRING
    t.string_data.extend([b"\xff\xfe", b"abc"])


def m_typed_and_raw(m, rng):
    t = _init(m, rng)
    t.float_data.extend([1.0, 2.0])  # raw_data and float_data at once


def m_sparse(m, rng):
    sp = m.graph.sparse_initializer.add()
    sp.dims.extend([4, 4])
    sp.values.CopyFrom(numpy_helper.from_array(np.ones(3, np.float32), "sp"))
    sp.indices.CopyFrom(numpy_helper.from_array(np.array([0, 5, rng.choice([15, 99, -1])], np.int64), "sp_i"))


def m_random_field(m, rng):
    """Set a random scalar field somewhere in the model to a random value (generic protobuf fuzz)."""
    msgs: list = []

    def collect(msg, depth=0):
        msgs.append(msg)
        if depth > 6:
            return
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            items = list(value) if getattr(fd, "is_repeated", False) or (
                not hasattr(fd, "is_repeated") and fd.label == fd.LABEL_REPEATED) else [value]
            for item in items[:8]:
                collect(item, depth + 1)

    collect(m)
    msg = rng.choice(msgs)
    scalars = [fd for fd in msg.DESCRIPTOR.fields if fd.message_type is None]
    if not scalars:
        return
    fd = rng.choice(scalars)
    repeated = getattr(fd, "is_repeated", None)
    if repeated is None:
        repeated = fd.label == fd.LABEL_REPEATED
    try:
        if fd.type in (fd.TYPE_STRING,):
            val = rng.choice(["", "x", "../../etc/passwd", "\u00e9" * 3, "a" * 1000])
        elif fd.type == fd.TYPE_BYTES:
            val = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        elif fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
            val = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30])
        elif fd.type == fd.TYPE_ENUM:
            val = rng.choice([0, 1, 2, 3])
        elif fd.type == fd.TYPE_BOOL:
            val = bool(rng.randrange(2))
        else:
            val = rng.choice([0, 1, -1, 7, 2**31 - 1, -(2**31), 2**40])
        if repeated:
            getattr(msg, fd.name).append(val)
        else:
            setattr(msg, fd.name, val)
    except (ValueError, TypeError):
        pass


# Mutations that keep the model valid but odd: they exercise the passes rather than the loader.

def v_dead_branch(m, rng):
    src = m.graph.input[0].name
    prev = src
    for i in range(rng.randrange(1, 4)):
        m.graph.node.append(helper.make_node(rng.choice(["Relu", "Neg", "Abs", "Identity"]), [prev], [f"dead_{i}"]))
        prev = f"dead_{i}"


def v_identity_chain(m, rng):
    out = m.graph.output[0]
    prod = next((n for n in m.graph.node if out.name in n.output), None)
    if prod is None:
        return
    k = list(prod.output).index(out.name)
    prod.output[k] = "chain_0"
    n = rng.randrange(1, 5)
    for i in range(n):
        m.graph.node.append(helper.make_node("Identity", [f"chain_{i}"], [out.name if i == n - 1 else f"chain_{i + 1}"]))


def v_duplicate_subexpression(m, rng):
    """The same computation twice, both results used (a CSE target)."""
    out = m.graph.output[0]
    prod = next((n for n in m.graph.node if out.name in n.output), None)
    if prod is None or len(prod.output) != 1:
        return
    twin = m.graph.node.add()
    twin.CopyFrom(prod)
    twin.name = (prod.name or "n") + "_twin"
    twin.output[0] = "twin_out"
    prod.output[0] = "orig_out"
    m.graph.node.append(helper.make_node("Sub", ["orig_out", "twin_out"], ["zero_diff"]))
    m.graph.node.append(helper.make_node("Add", ["orig_out", "zero_diff"], [out.name]))


def v_unused_things(m, rng):
    m.graph.initializer.append(numpy_helper.from_array(np.arange(rng.randrange(1, 600), dtype=np.float32), "unused_w"))
    m.graph.value_info.append(helper.make_tensor_value_info("nobody", TensorProto.FLOAT, ["d"]))
    m.metadata_props.append(onnx.StringStringEntryProto(key="k" * rng.randrange(1, 50), value="\u00e9" * 100))
    m.doc_string = "x" * rng.randrange(0, 10000)


def v_weird_names(m, rng):
    """Rename every tensor, in every (sub)graph and consistently, to odd but legal names."""
    names: dict[str, str] = {}
    pool = ["a/b:0", "\u5f20\u91cf", "x" * 300, "with space", "0", "..", "onnx::Gemm_1", "/etc/passwd"]

    def new(name):
        if not name:
            return name
        if name not in names:
            names[name] = f"{pool[len(names) % len(pool)]}#{len(names)}"
        return names[name]

    def walk(g):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            v.name = new(v.name)
        for t in g.initializer:
            t.name = new(t.name)
        for n in g.node:
            n.input[:] = [new(x) for x in n.input]
            n.output[:] = [new(x) for x in n.output]
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)

    walk(m.graph)


def v_dynamic_dims(m, rng):
    for v in list(m.graph.input) + list(m.graph.output):
        shape = v.type.tensor_type.shape
        for d in shape.dim[:1]:
            d.Clear()
            d.dim_param = rng.choice(["batch", "N", "", "?"])


VALID_MUTATIONS: dict[str, Callable] = {
    "dead-branch": v_dead_branch, "identity-chain": v_identity_chain,
    "duplicate-subexpression": v_duplicate_subexpression, "unused-things": v_unused_things,
    "weird-names": v_weird_names, "dynamic-dims": v_dynamic_dims,
}


PROTO_MUTATIONS: dict[str, Callable] = {
    "drop-node-input": m_drop_node_input, "empty-node-input": m_empty_node_input,
    "drop-node-output": m_drop_node_output, "dangling-input": m_dangling_input, "cycle": m_cycle,
    "self-loop": m_self_loop, "duplicate-output-name": m_dup_output_name, "duplicate-initializer": m_dup_initializer,
    "initializer-named-like-output": m_init_named_like_output, "input-named-like-output": m_input_named_like_output,
    "dtype-mismatch": m_dtype_mismatch, "size-mismatch": m_size_mismatch, "dims-mismatch": m_dims_mismatch,
    "negative-dims": m_negative_dims, "enormous-dims": m_enormous_dims, "missing-opset": m_missing_opset,
    "opset-too-new": m_opset_too_new, "opset-too-old": m_opset_too_old, "ir-version": m_ir_version,
    "unknown-op": m_unknown_op, "unknown-domain": m_unknown_domain, "orphan-output": m_orphan_output,
    "drop-outputs": m_drop_outputs, "drop-inputs": m_drop_inputs, "clear-types": m_clear_types,
    "value-info-garbage": m_value_info_garbage, "attribute": m_attribute, "empty-graph": m_empty_graph,
    "swap-ops": m_swap_ops, "subgraph": m_subgraph, "string-tensor": m_string_tensor,
    "typed-and-raw": m_typed_and_raw, "sparse": m_sparse, "random-field": m_random_field,
}


def b_truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(1, len(data))]


def b_bitflip(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def b_splice(data: bytes, rng: random.Random) -> bytes:
    i, j = sorted(rng.randrange(len(data)) for _ in range(2))
    what = rng.randrange(4)
    if what == 0:
        return data[:i] + data[j:]  # delete a range
    if what == 1:
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32))) + data[i:]
    if what == 2:
        return data[:j] + data[i:j] + data[j:]  # duplicate a range
    return data[:i] + b"\0" * (j - i) + data[j:]


def b_header(data: bytes, rng: random.Random) -> bytes:
    """Garbage that looks a little like protobuf: a valid first key then junk, or lengths that lie."""
    what = rng.randrange(4)
    if what == 0:
        return b"\x3a" + bytes([0xFF] * 9) + data[10:]  # graph field with an absurd varint length
    if what == 1:
        return b"\x3a\xff\xff\xff\xff\x07" + data  # graph field claiming 2 GB
    if what == 2:
        return data + b"\x3a\x05abc"  # a second, truncated graph field
    return b"\x0b" + data  # a group start (wire type 3)


BYTE_MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": b_truncate, "bitflip": b_bitflip, "splice": b_splice, "wire-header": b_header,
}

# Whole-file cases that are not mutations of a model.
FILE_CASES = ["empty", "random-bytes", "text", "json", "zeros", "onnx-text-format"]

EXTERNAL_MUTATIONS = ["dotdot", "absolute", "symlink-out", "symlink-dir-out", "missing-file", "fifo-inside",
                      "fifo-outside", "offset-past-end", "length-past-end", "negative-offset", "bad-offset",
                      "nul-location", "forged-stub", "directory", "no-location", "ok", "ok-nested-dir", "backslash"]


# ---------------------------------------------------------------------------------------------
# Corpus

@dataclass
class Case:
    index: int
    kind: str      # proto | bytes | file | external | valid
    mutation: str
    base: str
    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def name(self) -> str:
        return f"{self.index:04d}-{self.kind}-{self.mutation}-{self.base}"


def _save_external(m: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> None:
    """Save with every tensor >= 1 KB in one data file (our own writer keeps this deterministic)."""
    offset = 0
    data = bytearray()
    for t in m.graph.initializer:
        if len(t.raw_data) >= 1024:
            raw = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            data += raw
            offset += len(raw)
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    (folder / location).write_bytes(bytes(data))
    (folder / "model.onnx").write_bytes(m.SerializeToString())


def outside_dir(root: Path) -> Path:
    """Files outside every case folder that no case may ever open: a FIFO (opening it blocks) and a secret."""
    out = root / "outside"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "fifo").exists():
        os.mkfifo(out / "fifo")
    (out / "secret.bin").write_bytes(b"\x42" * 4096)
    return out


def _external_case(m: onnx.ModelProto, folder: Path, mutation: str, rng: random.Random, root: Path) -> None:
    out = outside_dir(root)
    _save_external(m, folder)
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    t = ext[rng.randrange(len(ext))]
    info = {e.key: e for e in t.external_data}
    rel_out = os.path.relpath(out, folder)
    if mutation == "dotdot":
        info["location"].value = os.path.join(rel_out, rng.choice(["secret.bin", "fifo"]))
    elif mutation == "absolute":
        info["location"].value = str(out / rng.choice(["secret.bin", "fifo"]))
    elif mutation == "symlink-out":
        target = rng.choice(["secret.bin", "fifo"])
        os.symlink(out / target, folder / "link.bin")
        info["location"].value = "link.bin"
    elif mutation == "symlink-dir-out":
        os.symlink(out, folder / "sub")
        info["location"].value = "sub/" + rng.choice(["secret.bin", "fifo"])
    elif mutation == "missing-file":
        info["location"].value = "does_not_exist.bin"
    elif mutation == "fifo-inside":
        os.mkfifo(folder / "pipe.bin")
        info["location"].value = "pipe.bin"
    elif mutation == "fifo-outside":
        info["location"].value = "../" * 3 + "outside/fifo"
    elif mutation == "offset-past-end":
        info["offset"].value = str(10**9)
    elif mutation == "length-past-end":
        info["length"].value = str(10**9)
    elif mutation == "negative-offset":
        info["offset"].value = "-4096"
    elif mutation == "bad-offset":
        info["offset"].value = rng.choice(["abc", "1e3", "", " 12"])
    elif mutation == "nul-location":
        info["location"].value = "weights.bin\0../../outside/secret.bin"
    elif mutation == "forged-stub":
        info["location"].value = "\0onnxslim:1:0"
    elif mutation == "directory":
        (folder / "adir").mkdir()
        info["location"].value = "adir"
    elif mutation == "no-location":
        t.external_data.remove(info["location"])
    elif mutation == "ok-nested-dir":
        (folder / "nested").mkdir()
        os.replace(folder / "weights.bin", folder / "nested" / "weights.bin")
        for tt in ext:
            tt.external_data[0].value = "nested/weights.bin"
    elif mutation == "backslash":
        info["location"].value = "..\\..\\outside\\secret.bin"
    (folder / "model.onnx").write_bytes(m.SerializeToString())


def _file_case(folder: Path, mutation: str, rng: random.Random) -> None:
    p = folder / "model.onnx"
    if mutation == "empty":
        p.write_bytes(b"")
    elif mutation == "random-bytes":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100, 5000]))))
    elif mutation == "text":
        p.write_text("this is not an onnx model\n" * rng.randrange(1, 50))
    elif mutation == "json":
        p.write_text(json.dumps({"graph": {"node": []}, "ir_version": 8}))
    elif mutation == "zeros":
        p.write_bytes(b"\0" * rng.choice([1, 64, 4096]))
    else:
        p.write_text(str(base_mlp()))  # protobuf text format, not binary


def generate(root: str | os.PathLike, cases: int = 600, seed: int = 0) -> list[Case]:
    """Build the corpus under ``root`` (deterministic for a given seed and count)."""
    root = Path(root).resolve()  # symlinks and absolute locations below must point at real places
    root.mkdir(parents=True, exist_ok=True)
    outside_dir(root)
    bases = {name: fn() for name, fn in BASES.items()}
    base_bytes = {name: m.SerializeToString() for name, m in bases.items()}
    plan: list[tuple[str, str]] = []
    plan += [("file", f) for f in FILE_CASES]
    plan += [("valid", b) for b in BASES]
    plan += [("external", e) for e in EXTERNAL_MUTATIONS]
    proto_names = sorted(PROTO_MUTATIONS)
    byte_names = sorted(BYTE_MUTATIONS)
    valid_names = sorted(VALID_MUTATIONS)
    i = 0
    while len(plan) < cases:
        # Per 5: three structural mutations (where the interesting bugs are), one byte-level, one valid-but-odd.
        if i % 5 == 3:
            plan.append(("bytes", byte_names[(i // 5) % len(byte_names)]))
        elif i % 5 == 4:
            plan.append(("odd", valid_names[(i // 5) % len(valid_names)]))
        else:
            plan.append(("proto", proto_names[(i - i // 5 * 2) % len(proto_names)]))
        i += 1
    base_names = sorted(BASES)
    out: list[Case] = []
    for index, (kind, mutation) in enumerate(plan):
        rng = random.Random(f"{seed}:{index}")
        base = base_names[rng.randrange(len(base_names))]
        case = Case(index, kind, mutation, base, root / f"case{index:04d}")
        case.folder.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            _file_case(case.folder, mutation, rng)
        elif kind == "valid":
            case.base = mutation
            case.model.write_bytes(base_bytes[mutation])
        elif kind == "bytes":
            case.model.write_bytes(BYTE_MUTATIONS[mutation](base_bytes[base], rng))
        elif kind == "odd":
            m = onnx.ModelProto()
            m.CopyFrom(bases[base])
            VALID_MUTATIONS[mutation](m, rng)
            if rng.random() < 0.3:  # odd models with weights in a side file
                _save_external(m, case.folder)
            else:
                case.model.write_bytes(m.SerializeToString())
        elif kind == "external":
            m = onnx.ModelProto()
            m.CopyFrom(bases[base])
            _external_case(m, case.folder, mutation, rng, root)
        else:
            m = onnx.ModelProto()
            m.CopyFrom(bases[base])
            with contextlib.suppress(ValueError, IndexError):  # nothing left to mutate: keep what we have
                PROTO_MUTATIONS[mutation](m, rng)
            if rng.random() < 0.2:  # sometimes two at once
                second = proto_names[rng.randrange(len(proto_names))]
                with contextlib.suppress(ValueError, IndexError):
                    PROTO_MUTATIONS[second](m, rng)
                mutation = f"{mutation}+{second}"
            case.mutation = mutation
            try:
                data = m.SerializeToString()
            except Exception:  # noqa: BLE001 - some mutations make unserializable protos: keep the raw try
                data = m.SerializePartialToString()
            case.model.write_bytes(data)
        out.append(case)
    return out


# ---------------------------------------------------------------------------------------------
# Running

@dataclass
class Outcome:
    case: str
    code: int | str
    stderr: str
    seconds: float
    category: str = ""
    problems: list[str] = field(default_factory=list)


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p.relative_to(folder))] = "special"
            continue
        out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class _Timeout(Exception):
    pass


def run_cli_inprocess(argv: list[str], timeout: float = TIMEOUT) -> tuple[int | str, str, str]:
    """``onnxslim ARGV`` in this process: (exit code or 'traceback'/'timeout', stdout, stderr)."""
    from onnxslim.cli import main

    out, err = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    code: int | str
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(argv))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _Timeout:
        code = "timeout"
    except BaseException as e:  # noqa: BLE001 - anything escaping main() is exactly what we look for
        import traceback

        code = "traceback"
        err.write("".join(traceback.format_exception(e)))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def run_cli_subprocess(argv: list[str], timeout: float = TIMEOUT, env: dict | None = None) -> tuple[int | str, str, str]:
    try:
        p = subprocess.run([sys.executable, "-m", "onnxslim.cli", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return "timeout", "", ""
    code: int | str = p.returncode if p.returncode >= 0 else f"signal {-p.returncode}"
    return code, p.stdout, p.stderr


def _limit_memory() -> None:
    """A hostile model must not take the machine down with it: 6 GB of address space at most."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _ones_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    from onnxslim.validate import NotValidatable, make_inputs

    try:
        feeds = make_inputs(model, {})
    except (NotValidatable, Exception):  # noqa: BLE001
        return None
    return {k: (np.ones_like(v) if v.dtype.kind in "biufc" else v) for k, v in feeds.items()}


def independent_check(original: Path, output: Path) -> tuple[str, list[str]]:
    """Our own look at a written output: the checker, the interface, and outputs vs the original.

    Categories: 'written-valid' (outputs match the original's), 'written-loads' (the original loads
    in onnxruntime but cannot run on generated inputs; the output must load too), 'written-unvalidated'
    (the original does not load in onnxruntime: only the checker and the interface can be held to it).
    """
    import onnxruntime as ort

    problems: list[str] = []
    try:
        onnx.checker.check_model(str(output))
    except Exception as e:  # noqa: BLE001
        problems.append(f"output fails onnx.checker: {str(e).splitlines()[0]}")
    a = onnx.load(str(original), load_external_data=False)
    b = onnx.load(str(output), load_external_data=False)

    def iface(m):
        inits = {t.name for t in m.graph.initializer}
        return ([(v.name, v.type.SerializeToString()) for v in m.graph.input if v.name not in inits],
                [(v.name, v.type.tensor_type.elem_type) for v in m.graph.output])

    if iface(a) != iface(b):
        problems.append("graph interface changed (inputs/outputs)")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    from onnxslim.runtime import _extensions_library

    lib = _extensions_library()
    if lib:
        so.register_custom_ops_library(lib)

    def session(path: Path):
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    try:
        sa = session(original)
    except Exception:  # noqa: BLE001 - the original does not load: nothing to compare against
        return ("written-unvalidated" if not problems else "violation"), problems
    try:
        sb = session(output)
    except Exception as e:  # noqa: BLE001
        problems.append(f"output does not load although the original does: {str(e).splitlines()[0][:200]}")
        return "violation", problems
    feeds = _ones_inputs(a)
    from onnxslim.api import _oversized_tensor

    try:
        if feeds is None or _oversized_tensor(a):  # would fill gigabytes: not here either
            raise ValueError("no inputs")
        options = ort.RunOptions()
        timer = threading.Timer(10, lambda: setattr(options, "terminate", True))
        timer.start()
        try:
            ra = sa.run(None, feeds, options)
        finally:
            timer.cancel()
    except Exception:  # noqa: BLE001 - the original cannot run on generated inputs
        return ("written-loads" if not problems else "violation"), problems
    try:
        rb = sb.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        problems.append(f"output does not run although the original does: {str(e).splitlines()[0][:200]}")
        return "violation", problems
    for x, y in zip(ra, rb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or (x.dtype.kind in "fc" and not np.allclose(x, y, rtol=1e-3, atol=1e-4, equal_nan=True)) \
                or (x.dtype.kind not in "fc" and not np.array_equal(x, y)):
            problems.append("outputs differ from the original")
            break
    return ("written-valid" if not problems else "violation"), problems


def check_outcome(case: Case, out: Path, code: int | str, stderr: str, before: dict[str, str],
                  seconds: float) -> Outcome:
    """Classify one run and list every broken guarantee."""
    o = Outcome(case.name, code, stderr.strip()[-2000:], round(seconds, 3))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if _digest(case.folder) != before:
        o.problems.append("input folder changed")
    if seconds > TIMEOUT:
        o.problems.append(f"took {seconds:.1f} s")
    litter = [p.name for p in out.parent.iterdir() if p.name != out.name and not p.name.startswith(out.name + ".")]
    litter += [p.name for p in out.parent.iterdir() if ".onnxslim-tmp-" in p.name]
    if litter:
        o.problems.append(f"left files behind: {litter}")
    if code == 0:
        if not out.exists():
            o.problems.append("exit 0 but no output")
            o.category = "violation"
        else:
            o.category, probs = independent_check(case.model, out)
            o.problems += probs
    elif code in (1, 2):
        if out.exists():
            o.problems.append(f"exit {code} but an output was written")
        if len(lines) != 1:
            o.problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in stderr:
            o.problems.append("traceback")
        if lines and not lines[0].startswith("onnxslim: "):
            o.problems.append("stderr line does not start with 'onnxslim: '")
        if "internal error" in stderr:
            o.category = "internal-error"
        elif "pass '" in stderr and "failed" in stderr:
            o.category = "pass-error"
        else:
            o.category = f"exit-{code}"
    else:
        o.problems.append(f"ended with {code}")
    if o.problems:
        o.category = "violation"
    return o


def run_case(case: Case, work: Path, *, subprocess_mode: bool = False, extra: list[str] | None = None) -> Outcome:
    out_dir = work / case.name
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "out.onnx"
    before = _digest(case.folder)
    argv = [str(case.model), str(out), "--quiet", *(extra or [])]
    t0 = time.perf_counter()
    runner = run_cli_subprocess if subprocess_mode else run_cli_inprocess
    code, _, stderr = runner(argv)
    return check_outcome(case, out, code, stderr, before, time.perf_counter() - t0)


def summarize(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.category] = counts.get(o.category, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", action="store_true", help="run onnxslim on every case (in-process)")
    ap.add_argument("--subprocess", type=int, default=0, help="also run every k-th case as a real process")
    ap.add_argument("--json", help="write every outcome here")
    args = ap.parse_args()
    root = Path(args.dir)
    cases = generate(root / "corpus", args.cases, args.seed)
    print(f"fuzz: {len(cases)} cases in {root / 'corpus'}")
    if not args.run:
        return
    t0 = time.perf_counter()
    outcomes = [run_case(c, root / "work") for c in cases]
    print(f"fuzz: in-process {summarize(outcomes)} in {time.perf_counter() - t0:.0f} s")
    sub: list[Outcome] = []
    if args.subprocess:
        sub = [run_case(c, root / "work-sub", subprocess_mode=True) for c in cases[::args.subprocess]]
        print(f"fuzz: subprocess {summarize(sub)}")
    for o in outcomes + sub:
        if o.category == "violation":
            print(f"VIOLATION {o.case}: code {o.code}; {'; '.join(o.problems)}; stderr: {o.stderr[-300:]}")
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes + sub], indent=1))


if __name__ == "__main__":
    main()
