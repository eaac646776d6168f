"""Least-squares refit of the layers that lost input channels (the reconstruction step of ThiNet and of
He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks").

For every consumer layer L whose input channels were pruned: X' = L's input in the *pruned* model
(so the error of earlier layers is seen and compensated), Y = L's output in the *original* model
(the teacher), restricted to L's kept output channels. New weights W (and bias b) minimize

    ||X' W + b - Y||^2 + lam ||W - W0||^2

over calibration data: a ridge pulled toward the pruned weights W0 rather than toward zero, so a
layer seen on few rows stays close to what it was. How strong: a layer with plenty of rows per input
feature (ROWS_PER_FEATURE) gets DEFAULT_RIDGE; one with fewer (a classifier Gemm fitted on 64 samples
for ~1000 inputs would otherwise be fitted exactly, and generalize worse than the plain pruned weights)
gets its strength by 2-fold cross-validation over calibration *samples* (even/odd), among RIDGE_GRID,
"bias only" and "no refit"; the chosen lam is per row, so the final fit on all rows is relatively
weaker than on one fold. Memory is bounded: X'^T X' and X'^T Y are
accumulated over calibration batches and a capped random sample of rows (conv output positions),
never the whole design matrix. Layers are refit in dependency order, in levels: the layers of one
level do not feed each other, so one run of the pruned model serves all of them.

Transformers (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers": layer-wise
reconstruction, sequential): a branch whose output is added to a residual stream (attention output
projection, FFN down-projection, before the LayerNorm) is fitted to Y = original sum - pruned residual,
so each block also makes up for what the blocks before it lost in the stream instead of reproducing
only its own original output (on the 2-layer test encoder at 0.3: held-out min cosine 0.970 against
0.908; fitting all layers at once on the unrefitted model instead of in sequence: 0.901). Rows at padding
positions (an ``attention_mask`` input's zeros) are dropped: no real token reads them.

Drifted readers (``drifted``): a MatMul/Gemm that lost no input but reads a tensor downstream of a refit
layer (a later block's Q/K/V and FFN up-projection read the residual stream the earlier blocks changed) is
refit the same way, to its original output (kept columns) from the pruned model's input: the sequential
compensation SparseGPT/OBC-style layer-wise compression does for every layer. all-MiniLM-L6-v2 at 0.3
(predicted allocation, 512 sentences half perturbed): sentence-embedding min cosine 0.9485 -> 0.9526 on
the benchmark's sentences, 0.9359 -> 0.9430 on another 400 (tools/bench_encoder.py); on the random 2-layer
test encoder with 555 fit rows it costs 0.002 (0.3) / 0.01 (0.5) held-out min cosine. On by default only
for encoders (calibration data with a token mask); CNNs were not measured with it and keep the old refit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto

from onnxslim.calibration import CalibrationData
from onnxslim.graph import const_value, to_proto
from onnxslim.prune.tracing import Analysis, keep_positions
from onnxslim.validate import token_mask_input

DEFAULT_RIDGE = 1e-2
DEFAULT_MAX_ROWS = 40000
DOWNDATE_BUDGET = 2e10  # multiply-adds of the selection's downdates per group (~ seconds on one core)
MAX_DENSE_FEATURES = 1536  # a dense selection state of 1536 features is 18 MB per reader
ROWS_PER_FEATURE = 16  # rows sampled per input feature: enough for a well-posed fit, cheap to accumulate
# Ridge strengths tried by cross-validation, relative to the mean input energy of all rows (DEFAULT_RIDGE's
# unit); inf = "bias only": the pruned weights, the intercept refitted.
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, float("inf"))


@dataclass
class LayerFit:
    name: str
    op: str
    rows: int
    inputs: int  # columns of the design matrix (input features, plus 1 for a bias)
    error_before: float  # relative reconstruction error sqrt(|XW0+b0-Y|^2 / |Y|^2) with the pruned weights
    error_after: float
    skipped: str | None = None
    ridge: float | None = None  # the strength used (DEFAULT_RIDGE's unit); inf: only the bias was refitted
    # cross-validated relative errors (fit on one half of the samples, measured on the other), when chosen so
    heldout_before: float | None = None
    heldout_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Layer:
    node: gs.Node
    out_keep: np.ndarray | None  # kept output positions of the original output (None: all)
    bias_add: tuple[gs.Node, int] | None = None  # MatMul: the Add holding its bias, and which input
    # (residual input, sum): the layer's output is added to a residual stream; the target is then the original
    # sum minus the pruned model's residual, so the layer also makes up for what earlier layers lost there
    residual: tuple[str, str] | None = None
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    yy: float = 0.0
    rows: int = 0
    # Refit layers accumulate the odd-numbered samples here and the even-numbered ones in ``fold`` (the two
    # halves of the cross-validation; every row is multiplied once), merged by ``merge_fold`` for the fit.
    fold: "_Layer | None" = None

    def add(self, xr: np.ndarray, yr: np.ndarray) -> None:
        """Accumulate normal equations of rows ``xr`` (bias column included) and targets ``yr``."""
        a, b = (xr.T @ xr).astype(np.float64), (xr.T @ yr).astype(np.float64)
        self.A = a if self.A is None else self.A + a
        self.B = b if self.B is None else self.B + b
        self.yy += float(np.square(yr, dtype=np.float64).sum())
        self.rows += len(xr)

    def merge_fold(self) -> "_Layer | None":
        """Add the even-numbered half into the totals; returns that half (None when it is empty)."""
        f, self.fold = self.fold, None
        if f is None or f.A is None:
            return None
        if self.A is None:
            self.A, self.B = f.A.copy(), f.B.copy()
        else:
            self.A, self.B = self.A + f.A, self.B + f.B
        self.yy += f.yy
        self.rows += f.rows
        return f

    @property
    def features(self) -> int:
        w = const_value(self.node.inputs[1])
        return int(np.prod(w.shape[1:])) if self.node.op == "Conv" else int(w.shape[0])


_BLAS_CALLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
               ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
               ("openblas_get_num_threads", "openblas_set_num_threads"))


def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """numpy's OpenBLAS thread getter/setter, from the library this process loaded (Linux), else None."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, put in _BLAS_CALLS:
            if hasattr(lib, get) and hasattr(lib, put):
                getter, setter = getattr(lib, get), getattr(lib, put)
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                return getter, setter
    return None


