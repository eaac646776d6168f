"""Outlier statistics and SmoothQuant (Xiao et al. 2022) for static INT8 of transformer encoders.

Static INT8 gives every activation tensor one scale. In BERT-family encoders a few channels of the
residual stream and of the FFN activations are far larger than the rest (all-MiniLM-L6-v2: channel 99
reaches |x| 223 where the tensor's p99.9 is 8.4), so that one scale leaves the other channels a few
levels of the 8-bit range and the embeddings collapse (onnxruntime's static QDQ: min cosine 0.12-0.15).

This module
- measures, on calibration data, per tensor the largest magnitude, its 99.9th percentile and the
  per-channel maxima (last axis), and reports the tensors whose max / p99.9 ratio marks outliers;
- migrates the activation outliers of every MatMul input with a constant 2-D weight into the weight:
  ``X W = (X / s) (s W)`` with ``s_j = max|X_j|^a / max|W_j|^(1-a)`` per input channel j. The division
  is folded into the producer where it is the only reader (a Mul by a constant, a decomposed LayerNorm's
  gamma/beta, LayerNormalization's scale/bias, and for the attention context -- the head merge of
  ``softmax(QK) V`` -- the value projection's weight columns and bias); otherwise, e.g. a post-LN BERT whose
  LayerNorm output also feeds the residual Add, a ``Mul(X, 1/s)`` feeds the MatMuls only (or, with
  ``allow_mul=False``, the site stays unsmoothed). Lossless in float up to rounding.
  ``smooth(..., only=...)`` limits it to chosen sites: onnxslim.quantization applies it where the measured
  uint8 SQNR of the MatMul input (``TensorStats.sqnr_u8``) rises -- LayerNorm outputs gain ~6 dB, FFN
  down-projection inputs lose (their weight rows vary more than the activation channels).

onnxruntime's own ``quantize_static(extra_options={"SmoothQuant": True})`` needs neural-compressor's
ONNX adaptor, which neural-compressor 3.x no longer has; 2.6 (numpy < 2 declared, opencv, pandas,
scikit-learn, pycocotools) crashes on all-MiniLM-L6-v2 with ``Number of values (1536) does not match
tensor dimensions requiring 1 elements``: it folds a per-channel scale into GELU's scalar 0.5 constant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

OUTLIER_RATIO = 8.0  # max|x| / p99.9|x| above this: the tensor has outlier values (reported)
CHANNEL_FACTOR = 6.0  # a channel whose max exceeds this many times the median channel max is an outlier channel
SAMPLE_PER_BATCH = 20000  # |x| values kept per tensor and batch for the percentile (memory stays bounded)
MIN_SCALE, MAX_SCALE = 1e-4, 1e4


@dataclass
class TensorStats:
    """Calibration statistics of one activation tensor."""

    name: str
    max_abs: float
    p999: float
    channel_max: np.ndarray  # per channel of the last axis
    sqnr_u8: float = float("nan")  # dB: x vs x through one uint8 scale over [min, max] (static QDQ's rounding)

    @property
    def ratio(self) -> float:
        return float(self.max_abs / max(self.p999, 1e-12))

    @property
    def spread(self) -> float:
        """Largest channel max over the median channel max."""
        med = float(np.median(self.channel_max)) if self.channel_max.size else 0.0
        return float(self.channel_max.max() / med) if med > 0 else 0.0

    def has_outliers(self, ratio: float = OUTLIER_RATIO) -> bool:
        """max/p99.9 above ``ratio``, or a channel above CHANNEL_FACTOR times the median channel: on a narrow
        model one always-large channel is more than 0.1% of the values and lifts the p99.9 itself."""
        return self.ratio > ratio or bool(self.outlier_channels())

    def outlier_channels(self) -> list[int]:
        med = float(np.median(self.channel_max)) if self.channel_max.size else 0.0
        if med <= 0:
            return []
        return [int(i) for i in np.flatnonzero(self.channel_max > CHANNEL_FACTOR * med)]

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.name, "max_abs": round(self.max_abs, 4), "p99_9": round(self.p999, 4),
                "ratio": round(self.ratio, 2),
                "channel_spread": round(self.spread, 2),
                "sqnr_u8_db": None if np.isnan(self.sqnr_u8) else round(self.sqnr_u8, 2), "outlier_channels": self.outlier_channels()[:8]}


def _initializers(model: ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _constants(model: ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and the outputs of Constant nodes with a tensor value (raw exports keep GELU's and
    LayerNorm's small constants as Constant nodes)."""
    out = _initializers(model)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            a = next((a for a in n.attribute if a.name == "value"), None)
            if a is not None:
                out[n.output[0]] = a.t
    return out


