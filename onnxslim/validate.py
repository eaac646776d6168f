"""Numeric validation: run the original and the optimized model on the same inputs and compare.

Lossless pipelines are held to element-wise tolerances (atol/rtol); lossy ones to a gate on
cosine similarity or, when labels exist, accuracy drop. The gate decides whether anything
is written.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto

from onnxslim.errors import InputError
from onnxslim.options import DEFAULT_MAX_ACC_DROP, DEFAULT_MIN_CENTRED_COSINE, DEFAULT_MIN_COSINE

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_DIM = 1  # value for a dynamic dimension nobody fixed
# Dynamic height/width of an image input (rank 4, channels fixed) in generated validation data: at 1x1 a
# detector with stride 32 (PP-OCR det) outputs all zeros and the comparison cannot tell models apart.
SPATIAL_DIM = 64
# Length of a dynamic axis 1 of a rank-2 float input, a waveform [batch, samples]: one sample is too short for
# the reflect Pad and STFT frames of audio exports; silero VAD takes 256 (an 8 kHz chunk) on each of its branches,
# while 512 and 1024 give its LSTM more frames than it was exported for.
SIGNAL_DIM = 256
MAX_INPUT_BYTES = 1 << 30  # random validation inputs larger than this are refused (NotValidatable)


class NotValidatable(Exception):
    """Inputs cannot be built for this model (e.g. sequence-typed inputs); validation is skipped."""


def graph_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old IR versions list weights as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_specs(model: ModelProto) -> dict[str, tuple[np.dtype, list[int | str | None]]]:
    specs = {}
    for vi in graph_inputs(model):
        tt = vi.type
        if not tt.HasField("tensor_type"):
            raise NotValidatable(f"input '{vi.name}' is not a tensor ({tt.WhichOneof('value')})")
        elem = tt.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except (KeyError, TypeError, ValueError):
            raise NotValidatable(f"input '{vi.name}' has element type {elem} that numpy cannot build") from None
        if not tt.tensor_type.HasField("shape"):
            raise NotValidatable(f"input '{vi.name}' has unknown rank; give --inputs")
        dims: list[int | str | None] = []
        for d in tt.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs[vi.name] = (dtype, dims)
    return specs


def resolve_shape(name: str, dims: list[int | str | None], input_shapes: dict[str, list[int]],
                  symbols: dict[str, int], batch: int | None = None) -> list[int]:
    if name in input_shapes:
        shape = list(input_shapes[name])
        if len(shape) != len(dims):
            raise InputError(f"--input-shape {name}: rank {len(shape)} but the model's input has rank {len(dims)}")
        for given, d in zip(shape, dims):
            if isinstance(d, int) and d > 0 and d != given:
                raise InputError(f"--input-shape {name}: {shape} conflicts with the model's fixed shape {dims}")
        for given, d in zip(shape, dims):
            if isinstance(d, str):
                symbols.setdefault(d, given)
        return shape
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, int) and d == 0:
            out.append(0)
        elif i == 0 and batch is not None:
            out.append(batch)
            if isinstance(d, str):
                symbols.setdefault(d, batch)
        elif isinstance(d, str):
            out.append(symbols.setdefault(d, DEFAULT_DIM))
        else:
            out.append(DEFAULT_DIM)
    return out


# Ops through which an integer input keeps its values (so a Gather further on still indexes with them).
_VALUE_PRESERVING = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Slice",
                     "Transpose", "Tile"}


def index_bounds(model: ModelProto) -> dict[str, int]:
    """Exclusive upper bound for integer inputs that index a table, so generated data is valid data.

    Followed through value-preserving ops to ``Gather``/``GatherElements`` (table length on the gather
    axis) and ``OneHot`` (depth), e.g. a BERT export's token-type ids into a 2-row table. Inputs named
    like masks get 2 (0/1). Only bounds that can be read from static shapes are returned."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    consts = {o: list(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value" for o in n.output}
    consts.update(inits)
    const_vals = {t.name: t for t in model.graph.initializer}

    @functools.lru_cache(maxsize=1)
    def shapes() -> dict[str, list[int]]:
        # Inferred only when a table is neither an initializer nor a Constant: models without integer
        # inputs (most vision models) never pay for a shape inference of the whole graph here.
        out: dict[str, list[int]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for v in list(inferred.graph.value_info) + list(inferred.graph.input):
                dims = v.type.tensor_type.shape.dim
                if v.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
                    out[v.name] = [d.dim_value for d in dims]
        except Exception:  # noqa: BLE001 - no shapes: bounds from initializers only
            pass
        return out

    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def attr(n: onnx.NodeProto, name: str, default: int) -> int:
        return next((a.i for a in n.attribute if a.name == name), default)

    bounds: dict[str, int] = {}
    for name, (dtype, _) in input_specs(model).items():
        if not np.issubdtype(dtype, np.integer):
            continue
        found: list[int] = []
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in users.get(t, []):
                if n.op_type in _VALUE_PRESERVING and n.input and n.input[0] == t:
                    stack.extend(n.output)
                elif n.op_type in ("Gather", "GatherElements") and len(n.input) > 1 and n.input[1] == t:
                    table = consts.get(n.input[0]) or shapes().get(n.input[0])
                    if table:
                        found.append(table[attr(n, "axis", 0) % len(table)])
                elif n.op_type == "OneHot" and n.input[0] == t and n.input[1] in const_vals:
                    from onnx import numpy_helper

                    found.append(int(numpy_helper.to_array(const_vals[n.input[1]]).reshape(-1)[0]))
        if found:
            bounds[name] = max(1, min(found))
        elif "mask" in name.lower():
            bounds[name] = 2
    return bounds


def random_array(dtype: np.dtype, shape: list[int], rng: np.random.Generator, high: int = 4,
                 float_range: tuple[float, float] | None = None) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.floating):
        if float_range is not None:  # e.g. images in [0, 1]: what the model sees in use
            return rng.uniform(float_range[0], float_range[1], size=shape).astype(dtype)
        return rng.standard_normal(size=shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        # Small non-negative values: safe as indices, ids and counts in most graphs (``high`` when an
        # input is known to index a smaller table).
        return rng.integers(0, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape)).astype(dtype)
    if dtype.kind in "OUS":
        return np.full(shape, "a", dtype=object)
    raise NotValidatable(f"cannot build random data of type {dtype}")