@contextmanager
def one_blas_thread():
    """Run numpy's BLAS on one thread: the normal equations are many small products, and OpenBLAS's
    threads cost more than they give on them (measured on 2 busy cores: X^T X of 4096 x 26 took 5 ms
    with 2 threads, 0.4 ms with one; of 16000 x 1000, 0.97 s against 0.39 s), the more so next to
    onnxruntime's own threads."""
    blas = _openblas()
    if blas is None:
        yield
        return
    getter, setter = blas
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


def _with_outputs(model: ModelProto, names: list[str]) -> ModelProto:
    m = ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            have.add(n)
    return m


def _conv_geometry(node: gs.Node, w: np.ndarray, x_shape: tuple, y_shape: tuple) -> tuple:
    kh, kw = int(w.shape[2]), int(w.shape[3])
    sh, sw = [int(s) for s in node.attrs.get("strides", [1, 1])]
    dh, dw = [int(d) for d in node.attrs.get("dilations", [1, 1])]
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d, out in ((x_shape[2], kh, sh, dh, y_shape[2]), (x_shape[3], kw, sw, dw, y_shape[3])):
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            pads.append((total // 2, total - total // 2) if auto == "SAME_UPPER" else (total - total // 2, total // 2))
        (pt, pb), (pl, pr) = pads
    elif auto == "VALID":
        pt = pb = pl = pr = 0
    else:
        pt, pl, pb, pr = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
    return kh, kw, sh, sw, dh, dw, pt, pb, pl, pr


def _conv_rows(node: gs.Node, w: np.ndarray, x: np.ndarray, y: np.ndarray, n_rows: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled im2col rows of ``x``, the matching output positions of ``y`` ([rows, C*kh*kw], [rows, Cout])
    and the sample (index in the batch) each row comes from."""
    kh, kw, sh, sw, dh, dw, pt, pb, pl, pr = _conv_geometry(node, w, x.shape, y.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    b, _, ho, wo = y.shape
    total = b * ho * wo
    idx = rng.choice(total, n_rows, replace=False) if n_rows < total else np.arange(total)
    bi, rem = np.divmod(idx, ho * wo)
    ii, jj = np.divmod(rem, wo)
    cols = [xp[bi, :, ii * sh + ki * dh, jj * sw + kj * dw] for ki in range(kh) for kj in range(kw)]
    patches = np.stack(cols, axis=-1).reshape(len(idx), -1)  # channel-major, then kernel position: W's order
    return patches, y[bi, :, ii, jj], bi


def _rows(node: gs.Node, x: np.ndarray, y: np.ndarray, n_rows: int, rng: np.random.Generator,
          valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's design rows with a bias column (float32), its targets, and each row's sample in the batch:
    im2col positions of a Conv, or rows of the flattened leading axes of a Gemm/MatMul input; at most
    ``n_rows``, sampled without replacement. ``valid`` ([batch, sequence] of a MatMul input [B, S, F]):
    the rows that are real tokens (padding rows are dropped, see ``token_mask``)."""
    if node.op == "Conv":
        xr, yr, sample = _conv_rows(node, np.asarray(const_value(node.inputs[1])), x, y, n_rows, rng)
    else:
        xr, yr = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        b = x.shape[0] if x.ndim > 1 else 1
        per = len(xr) // b if b and len(xr) % b == 0 else len(xr)  # rows per sample
        sample = np.arange(len(xr)) // max(per, 1)
        if valid is not None and x.ndim == 3 and y.ndim == 3 and valid.shape == x.shape[:2]:
            real = valid.reshape(-1)
            xr, yr, sample = xr[real], yr[real], sample[real]
        if len(xr) > n_rows:
            pick = rng.choice(len(xr), n_rows, replace=False)
            xr, yr, sample = xr[pick], yr[pick], sample[pick]
    xr = np.concatenate([xr, np.ones((len(xr), 1), xr.dtype)], axis=1).astype(np.float32)
    return xr, yr.astype(np.float32), sample


def _bias_add(node: gs.Node, graph: gs.Graph) -> tuple[gs.Node, int] | None:
    """The Add that alone reads a MatMul's output and adds a constant along the last axis."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or any(o is out for o in graph.outputs) or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    for k, t in enumerate(add.inputs):
        if t is out:
            continue
        v = const_value(t)
        if v is not None and np.asarray(v).dtype.kind == "f" and (v.ndim <= 1 or all(d == 1 for d in v.shape[:-1])):
            return add, k
    return None


def token_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """[batch, sequence] bool of the real tokens, from a 2-D integer/bool input named like an attention mask
    (``attention_mask``, ``input_mask``): padding positions are rows that no real token reads (the mask hides
    them from attention and mean pooling skips them), so fitting them spends the refit on nothing."""
    name = token_mask_input(feeds)
    return None if name is None else feeds[name] != 0


def _residual(layer: _Layer, graph: gs.Graph) -> tuple[str, str] | None:
    """(residual input, sum) when the layer's biased output goes only into an Add with a same-shaped
    non-constant tensor (a transformer's x + sublayer(x) before its LayerNorm)."""
    if layer.bias_add is None or (layer.out_keep is not None and not layer.out_keep.all()):
        return None
    out = layer.bias_add[0].outputs[0]
    if len(out.outputs) != 1 or any(o is out for o in graph.outputs) or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    other = [t for t in add.inputs if t is not out]
    if len(other) != 1 or const_value(other[0]) is not None:  # same shape: checked on the data (refit_layers)
        return None
    return other[0].name, add.outputs[0].name


def _current(layer: _Layer) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's weights as a [features, outputs] matrix and its bias vector (None: no place for one)."""
    node = layer.node
    w = np.asarray(const_value(node.inputs[1]), np.float64)
    if node.op == "Conv":
        cout = w.shape[0]
        mat = w.reshape(cout, -1).T
        b = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        return mat, (np.zeros(cout) if b is None else np.asarray(b, np.float64).reshape(-1))
    if node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        mat = (w.T if int(node.attrs.get("transB", 0)) else w) * alpha
        n = mat.shape[1]
        c = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        b = np.zeros(n) if c is None else np.broadcast_to(np.asarray(c, np.float64) * beta, (1, n)).reshape(-1)
        return mat, b.copy()
    # MatMul: the fitted intercept is added to the following Add's constant
    return w, (np.zeros(w.shape[1]) if layer.bias_add is not None else None)


def _write(layer: _Layer, mat: np.ndarray, bias: np.ndarray | None, tag: str) -> None:
    node = layer.node
    w0 = np.asarray(const_value(node.inputs[1]))
    dt = w0.dtype
    name = node.inputs[1].name
    if node.op == "Conv":
        node.inputs[1] = gs.Constant(f"{name}_{tag}", mat.T.reshape(w0.shape).astype(dt))
        bname = f"{node.name or 'conv'}_bias_{tag}"
        bt = gs.Constant(bname, bias.astype(dt))
        if len(node.inputs) > 2 and node.inputs[2].name:
            node.inputs[2] = bt
        else:
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            if len(node.inputs) == 2:
                node.inputs.append(bt)
            else:
                node.inputs[2] = bt
        return
    if node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        m = mat / alpha
        node.inputs[1] = gs.Constant(f"{name}_{tag}", (m.T if int(node.attrs.get("transB", 0)) else m).astype(dt))
        if beta == 0.0:
            node.attrs["beta"] = beta = 1.0
        c = gs.Constant(f"{node.name or 'gemm'}_bias_{tag}", (bias / beta).astype(dt))
        if len(node.inputs) > 2:
            node.inputs[2] = c
        else:
            node.inputs.append(c)
        return
    node.inputs[1] = gs.Constant(f"{name}_{tag}", mat.astype(dt))
    if bias is not None and layer.bias_add is not None:
        add, k = layer.bias_add
        old = np.asarray(const_value(add.inputs[k]))
        new = np.broadcast_to(old.astype(np.float64), old.shape[:-1] + (len(bias),)) + bias.reshape(
            (1,) * (max(old.ndim, 1) - 1) + (-1,))
        add.inputs[k] = gs.Constant(f"{add.inputs[k].name}_{tag}", new.astype(old.dtype))


@one_blas_thread()
def _consumer_layer(node: gs.Node, out_ids: np.ndarray | None, keep: np.ndarray, graph: gs.Graph,
                    residual: bool) -> _Layer:
    out_keep = keep_positions(out_ids, keep) if out_ids is not None else None
    layer = _Layer(node, out_keep, fold=_Layer(node, out_keep))
    if node.op == "MatMul":
        layer.bias_add = _bias_add(node, graph)
        layer.residual = _residual(layer, graph) if residual else None
    return layer


def refit_layers(graph: gs.Graph, nodes: dict[int, gs.Node], an: Analysis, keep: np.ndarray,
                 original: ModelProto, template: ModelProto, calib: CalibrationData, *, batch: int = 64,
                 ridge: float | None = None, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
                 sequential: bool = True, residual: bool = True, drifted: bool | Callable | None = None,
                 progress: Callable[[str], None] = lambda m: None) -> list[LayerFit]:
    """Refit, in place on the pruned ``graph``, every consumer that lost input channels (see module doc).

    ``ridge``: a fixed strength for every layer; None: DEFAULT_RIDGE where rows are plenty, else chosen
    by cross-validation. ``sequential``: a layer sees its inputs after every layer upstream was refit
    (False: all layers fitted at once on the pruned, unrefitted model -- the faster, worse way, kept to
    measure the difference). ``residual``: fit a residual branch to the original sum minus the pruned
    residual (Kwon et al. 2022's layer-wise reconstruction of the whole block output), not to its own
    original output. ``drifted``: also refit the readers that lost no input but read a tensor a refit
    layer upstream changed (True; False: none; a predicate on the node, to measure subsets; None: True when the
    calibration data has a token mask -- an encoder, where it was measured -- else False)."""
    from onnxslim.runtime import make_session

    if drifted is None:
        drifted = token_mask(calib.inputs) is not None
    rng = np.random.default_rng(seed)
    fits: list[LayerFit] = []
    layers: list[_Layer] = []
    candidates: list[_Layer] = []  # readers that lost no input: refit only when something upstream changed
    for c in an.consumers:
        node = nodes[c.node]
        if keep_positions(c.ids, keep).all():
            plain = node.op == "MatMul" or (node.op == "Gemm" and not int(node.attrs.get("transA", 0)))
            if drifted and (drifted is True or drifted(node)) and plain:
                layer = _consumer_layer(node, c.out_ids, keep, graph, residual)
                layers.append(layer)
                candidates.append(layer)
            continue
        if node.op == "ConvTranspose" or (node.op == "Conv" and np.asarray(const_value(node.inputs[1])).ndim != 4):
            fits.append(LayerFit(node.name, node.op, 0, 0, float("nan"), float("nan"),
                                 skipped="only 2-D Conv, Gemm and MatMul are refit"))
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            fits.append(LayerFit(node.name, node.op, 0, 0, float("nan"), float("nan"), skipped="transA"))
            continue
        layers.append(_consumer_layer(node, c.out_ids, keep, graph, residual))
    if not layers:
        return fits

    # Levels: a layer waits for every refit layer upstream of it.
    producer_of = {id(t): n for n in graph.nodes for t in n.outputs}
    index_of = {id(layer.node): k for k, layer in enumerate(layers)}
    upstream: dict[int, set[int]] = {}
    for k, layer in enumerate(layers):
        seen: set[int] = set()
        found: set[int] = set()
        stack = [t for t in layer.node.inputs[:1]]
        while stack:
            t = stack.pop()
            p = producer_of.get(id(t))
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in index_of:
                found.add(index_of[id(p)])
            stack.extend(p.inputs)
        upstream[k] = found
    if candidates:  # keep a drifted reader only when a refit layer (lost inputs, or kept) is upstream of it
        cand = {id(la) for la in candidates}
        kept: list[int] = []
        for k, layer in enumerate(layers):
            if id(layer) not in cand or any(u in kept for u in upstream[k]):
                kept.append(k)
        remap = {old: new for new, old in enumerate(kept)}
        layers = [layers[k] for k in kept]
        upstream = {remap[k]: {remap[u] for u in upstream[k] if u in remap} for k in kept}
        if not layers:
            return fits
    level = {}
    for k in range(len(layers)):  # consumers come in topological order, so upstream levels are known
        level[k] = 1 + max((level[u] for u in upstream[k] if u in level), default=-1) if sequential else 0
    n_levels = max(level.values()) + 1
    n_batches = max(1, -(-calib.size // batch))

    for lv in range(n_levels):
        todo = [layers[k] for k in range(len(layers)) if level[k] == lv]
        progress(f"prune: refit {sum(1 for k in level if level[k] < lv)}/{len(layers)} layers")
        pruned = _with_outputs(to_proto(graph, template), [la.node.inputs[0].name for la in todo]
                               + [la.residual[0] for la in todo if la.residual])
        teacher = _with_outputs(original, [la.residual[1] if la.residual else la.node.outputs[0].name
                                           for la in todo])
        sp, so = make_session(pruned), make_session(teacher)
        p_names = [o.name for o in sp.get_outputs()]
        o_names = [o.name for o in so.get_outputs()]
        offset = 0  # samples seen before this batch: a row's sample number decides its fold
        for feeds in calib.batches(batch):
            px = dict(zip(p_names, sp.run(p_names, feeds)))
            oy = dict(zip(o_names, so.run(o_names, feeds)))
            valid = token_mask(feeds)
            for la in todo:
                rows_per_batch = max(64, min(max_rows, max(4096, ROWS_PER_FEATURE * la.features)) // n_batches)
                x = np.asarray(px[la.node.inputs[0].name], np.float32)
                if la.residual and px[la.residual[0]].shape != oy[la.residual[1]].shape:
                    la.residual = None  # a broadcast add, not a residual stream (seen on the first batch)
                if la.residual:
                    y = np.asarray(oy[la.residual[1]], np.float32) - np.asarray(px[la.residual[0]], np.float32)
                else:
                    y = np.asarray(oy[la.node.outputs[0].name], np.float32)
                if la.out_keep is not None:
                    y = np.compress(la.out_keep, y, axis=1 if la.node.op in ("Conv", "Gemm") else y.ndim - 1)
                # float32 products per batch (half the time), summed across batches in float64
                xr, yr, sample = _rows(la.node, x, y, rows_per_batch, rng, valid)
                even = (offset + sample) % 2 == 0
                if even.all():
                    la.fold.add(xr, yr)
                elif not even.any():
                    la.add(xr, yr)
                else:
                    la.fold.add(xr[even], yr[even])
                    la.add(xr[~even], yr[~even])
            offset += len(next(iter(feeds.values())))
        del sp, so
        for la in todo:
            fits.append(_solve(la, la.merge_fold(), ridge, tag=f"refit{lv}"))
            la.A = la.B = None
    return fits


def _fit(A: np.ndarray, B: np.ndarray, w0: np.ndarray, d: int, has_bias: bool, lam: float) -> np.ndarray:
    """argmin |XW - Y|^2 + lam |W[:d] - W0[:d]|^2 from the normal equations; lam = inf: W0 with the
    intercept refitted (the bias is never pulled back: it absorbs the mean of what the removed channels
    carried)."""
    if np.isinf(lam):
        w = w0.copy()
        if has_bias and A[d, d] > 0:
            w[d] = (B[d] - A[d, :d] @ w0[:d]) / A[d, d]
        return w
    reg = np.zeros(A.shape[0])
    reg[:d] = lam
    try:
        return np.linalg.solve(A + np.diag(reg), B + reg[:, None] * w0)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A + np.diag(reg), B + reg[:, None] * w0, rcond=None)[0]


def _sq_err(w: np.ndarray, A: np.ndarray, B: np.ndarray, yy: float) -> float:
    """|XW - Y|^2 from the normal equations."""
    return max(float(np.einsum("ij,ij->", w, A @ w) - 2 * np.einsum("ij,ij->", w, B) + yy), 0.0)


Normal = tuple  # (A, B, yy, rows): the normal equations of some rows and their target energy


def _cross_validate(full: Normal, fold: Normal, w0: np.ndarray, d: int, has_bias: bool,
                    unit: float) -> tuple[float | None, float, float]:
    """2-fold cross-validation over samples (``fold``: the even-numbered ones; the rest is ``full``
    minus ``fold``): the best ridge in RIDGE_GRID or None for "keep w0", its held-out relative error, w0's.

    ``unit``: the mean input energy per row; a fold fits with lam = ridge * unit * its own rows, i.e.
    the same per-row prior as the final fit on all rows."""
    other = (full[0] - fold[0], full[1] - fold[1], full[2] - fold[2], full[3] - fold[3])
    halves = (fold, other)
    base = sum(_sq_err(w0, *h[:3]) for h in halves)
    best, best_err = None, base
    for r in RIDGE_GRID:
        e = 0.0
        for k in range(2):
            A, B, _, n = halves[k]
            w = _fit(A, B, w0, d, has_bias, r * unit * n)
            e += _sq_err(w, *halves[1 - k][:3]) if np.all(np.isfinite(w)) else np.inf
        if e < best_err:
            best, best_err = r, e
    return best, float(np.sqrt(best_err / full[2])), float(np.sqrt(base / full[2]))


def _solve(la: _Layer, f: _Layer | None, ridge: float | None, tag: str) -> LayerFit:
    """Fit ``la`` (totals over all rows); ``f``: the even-numbered half, for cross-validation."""
    mat0, b0 = _current(la)
    has_bias = b0 is not None

    def normal(x: _Layer) -> Normal:  # without a place for an intercept, drop its row and column
        return (x.A, x.B, x.yy, x.rows) if has_bias else (x.A[:-1, :-1], x.B[:-1], x.yy, x.rows)

    full = normal(la)
    A, B = full[0], full[1]
    w0 = np.vstack([mat0, b0[None, :]]) if has_bias else mat0
    d = mat0.shape[0]
    name = la.node.name or la.node.op

    def err(w: np.ndarray) -> float:
        return float(np.sqrt(_sq_err(w, A, B, la.yy) / la.yy)) if la.yy > 0 else 0.0

    before = err(w0)
    unit = float(np.trace(A[:d, :d])) / max(d, 1) / max(la.rows, 1)  # mean input energy per row
    held_before = held_after = None
    chosen = DEFAULT_RIDGE if ridge is None else ridge
    if ridge is None and la.rows < ROWS_PER_FEATURE * A.shape[0] and la.yy > 0 \
            and f is not None and f.A is not None and 0 < f.rows < la.rows:
        chosen, held_after, held_before = _cross_validate(full, normal(f), w0, d, has_bias, unit)
        if chosen is None:
            return LayerFit(name, la.node.op, la.rows, A.shape[0], before, before, skipped=(
                f"the pruned weights generalize better (cross-validated error {held_before:.4f})"),
                heldout_before=held_before, heldout_after=held_before)
    w = _fit(A, B, w0, d, has_bias, chosen * unit * la.rows)
    after = err(w)
    if not np.all(np.isfinite(w)) or after > before:
        return LayerFit(name, la.node.op, la.rows, A.shape[0], before, before, skipped="no improvement",
                        heldout_before=held_before, heldout_after=held_before)
    _write(la, w[:d], w[d] if has_bias else None, tag)
    return LayerFit(name, la.node.op, la.rows, A.shape[0], before, after, ridge=chosen,
                    heldout_before=held_before, heldout_after=held_after)


class ReconSelector:
    """Which channels to remove, chosen by what the refit can rebuild (He et al. 2017's channel selection
    and ThiNet's greedy criterion, in closed form).

    For every reader L of pruned channels, one pass of the original model accumulates the normal
    equations of L's output on its input features (A = X^T X with a bias column, B = X^T Y). With
    P = A^-1 and the least-squares weights beta = P B, removing a block F of input features (one
    channel: its kernel positions, or its block of flattened features) and refitting the rest raises
    the squared error by tr(beta_F^T P_FF^-1 beta_F) (a block downdate of the inverse, as in Optimal
    Brain Surgeon). Units are removed greedily, cheapest first, summing that increase over the group's
    readers (each relative to its output energy); after each removal P and beta are downdated, so a
    channel that others can stand in for goes before one that carries something unique.

    Memory: a reader with more than MAX_DENSE_FEATURES input features (P would take d^2 doubles) is
    scored without the downdate: each unit costs the energy of its own contribution ||X_F W_F||^2,
    accumulated per batch (ThiNet's criterion without the refit term).
    """

    @one_blas_thread()
    def __init__(self, an: Analysis, model: ModelProto, calib: CalibrationData, imp: np.ndarray, *,
                 batch: int = 64, ridge: float = 1e-4, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
                 progress: Callable[[str], None] = lambda m: None) -> None:
        from onnxslim.runtime import make_session

        self.an, self.imp = an, imp
        rng = np.random.default_rng(seed)
        code = np.full(an.n_atoms, -1, np.int64)  # atom -> (group index << 32) + unit index
        for gi, g in enumerate(an.groups):
            if g.prunable:
                for ui, u in enumerate(g.units):
                    code[u] = (gi << 32) + ui
        self.readers: list[dict[str, Any]] = []
        layers: list[tuple[Any, _Layer, np.ndarray]] = []
        for c in an.consumers:
            node = an.graph.nodes[c.node]
            w = np.asarray(const_value(node.inputs[1]))
            if node.op == "Conv" and w.ndim == 4:
                per = int(w.shape[2] * w.shape[3])
            elif node.op == "MatMul" or (node.op == "Gemm" and not int(node.attrs.get("transA", 0))):
                per = 1
            else:
                continue
            pos_code = np.where(c.ids >= 0, code[np.clip(c.ids, 0, None)], -1)
            if (pos_code < 0).all():
                continue
            feat = np.concatenate([np.repeat(pos_code, per), [-1]])  # the bias column is never removed
            la = _Layer(node, None)
            if node.op == "MatMul":
                la.bias_add = _bias_add(node, an.graph)
                la.residual = _residual(la, an.graph)
            if la.features > MAX_DENSE_FEATURES:
                la.yy = 0.0
                la.A = {int(v): 0.0 for v in np.unique(feat[feat >= 0])}  # per-unit energy, no d x d state
                la.B = _current(la)[0]
            layers.append((c, la, feat))
        if not layers:
            return
        progress("prune: channel selection statistics")
        names = [la.node.inputs[0].name for _, la, _ in layers] + [la.node.outputs[0].name for _, la, _ in layers]
        names += [la.residual[1] for _, la, _ in layers if la.residual]
        # per reader: [rows, output energy, residual-sum rows, residual-sum energy] (see ``weight`` below)
        energy = {id(la): [0, 0.0, 0, 0.0] for _, la, _ in layers}
        sess = make_session(_with_outputs(model, list(dict.fromkeys(names))))
        out_names = [o.name for o in sess.get_outputs()]
        n_batches = max(1, -(-calib.size // batch))
        for feeds in calib.batches(batch):
            got = dict(zip(out_names, sess.run(out_names, feeds)))
            valid = token_mask(feeds)
            for _, la, _ in layers:
                x = np.asarray(got[la.node.inputs[0].name], np.float32)
                y = np.asarray(got[la.node.outputs[0].name], np.float32)
                rows = max(64, min(max_rows, max(4096, ROWS_PER_FEATURE * la.features)) // n_batches)
                xr, yr, _ = _rows(la.node, x, y, rows, rng, valid)
                e = energy[id(la)]
                e[0] += len(yr)
                e[1] += float(np.square(yr, dtype=np.float64).sum())
                if la.residual:
                    sm = np.asarray(got[la.residual[1]], np.float32)
                    if valid is not None and sm.ndim == 3 and valid.shape == sm.shape[:2]:
                        sm = sm[valid]
                    sm = sm.reshape(-1, sm.shape[-1])
                    e[2] += len(sm)
                    e[3] += float(np.square(sm, dtype=np.float64).sum())
                if isinstance(la.A, dict):
                    la.yy += float(np.square(yr, dtype=np.float64).sum())
                    w = la.B.astype(np.float32)
                    for code_u in la.A:
                        f = np.flatnonzero(feat[:-1] == code_u)
                        la.A[code_u] += float(np.square(xr[:, f] @ w[f], dtype=np.float64).sum())
                    continue
                la.add(xr, yr)
        for c, la, feat in layers:
            groups = {int(v >> 32) for v in feat if v >= 0}
            # A reader's costs are relative to its own output energy; a residual branch's error lands in the
            # residual stream, which the LayerNorm after it normalizes: ``weight`` converts to the error
            # relative to that sum (per row), the currency in which the layers of a model compare (allocate).
            e = energy[id(la)]
            weight = (e[1] / max(e[0], 1)) / (e[3] / e[2]) if e[2] and e[3] > 0 else 1.0
            if isinstance(la.A, dict):
                scale = 1.0 / max(la.yy, 1e-30)
                self.readers.append({"cost": {k: v * scale for k, v in la.A.items()}, "groups": groups,
                                     "weight": weight})
                la.A = la.B = None
                continue
            d = la.A.shape[0] - 1
            reg = np.zeros(d + 1)
            reg[:d] = ridge * max(float(np.trace(la.A[:d, :d])) / max(d, 1), 1e-12)
            try:
                p = np.linalg.inv(la.A + np.diag(reg))
            except np.linalg.LinAlgError:
                p = np.linalg.pinv(la.A + np.diag(reg))
            self.readers.append({"P": p, "beta": p @ la.B, "feat": feat, "scale": 1.0 / max(la.yy, 1e-30),
                                 "groups": groups, "weight": weight})
            la.A = la.B = None

    @one_blas_thread()
    def __call__(self, removals: dict[str, int],
                 curves: dict[str, list[tuple[int, float]]] | None = None) -> list[tuple[str, int]]:
        """(group id, unit) pairs to remove, ``removals[group id]`` per group. ``curves``, when given, gets per
        group the predicted error after each greedy step: (units removed, summed weighted cost)."""
        chosen: list[tuple[str, int]] = []
        state = [dict(r, P=r["P"].copy(), beta=r["beta"].copy(), feat=r["feat"].copy()) if "P" in r else r
                 for r in self.readers]
        for gi, g in enumerate(self.an.groups):
            n = removals.get(g.id, 0)
            if not n:
                continue
            mine = [r for r in state if gi in r["groups"]]
            left = list(range(len(g.units)))
            if not mine:  # no reader the criterion can model: fall back to the weight norms
                scores = np.array([self.imp[u].sum() for u in g.units])
                chosen += [(g.id, int(u)) for u in np.argsort(scores, kind="stable")[:n]]
                continue
            # Block elimination costs ~ d^2 * (features removed) per reader whatever the step; past the
            # budget the group is chosen in one step from the first costs (no downdate between removals).
            work = sum(len(r["feat"]) ** 2 * np.count_nonzero((r["feat"] >> 32) == gi) for r in mine if "P" in r)
            one_step = work * n / max(len(g.units), 1) > DOWNDATE_BUDGET
            curve, total = [(0, 0.0)], 0.0
            while n > 0:
                step = n if one_step else max(1, n // 16)
                costs = np.zeros(len(g.units))
                weighted = np.zeros(len(g.units))
                for r in mine:
                    if "cost" in r:
                        c = np.array([r["cost"].get((gi << 32) + u, 0.0) for u in range(len(g.units))])
                    else:
                        c = _unit_costs(r, gi, len(g.units))
                    costs += c
                    weighted += r.get("weight", 1.0) * c
                costs, weighted = costs[left], weighted[left]
                order = np.argsort(costs, kind="stable")[:step]
                drop = [left[k] for k in order]
                # the cost of a unit grows as others go (downdates): the step's cost is each unit's cost
                # at the start of the step, accumulated in order (a lower bound within a step)
                for k in order:
                    total += float(weighted[k])
                    curve.append((curve[-1][0] + 1, total))
                for r in mine:
                    if "P" in r:
                        codes = [(gi << 32) + u for u in drop]
                        _downdate(r, np.flatnonzero(np.isin(r["feat"], codes)))
                chosen += [(g.id, int(u)) for u in drop]
                left = [u for u in left if u not in drop]
                n -= len(drop)
            if curves is not None:
                curves[g.id] = curve
        return chosen


def _unit_costs(r: dict[str, Any], gi: int, n_units: int) -> np.ndarray:
    """Per unit of group ``gi``: the error increase scale * tr(beta_F^T P_FF^-1 beta_F) of removing it
    from reader ``r`` (0 for units the reader does not see). Units of equal block size are solved
    in one batched call (the per-unit loop was most of the selection's time)."""
    out = np.zeros(n_units)
    feat = r["feat"]
    idx = np.flatnonzero((feat >> 32) == gi)
    if not len(idx):
        return out
    unit = (feat[idx] & 0xFFFFFFFF).astype(np.int64)
    order = np.argsort(unit, kind="stable")
    idx, unit = idx[order], unit[order]
    units, starts, counts = np.unique(unit, return_index=True, return_counts=True)
    for k in np.unique(counts):
        sel = counts == k
        F = idx[starts[sel][:, None] + np.arange(k)]  # [U, k] feature indices per unit
        bf = r["beta"][F]  # [U, k, outputs]
        pff = r["P"][F[:, :, None], F[:, None, :]]  # [U, k, k]
        try:
            sol = np.linalg.solve(pff, bf)
        except np.linalg.LinAlgError:
            sol = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(pff, bf)])
        out[units[sel]] += r["scale"] * np.einsum("ukm,ukm->u", bf, sol)
    return out


def _downdate(r: dict[str, Any], f: np.ndarray) -> None:
    """Remove features ``f`` from a reader's inverse normal matrix and refit weights (block elimination)."""
    if not len(f):
        return
    keep = np.setdiff1d(np.arange(len(r["feat"])), f)
    p = r["P"]
    pff = p[np.ix_(f, f)]
    prf = p[np.ix_(keep, f)]
    r["beta"] = r["beta"][keep] - prf @ np.linalg.solve(pff, r["beta"][f])
    r["P"] = p[np.ix_(keep, keep)] - prf @ np.linalg.solve(pff, prf.T)
    r["feat"] = r["feat"][keep]