def _consumers(model: ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            if t:
                out.setdefault(t, []).append(n)
    return out


def collect_stats(model: ModelProto, batches: Iterable[dict[str, np.ndarray]], tensors: list[str],
                  seed: int = 0) -> dict[str, TensorStats]:
    """Max, p99.9 (over a bounded random sample of |x|) and per-channel max of each float tensor named,
    one batch in memory at a time."""
    import onnxruntime as ort

    if not tensors:
        return {}
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    rng = np.random.default_rng(seed)
    mx: dict[str, float] = {}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    chan: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for batch in batches:
        outs = sess.run(tensors, {k: v for k, v in batch.items() if k in inputs})
        for t, v in zip(tensors, outs):
            x = np.asarray(v, np.float32)
            if x.size == 0:
                continue
            a = np.abs(x)
            flat = a.reshape(-1, a.shape[-1]) if a.ndim >= 1 else a.reshape(1, 1)
            c = flat.max(0)
            chan[t] = c if t not in chan or chan[t].shape != c.shape else np.maximum(chan[t], c)
            mx[t] = max(mx.get(t, 0.0), float(c.max()))
            lo[t], hi[t] = min(lo.get(t, 0.0), float(x.min())), max(hi.get(t, 0.0), float(x.max()))
            r = x.reshape(-1)
            samples[t].append(r if r.size <= SAMPLE_PER_BATCH else rng.choice(r, SAMPLE_PER_BATCH, replace=False))
    out = {}
    for t in tensors:
        if t not in mx:
            continue
        vals = np.concatenate(samples[t])
        out[t] = TensorStats(t, mx[t], float(np.percentile(np.abs(vals), 99.9)), chan[t], _sqnr_u8(vals, lo[t], hi[t]))
    return out


def _sqnr_u8(x: np.ndarray, lo: float, hi: float) -> float:
    """SQNR in dB of ``x`` quantized to uint8 with the MinMax range [lo, hi] (zero included), as
    onnxruntime's static QDQ does with one scale per activation tensor."""
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return 120.0
    zp = np.round(-lo / scale)
    q = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
    sig, noise = float(np.sum(x.astype(np.float64) ** 2)), float(np.sum((x - q).astype(np.float64) ** 2))
    return float(min(120.0, 10 * np.log10(max(sig, 1e-30) / max(noise, 1e-30))))


def outliers(stats: dict[str, TensorStats], ratio: float = OUTLIER_RATIO) -> list[TensorStats]:
    """Tensors with outliers (``TensorStats.has_outliers``), the one furthest past either threshold first."""
    return sorted((s for s in stats.values() if s.has_outliers(ratio)),
                  key=lambda s: -max(s.ratio / ratio, s.spread / CHANNEL_FACTOR))


@dataclass
class Site:
    """An activation tensor read as input A by MatMuls with constant 2-D weights."""

    tensor: str
    matmuls: list[str] = field(default_factory=list)


def sites(model: ModelProto) -> list[Site]:
    """Every tensor that feeds MatMul(X, W) with W a constant [K, N] initializer (Q/K/V, attention
    output, FFN up/down projections in a transformer)."""
    inits = _initializers(model)
    found: dict[str, Site] = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) != 2 or n.input[1] not in inits or n.input[0] in inits:
            continue
        if len(inits[n.input[1]].dims) != 2:
            continue
        found.setdefault(n.input[0], Site(n.input[0])).matmuls.append(n.name)
    return list(found.values())


def _as_channel_vector(arr: np.ndarray, c: int) -> np.ndarray | None:
    """``arr`` as a length-c vector if it broadcasts along the last axis only (scalar, [c], [1,..,c])."""
    if arr.size == 1:
        return np.full(c, float(arr.reshape(-1)[0]), arr.dtype)
    if arr.shape and arr.shape[-1] == c and arr.size == c:
        return arr.reshape(c)
    return None


