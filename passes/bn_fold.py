"""bn-fold: fold inference BatchNormalization, and Mul/Add/Sub/Div by per-channel constants, into the
weights and bias of the Conv / ConvTranspose / Gemm / MatMul(+Add) that produces their input.

BN(y) = y * s + t with s = gamma / sqrt(var + eps), t = beta - mean * s, per output channel, so
the producer's weights are scaled per output channel and its bias becomes b * s + t. Only when the
producer's output has no other reader and its weights (and bias) are constants. Also MatMul + Add of
a constant bias on a rank-2 input becomes one Gemm, and a zero Pad of spatial dims in front of a Conv
becomes part of the Conv's pads. Arithmetic is done in float64 and cast back.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import const_value, in_graph, is_default_domain, iter_graphs, stored_constant, substitute
from onnxslim.manager import Context, Pass, PassResult, register

FLOATS = (np.float16, np.float32, np.float64)


class _Names:
    """Fresh tensor names, unique in the whole model."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = {t.name for g in iter_graphs(graph) for n in g.nodes for t in list(n.inputs) + list(n.outputs)}
        self.used |= {t.name for g in iter_graphs(graph) for t in list(g.inputs) + list(g.outputs)}

    def new(self, base: str) -> str:
        i, name = 0, f"{base}_fused"
        while name in self.used:
            i += 1
            name = f"{base}_fused{i}"
        self.used.add(name)
        return name


def _float_const(t: gs.Tensor | None) -> np.ndarray | None:
    if t is None or not t.name:
        return None
    v = const_value(t)
    if v is None:
        return None
    v = np.asarray(v)
    return v if v.dtype in [np.dtype(f) for f in FLOATS] else None


def _sole_reader(t: gs.Tensor, g: gs.Graph, reader: gs.Node) -> bool:
    return len(t.outputs) == 1 and t.outputs[0] is reader and not any(o is t for o in g.outputs)


def _producer(t: gs.Tensor, g: gs.Graph) -> gs.Node | None:
    if len(t.inputs) != 1:
        return None
    p = t.inputs[0]
    return p if in_graph(g, p) and is_default_domain(p) else None