def _spatial_axes(dtype: np.dtype, dims: list) -> tuple[int, ...]:
    """Height/width axes of a float image input: NCHW when axis 1 is fixed, NHWC when only axis 3 is."""
    if dtype.kind != "f" or len(dims) != 4:
        return ()
    fixed = [isinstance(d, int) and d > 0 for d in dims]
    if fixed[1]:
        return (2, 3)
    if fixed[3]:
        return (1, 2)
    return ()


def make_inputs(model: ModelProto, input_shapes: dict[str, list[int]] | None = None, *, seed: int = 0,
                batch: int | None = None, float_range: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """Deterministic random inputs following the model's input specs."""
    rng = np.random.default_rng(seed)
    symbols: dict[str, int] = {}
    feeds = {}
    shapes = input_shapes or {}
    for name in shapes:
        if name not in {vi.name for vi in graph_inputs(model)}:
            raise InputError(f"--input-shape names '{name}', which is not an input of the model")
    bounds = index_bounds(model)
    for name, (dtype, dims) in input_specs(model).items():
        if name not in shapes:
            dims = list(dims)
            sized = {i: SPATIAL_DIM for i in _spatial_axes(dtype, dims)}
            if dtype.kind == "f" and len(dims) == 2:
                sized[1] = SIGNAL_DIM
            for i, size in sized.items():
                if isinstance(dims[i], str):
                    symbols.setdefault(dims[i], size)  # the same symbol elsewhere gets the same size
                elif not (isinstance(dims[i], int) and dims[i] > 0):
                    dims[i] = size
        shape = resolve_shape(name, dims, shapes, symbols, batch)
        if any(d < 0 for d in shape) or np.prod(shape, dtype=np.float64) * dtype.itemsize > MAX_INPUT_BYTES:
            # A declared shape of billions of elements (hostile or mistaken) must not take the machine down.
            raise NotValidatable(f"input '{name}' has shape {shape}, too large to build random data for; "
                                 "give --inputs or --input-shape")
        feeds[name] = random_array(dtype, shape, rng, high=min(4, bounds.get(name, 4)), float_range=float_range)
        if name in bounds and bounds[name] == 2 and "mask" in name.lower() and feeds[name].ndim == 2:
            feeds[name][:, 0] = 1  # a mask with no position set would be an empty sequence
    return feeds


LATENCY_BATCHES = (1, 64)


def take_batch(feeds: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """``b`` samples of ``feeds`` along the batch axis, repeating samples when there are fewer."""
    out = {}
    for k, v in feeds.items():
        n = v.shape[0] if v.ndim else 0
        if n == 0:
            return {}
        idx = np.arange(b) % n
        out[k] = v[idx]
    return out


def latency_feeds(model: ModelProto, input_shapes: dict[str, list[int]] | None = None,
                  data: dict[str, np.ndarray] | None = None,
                  batches: tuple[int, ...] = LATENCY_BATCHES) -> dict[int, dict[str, np.ndarray]]:
    """Inputs per batch size for timing: the user's data where given (so sequence lengths and ids are
    real), else generated valid inputs; a fixed-batch model is timed at its own batch only."""
    fixed = static_batch(model)
    out: dict[int, dict[str, np.ndarray]] = {}
    for b in ((fixed,) if fixed is not None else batches):
        feeds = take_batch(data, b) if data else {}
        if not feeds:
            try:
                feeds = make_inputs(model, input_shapes, batch=b, seed=1)
            except NotValidatable:
                continue
        out[b] = feeds
    return out


def _read_pb_folder(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """An ONNX test-data folder (``input_0.pb``, ``input_1.pb`` ...; ``test_data_set_*`` of them are joined
    along the batch axis when the model's batch is dynamic, else the first set is used)."""
    from onnx import numpy_helper

    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir()) or [path]
    feeds_per_set = []
    for folder in sets:
        files = sorted(folder.glob("input_*.pb"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        if not files:
            raise InputError(f"--inputs '{path}': no input_N.pb files in '{folder}'")
        arrays = {}
        for i, f in enumerate(files):
            t = onnx.TensorProto()
            try:
                t.ParseFromString(f.read_bytes())
                arr = numpy_helper.to_array(t)
            except Exception as e:  # noqa: BLE001 - not a TensorProto
                raise InputError(f"--inputs '{f}': not a serialized ONNX tensor ({type(e).__name__})") from None
            name = t.name or (names[i] if i < len(names) else f"input_{i}")
            arrays[name] = arr
        feeds_per_set.append(arrays)
    if len(feeds_per_set) == 1:
        return feeds_per_set[0]
    try:
        return {k: np.concatenate([fs[k] for fs in feeds_per_set]) for k in feeds_per_set[0]}
    except (KeyError, ValueError):
        return feeds_per_set[0]  # sets that do not stack (e.g. fixed batch): validate on the first


def check_feeds(feeds: dict[str, np.ndarray], model: ModelProto, what: str) -> None:
    """Each array has its input's element type and rank, and fits its fixed dims: one line naming the problem."""
    specs = input_specs(model)
    for name, (dtype, dims) in specs.items():
        arr = feeds[name]
        if arr.dtype != dtype:
            if (arr.dtype.kind == "f" and dtype.kind == "f") or (arr.dtype.kind in "iu" and dtype.kind in "iu"):
                feeds[name] = arr = arr.astype(dtype)  # float64 data for a float32 input: same values
            else:
                raise InputError(f"{what}: input '{name}' is {arr.dtype}, the model expects {dtype}")
        if arr.ndim != len(dims):
            raise InputError(f"{what}: input '{name}' has shape {list(arr.shape)} (rank {arr.ndim}), the model "
                             f"expects rank {len(dims)} {['?' if not isinstance(d, int) else d for d in dims]}")
        for i, (got, want) in enumerate(zip(arr.shape, dims)):
            if isinstance(want, int) and want > 0 and got != want and not (i == 0 and want == 1):
                raise InputError(f"{what}: input '{name}' has shape {list(arr.shape)}, the model fixes dim {i} to {want}")


def load_inputs(path: str | Path, model: ModelProto) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Validation inputs: an .npz whose keys are input names (optional ``labels``), an .npy for a
    single-input model, or an ONNX test-data folder (``input_N.pb``). Checked against the model's inputs."""
    path = Path(path)
    names = [vi.name for vi in graph_inputs(model)]
    what = f"--inputs '{path}'"
    labels = None
    if not path.exists():
        raise InputError(f"{what}: no such file or folder")
    if path.is_dir():
        feeds = _read_pb_folder(path, names)
    elif path.suffix.lower() == ".npy":
        if len(names) != 1:
            raise InputError(f"{what}: an .npy holds one array, the model has {len(names)} inputs {names}; use .npz")
        try:
            feeds = {names[0]: np.load(path, allow_pickle=False)}
        except (OSError, ValueError) as e:
            raise InputError(f"{what}: cannot read as .npy ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    else:
        try:
            data = np.load(path, allow_pickle=False)
            if not hasattr(data, "files"):
                raise ValueError("an .npy array, not an .npz archive")
            feeds = {k: data[k] for k in data.files if k != "labels"}
            labels = data["labels"] if "labels" in data.files else None
        except (OSError, ValueError, EOFError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{what}: cannot read as .npz ({msg.split('. ')[0]})") from None
    missing = [n for n in names if n not in feeds]
    extra = [k for k in feeds if k not in names]
    if missing or extra:
        raise InputError(f"{what}: keys {sorted(feeds)} do not match the model's inputs {names}")
    check_feeds(feeds, model, what)
    n = {v.shape[0] for v in feeds.values() if v.ndim}
    if labels is not None and (labels.ndim != 1 or (n and labels.shape[0] not in n)):
        raise InputError(f"{what}: 'labels' has shape {list(labels.shape)}; expected one class id per sample")
    return feeds, labels


def describe_feeds(feeds: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """What validation ran on, for the report: source, samples, and per input shape, dtype and range."""
    n = next((int(v.shape[0]) for v in feeds.values() if isinstance(v, np.ndarray) and v.ndim), 1)
    inputs = []
    for k, v in feeds.items():
        if not isinstance(v, np.ndarray):
            inputs.append({"name": k, "shape": None, "dtype": type(v).__name__})
            continue
        row: dict[str, Any] = {"name": k, "shape": list(v.shape), "dtype": str(v.dtype)}
        if v.size and v.dtype.kind in "biuf":
            row["min"], row["max"] = float(np.nanmin(v)), float(np.nanmax(v))
        inputs.append(row)
    return {"source": source, "samples": n, "inputs": inputs}


def degenerate_outputs(outputs: list[tuple[str, np.ndarray]]) -> list[str]:
    """Outputs of the original that cannot tell a good model from a bad one on these inputs."""
    bad = []
    for name, a in outputs:
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fc" or a.size == 0:  # sequences, maps
            continue
        if np.isnan(a).any():
            bad.append(f"output '{name}' of the original has NaN values on the validation inputs")
        elif not np.any(a):
            bad.append(f"output '{name}' of the original is all zero on the validation inputs")
        elif a.size > 1 and np.all(a == a.reshape(-1)[0]):
            bad.append(f"output '{name}' of the original is constant on the validation inputs")
    return bad


@dataclass
class OutputMetrics:
    name: str
    shape: list[int]
    shape_optimized: list[int]
    dtype: str
    max_abs: float
    max_rel: float
    cosine: float
    min_sample_cosine: float
    top1_agreement: float | None
    within_tolerance: bool
    centred_cosine: float | None = None  # see centred_cosine()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidationResult:
    passed: bool
    reason: str
    outputs: list[OutputMetrics] = field(default_factory=list)
    mode: str = "lossless"  # or "lossy"
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    samples: int = 0
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. outputs that are constant on these inputs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = [o.to_dict() for o in self.outputs]
        return d

    @property
    def min_cosine(self) -> float:
        return min((o.min_sample_cosine for o in self.outputs), default=1.0)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


# Centring needs enough samples to estimate the original's mean output; and an output that barely varies
# across inputs (relative to its size) has no variation to track.
CENTRED_MIN_SAMPLES = 4
CENTRED_MIN_SPREAD = 1e-6


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine of both outputs after subtracting the original's mean over the samples (axis 0).

    A raw cosine is dominated by what every input has in common: on networks whose outputs share a large
    mean (random-init zoo exports, detectors' anchor grids, ReLU features) a pruned model that returns
    nearly the mean for every input still scores 0.99. Centred, only the part that depends on the input
    counts (yolov8n pruned with an overfit refit: raw 0.990, centred 0.37). None when it does not apply."""
    if a.ndim < 1 or a.shape[0] < CENTRED_MIN_SAMPLES or a.dtype.kind != "f" or a.shape != b.shape:
        return None
    fa = np.nan_to_num(a.reshape(a.shape[0], -1).astype(np.float64))
    fb = np.nan_to_num(b.reshape(b.shape[0], -1).astype(np.float64))
    mean = fa.mean(axis=0, keepdims=True)
    ca, cb = (fa - mean).ravel(), (fb - mean).ravel()
    if float(np.linalg.norm(ca)) <= CENTRED_MIN_SPREAD * max(float(np.linalg.norm(fa)), 1e-30):
        return None
    return _cos(ca, cb)


def output_metrics(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> OutputMetrics:
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    shape_ok = a_arr.shape == b_arr.shape
    dtype_ok = a_arr.dtype == b_arr.dtype
    if not shape_ok or a_arr.dtype.kind in "OUSV" or b_arr.dtype.kind in "OUSV":
        equal = shape_ok and dtype_ok and bool(np.all(a_arr == b_arr))
        return OutputMetrics(name, list(a_arr.shape), list(b_arr.shape), str(a_arr.dtype),
                             0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                             1.0 if equal else 0.0, 1.0 if equal else 0.0, None, equal)
    af = a_arr.astype(np.float64).ravel()
    bf = b_arr.astype(np.float64).ravel()
    both_nan = np.isnan(af) & np.isnan(bf)
    same_inf = np.isinf(af) & (af == bf)
    ok_special = both_nan | same_inf
    diff = np.where(ok_special, 0.0, np.abs(af - bf))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = np.abs(af)
    rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1), np.where(diff > 0, np.inf, 0.0))
    max_rel = float(rel.max()) if rel.size else 0.0
    within = bool(dtype_ok and np.all(diff <= atol + rtol * np.where(np.isfinite(denom), denom, 0)))
    fa, fb = np.nan_to_num(af, posinf=0, neginf=0), np.nan_to_num(bf, posinf=0, neginf=0)
    cos = _cos(fa, fb)
    min_sample = cos
    top1 = None
    if a_arr.ndim >= 2 and a_arr.shape[0] > 1 and a_arr.dtype.kind == "f":
        ra = np.nan_to_num(a_arr.reshape(a_arr.shape[0], -1).astype(np.float64))
        rb = np.nan_to_num(b_arr.reshape(b_arr.shape[0], -1).astype(np.float64))
        per = [_cos(x, y) for x, y in zip(ra, rb)]
        min_sample = float(min(per))
        cos = float(np.mean(per))
    if a_arr.ndim == 2 and a_arr.shape[-1] > 1 and a_arr.dtype.kind == "f":
        top1 = float(np.mean(np.argmax(a_arr, -1) == np.argmax(b_arr, -1)))
    return OutputMetrics(name, list(a_arr.shape), list(b_arr.shape), str(a_arr.dtype), max_abs, max_rel,
                         cos, min_sample, top1, within, centred_cosine(a_arr, b_arr))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of a score matrix [N, classes] against integer labels."""
    scores = np.asarray(scores)
    pred = np.argmax(scores.reshape(scores.shape[0], -1), axis=-1)
    return float(np.mean(pred == np.asarray(labels).reshape(-1)) * 100.0)


def run_model(model: ModelProto | str | Path, inputs: dict[str, np.ndarray], *, chunk: int | None = None,
              custom_op_library: str | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Run in onnxruntime; when ``chunk`` is given, feed axis-0 slices of that size and concatenate."""
    return _run_model(model, inputs, chunk=chunk, custom_op_library=custom_op_library)


def _run_model(model: ModelProto | str | Path, inputs: dict[str, np.ndarray], *, chunk: int | None = None,
               custom_op_library: str | None = None, optimize: bool | str = True) -> tuple[list[str], list[np.ndarray]]:
    """``run_model``; ``optimize=False`` runs the graph as it is, without onnxruntime's graph rewrites;
    ``optimize="extended"`` applies them except the layout ones (see ``rewrite_level``).

    The session lives only inside this call: when it returns, the weights onnxruntime holds (mapped
    external data, or its parse of an embedded file) are gone before the next model is loaded."""
    import onnxruntime as ort

    from onnxslim.runtime import make_session, run

    level = {True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[optimize]
    sess = make_session(model, custom_op_library=custom_op_library, level=level, prepack=False)  # a few runs: see runtime
    names = [o.name for o in sess.get_outputs()]
    if not chunk:
        return names, run(sess, inputs)
    n = next(iter(inputs.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    for s in range(0, n, chunk):
        piece = {k: v[s:s + chunk] for k, v in inputs.items()}
        short = chunk - next(iter(piece.values())).shape[0]
        if short:
            # A model with a fixed batch takes only whole batches: pad by repeating rows, drop their outputs.
            piece = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in piece.items()}
        outs = run(sess, piece)
        parts.append([o[:chunk - short] for o in outs] if short else outs)
    return names, [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


# Lossless comparisons of models with at least this many bytes of weights run both graphs as they are,
# without onnxruntime's graph rewrites: those (Conv+BN fusion, NCHWc weight re-layout, constant folding)
# copy every weight they touch (3.3x a 300 MB Conv model in memory, 3/4 of the validation time), and
# they differ between the two graphs, so they add nothing to a check that both compute the same thing.
# Smaller models keep the rewrites (their copies are small; fp16 graphs then agree more closely, as
# onnxruntime computes both the same way), and so do lossy gates, which must measure what onnxruntime
# will run (e.g. fused int8 kernels).
NO_REWRITES_BYTES = 64 << 20


def rewrite_level(lossy: bool, weight_bytes: int) -> bool | str:
    """onnxruntime's graph rewrites for a comparison (``_run_model``'s ``optimize``).

    Lossy gates: all of them (they measure what onnxruntime will run). Lossless comparisons of models
    from NO_REWRITES_BYTES on: none (above). Smaller lossless ones: the fusions (both graphs fused
    alike, e.g. LayerNorm/Gelu patterns of a float16 model, agree more closely) but not the level-3 layout
    rewrites (NCHWc: every conv weight re-laid out at session start, half of a small model's session
    time, applied to both graphs alike, so they prove nothing about onnxslim's rewrites)."""
    if lossy:
        return True
    return "extended" if weight_bytes < NO_REWRITES_BYTES else False


def _weight_bytes(model: ModelProto | str | Path) -> int:
    """Bytes of the model with its weights (a file's size plus its external data), cheaply."""
    from onnxslim import weights

    if isinstance(model, ModelProto):
        return weights.logical_size(model)
    try:
        size = Path(model).stat().st_size
    except OSError:  # onnxruntime will say what is wrong with it
        return 0
    if size >= NO_REWRITES_BYTES:
        return size
    from onnxslim.model import load_model

    try:
        m = load_model(model, check=False, lazy=True)  # weights stay on disk: reads only the structure
    except InputError:
        return size
    try:
        return m.file_size
    finally:
        m.close()


def static_batch(model: ModelProto) -> int | None:
    """The fixed leading dimension shared by all inputs, if any (then data is fed in chunks of it)."""
    sizes = set()
    for _, (_, dims) in input_specs(model).items():
        if dims and isinstance(dims[0], int) and dims[0] > 0:
            sizes.add(dims[0])
        else:
            return None
    return sizes.pop() if len(sizes) == 1 else None


class ReferenceOutputs:
    """The original model's outputs, computed once per set of inputs and reused for every comparison of
    one run (each --check-each-pass step, each lossy stage, the final check): the original does not
    change, so building its onnxruntime session again would only cost time. A failure of the original
    on some inputs is remembered too. Entries are keyed by the inputs' identity (the dict is kept, so
    the identity cannot be reused), the graph-rewrite level and the chunk size."""

    def __init__(self, weight_bytes: int | None = None) -> None:
        self.weight_bytes = weight_bytes  # the original's size with its weights, when the caller knows it
        self._entries: list[tuple[dict, bool | str, int | None, Any]] = []
        self._derived: list[tuple[dict, dict]] = []

    def get(self, inputs: dict, optimize: bool | str, chunk: int | None) -> Any:
        for feeds, opt, ch, value in self._entries:
            if feeds is inputs and opt == optimize and ch == chunk:
                return value
        return None

    def put(self, inputs: dict, optimize: bool | str, chunk: int | None, value: Any) -> None:
        self._entries.append((inputs, optimize, chunk, value))

    def derived(self, inputs: dict, make: Any) -> dict:
        """``make(inputs)``, made once: inputs derived from ``inputs`` (e.g. all-ones) keep one identity."""
        for src, out in self._derived:
            if src is inputs:
                return out
        out = make(inputs)
        self._derived.append((inputs, out))
        return out


def compare_models(original: ModelProto | str | Path, optimized: ModelProto | str | Path,
                   inputs: dict[str, np.ndarray], *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                   labels: np.ndarray | None = None, lossy: bool = False,
                   min_cosine: float = DEFAULT_MIN_COSINE, max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
                   chunk: int | None = None, custom_op_library: str | None = None,
                   min_top1: float | None = None, score_outputs: set[str] | None = None,
                   reference: ReferenceOutputs | None = None,
                   min_centred_cosine: float = DEFAULT_MIN_CENTRED_COSINE) -> ValidationResult:
    """Run both models on ``inputs`` and judge the optimized one (see module doc).

    Lossy, without labels: every output's cosine >= ``min_cosine``, its centred cosine (``centred_cosine``)
    >= ``min_centred_cosine`` where it applies, and top-1 agreement >= ``min_top1`` on the outputs that are
    class scores (``score_outputs``; by default ``DEFAULT_MIN_TOP1``): a cosine near 1 can hide a classifier
    that changed one answer in five, or a model that answers every input with the average answer.
    ``reference``: the original's outputs of earlier comparisons in the same run (then its session is not
    built again)."""
    # One session at a time: the original's outputs are computed and its session freed before the
    # optimized one is built.
    size = reference.weight_bytes if reference is not None and reference.weight_bytes is not None else None
    optimize = rewrite_level(lossy, 0 if lossy else size if size is not None else _weight_bytes(original))
    run = functools.partial(_run_model, chunk=chunk, custom_op_library=custom_op_library, optimize=optimize)
    known = reference.get(inputs, optimize, chunk) if reference is not None else None
    if isinstance(known, NotValidatable):
        raise NotValidatable(str(known))
    if known is not None:
        names_a, outs_a = known
    else:
        try:
            names_a, outs_a = run(original, inputs)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the reference itself fails: nothing to compare against
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            failure = NotValidatable(f"the original model does not run in onnxruntime on these inputs: {first[-200:]}")
            if reference is not None:
                reference.put(inputs, optimize, chunk, failure)
            raise failure from None
        if reference is not None:
            reference.put(inputs, optimize, chunk, (names_a, outs_a))
    try:
        names_b, outs_b = run(optimized, inputs)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the original runs and the result does not: a failed check, not a crash
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return ValidationResult(False, f"the optimized model does not run in onnxruntime: {first[-200:]}",
                                mode="lossy" if lossy else "lossless")
    n = next(iter(inputs.values())).shape[0] if inputs and next(iter(inputs.values())).ndim else 1
    if names_a != names_b:
        return ValidationResult(False, f"output names differ: {names_a} vs {names_b}", mode="lossy" if lossy else "lossless")
    if lossy:
        outs_a, outs_b = _real_tokens(inputs, outs_a, outs_b)
    metrics = [output_metrics(nm, a, b, atol, rtol) for nm, a, b in zip(names_a, outs_a, outs_b)]
    res = ValidationResult(True, "", metrics, mode="lossy" if lossy else "lossless", samples=int(n),
                           warnings=degenerate_outputs(list(zip(names_a, outs_a))))
    bad_shape = [m for m in metrics if m.shape != m.shape_optimized]
    if bad_shape:
        m = bad_shape[0]
        res.passed, res.reason = False, f"output '{m.name}' has shape {m.shape_optimized}, expected {m.shape}"
        return res
    if labels is not None and outs_a:
        res.accuracy_before = accuracy(outs_a[0], labels)
        res.accuracy_after = accuracy(outs_b[0], labels)
    if not lossy:
        failing = [m for m in metrics if not m.within_tolerance]
        if failing:
            m = failing[0]
            res.passed = False
            res.reason = (f"output '{m.name}' differs: max abs error {m.max_abs:.3g}, max rel error {m.max_rel:.3g} "
                          f"(atol {atol:g}, rtol {rtol:g})")
        return res
    if res.accuracy_before is not None:
        drop = res.accuracy_before - res.accuracy_after
        if drop > max_acc_drop:
            res.passed = False
            res.reason = (f"accuracy {res.accuracy_after:.2f}% vs {res.accuracy_before:.2f}% "
                          f"(drop {drop:.2f} > max {max_acc_drop:g} points)")
        return res
    worst = min(metrics, key=lambda m: m.cosine)
    if worst.cosine < min_cosine:
        res.passed = False
        res.reason = f"output '{worst.name}' cosine similarity {worst.cosine:.4f} < min {min_cosine:g}"
        return res
    centred = [m for m in metrics if m.centred_cosine is not None]
    worst_c = min(centred, key=lambda m: m.centred_cosine, default=None)
    if worst_c is not None and worst_c.centred_cosine < min_centred_cosine:
        res.passed = False
        res.reason = (f"output '{worst_c.name}' centred cosine {worst_c.centred_cosine:.4f} < min "
                      f"{min_centred_cosine:g} (--min-centred-cosine: the part of the output that depends on "
                      f"the input is not reproduced; raw cosine {worst_c.cosine:.4f})")
        return res
    top1_gate = DEFAULT_MIN_TOP1 if min_top1 is None else min_top1
    for m in metrics:
        if m.top1_agreement is not None and (min_top1 is not None or m.name in (score_outputs or ())) \
                and m.top1_agreement < top1_gate:
            res.passed = False
            res.reason = (f"output '{m.name}' top-1 agreement with the original {m.top1_agreement:.1%} "
                          f"< min {top1_gate:.0%} (--min-top1)")
            return res
    return res


def token_mask_input(feeds: dict[str, np.ndarray]) -> str | None:
    """The input marking an encoder's real tokens: 2-D, integer or bool, 0/1 with at least one 1, named like an
    attention mask (``attention_mask``, ``input_mask``). Shared by the refit and distill, which skip padding."""
    for name, v in feeds.items():
        if "mask" in name.lower() and v.ndim == 2 and v.dtype.kind in "biu" and v.any() \
                and np.isin(np.unique(v), (0, 1)).all():
            return name
    return None


def _real_tokens(inputs: dict[str, np.ndarray], outs_a: list, outs_b: list) -> tuple[list, list]:
    """Lossy gates of encoders judge the tokens that exist: outputs [batch, sequence, ...] at padded positions
    (``attention_mask`` 0) are read by nothing (the mask hides them from attention, pooling skips them), and
    INT8 changes them most: all-MiniLM-L6-v2 dynamic INT8 s8 per-channel, cosine 0.991 on real tokens,
    0.86 on padding, 0.976 over both."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.dtype.kind not in "iub" or mask.all() or not mask.any():
        return outs_a, outs_b
    pad = ~mask.astype(bool)

    def zero_pad(x: np.ndarray) -> np.ndarray:  # shapes kept: which outputs are class scores depends on rank
        x = x.copy()
        x[pad] = 0
        return x

    pairs = [(zero_pad(a), zero_pad(b)) if (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.ndim >= 2
                                          and a.shape[:2] == mask.shape and b.shape == a.shape) else (a, b)
             for a, b in zip(outs_a, outs_b)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


DEFAULT_MIN_TOP1 = 0.95
_SCORE_PRODUCERS = {"Softmax", "LogSoftmax", "Sigmoid", "Gemm", "MatMul", "Add"}


def score_outputs(model: ModelProto) -> set[str]:
    """Outputs that are class scores: made by Softmax/LogSoftmax/Sigmoid or straight by a classifier
    layer (Gemm, MatMul(+Add)), as opposed to embeddings or features (Tanh, normalization, pooling)."""
    made_by = {o: n for n in model.graph.node for o in n.output}

    def producer_op(name: str) -> str | None:
        seen = 0
        n = made_by.get(name)
        while n is not None and n.op_type in ("Identity", "Cast", "Flatten", "Reshape", "Squeeze") and seen < 8:
            n, seen = made_by.get(n.input[0]), seen + 1  # PP-OCR's cls ends Softmax -> Identity
        return None if n is None else n.op_type

    return {o.name for o in model.graph.output if producer_op(o.name) in _SCORE_PRODUCERS}