def smooth(model: ModelProto, stats: dict[str, TensorStats], alpha: float = 0.5,
           only: set[str] | None = None, allow_mul: bool = True) -> tuple[ModelProto, list[dict[str, Any]]]:
    """A copy of ``model`` with activation outliers migrated into the MatMul weights at every site (or
    the sites whose tensor is in ``only``), and one record per site: how the scale was applied
    ('folded into <node>' or 'Mul inserted'), the activation max before/after. ``allow_mul=False``
    leaves a site unsmoothed where no producer can take the scale: the inserted Mul and the
    QuantizeLinear after it are two passes over the tensor that onnxruntime fuses with nothing
    (MiniLM: 17 Muls cost 0.17x of the float latency at batch 1)."""
    m = copy.deepcopy(model)
    inits = _constants(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers = _consumers(m)
    by_name = {n.name: n for n in m.graph.node}
    used_names = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    records: list[dict[str, Any]] = []
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (insert after, node)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    def set_init(old: str, arr: np.ndarray, node: onnx.NodeProto, slot: int) -> None:
        """Give ``node`` input ``slot`` a new initializer ``arr`` (the old one may be shared)."""
        name = fresh(f"{old}_smooth")
        t = numpy_helper.from_array(arr.astype(numpy_helper.to_array(inits[old]).dtype), name)
        m.graph.initializer.append(t)
        inits[name] = t
        node.input[slot] = name

    for site in sites(m):
        st = stats.get(site.tensor)
        if st is None or (only is not None and site.tensor not in only):
            continue
        mms = [by_name[x] for x in site.matmuls]
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in mms]
        c = weights[0].shape[0]
        if st.channel_max.shape != (c,) or any(w.shape[0] != c for w in weights):
            continue
        a = st.channel_max.astype(np.float64)
        w = np.max([np.abs(x).max(1) for x in weights], axis=0)
        s = np.ones(c)
        ok = (a > 0) & (w > 0)
        s[ok] = np.clip(a[ok] ** alpha / w[ok] ** (1 - alpha), MIN_SCALE, MAX_SCALE)
        readers = consumers.get(site.tensor, [])
        others = [r for r in readers if r.name not in site.matmuls and r.op_type != "Shape"]
        how = _fold(m, site.tensor, 1.0 / s, producer, others, inits, set_init, consumers)
        if how is None and not allow_mul:
            continue
        for n in mms:  # re-read: a fold above may have rescaled this weight's columns (V -> output)
            set_init(n.input[1], numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) * s[:, None], n, 1)
        if how is None:
            inv = fresh(f"{site.tensor}_smooth_inv")
            m.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            out = fresh(f"{site.tensor}_smooth")
            mul = onnx.helper.make_node("Mul", [site.tensor, inv], [out], name=fresh(f"{site.tensor}_smooth_mul"))
            for n in mms:
                n.input[0] = out
            new_nodes.append((producer.get(site.tensor), mul))
            how = "Mul inserted (the tensor has other readers)"
        after = float((a / s).max()) if a.size else 0.0
        records.append({"tensor": site.tensor, "input": mms[0].input[0], "matmuls": site.matmuls, "applied": how,
                        "act_max_before": round(float(a.max()), 4), "act_max_after": round(after, 4),
                        "channel_spread_before": round(float(a.max() / max(np.median(a), 1e-12)), 2),
                        "channel_spread_after": round(float(after / max(np.median(a / s), 1e-12)), 2)})
    if new_nodes:
        nodes = list(m.graph.node)
        for anchor, node in new_nodes:
            at = 0 if anchor is None else next(i for i, x in enumerate(nodes) if x is anchor) + 1
            nodes.insert(at, node)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    read = {t for n in m.graph.node for t in n.input}
    outputs = {o.name for o in m.graph.output}
    dead = [n for n in m.graph.node if n.op_type == "Constant" and n.output[0] not in read | outputs]
    for n in dead:  # the constants replaced by their smoothed copies
        m.graph.node.remove(n)
    keep = [t for t in m.graph.initializer if t.name in read or t.name in {o.name for o in m.graph.output}]
    if len(keep) != len(m.graph.initializer):  # the weights replaced by their smoothed copies
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
    return m, records