def _channel_vector(c: np.ndarray, rank: int | None, axis_from_end: int, channels: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector when broadcasting it against an output of ``rank`` only
    varies along one axis (``axis_from_end`` counted from the last), else None."""
    if rank is None:
        if c.ndim > axis_from_end:  # the rank decides where c's dims land
            return None
        rank = max(c.ndim, axis_from_end)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    for i, d in enumerate(shape):
        if i == rank - axis_from_end:
            if d not in (1, channels):
                return None
        elif d != 1:
            return None
    return np.broadcast_to(c.reshape(-1) if c.size == channels else c.reshape(-1)[:1], (channels,)).astype(np.float64)


def _scale_rows(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w * scale`` per output channel (axis 0), computed in float64 and cast back to ``w``'s type:
    the same values as ``(w.astype(float64) * s).astype(w.dtype)`` without two float64 copies of a large
    weight (numpy works through small buffers)."""
    out = np.empty(w.shape, w.dtype)
    np.multiply(w.reshape(w.shape[0], -1), scale[:, None], out=out.reshape(w.shape[0], -1), dtype=np.float64,
                casting="same_kind")
    return out


def _reset(node: gs.Node, inputs: list[gs.Tensor]) -> None:
    """Give ``node`` these inputs and only its first output (graphsurgeon lists stay in sync)."""
    node.inputs.clear()
    node.inputs.extend(inputs)
    while len(node.outputs) > 1:
        node.outputs.pop()


class _Fuser:
    def __init__(self, graph: gs.Graph) -> None:
        self.names = _Names(graph)
        self.opset = int(graph.opset)
        self.stats = {"bn_folded": 0, "mul_add_fused": 0, "matmul_add_to_gemm": 0, "pad_into_conv": 0}

    def const(self, base: str, value: np.ndarray) -> gs.Constant:
        # A rewritten weight goes to the spill file at once when the run spills (graph.stored_constant):
        # folding every conv of a model must not keep every new weight in memory until the save.
        return stored_constant(self.names.new(base), value)

    # -- the producers ------------------------------------------------------------------------------
    def affine(self, p: gs.Node, scale: np.ndarray | None, shift: np.ndarray | None) -> bool:
        """Make producer ``p`` compute ``p(x) * scale + shift`` (per output channel). False if it cannot."""
        if p.op in ("Conv", "ConvTranspose"):
            return self._conv(p, scale, shift)
        if p.op == "Gemm" and self.opset >= 7:  # older Gemm needs a 'broadcast' attribute for a vector C
            return self._gemm(p, scale, shift)
        if p.op == "MatMul" and shift is None:
            return self._matmul(p, scale)
        return False

    def channels(self, p: gs.Node) -> int | None:
        w = _float_const(p.inputs[1]) if len(p.inputs) > 1 else None
        if w is None:
            return None
        if p.op == "Conv" and w.ndim >= 3:
            return w.shape[0]
        if p.op == "ConvTranspose" and w.ndim >= 3:
            return w.shape[1] * int(p.attrs.get("group", 1))
        if p.op == "Gemm" and w.ndim == 2:
            return w.shape[0] if int(p.attrs.get("transB", 0)) else w.shape[1]
        if p.op == "MatMul" and w.ndim == 2:
            return w.shape[1]
        return None

    def _conv(self, p: gs.Node, scale, shift) -> bool:
        w = _float_const(p.inputs[1])
        b = _float_const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2].name else None
        if w is None or (len(p.inputs) > 2 and p.inputs[2].name and b is None):
            return False
        m = self.channels(p)
        bf = np.zeros(m) if b is None else b.astype(np.float64).reshape(-1)
        if bf.shape != (m,):
            return False
        new_w = None  # a shift alone leaves the weights as they are (no copy of them)
        if scale is not None:
            if p.op == "Conv":
                new_w = _scale_rows(w, scale)
            else:  # ConvTranspose: [C, M/group, k...]; output channel o = group_index * (M/group) + j
                grp = int(p.attrs.get("group", 1))
                c, mg = w.shape[0], w.shape[1]
                new_w = (w.astype(np.float64).reshape((grp, c // grp, mg) + w.shape[2:])
                         * scale.reshape((grp, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape).astype(w.dtype)
            bf = bf * scale
        if shift is not None:
            bf = bf + shift
        if new_w is not None:
            p.inputs[1] = self.const(p.inputs[1].name, new_w)
        new_b = self.const(p.inputs[2].name if b is not None else p.inputs[1].name + "_bias", bf.astype(w.dtype))
        if len(p.inputs) > 2:
            p.inputs[2] = new_b
        else:
            p.inputs.append(new_b)
        return True

    def _gemm(self, p: gs.Node, scale, shift) -> bool:
        w = _float_const(p.inputs[1])
        has_c = len(p.inputs) > 2 and bool(p.inputs[2].name)
        c = _float_const(p.inputs[2]) if has_c else None
        if w is None or (has_c and c is None):
            return False
        alpha, beta = float(p.attrs.get("alpha", 1.0)), float(p.attrs.get("beta", 1.0))
        m = self.channels(p)
        cf = np.zeros((m,)) if c is None or beta == 0.0 else c.astype(np.float64) * beta  # what Gemm adds
        try:
            np.broadcast_shapes(cf.shape, (1, m))
        except ValueError:
            return False
        if cf.ndim > 2:
            return False
        wf = w.astype(np.float64)
        if scale is not None:
            wf = wf * (scale[:, None] if int(p.attrs.get("transB", 0)) else scale[None, :])
            cf = cf * scale
        if shift is not None:
            cf = cf + shift
        del alpha  # scales A*B only, which the weight scaling already covers
        p.inputs[1] = self.const(p.inputs[1].name, wf.astype(w.dtype))
        new_c = self.const(p.inputs[2].name if has_c else p.inputs[1].name + "_bias", cf.astype(w.dtype))
        if has_c:
            p.inputs[2] = new_c
        elif len(p.inputs) > 2:
            p.inputs[2] = new_c  # an empty optional C
        else:
            p.inputs.append(new_c)
        p.attrs["beta"] = 1.0
        return True

    def _matmul(self, p: gs.Node, scale) -> bool:
        w = _float_const(p.inputs[1])
        if w is None or w.ndim != 2:
            return False
        p.inputs[1] = self.const(p.inputs[1].name, (w.astype(np.float64) * scale[None, :]).astype(w.dtype))
        return True

    # -- the consumers ------------------------------------------------------------------------------
    def batchnorm(self, g: gs.Graph, bn: gs.Node) -> bool:
        if len(bn.inputs) < 5 or int(bn.attrs.get("training_mode", 0)) or int(bn.attrs.get("spatial", 1)) != 1:
            return False
        if int(g.opset) < 7 and not int(bn.attrs.get("is_test", 0)):
            return False  # BatchNormalization-6 and older default to training mode
        if any(o.outputs or any(o is x for x in g.outputs) for o in bn.outputs[1:] if o.name):
            return False
        x = bn.inputs[0]
        p = _producer(x, g)
        if p is None or not _sole_reader(x, g, bn):
            return False
        vals = [_float_const(t) for t in bn.inputs[1:5]]
        if any(v is None for v in vals):
            return False
        gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in vals)
        m = self.channels(p)
        if m is None or any(v.shape != (m,) for v in (gamma, beta, mean, var)):
            return False
        if p.op == "MatMul" and not self._rank2(p.outputs[0], p.inputs[0]):
            return False
        s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        t = beta - mean * s
        if p.op == "MatMul":
            return self._matmul_bn(g, p, bn, s, t)
        if not self.affine(p, s, t):
            return False
        return self._drop(g, bn, x)

    def _rank2(self, out: gs.Tensor, a: gs.Tensor) -> bool:
        shape = out.shape if out.shape is not None else a.shape
        return shape is not None and len(shape) == 2

    def _matmul_bn(self, g: gs.Graph, mm: gs.Node, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> bool:
        """MatMul -> [Add bias] -> BN becomes MatMul(W * s) -> Add(bias * s + t)."""
        if not self._matmul(mm, s):
            return False
        w_dtype = mm.inputs[1].dtype
        bn.op, bn.attrs = "Add", {}
        _reset(bn, [mm.outputs[0], self.const(bn.outputs[0].name + "_shift", t.astype(w_dtype))])
        return True

    def elementwise(self, g: gs.Graph, node: gs.Node) -> bool:
        """Conv/ConvTranspose/Gemm/MatMul followed by Mul/Div/Add/Sub with a per-channel constant."""
        if len(node.inputs) != 2:
            return False
        for xi in ((0, 1) if node.op in ("Mul", "Add") else (0,)):
            x, c_t = node.inputs[xi], node.inputs[1 - xi]
            c = _float_const(c_t)
            p = _producer(x, g)
            if c is None or p is None or p.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            if not _sole_reader(x, g, node) or (len(p.inputs) > 1 and _float_const(p.inputs[1]) is None):
                continue
            m = self.channels(p)
            if m is None:
                continue
            if p.op in ("Conv", "ConvTranspose"):
                w = _float_const(p.inputs[1])
                vec = _channel_vector(c, w.ndim, w.ndim - 1, m)
            elif p.op == "Gemm":
                vec = _channel_vector(c, 2, 1, m)
            else:
                shape = x.shape if x.shape is not None else None
                vec = _channel_vector(c, None if shape is None else len(shape), 1, m)
                if node.op not in ("Mul", "Div"):
                    vec = None  # MatMul + Add is a Gemm candidate, not a bias fusion
            if vec is None:
                continue
            if node.op == "Div" and np.any(vec == 0):
                continue
            scale = vec if node.op == "Mul" else (1.0 / vec if node.op == "Div" else None)
            shift = vec if node.op == "Add" else (-vec if node.op == "Sub" else None)
            if not self.affine(p, scale, shift):
                continue
            return self._drop(g, node, x)
        return False

    def matmul_add_to_gemm(self, g: gs.Graph, add: gs.Node) -> bool:
        """MatMul(A[N,K], W[K,M]) + bias([M] or [1,M]) with constant W and bias -> Gemm(A, W, bias)."""
        if len(add.inputs) != 2:
            return False
        for xi in (0, 1):
            x, c_t = add.inputs[xi], add.inputs[1 - xi]
            c = _float_const(c_t)
            p = _producer(x, g)
            if c is None or p is None or p.op != "MatMul" or not _sole_reader(x, g, add):
                continue
            w = _float_const(p.inputs[1])
            a = p.inputs[0]
            if (w is None or w.ndim != 2 or w.dtype != c.dtype or w.dtype not in (np.float32, np.float64)
                    or a.shape is None or len(a.shape) != 2):
                continue  # onnxruntime's CPU Gemm has no float16 kernel
            if _channel_vector(c, 2, 1, w.shape[1]) is None or self.opset < 7:
                continue
            p.op = "Gemm"
            p.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
            p.inputs.append(c_t)
            return self._drop(g, add, x)
        return False

    def pad_into_conv(self, g: gs.Graph, conv: gs.Node) -> bool:
        """Pad(x) with zeros on spatial dims only -> Conv(x) with those pads added to its own."""
        if not conv.inputs or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return False
        x = conv.inputs[0]
        pad = _producer(x, g)
        if pad is None or pad.op != "Pad" or not _sole_reader(x, g, conv):
            return False
        mode = pad.attrs.get("mode", "constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return False
        if self.opset < 11:
            pads, value = pad.attrs.get("pads"), float(pad.attrs.get("value", 0.0))
        else:
            if len(pad.inputs) > 3 and pad.inputs[3].name:  # 'axes' (opset 18)
                return False
            pads = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
            cv = pad.inputs[2] if len(pad.inputs) > 2 and pad.inputs[2].name else None
            v = const_value(cv) if cv is not None else np.zeros(1)
            if v is None or np.asarray(v).size > 1:
                return False
            value = float(np.asarray(v).ravel()[0]) if np.asarray(v).size else 0.0
        if pads is None or value != 0.0:
            return False
        pads = [int(p) for p in np.asarray(pads).ravel()]
        rank = len(pads) // 2
        w = conv.inputs[1] if len(conv.inputs) > 1 else None
        k = len(conv.attrs["kernel_shape"]) if "kernel_shape" in conv.attrs else (
            len(w.shape) - 2 if w is not None and w.shape is not None else None)
        if k is None or rank != k + 2 or any(p < 0 for p in pads) or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return False
        own = [int(p) for p in conv.attrs.get("pads", [0] * (2 * k))]
        conv.attrs["pads"] = [own[i] + pads[2 + i] for i in range(k)] + [own[k + i] + pads[rank + 2 + i] for i in range(k)]
        conv.inputs[0] = pad.inputs[0]
        return True

    def _drop(self, g: gs.Graph, node: gs.Node, replacement: gs.Tensor) -> bool:
        """``node`` is now the identity on ``replacement``: its readers read the producer's output."""
        if substitute(g, node.outputs[0], replacement):
            node.inputs.clear()
            node.outputs.clear()
            return True
        # Cannot reroute (e.g. its output is a graph output fed from outside): keep it as an Identity.
        node.op, node.attrs = "Identity", {}
        _reset(node, [replacement])
        return True


@register
class BatchNormFolding(Pass):
    name = "bn-fold"
    description = ("Fold BatchNormalization and per-channel Mul/Add/Sub/Div into the preceding Conv/ConvTranspose/"
                   "Gemm/MatMul; MatMul+Add bias -> Gemm; zero Pad -> Conv pads")
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        fuser = _Fuser(graph)
        for g in list(iter_graphs(graph)):
            for node in list(g.nodes):
                if not node.outputs or not is_default_domain(node):
                    continue
                if node.op == "BatchNormalization" and fuser.batchnorm(g, node):
                    fuser.stats["bn_folded"] += 1
                elif node.op in ("Mul", "Add", "Sub", "Div") and fuser.elementwise(g, node):
                    fuser.stats["mul_add_fused"] += 1
                elif node.op == "Add" and fuser.matmul_add_to_gemm(g, node):
                    fuser.stats["matmul_add_to_gemm"] += 1
                elif node.op == "Conv" and fuser.pad_into_conv(g, node):
                    fuser.stats["pad_into_conv"] += 1
        changed = any(fuser.stats.values())
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=changed, stats=dict(fuser.stats))