def _fold(m: ModelProto, tensor: str, inv: np.ndarray, producer: dict, others: list,
          inits: dict, set_init, consumers: dict) -> str | None:
    """Fold ``X *= inv`` into the producer of X when only the smoothed MatMuls read X; None if it cannot."""
    prod = producer.get(tensor)
    if prod is None or others:
        return None
    c = inv.size
    if prod.op_type == "Reshape":
        return _fold_into_value(tensor, inv, producer, inits, set_init, consumers)
    if prod.op_type == "LayerNormalization" and len(prod.input) >= 2 and all(
            i in inits for i in prod.input[1:3] if i):
        for slot in (1, 2):
            if slot < len(prod.input) and prod.input[slot]:
                v = _as_channel_vector(numpy_helper.to_array(inits[prod.input[slot]]), c)
                if v is None:
                    return None
        for slot in (1, 2):
            if slot < len(prod.input) and prod.input[slot]:
                v = _as_channel_vector(numpy_helper.to_array(inits[prod.input[slot]]), c)
                set_init(prod.input[slot], v * inv, prod, slot)
        return f"folded into {prod.name} (scale, bias)"
    if prod.op_type == "Mul":
        k = next((i for i, t in enumerate(prod.input) if t in inits), None)
        if k is not None:
            v = _as_channel_vector(numpy_helper.to_array(inits[prod.input[k]]), c)
            other = prod.input[1 - k]
            if v is not None and other not in inits:
                set_init(prod.input[k], v * inv, prod, k)
                return f"folded into {prod.name} (constant factor)"
    if prod.op_type == "Add":
        # Decomposed LayerNorm: Add(Mul(norm, gamma), beta) -> gamma/s, beta/s, when only this Add reads the Mul.
        k = next((i for i, t in enumerate(prod.input) if t in inits), None)
        if k is None:
            return None
        beta = _as_channel_vector(numpy_helper.to_array(inits[prod.input[k]]), c)
        mul = next((n for n in m.graph.node if prod.input[1 - k] in n.output), None)
        if beta is None or mul is None or mul.op_type != "Mul" or len(consumers.get(prod.input[1 - k], [])) != 1:
            return None
        g = next((i for i, t in enumerate(mul.input) if t in inits), None)
        gamma = None if g is None else _as_channel_vector(numpy_helper.to_array(inits[mul.input[g]]), c)
        if gamma is None:
            return None
        set_init(prod.input[k], beta * inv, prod, k)
        set_init(mul.input[g], gamma * inv, mul, g)
        return f"folded into {mul.name} / {prod.name} (gamma, beta)"
    return None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _shape_tail(shape: str, rank: int, producer: dict, inits: dict) -> tuple[int, int] | None:
    """The last two entries of a Reshape target of ``rank`` entries: a constant, or a Concat whose last
    two parts are constants (an export's ``x.size()[:-1] + (heads, head_dim)``); None if not known."""
    if shape in inits:
        v = numpy_helper.to_array(inits[shape]).reshape(-1)
        return (int(v[-2]), int(v[-1])) if v.size == rank else None
    cat = producer.get(shape)
    if cat is None or cat.op_type != "Concat" or not all(t in inits for t in cat.input[-2:]):
        return None
    parts = [numpy_helper.to_array(inits[t]).reshape(-1) for t in cat.input[-2:]]
    if any(p.size != 1 for p in parts) or len(cat.input) != rank:  # each leading part one entry (Shape->Gather)
        return None
    return int(parts[0][0]), int(parts[1][0])


def _fold_into_value(tensor: str, inv: np.ndarray, producer: dict, inits: dict, set_init,
                     consumers: dict) -> str | None:
    """The attention context ``Reshape(Transpose(P @ Transpose(Reshape(X Wv + bv))))`` scales channel j
    exactly as column j of Wv and bv do (P @ V is linear in V, the head split/merge only moves axes),
    so ``ctx / s`` is folded into the value projection: Wv[:, j] / s_j, bv_j / s_j (the SmoothQuant
    paper's V -> output-projection fold). Only this exact chain, each tensor with one reader, the
    split a constant [.., -1 or H, D] and the two Transposes inverse with the last axis kept."""
    def only_reader(t: str) -> bool:
        return len([r for r in consumers.get(t, []) if r.op_type != "Shape"]) == 1

    merge = producer.get(tensor)
    t2 = producer.get(merge.input[0])
    if t2 is None or t2.op_type != "Transpose" or not only_reader(merge.input[0]):
        return None
    pv = producer.get(t2.input[0])
    if pv is None or pv.op_type != "MatMul" or not only_reader(t2.input[0]) or pv.input[1] in inits:
        return None
    t1 = producer.get(pv.input[1])
    if t1 is None or t1.op_type != "Transpose" or not only_reader(pv.input[1]):
        return None
    p1, p2 = _perm(t1), _perm(t2)
    r = len(p1)
    if r < 3 or len(p2) != r or p1[-1] != r - 1 or p2[-1] != r - 1 or [p1[p2[i]] for i in range(r)] != list(range(r)):
        return None
    split = producer.get(t1.input[0])
    if split is None or split.op_type != "Reshape" or not only_reader(t1.input[0]):
        return None
    tail = _shape_tail(split.input[1], r, producer, inits)
    if tail is None or tail[1] <= 0 or inv.size % tail[1] or tail[0] not in (-1, inv.size // tail[1]):
        return None
    v = split.input[0]
    add = producer.get(v)
    if add is None or not only_reader(v):
        return None
    if add.op_type == "Add":
        k = next((i for i, t in enumerate(add.input) if t in inits), None)
        if k is None:
            return None
        bias = _as_channel_vector(numpy_helper.to_array(inits[add.input[k]]), inv.size)
        mm = producer.get(add.input[1 - k])
        if bias is None or mm is None or not only_reader(add.input[1 - k]):
            return None
    else:
        k, bias, mm = None, None, add
    if mm.op_type != "MatMul" or mm.input[1] not in inits:
        return None
    w = numpy_helper.to_array(inits[mm.input[1]])
    if w.ndim != 2 or w.shape[1] != inv.size:
        return None
    set_init(mm.input[1], w * inv[None, :], mm, 1)
    if bias is not None:
        set_init(add.input[k], bias * inv, add, k)
    return f"folded into {mm.name} (value projection columns{' and bias' if bias is not None else ''})"
