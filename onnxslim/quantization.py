"""Shared quantization machinery around onnxruntime.quantization (which does the arithmetic).

onnxruntime's tool quantizes well but leaves gaps that this module closes:

- it needs a CalibrationDataReader: ``CalibReader`` adapts onnxslim's CalibrationData; its MinMax
  calibrator's ``CalibMaxIntermediateOutputs`` loses data (see ``Quantizer.quantize``), so it is not used;
- its pre-processing needs sympy and can crash; ``preprocess`` falls back step by step and says why;
- per-channel QDQ below opset 13 writes ``DequantizeLinear(axis=...)``, invalid there: ``_prepare``
  upgrades the model to opset 13 first;
- it never checks that the result is faster or still accurate: ``QuantSearch`` times every candidate
  against the float model with the one latency function (``onnxslim.runtime.latency_table``: one-thread
  sessions, CPU time, interleaved; batch 1 and a large batch, on the user's data where given), tries what
  can win when INT8 is slower (per-tensor/per-channel, float depthwise convs, the other activation type
  where it can win, compute ops only; a candidate clearly slower at batch 1 is not timed further, and
  calibration ranges are computed once and reused by every candidate),
  and moves the nodes that lose the most signal back to float until the accuracy gate passes. The
  signal loss is qdq_loss_debug's SQNR, averaged per channel so that an outlier channel cannot hide it.

Transformer encoders get their own start (``encoder_static_prepare``, ``encoder_dynamic_defaults``): static
INT8 reports the outlier tensors found in the calibration statistics, applies SmoothQuant (onnxslim.smoothquant)
where it raises the measured INT8 SQNR of a MatMul input, keeps the residual stream and the MatMul inputs that
still quantize badly in float and ranks the fallback by that SQNR; dynamic INT8 starts from s8 per-channel
weights with the embedding tables, and on AVX2 tries u8 weights before any MatMul goes back to float.

Every temporary file (and whatever onnxruntime's helpers write into the working directory) lives in a
private folder removed on every exit path (``private_workdir``). The passes (quantize-static,
quantize-dynamic) turn the typed ``QuantOutcome`` of ``quantize_pass`` into a PassResult.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import ModelProto

from onnxslim.calibration import CalibrationData
from onnxslim.errors import InputError
from onnxslim.options import DEFAULT_MAX_ACC_DROP, DEFAULT_MIN_CENTRED_COSINE, DEFAULT_MIN_COSINE
from onnxslim.protowalk import opset_of, prune_opsets  # noqa: F401 - part of this module's interface
from onnxslim.runtime import quiet_ort  # noqa: F401
from onnxslim.validate import compare_models, make_inputs, score_outputs, static_batch

PER_CHANNEL_MIN_OPSET = 13  # DequantizeLinear gained 'axis' in opset 13
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM")
LATENCY_BATCHES = (1, 64)
# per batch and candidate; paired CPU-time runs make this enough on a busy machine (tests shorten it)
LATENCY_SECONDS = float(os.environ.get("ONNXSLIM_QUANT_LATENCY_SECONDS", "1.0"))
SEARCH_BUDGET = 8  # quantized candidates tried by the latency search
FALLBACK_STEPS = 8  # accuracy fallback rounds
FALLBACK_PATIENCE = 3  # rounds without improvement before giving up
DEBUG_SAMPLES = 32  # samples used to rank nodes by quantization error
NOISE = 0.05  # relative latency noise: within this of a threshold, measure again
CLEARLY_SLOWER = 1.25  # a candidate this much slower than the best at batch 1 is not timed at other batches


# ------------------------------------------------------------------------------------ machine defaults

def has_vnni() -> bool:
    """x86 VNNI (8-bit dot products without saturation); read from /proc/cpuinfo where it exists."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: assume a modern CPU
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def machine_defaults() -> dict[str, Any]:
    """The static settings that are fastest at unchanged accuracy on this CPU.

    x86 (``tools/bench_quant.py --forms``): uint8 activations with int8 weights (U8S8) are the fastest form
    on every model measured. AMD EPYC, AVX2, no VNNI, latency INT8/float at batch 1/64: digits CNN U8S8
    0.81x/0.64x, U8U8 1.04x/0.93x, S8S8 QDQ 1.55x/1.45x, S8S8 QOperator 4.6x/5.6x; MobileNet-like
    0.86x/0.71x vs U8U8 1.17x/0.97x and S8S8 1.7x/1.6x. QDQ and QOperator ran alike for U8S8, and
    reduce_range did not change the speed. Without VNNI, the AVX2 u8*s8 kernels sum pairs into
    saturating 16 bits, so 7-bit weights (reduce_range) keep the accuracy, as onnxruntime advises; ARM
    gets int8 activations, also as onnxruntime's documentation advises (not measured here).
    """
    arch = platform.machine().lower()
    if arch in ("arm64", "aarch64") or arch.startswith("arm"):
        return {"activation": "int8", "weight": "int8", "per_channel": True, "reduce_range": False,
                "why": f"{arch}: int8 activations and weights"}
    vnni = has_vnni()
    return {"activation": "uint8", "weight": "int8", "per_channel": True, "reduce_range": not vnni,
            "why": f"{arch} {'with' if vnni else 'without'} VNNI: uint8 activations, int8 per-channel weights"
                   + ("" if vnni else ", 7-bit weight range")}


# ------------------------------------------------------------------------------------------ settings

@dataclass
class QuantConfig:
    """One way to quantize. ``kind`` is 'static' or 'dynamic'."""

    kind: str = "static"
    fmt: str = "qdq"
    method: str = "minmax"
    activation: str = "uint8"
    weight: str = "int8"
    per_channel: bool = True
    symmetric: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None  # None: every op type onnxruntime can quantize
    exclude: tuple[str, ...] = ()  # node names kept in float
    float_ops: tuple[str, ...] = ()  # op types kept in float (e.g. depthwise Conv) -> expanded to nodes
    # Static only. MatMul inputs whose static range loses too much (encoders' FFN down projections) are
    # quantized at run time instead (DynamicQuantizeLinear + MatMulInteger), mixed with the QDQ elsewhere.
    dynamic_nodes: tuple[str, ...] = ()
    # Static only (encoders): MatMul/Gemm outputs are not re-quantized (onnxruntime fuses DQ+DQ+MatMul into
    # MatMulIntegerToFloat), and readers of a quantized activation that are not quantized themselves (the
    # residual Add after a LayerNorm) read the float tensor, not its Q/DQ copy.
    encoder_form: bool = False

    def label(self) -> str:
        if self.kind == "dynamic":
            s = f"dynamic, {self.weight} {'per-channel' if self.per_channel else 'per-tensor'} weights"
            if self.reduce_range:
                s += ", 7-bit weights"
        else:
            s = (f"{self.fmt.upper()}, {self.activation} activations{' (symmetric)' if self.symmetric else ''}, "
                 f"{self.weight} {'per-channel' if self.per_channel else 'per-tensor'} weights, {self.method}")
            if self.reduce_range:
                s += ", 7-bit weights"
        if self.encoder_form:
            s += ", float MatMul outputs"
        if self.dynamic_nodes:
            s += f", {len(self.dynamic_nodes)} MatMul(s) dynamic"
        if self.op_types:
            s += f", ops {'/'.join(self.op_types)}"
        if self.float_ops:
            s += f", float {'/'.join(self.float_ops)}"
        if self.exclude:
            s += f", {len(self.exclude)} node(s) in float"
        return s


def _split(text: Any) -> list[str]:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    return [t.strip() for t in str(text).split(",") if t.strip()]


def config_from_options(options: Any, kind: str, model: ModelProto) -> tuple[QuantConfig, set[str], str]:
    """The starting config from the pass's options object (unset = None), the settings the user fixed
    (the search leaves them alone), and why."""
    d = machine_defaults()
    fixed: set[str] = set()

    def opt(key: str, default: Any, field_name: str) -> Any:
        v = getattr(options, key)
        if v is None:
            return default
        fixed.add(field_name)
        return v

    names = {n.name for n in model.graph.node}
    exclude = _split(options.quant_exclude)
    unknown = [n for n in exclude if n not in names]
    if unknown:
        raise InputError(f"--quant-exclude: no node named {', '.join(repr(u) for u in unknown[:5])} in the model")
    op_types = _split(options.quant_op_types) or None
    if op_types:
        fixed.add("op_types")
    if kind == "dynamic":
        cfg = QuantConfig(kind="dynamic", fmt="qoperator", activation="uint8",
                          weight=opt("weight_type", "int8", "weight"),
                          per_channel=bool(opt("per_channel", False, "per_channel")),
                          op_types=tuple(op_types) if op_types else None, exclude=tuple(exclude))
        return cfg, fixed, "dynamic: uint8 activations quantized at run time"
    cfg = QuantConfig(kind="static", fmt=opt("quant_format", "qdq", "fmt"), method=opt("quant_method", "minmax", "method"),
                      activation=opt("activation_type", d["activation"], "activation"),
                      weight=opt("weight_type", d["weight"], "weight"),
                      per_channel=bool(opt("per_channel", d["per_channel"], "per_channel")),
                      symmetric=bool(opt("quant_symmetric", False, "symmetric")),
                      reduce_range=d["reduce_range"],
                      op_types=tuple(op_types) if op_types else None, exclude=tuple(exclude))
    return cfg, fixed, d["why"]


# ------------------------------------------------------------------------------------- data reader

def _make_reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class CalibReader(CalibrationDataReader):
        """Feeds CalibrationData to onnxruntime's calibrators in batches (re-iterable)."""

        def __init__(self, data: CalibrationData, names: list[str], batch_size: int) -> None:
            self.data, self.names, self.batch_size = data, names, batch_size
            self._it: Iterator[dict[str, np.ndarray]] | None = None

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._it is None:
                self._it = ({k: v for k, v in b.items() if k in self.names}
                            for b in self.data.batches(self.batch_size))
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = None

        def __len__(self) -> int:
            return math.ceil(self.data.size / max(1, self.batch_size))

    return CalibReader


def calib_reader(data: CalibrationData, model: ModelProto):
    """A CalibrationDataReader over ``data`` for ``model`` (batches of the data's batch size)."""
    from onnxslim.validate import graph_inputs

    return _make_reader_class()(data, [i.name for i in graph_inputs(model)], data.batch_size)


# ---------------------------------------------------------------------------------- model preparation

def name_nodes(model: ModelProto) -> int:
    """Give unnamed nodes unique names: exclusion lists and per-node reports need them."""
    used = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            base = f"{n.op_type}_{i}"
            name = base
            k = 0
            while name in used:
                k += 1
                name = f"{base}_{k}"
            n.name = name
            used.add(name)
            count += 1
    return count


def upgrade_opset(model: ModelProto, target: int = PER_CHANNEL_MIN_OPSET) -> ModelProto:
    """onnx.version_converter to ``target`` (raises ValueError with a one-line reason)."""
    try:
        out = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(out)
        return out
    except Exception as e:  # noqa: BLE001 - the converter raises many types
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def preprocess(model: ModelProto) -> tuple[ModelProto, str]:
    """onnxruntime's quant_pre_process (symbolic shape inference + ORT basic graph optimization),
    falling back to fewer steps when one fails. Returns the model and a note saying what ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = [("symbolic shape inference + ORT optimization + shape inference", dict(skip_symbolic_shape=False)),
                ("ORT optimization + shape inference (symbolic shape inference skipped)", dict(skip_symbolic_shape=True))]
    failures = []
    with tempfile.TemporaryDirectory(prefix="onnxslim-pre-") as tmp:
        for what, kw in attempts:
            out = Path(tmp) / "pre.onnx"
            try:
                with quiet_ort() as errors:
                    quant_pre_process(copy.deepcopy(model), str(out), **kw)
                result = onnx.load(str(out))
                if errors:
                    # quant_pre_process logs (not raises) an ORT optimizer failure and carries on without it.
                    failures.append(f"onnxruntime's graph optimization failed ({_plain(errors[0])})")
                    what = what.replace("ORT optimization + ", "")
                note = f"pre-processing: {what}"
                if failures:
                    note += f"; {'; '.join(failures)}"
                return result, note
            except ImportError as e:
                failures.append(f"symbolic shape inference unavailable ({str(e).splitlines()[0]})")
            except Exception as e:  # noqa: BLE001 - third-party shape inference crashes in many ways
                failures.append(f"onnxruntime's {what.split(' +')[0]} failed ({_plain(str(e)) or type(e).__name__})")
    return model, (f"pre-processing skipped, the model is quantized as it is (information only: "
                   f"{'; '.join(failures)})")


def _plain(msg: str) -> str:
    """A third-party message fit for the user: first line, no temporary paths, no advice about options of
    the tool that raised it (they are not onnxslim's), bounded length."""
    import re

    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    first = re.sub(r"(?:[A-Za-z]:)?(?:/[^\s,;:()'\"]+)+", "<temporary file>", first)
    first = re.split(r"\b(?:please |try |use |rerun |re-run |consider )", first, flags=re.I)[0].rstrip(" ,.;:")
    return first[:160]


def depthwise_convs(model: ModelProto) -> list[str]:
    """Names of grouped convolutions (depthwise and group>1): INT8 kernels for them are often slower."""
    return [n.name for n in model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)]


# ------------------------------------------------------------------------------------------ quantizer

class Quantizer:
    """Quantizes one prepared float model under many configs; calibration ranges are computed once
    per (method, op types) and reused from onnxruntime's calibration cache."""

    def __init__(self, model: ModelProto, data: CalibrationData | None, tmpdir: Path) -> None:
        self.model = model
        self.data = data
        self.tmp = tmpdir
        self._n = 0
        # onnxruntime is given a path, never the proto: for a ModelProto input it saves it with external
        # data, which rewrites the caller's proto in place into references to a temporary file.
        self.path = tmpdir / "float.onnx"
        onnx.save(model, str(self.path))

    def _nodes_for(self, cfg: QuantConfig) -> list[str]:
        names = set(cfg.exclude)
        if "DepthwiseConv" in cfg.float_ops:
            names.update(depthwise_convs(self.model))
        names.update(n.name for n in self.model.graph.node if n.op_type in cfg.float_ops)
        if cfg.kind == "dynamic":
            # The dynamic quantizer first rewrites Gemm 'g' as MatMul 'g_MatMul' (+ Add 'g_Add').
            gemms = {n.name for n in self.model.graph.node if n.op_type == "Gemm"}
            names.update(f"{g}_MatMul" for g in names & gemms)
        return sorted(names)

    def quantize(self, cfg: QuantConfig) -> ModelProto:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        self._n += 1
        out = self.tmp / f"q{self._n}.onnx"
        op_types = list(cfg.op_types) if cfg.op_types else None
        with quiet_ort():
            if cfg.kind == "dynamic":
                quantize_dynamic(str(self.path), str(out), op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                                 reduce_range=cfg.reduce_range, weight_type=types[cfg.weight],
                                 nodes_to_exclude=self._nodes_for(cfg),
                                 # The quantizer rewrites Gemm as MatMul + Add and re-infers types; where onnx's
                                 # inference stops short (PP-OCR cls after its Reshape target became constant) the
                                 # new MatMul output has none and it gives up: every tensor here is float.
                                 extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            else:
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[cfg.method]
                cache = self.tmp / f"ranges-{cfg.method}-{'_'.join(op_types or ['all'])}.json"
                if not cache.exists():
                    full = self.tmp / f"ranges-{cfg.method}-all.json"
                    if full.exists():
                        cache = full  # a superset of the tensors of any op-type subset
                extra: dict[str, Any] = {"ActivationSymmetric": cfg.symmetric, "WeightSymmetric": True}
                if cfg.encoder_form:
                    extra["OpTypesToExcludeOutputQuantization"] = list(op_types or ("MatMul", "Gemm"))
                excluded = self._nodes_for(cfg)
                dynamic = [n for n in cfg.dynamic_nodes if n not in excluded]
                # Never CalibMaxIntermediateOutputs: onnxruntime (1.32) drops every full chunk of collected
                # ranges without merging them, so only the last partial chunk calibrates, and a batch count
                # that is a multiple of the chunk ("No data is collected.": 160 batches of a fixed batch 1)
                # fails. MinMax keeps one min/max per tensor and batch, which is small anyway.
                reader = calib_reader(self.data, self.model) if self.data is not None else None
                quantize_static(str(self.path), str(out), reader,
                                quant_format=QuantFormat.QDQ if cfg.fmt == "qdq" else QuantFormat.QOperator,
                                op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                                reduce_range=cfg.reduce_range, activation_type=types[cfg.activation],
                                weight_type=types[cfg.weight], nodes_to_exclude=sorted(set(excluded) | set(dynamic)),
                                calibrate_method=method, extra_options=extra, calibration_cache_path=str(cache))
                if cfg.encoder_form:
                    q = onnx.load(str(out))
                    float_side_readers(q, set(op_types or ("MatMul", "Gemm")))
                    onnx.save(q, str(out))
                if dynamic:
                    mixed = self.tmp / f"q{self._n}-dynamic.onnx"
                    quantize_dynamic(str(out), str(mixed), op_types_to_quantize=["MatMul"], per_channel=cfg.per_channel,
                                     reduce_range=cfg.reduce_range, weight_type=types[cfg.weight],
                                     nodes_to_quantize=dynamic, extra_options={"MatMulConstBOnly": True})
                    mixed.replace(out)
        q = onnx.load(str(out))
        out.unlink(missing_ok=True)
        prune_opsets(q)
        return q


def float_side_readers(q: ModelProto, quantized_ops: set[str]) -> int:
    """Rewire, in place, every reader of ``DequantizeLinear(QuantizeLinear(x))`` that is not itself a
    quantized op (``quantized_ops``) to read ``x``: onnxruntime's QDQ quantizer gives all readers of a
    quantized tensor its Q/DQ copy, so a LayerNorm output read by Q/K/V and by the residual Add put the
    residual stream through uint8 (MiniLM, no SmoothQuant Muls: min cosine 0.974 -> 0.985 with the residual
    in float) and left one unfused DequantizeLinear per reader. Returns the number of inputs rewired."""
    prod = {o: n for n in q.graph.node for o in n.output}
    consts = {t.name for t in q.graph.initializer}
    done = 0
    for n in q.graph.node:
        if n.op_type in quantized_ops or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(n.input):
            dq = prod.get(t)
            qn = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if qn is not None and qn.op_type == "QuantizeLinear" and qn.input[0] not in consts:
                n.input[i] = qn.input[0]
                done += 1
    if done:  # the DequantizeLinear nodes nobody reads any more
        read = {t for n in q.graph.node for t in n.input} | {o.name for o in q.graph.output}
        keep = [n for n in q.graph.node if n.op_type != "DequantizeLinear" or n.output[0] in read]
        del q.graph.node[:]
        q.graph.node.extend(keep)
    return done


# --------------------------------------------------------------------------------------- measurement

@dataclass
class Gate:
    """The quality and speed requirements a quantized result must meet."""

    min_cosine: float = DEFAULT_MIN_COSINE
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP
    min_top1: float | None = None
    min_speedup: float | None = 1.0  # None: no speed gate (--objective size)
    objective: str = "speed"
    min_centred_cosine: float = DEFAULT_MIN_CENTRED_COSINE


@dataclass
class Quality:
    passed: bool
    reason: str
    cosine: float | None = None
    top1: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    def score(self) -> float:
        """What the gate judges: accuracy when labels exist, else cosine (higher is better)."""
        if self.accuracy_after is not None:
            return self.accuracy_after
        return self.cosine if self.cosine is not None else 0.0

    def summary(self) -> str:
        parts = []
        if self.accuracy_after is not None:
            parts.append(f"accuracy {self.accuracy_after:.2f}% (float {self.accuracy_before:.2f}%)")
        if self.cosine is not None:
            parts.append(f"cosine {self.cosine:.6f}")
        if self.top1 is not None:
            parts.append(f"top-1 agreement {self.top1 * 100:.1f}%")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "cosine": self.cosine, "top1": self.top1,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after}


def judge(reference: ModelProto, candidate: ModelProto, feeds: dict[str, np.ndarray], labels: np.ndarray | None,
          gate: Gate, custom_op_library: str | None = None) -> Quality:
    n = next(iter(feeds.values())).shape[0]
    chunk = static_batch(reference)
    if chunk is not None and n % chunk and n > chunk:
        keep = n - n % chunk  # a fixed-batch model only takes whole batches
        feeds = {k: v[:keep] for k, v in feeds.items()}
        labels = None if labels is None else labels[:keep]
        n = keep
    if chunk is None and n > 256:
        chunk = 256
    if chunk is not None and n <= chunk:
        chunk = None
    # The same judgement as the run's final validation (api.py), so the search never picks what it refuses.
    res = compare_models(reference, candidate, feeds, labels=labels, lossy=True, min_cosine=gate.min_cosine,
                         max_acc_drop=gate.max_acc_drop, chunk=chunk, custom_op_library=custom_op_library,
                         min_top1=gate.min_top1, score_outputs=score_outputs(reference),
                         min_centred_cosine=gate.min_centred_cosine)
    cos = min((o.cosine for o in res.outputs), default=None)
    tops = [o.top1_agreement for o in res.outputs if o.top1_agreement is not None]
    top1 = min(tops) if tops else None
    q = Quality(res.passed, res.reason, cos, top1, res.accuracy_before, res.accuracy_after)
    if q.passed and gate.min_top1 is not None and top1 is not None and top1 < gate.min_top1:
        q.passed, q.reason = False, f"top-1 agreement {top1 * 100:.1f}% < min {gate.min_top1 * 100:.1f}%"
    return q


def latency_batches(model: ModelProto) -> tuple[int, ...]:
    fixed = static_batch(model)
    return (fixed,) if fixed is not None else LATENCY_BATCHES


def time_pair(reference: ModelProto, candidate: ModelProto, feeds_by_batch: dict[int, dict[str, np.ndarray]],
              seconds: float | None = None, custom_op_library: str | None = None) -> dict[str, dict[str, Any]]:
    """The one latency measurement (``onnxslim.runtime.latency_table``): ratio = candidate / reference."""
    from onnxslim.runtime import latency_table

    return latency_table(reference, candidate, feeds_by_batch, custom_op_library=custom_op_library,
                         seconds=LATENCY_SECONDS if seconds is None else seconds)


# ------------------------------------------------------------------------------------ error ranking

def _activation_session(model: ModelProto) -> tuple[Any, list[str]]:
    """A session of ``model`` whose outputs are every float tensor a node produces (shapes kept, unlike
    qdq_loss_debug.collect_activations: the error is measured per channel), and their names."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - shapes are only needed for element types
        inferred = m
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info)
             + list(inferred.graph.input) + list(inferred.graph.output) if v.type.HasField("tensor_type")}
    have = {o.name for o in m.graph.output}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for n in m.graph.node:
        for t in n.output:
            if t and t not in have and types.get(t) in floats:
                m.graph.output.append(onnx.helper.make_tensor_value_info(t, types[t], None))
                have.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, [o.name for o in sess.get_outputs()]


class ChannelSqnr:
    """Per-channel signal and noise energies of one tensor pair, summed batch by batch (so the
    activations of a whole calibration set are never held at once: a ViT-S/16 at 64 samples needed
    21.8 GB when they were). ``value`` is the SQNR in dB averaged over the live channels."""

    def __init__(self) -> None:
        self.sig: np.ndarray | None = None
        self.noise: np.ndarray | None = None
        self.valid = True

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        if not self.valid:
            return
        if ref.shape != test.shape:
            self.valid = False
            return
        r, t = ref.astype(np.float64), test.astype(np.float64)
        if r.ndim < 2:
            r, t = r.reshape(1, -1), t.reshape(1, -1)  # one "channel": the tensor's overall SQNR
        else:
            axis = 1 if r.ndim == 4 else r.ndim - 1
            r = np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1)
            t = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
        sig, noise = (r * r).sum(1), ((r - t) ** 2).sum(1)
        if self.sig is None:
            self.sig, self.noise = sig, noise
        elif self.sig.shape != sig.shape:
            self.valid = False  # the channel count changed between batches: not comparable
        else:
            self.sig += sig
            self.noise += noise

    def value(self) -> float:
        if not self.valid or self.sig is None:
            return float("nan")
        eps2 = np.finfo(float).eps ** 2
        if self.sig.size == 1:  # qdq_loss_debug's definition, from the sums
            return float(10 * np.log10(max(self.sig[0], eps2) / max(self.noise[0], eps2)))
        live = self.sig > 1e-9 * max(self.sig.max(), 1e-30)  # channels that are (almost) always zero carry no signal
        if not live.any():
            return float(10 * np.log10(max(self.sig.sum(), eps2) / max(self.noise.sum(), eps2)))
        sig, noise = self.sig[live], self.noise[live]
        return float(np.mean(10 * np.log10(sig / np.maximum(noise, sig * 1e-12))))  # exact channels: 120 dB


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (onnxruntime's qdq_loss_debug definition)."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    if ref.shape != test.shape:
        return float("nan")
    return float(compute_signal_to_quantization_noice_ratio(ref.astype(np.float64), test.astype(np.float64)))


def channel_sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """SQNR averaged (in dB) over channels (axis 1 of 4-D tensors, else the last axis).

    One number per tensor hides the classic INT8 failure: an outlier channel (|x| = 300 among values
    near 1) widens the scale until every other channel drowns in rounding noise, while the tensor's
    overall SQNR, dominated by the outlier's energy, still looks fine. Per channel it does not."""
    acc = ChannelSqnr()
    acc.add(ref, test)
    return acc.value()


def rank_nodes(float_model: ModelProto, quant_model: ModelProto, data: CalibrationData, candidates: set[str],
               samples: int = DEBUG_SAMPLES) -> list[dict[str, Any]]:
    """Where precision is lost: quantized nodes ordered by SQNR of their inputs minus SQNR of their output,
    float model vs quantized model on the same calibration samples.

    Tensors keep their names in QDQ and dynamic models; on the quantized side a tensor is read after its
    QuantizeLinear/DequantizeLinear pair (what consumers see). A node whose output vanished in the
    quantized model (a Conv fused with the Relu after it) is folded into the first observable node
    after it: both are moved to float together."""
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    from onnxslim.validate import graph_inputs

    sub = data.subset(samples)
    names = [i.name for i in graph_inputs(float_model)]
    fsess, fnames = _activation_session(float_model)
    qsess, qnames = _activation_session(quant_model)
    fset, qset = set(fnames) | set(names), set(qnames)  # graph inputs are quantized too (their Q/DQ pair is the first loss)

    # Which quantized tensor each float tensor is compared with: after its Q/DQ pair (post) or before it (pre).
    def partner(t: str, pre: bool) -> str | None:
        if pre:
            if t + QUANT_INPUT_SUFFIX in qset:
                return t + QUANT_INPUT_SUFFIX
            return t if t + DEQUANT_OUTPUT_SUFFIX in qset and t in qset else None
        return t + DEQUANT_OUTPUT_SUFFIX if t + DEQUANT_OUTPUT_SUFFIX in qset else (t if t in qset else None)

    pairs = {(t, pre): qt for t in fset for pre in (False, True) if (qt := partner(t, pre)) is not None}
    acc = {key: ChannelSqnr() for key in pairs}
    for batch in sub.batches():  # one batch of both models' activations in memory at a time
        feed = {k: v for k, v in batch.items() if k in names}
        fa = dict(zip(fnames, fsess.run(fnames, feed)))
        fa.update(feed)
        qa = dict(zip(qnames, qsess.run(qnames, feed)))
        for (t, pre), qt in pairs.items():
            if t in fa and qt in qa:
                acc[(t, pre)].add(np.asarray(fa[t]), np.asarray(qa[qt]))
        del fa, qa
    graph_in = set(names)
    producer = {o: n for n in float_model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in float_model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n.name)
    cap = 120.0
    cache: dict[tuple[str, bool], float | None] = {}

    def sq(t: str, pre: bool = False) -> float | None:
        """SQNR of tensor t as its consumers see it (after its Q/DQ pair), or before the pair (pre)."""
        if t in graph_in and (pre or t + DEQUANT_OUTPUT_SUFFIX not in qset):
            return cap
        if (t, pre) not in cache:
            v = acc[(t, pre)].value() if (t, pre) in acc else float("nan")
            cache[(t, pre)] = None if math.isnan(v) else min(cap, v)
        return cache[(t, pre)]

    def seen_by_consumers(t: str, chain: list[str], depth: int = 0) -> float | None:
        s = sq(t)
        if s is not None or depth > 4:
            return s
        p = producer.get(t)
        if p is None:
            return None  # an initializer
        chain.append(p.name)
        vals = [v for i in p.input if i and (v := seen_by_consumers(i, chain, depth + 1)) is not None]
        return min(vals) if vals else None

    ranked = []
    for n in float_model.graph.node:
        if not n.output or sq(n.output[0]) is None:
            continue
        out = sq(n.output[0])
        chain: list[str] = []
        ins = [v for t in n.input if t and (v := seen_by_consumers(t, chain)) is not None]
        inp = min(ins) if ins else cap
        pre = sq(n.output[0], pre=True)
        nodes = [n.name] + chain
        if pre is not None and pre - out > inp - pre:
            # The loss is the Q/DQ pair on the output (e.g. an outlier channel widening one scale for all):
            # that pair goes only when the producer and every quantized consumer of the tensor are float.
            nodes += consumers.get(n.output[0], [])
        nodes = [x for x in dict.fromkeys(nodes) if x in candidates]
        if not nodes:
            continue
        ranked.append({"node": n.name, "op": n.op_type, "nodes": nodes, "sqnr_out": round(out, 2),
                       "sqnr_in": round(inp, 2), "sqnr_before_qdq": None if pre is None else round(pre, 2),
                       "loss_db": round(max(0.0, inp - out), 2)})
    ranked.sort(key=lambda r: (-r["loss_db"], r["sqnr_out"]))
    return ranked


# --------------------------------------------------------------------------------------------- search

@dataclass
class Candidate:
    cfg: QuantConfig
    model: ModelProto
    quality: Quality
    # runtime.latency_table: {"batch1": {"before_ms", "after_ms", "ratio"}}, ratio = INT8 / float
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped_early: bool = False  # timed at the first batch only: clearly slower there

    @property
    def ratio(self) -> float | None:
        """The speed gate's number: geometric mean of the latency ratios (below 1 is faster)."""
        from onnxslim.runtime import mean_ratio

        return mean_ratio(self.speed)

    @property
    def speedup(self) -> float:
        r = self.ratio
        return 1.0 / r if r else 0.0

    @property
    def worst_speedup(self) -> float:
        ratios = [v["ratio"] for v in self.speed.values() if v.get("ratio")]
        return 1.0 / max(ratios) if ratios else 0.0

    def score(self) -> float:
        return self.speedup

    def row(self) -> dict[str, Any]:
        return {"config": self.cfg.label(), "size": self.model.ByteSize(), "quality": self.quality.to_dict(),
                "latency": self.speed, "stopped_early": self.stopped_early}


class QuantSearch:
    """Quantize, then make the result fast (latency search) and accurate enough (float fallback)."""

    def __init__(self, float_model: ModelProto, quantizer: Quantizer, reference: ModelProto,
                 feeds: dict[str, np.ndarray], labels: np.ndarray | None, gate: Gate, fixed: set[str],
                 input_shapes: dict[str, list[int]], progress: Callable[[str], None] = lambda m: None,
                 custom_op_library: str | None = None, search: bool = True,
                 latency_data: dict[str, np.ndarray] | None = None) -> None:
        from onnxslim.validate import latency_feeds

        self.float_model = float_model
        self.q = quantizer
        self.reference = reference
        self.feeds, self.labels = feeds, labels
        self.gate = gate
        self.fixed = fixed
        self.input_shapes = input_shapes
        self.progress = progress
        self.custom = custom_op_library
        self.search_enabled = search
        self.tried: list[Candidate] = []
        self.before_fallback: Candidate | None = None
        self.failed: list[str] = []  # configurations onnxruntime could not quantize or run
        self.fallback_steps: list[dict[str, Any]] = []
        # Timing inputs: the user's data where given (real ids and lengths), else valid generated inputs.
        self.latency_feeds = latency_feeds(float_model, input_shapes, latency_data)
        self.best_ratio: float | None = None  # of the fastest accurate candidate timed so far
        # (candidates, quantized model, data) -> ranking like rank_nodes'; set for encoders
        self.ranker: Callable[[set[str], ModelProto, CalibrationData], list[dict[str, Any]]] | None = None
        self.accuracy_forms: list[QuantConfig] = []  # tried before any node goes to float (encoders)

    def evaluate(self, cfg: QuantConfig, timed: bool = True) -> Candidate:
        self.progress(f"quantizing: {cfg.label()}")
        model = self.q.quantize(cfg)
        quality = judge(self.reference, model, self.feeds, self.labels, self.gate, self.custom)
        cand = Candidate(cfg, model, quality)
        if timed:
            self.time(cand)
        self.tried.append(cand)
        return cand

    def time(self, cand: Candidate, early_stop: bool = False) -> None:
        """Latency of ``cand`` against the float model on every batch size. With ``early_stop``, a
        candidate clearly slower than the best so far at the first batch size is not timed further."""
        self.progress(f"timing: {cand.cfg.label()}")
        batches = list(self.latency_feeds)
        if early_stop and len(batches) > 1 and self.best_ratio is not None:
            first = time_pair(self.float_model, cand.model, {batches[0]: self.latency_feeds[batches[0]]},
                              custom_op_library=self.custom)
            r = first.get(f"batch{batches[0]}", {}).get("ratio")
            if r is not None and r > self.best_ratio * CLEARLY_SLOWER:
                cand.speed, cand.stopped_early = first, True
                return
            rest = time_pair(self.float_model, cand.model, {b: self.latency_feeds[b] for b in batches[1:]},
                             custom_op_library=self.custom)
            cand.speed = {**first, **rest}
        else:
            cand.speed = time_pair(self.float_model, cand.model, self.latency_feeds, custom_op_library=self.custom)
        if self.gate.min_speedup is not None and cand.ratio and abs(cand.ratio * self.gate.min_speedup - 1) < NOISE:
            again = time_pair(self.float_model, cand.model, self.latency_feeds, seconds=2 * LATENCY_SECONDS,
                              custom_op_library=self.custom)
            for k, v in again.items():  # near the threshold: average two measurements
                if "ratio" in v and "ratio" in cand.speed.get(k, {}):
                    cand.speed[k] = {m: round((cand.speed[k][m] + v[m]) / 2, 4) for m in v}
        if cand.ratio is not None and (self.best_ratio is None or cand.ratio < self.best_ratio):
            if cand.quality.passed and not cand.stopped_early:
                self.best_ratio = cand.ratio

    def goal(self) -> float:
        """The speedup at every batch size that ends the search. A form within noise of float at some
        batch size is no win there (digits MLP static per-channel: 0.98x at batch 1, per-tensor 0.87x),
        so the search looks further until each batch gains more than NOISE, or the budget runs out."""
        return max(1.0 / (1.0 - NOISE), self.gate.min_speedup or 1.0)

    def moves(self, cfg: QuantConfig) -> list[QuantConfig]:
        """What can win when INT8 is slower, in the order worth trying.

        Order and omissions from ``tools/bench_quant.py --forms`` (AMD EPYC, AVX2, no VNNI; ratios INT8/float
        at batch 1/64): per-tensor weights win on small Gemms (digits MLP static 1.03x/0.68x -> 0.87x/0.64x);
        float depthwise convs next; int8 activations ran 1.5-4.6x slower than float on every model there,
        so without VNNI x86 never tries them; quantizing only the compute ops leaves Q/DQ pairs between them
        (MobileNet-like 0.86x/0.71x -> 1.31x/1.20x), so it comes last."""
        out = []
        ops = {n.op_type for n in self.float_model.graph.node}
        if cfg.kind == "dynamic" and "Conv" in ops and "Conv" not in cfg.float_ops and "op_types" not in self.fixed:
            out.append(replace(cfg, float_ops=cfg.float_ops + ("Conv",)))
        if "per_channel" not in self.fixed:
            out.append(replace(cfg, per_channel=not cfg.per_channel))
        if depthwise_convs(self.float_model) and "DepthwiseConv" not in cfg.float_ops:
            out.append(replace(cfg, float_ops=cfg.float_ops + ("DepthwiseConv",)))
        if cfg.kind == "static" and "activation" not in self.fixed:
            other = "int8" if cfg.activation == "uint8" else "uint8"
            if not (other == "int8" and _is_x86() and not has_vnni()):
                out.append(replace(cfg, activation=other, symmetric=other == "int8" or cfg.symmetric))
        if cfg.kind == "static" and "op_types" not in self.fixed and cfg.op_types is None:
            out.append(replace(cfg, op_types=tuple(o for o in COMPUTE_OPS if o in ops)))
        heavy = [o for o in ("Conv", "MatMul", "Gemm") if o in ops]
        if len(heavy) > 1 and "op_types" not in self.fixed:
            out += [replace(cfg, float_ops=cfg.float_ops + (o,)) for o in heavy if o not in cfg.float_ops]
        return out

    def latency_search(self, first: Candidate) -> Candidate:
        """Greedy: from the best so far, try each move; keep the best; stop when fast enough or out of budget."""
        best = first if first.quality.passed else None
        current = first
        seen = {first.cfg.label()}
        while len(self.tried) < SEARCH_BUDGET:
            if best is not None and best.worst_speedup >= self.goal():
                break
            improved = False
            for cfg in self.moves(current.cfg):
                if best is not None and best.worst_speedup >= self.goal():
                    break  # fast enough at every batch size: the search is bounded, not exhaustive
                if cfg.label() in seen or len(self.tried) >= SEARCH_BUDGET:
                    continue
                seen.add(cfg.label())
                try:
                    c = self.evaluate(cfg, timed=False)
                except Exception as e:  # noqa: BLE001 - one failing configuration must not end the search
                    self.failed.append(f"{cfg.label()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                if not quant_op_counts(c.model) or not c.quality.passed:
                    continue  # all float (that is the float model), or not accurate enough: not worth timing
                self.time(c, early_stop=True)
                if c.stopped_early:
                    continue
                if c.quality.passed and (best is None or c.score() > best.score() * (1 + NOISE / 2)):
                    best, improved = c, True
            if not improved or best is None:
                break
            current = best
        return best if best is not None else first

    def _try_form(self, form: QuantConfig, change: str) -> Candidate | None:
        """One untimed fallback candidate, recorded as a step; None (and noted) when onnxruntime fails on it:
        one failing form must not end the fallback."""
        try:
            alt = self.evaluate(form, timed=False)
        except Exception as e:  # noqa: BLE001
            self.failed.append(f"{form.label()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        self.fallback_steps.append({"step": 0, "change": change, "form": form.label(), "moved_to_float": [],
                                    "ranking": [], "quality": alt.quality.to_dict(), "metric": alt.quality.summary()})
        return alt

    def fallback(self, cand: Candidate, data: CalibrationData) -> Candidate:
        """Move the nodes that lose the most signal back to float, a few at a time, until the gate passes."""
        self.before_fallback = cand
        for form in self.accuracy_forms:
            self.progress(f"accuracy fallback: {form.label()}")
            alt = self._try_form(form, "another INT8 form")
            if alt is None:
                continue
            if alt.quality.score() > cand.quality.score():
                cand = alt
            if cand.quality.passed:
                break
        if not cand.cfg.per_channel and "per_channel" not in self.fixed:
            # Per-channel weights first: everything stays INT8 (dynamic MiniLM: cosine 0.962 -> 0.993).
            best_pc = None
            for form in per_channel_forms(cand.cfg, self.fixed):
                self.progress(f"accuracy fallback: per-channel weights ({form.label()})")
                pc = self._try_form(form, "per-channel weights")
                if pc is None:
                    continue
                if best_pc is None or pc.quality.score() > best_pc.quality.score():
                    best_pc = pc
                if pc.quality.passed:
                    break
            if best_pc is not None and best_pc.quality.score() > cand.quality.score():
                cand = best_pc
        steps = 0
        best_score, stale = cand.quality.score(), 0
        n_quant = sum(1 for n in self.float_model.graph.node if n.op_type in (cand.cfg.op_types or COMPUTE_OPS))
        while not cand.quality.passed and steps < FALLBACK_STEPS:
            steps += 1
            self.progress(f"accuracy fallback step {steps}")
            float_now = set(cand.cfg.exclude) | set(self.q._nodes_for(cand.cfg))
            quantizable = _quantizable_nodes(self.float_model, cand.cfg)
            candidates = quantizable - float_now
            if not candidates:
                break
            ranked = (self.ranker(candidates, cand.model, data) if self.ranker is not None
                      else rank_nodes(self.float_model, cand.model, data, candidates))
            if not ranked:
                break
            k = max(1, min(len(ranked), (2 ** ((steps - 1) // 2)) * max(1, n_quant // 32)))
            moved = list(dict.fromkeys(x for r in ranked[:k] for x in r["nodes"]))
            cfg = replace(cand.cfg, exclude=tuple(cand.cfg.exclude) + tuple(moved))
            try:
                nxt = self.evaluate(cfg, timed=False)
            except Exception as e:  # noqa: BLE001
                self.failed.append(f"{cfg.label()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                break
            self.fallback_steps.append({"step": steps, "moved_to_float": moved,
                                        "ranking": ranked[:max(5, k)], "quality": nxt.quality.to_dict(),
                                        "metric": nxt.quality.summary()})
            cand = nxt
            if nxt.quality.score() > best_score + 1e-9:
                best_score, stale = nxt.quality.score(), 0
            else:
                stale += 1
                if stale >= FALLBACK_PATIENCE:
                    break  # moving more nodes to float does not help: the gate is out of reach
        if self.fallback_steps and cand.quality.passed:  # a refused result needs no timing
            self.progress("timing the fallback result")
            self.time(cand)
        return cand

    def run(self, start: QuantConfig, data: CalibrationData | None, timed: bool = True) -> Candidate:
        first = self.evaluate(start, timed=timed)
        best = first
        if timed and self.search_enabled and first.worst_speedup < self.goal():
            best = self.latency_search(first)
        if not best.quality.passed and data is not None:
            best = self.fallback(best, data)
        return best


def per_channel_forms(cfg: QuantConfig, fixed: set[str]) -> list[QuantConfig]:
    """The per-channel variants of ``cfg`` worth trying for accuracy on this CPU, best first.

    Without VNNI, x86 INT8 kernels multiply u8 x s8 pairs into saturating 16-bit sums (AVX2 vpmaddubsw);
    per-channel scales fill the 8-bit range in every column and saturate more often than per-tensor ones:
    measured on the 2-layer transformer (dynamic, AVX2): cosine per-tensor 0.99991, per-channel s8 0.99946,
    per-channel s8 7-bit 0.99988, per-channel u8 0.99994 (u8 x u8 kernels do not saturate). So there, the
    7-bit form is tried first, then (dynamic, weight type not fixed) uint8 weights."""
    base = replace(cfg, per_channel=True)
    if has_vnni() or not _is_x86():
        return [base]
    forms = [replace(base, reduce_range=True)]
    if cfg.kind == "dynamic" and "weight" not in fixed and cfg.weight == "int8":
        forms.append(replace(base, weight="uint8", reduce_range=False))
    return forms


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _quantizable_nodes(model: ModelProto, cfg: QuantConfig) -> set[str]:
    """Nodes the config would quantize: its op types, or (default) onnxruntime's registry for the mode."""
    if cfg.op_types:
        types = set(cfg.op_types)
    else:
        from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

        # onnxruntime's defaults: quantize_dynamic takes IntegerOps; quantize_static the union of both registries.
        types = (set(IntegerOpsRegistry) | {"Gemm"} if cfg.kind == "dynamic"
                 else set(QDQRegistry) | set(QLinearOpsRegistry))
    return {n.name for n in model.graph.node if n.op_type in types}


# ------------------------------------------------------------------------------------------- helpers

def size_ratio(before: ModelProto, after: ModelProto) -> float:
    b = before.ByteSize()
    return after.ByteSize() / b if b else 1.0


def quant_op_counts(model: ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                         "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ------------------------------------------------------------------------------------ pass driver

def gate_from_options(run: Any) -> Gate:
    """The gate from the run-level options (``onnxslim.options.RunOptions``; defaults live there)."""
    return Gate(min_cosine=run.min_cosine, max_acc_drop=run.max_acc_drop, min_top1=run.min_top1,
                min_speedup=None if run.objective == "size" else run.min_speedup, objective=run.objective,
                min_centred_cosine=run.min_centred_cosine)


def _prepare(model: ModelProto, cfg: QuantConfig, kind: str, notes: list[str]) -> tuple[ModelProto, QuantConfig]:
    """Copy, name nodes, upgrade the opset where quantization needs it, run ORT pre-processing."""
    prep = copy.deepcopy(model)
    named = name_nodes(prep)
    if named:
        notes.append(f"named {named} unnamed node(s) so they can be excluded and reported")
    opset = opset_of(prep)
    want = 11 if opset < 10 else opset
    if kind == "static" and cfg.fmt == "qdq" and cfg.per_channel and opset < PER_CHANNEL_MIN_OPSET:
        want = PER_CHANNEL_MIN_OPSET  # per-channel DequantizeLinear(axis=...) is invalid below 13
    if want != opset:
        try:
            prep = upgrade_opset(prep, want)
            notes.append(f"opset {opset} -> {want} (onnx.version_converter) so that "
                         + ("per-channel QDQ is valid" if want == PER_CHANNEL_MIN_OPSET else "it can be quantized"))
        except ValueError as e:
            if want == PER_CHANNEL_MIN_OPSET and opset >= 10:
                cfg = replace(cfg, per_channel=False)
                notes.append(f"opset {opset} could not be converted to {want} ({e}): per-tensor weights instead")
            else:
                raise InputError(f"opset {opset} model cannot be converted to opset {want} for quantization: {e}") from None
    if kind == "dynamic" and cfg.op_types and "Gemm" in cfg.op_types and "MatMul" not in cfg.op_types:
        # onnxruntime's dynamic quantizer rewrites Gemm as MatMul(+Add) and then quantizes MatMul.
        cfg = replace(cfg, op_types=tuple(cfg.op_types) + ("MatMul",))
    prep, note = preprocess(prep)
    notes.append(note)
    missing = [n for n in cfg.exclude if n not in {x.name for x in prep.graph.node}]
    if missing:
        notes.append(f"--quant-exclude: {', '.join(missing)} no longer exist after pre-processing (fused)")
    return prep, cfg


# ------------------------------------------------------------------------ transformer encoders (static)

SMOOTH_ALPHA = 0.5  # SmoothQuant migration strength (Xiao et al.: 0.5 for BERT-sized models)
SMOOTH_LOSSLESS_RTOL = 1e-3  # the smoothed float model must match the unsmoothed one this closely
# A MatMul input whose uint8 rounding alone leaves less than this SQNR is quantized dynamically. MiniLM:
# the GELU outputs of layers 0-3 (19.6-25.4 dB); layers 4-5 (30.2, 32.4) and every other site (>= 30.8 dB after
# SmoothQuant) stay static. All six GELU outputs dynamic measured alike (min cosine 0.990, same latency).
DYNAMIC_SITE_SQNR = 28.0


def is_encoder(model: ModelProto) -> bool:
    """A transformer: attention (Softmax), normalization, and at least 4 MatMuls with constant weights."""
    from onnxslim import smoothquant as sq

    ops = {n.op_type for n in model.graph.node}
    norm = bool(ops & {"LayerNormalization", "ReduceMean", "SkipLayerNormalization"})
    return "Softmax" in ops and norm and sum(len(s.matmuls) for s in sq.sites(model)) >= 4


def activation_matmuls(model: ModelProto) -> list[str]:
    """MatMuls of two activations (attention scores Q.K^T and probabilities x V): no weight to quantize."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & inits]


def _residual_tensors(model: ModelProto) -> list[str]:
    """Inputs of the normalizations (the residual stream): where encoders carry their outlier channels."""
    subs = {t for n in model.graph.node if n.op_type == "Sub" for t in n.input}
    out = []
    for n in model.graph.node:
        # decomposed LayerNorm: x - ReduceMean(x) (the variance's ReduceMean reads Pow, not a Sub input)
        if n.input and n.input[0] and (n.op_type == "LayerNormalization"
                                       or (n.op_type == "ReduceMean" and n.input[0] in subs)):
            out.append(n.input[0])
    return list(dict.fromkeys(out))


def _float_outputs(model: ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnxslim.runtime import make_session

    sess = make_session(model)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def encoder_static_prepare(model: ModelProto, cfg: QuantConfig, fixed: set[str], data: CalibrationData,
                           notes: list[str], alpha: float = SMOOTH_ALPHA,
                           allow_mul: bool = True) -> tuple[ModelProto, QuantConfig, dict | None]:
    """Static INT8 of a transformer encoder: outlier report from calibration statistics, SmoothQuant on
    the MatMul inputs where it raises their INT8 SQNR, the residual stream and attention-score MatMuls in
    float, the MatMul inputs whose static INT8 SQNR stays below DYNAMIC_SITE_SQNR quantized at run time.

    All-MiniLM-L6-v2 (onnxruntime static QDQ, u8 activations, s8 per-channel weights; min cosine of sentence
    embeddings): every op type quantized 0.15 (the residual Adds carry |x| 223 where p99.9 is 8.4);
    MatMul only 0.894; + SmoothQuant everywhere 0.901; the six FFN down projections in float 0.996 but at
    0.76x/0.79x latency (batch 1/16, AVX2 no VNNI). Their inputs (GELU outputs) are the worst sites by INT8
    SQNR (19.6-32 dB) and SmoothQuant lowers it there, so it is applied per site where it helps. What the
    latency went to (tools/bench_encoder_static_forms.py, interleaved in one process, load 12-17):
    the FFN down projections in float (dynamic instead: 0.60x/0.66x), the re-quantized MatMul outputs
    (QLinearMatMul + DequantizeLinear; ``encoder_form`` keeps them float, MatMulIntegerToFloat: -0.02x),
    and, where no SmoothQuant Mul sits between, the residual Adds reading the LayerNorm outputs' Q/DQ copy
    (min cosine 0.974 -> 0.985 when they read the float tensor). The inserted SmoothQuant Muls cost ~0.01x (12 of them, 0.563x vs 0.557x at batch 1);
    the five attention contexts fold into the value projections instead (``smoothquant._fold_into_value``).
    Static FFN-down inputs clipped at their p99.99 instead of dynamic: 0.988 / 99.5%, same speed; at p99.9
    0.973. Result: see the README table (tools/bench_encoder.py)."""
    from onnxslim import smoothquant as sq

    if not is_encoder(model):
        return model, cfg, None
    site_list = sq.sites(model)
    tensors = list(dict.fromkeys([s.tensor for s in site_list] + _residual_tensors(model)))
    stats = sq.collect_stats(model, data.batches(), tensors)
    found = sq.outliers(stats)
    info: dict[str, Any] = {"outlier_ratio": sq.OUTLIER_RATIO, "tensors_measured": len(stats),
                            "outliers": [s.to_dict() for s in found], "smoothing": [], "alpha": alpha}
    if found:
        worst = ", ".join(f"{s.name} (max {s.max_abs:.3g} vs p99.9 {s.p999:.3g}, channels "
                          f"{s.outlier_channels()[:4]} up to {s.spread:.0f}x the median channel)" for s in found[:3])
        notes.append(f"outliers: {len(found)} of {len(stats)} tensors have max/p99.9 > {sq.OUTLIER_RATIO:g} or a "
                     f"channel > {sq.CHANNEL_FACTOR:g}x the median channel on the calibration data; worst {worst}")
    else:
        notes.append(f"outliers: none of {len(stats)} tensors has max/p99.9 > {sq.OUTLIER_RATIO:g} or a channel "
                     f"> {sq.CHANNEL_FACTOR:g}x the median channel")
    site_stats = {s.tensor: stats[s.tensor] for s in site_list if s.tensor in stats}
    # SmoothQuant helps where the outliers are in the activation (LayerNorm outputs) and hurts where the
    # weight rows vary more (MiniLM's FFN down projections: GELU output SQNR 18.7 -> 16.2 dB), so each
    # site keeps it only where the measured INT8 SQNR of the MatMul input improves.
    trial, trial_records = sq.smooth(model, site_stats, alpha, allow_mul=allow_mul)
    after = sq.collect_stats(trial, data.batches(), [r["input"] for r in trial_records])
    sqnr = {t: st.sqnr_u8 for t, st in site_stats.items()}
    chosen = set()
    for r in trial_records:
        a = after.get(r["input"])
        if a is not None and a.sqnr_u8 > sqnr[r["tensor"]] + 0.5:
            chosen.add(r["tensor"])
            r["sqnr_u8_db"] = (round(sqnr[r["tensor"]], 2), round(a.sqnr_u8, 2))
            sqnr[r["tensor"]] = a.sqnr_u8
    smoothed, records = sq.smooth(model, site_stats, alpha, only=chosen, allow_mul=allow_mul)
    by_tensor = {r["tensor"]: r for r in trial_records}
    for r in records:
        r["sqnr_u8_db"] = by_tensor[r["tensor"]].get("sqnr_u8_db")
    feeds = next(data.batches())
    ref, got = _float_outputs(model, feeds), _float_outputs(smoothed, feeds)
    err = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) for a, b in zip(ref, got))
    info["smoothing_float_error"] = err
    if err > SMOOTH_LOSSLESS_RTOL:
        notes.append(f"SmoothQuant not applied: the smoothed float model differs by {err:.2g} (relative)")
        sqnr = {t: st.sqnr_u8 for t, st in site_stats.items()}
    else:
        info["smoothing"] = records
        folded = sum(1 for r in records if r["applied"].startswith("folded"))
        notes.append(f"SmoothQuant (alpha {alpha:g}): {len(records)} of {len(site_stats)} MatMul input(s) smoothed "
                     f"where it raised their INT8 SQNR ({folded} folded into the producer, {len(records) - folded} "
                     f"by a Mul); float outputs unchanged within {err:.1g}")
        model = smoothed
    matmuls = {s.tensor: s.matmuls for s in site_list}
    info["sites"] = [{"tensor": t, "matmuls": matmuls[t], "sqnr_u8_db": round(v, 2)}
                     for t, v in sorted(sqnr.items(), key=lambda kv: kv[1])]
    # A static range over all calibration data is the wrong tool where the activation's range changes from
    # input to input (GELU outputs: rare large values): those MatMuls take their range at run time instead.
    weak = [t for t, v in sqnr.items() if v < DYNAMIC_SITE_SQNR]
    if weak and "op_types" not in fixed:
        names = [x for t in weak for x in matmuls[t] if x not in cfg.exclude]
        cfg = replace(cfg, dynamic_nodes=tuple(dict.fromkeys(tuple(cfg.dynamic_nodes) + tuple(names))))
        info["dynamic_by_sensitivity"] = [{"tensor": t, "sqnr_u8_db": round(sqnr[t], 2), "matmuls": matmuls[t]}
                                          for t in weak]
        notes.append("quantized at run time (dynamic) by measured sensitivity (static INT8 SQNR of the MatMul input "
                     f"< {DYNAMIC_SITE_SQNR:g} dB): " + ", ".join(f"{t} ({sqnr[t]:.1f} dB) -> {', '.join(matmuls[t])}"
                                                                for t in weak))
    dynamic = set(cfg.dynamic_nodes)

    def ranker(candidates: set[str], *_: Any) -> list[dict[str, Any]]:
        """MatMul inputs by INT8 SQNR, worst first: local, so one noisy layer does not hide behind softmax."""
        out = []
        # static sites worst first; the dynamic ones (their static SQNR does not apply) after them
        for t, v in sorted(sqnr.items(), key=lambda kv: (bool(set(matmuls[kv[0]]) & dynamic), kv[1])):
            nodes = [x for x in matmuls[t] if x in candidates]
            if nodes:
                out.append({"node": nodes[0], "op": "MatMul", "tensor": t, "nodes": nodes, "sqnr_out": round(v, 2),
                            "sqnr_in": None, "sqnr_before_qdq": None, "loss_db": None})
        covered = {x for r in out for x in r["nodes"]}
        for n in model.graph.node:  # not measured (e.g. the pooler's Gemm): last, one at a time
            if n.name in candidates and n.name not in covered and n.input:
                out.append({"node": n.name, "op": n.op_type, "tensor": n.input[0], "nodes": [n.name], "sqnr_out": None,
                            "sqnr_in": None, "sqnr_before_qdq": None, "loss_db": None})
        return out

    info["ranker"] = ranker
    if "op_types" not in fixed:
        # Residual Adds, LayerNorm, Softmax and GELU stay float: their outliers are what collapses QDQ.
        cfg = replace(cfg, op_types=tuple(o for o in ("MatMul", "Gemm") if o in {n.op_type for n in model.graph.node}),
                      encoder_form=True)
        scores = [x for x in activation_matmuls(model) if x not in cfg.exclude]
        cfg = replace(cfg, exclude=tuple(cfg.exclude) + tuple(scores))
        notes.append(f"encoder: INT8 for the MatMul/Gemm weights only; residual stream, LayerNorm, Softmax, GELU "
                     f"and {len(scores)} attention MatMul(s) of two activations stay float")
        info["activation_matmuls_float"] = scores
    return model, cfg, info


def embedding_tables(model: ModelProto) -> list[str]:
    """Gather nodes that look rows up in a float 2-D initializer with token ids (BERT-family embeddings)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits
            and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT]


def embeddings_first_ranker(model: ModelProto) -> Callable[[set[str], ModelProto, CalibrationData], list[dict]]:
    """Fallback order of dynamic INT8 on encoders: the embedding tables go back to float first (they cost
    no speed, only file size: MiniLM cosine on real tokens 0.9896 with them in INT8, 0.9906 without),
    then rank_nodes' order."""
    tables = embedding_tables(model)

    def rank(candidates: set[str], quant: ModelProto, data: CalibrationData) -> list[dict[str, Any]]:
        gathers = [g for g in tables if g in candidates]
        if gathers:
            return [{"node": gathers[0], "op": "Gather", "nodes": gathers, "sqnr_out": None, "sqnr_in": None,
                     "sqnr_before_qdq": None, "loss_db": None, "tensor": "embedding tables"}]
        return rank_nodes(model, quant, data, candidates)

    return rank


def encoder_dynamic_defaults(model: ModelProto, cfg: QuantConfig, fixed: set[str],
                             notes: list[str]) -> QuantConfig:
    """Dynamic INT8 of a transformer encoder starts from the form measured fastest at unchanged accuracy.

    All-MiniLM-L6-v2, AMD EPYC AVX2 without VNNI, latency INT8/float at batch 1/16 (min cosine of sentence
    embeddings, NN agreement): s8 per-channel 0.56x/0.63x (0.986, 98.5%); s8 per-channel 7-bit 0.56x/0.62x
    (0.987, 99.5%); s8 per-tensor 0.53x/0.63x but 0.915; u8 per-channel weights (U8U8 kernels) 0.61x/0.76x
    (0.989, 100%) -- the form the per-tensor fallback used to end on, hence 0.80x at batch 16. The embedding
    tables (Gather) quantized as onnxruntime's defaults do: same speed, file 0.25x instead of 0.65x, cosine
    0.985; at the default gate (0.99 on real tokens: 0.9897 with them, 0.9902 without) the fallback moves
    them to float first (``embeddings_first_ranker``). Result: 0.58x/0.58x at batch 1/16, min cosine 0.986,
    NN 98%. Attention-score MatMuls (two activations) stay float, as quantize_dynamic leaves them."""
    if not (is_encoder(model) and embedding_tables(model)):
        return cfg  # a transformer block on float inputs keeps the generic search (per-tensor first)
    changed = []
    if "per_channel" not in fixed and not cfg.per_channel:
        cfg = replace(cfg, per_channel=True)
        changed.append("int8 per-channel weights")
    if "op_types" not in fixed and cfg.op_types is None:
        ops = {n.op_type for n in model.graph.node}
        cfg = replace(cfg, op_types=tuple(o for o in ("MatMul", "Gemm", "Gather") if o in ops))
        changed.append("MatMul/Gemm weights and embedding tables (Gather)")
    if changed:
        notes.append(f"encoder: dynamic INT8 starts from {', '.join(changed)} (the form measured fastest on "
                     "encoders at unchanged accuracy)")
    return cfg


def breaking_tensors(search: "QuantSearch", k: int = 4) -> list[str]:
    """The tensors that lost the most signal in the first fallback ranking, i.e. in the INT8 model before
    anything went back to float (what broke the gate)."""
    for st in search.fallback_steps:
        if st.get("ranking"):
            return [f"{r['tensor']} -> {', '.join(r['nodes'])} (INT8 SQNR "
                    f"{'not measured' if r['sqnr_out'] is None else format(r['sqnr_out'], '.1f') + ' dB'})"
                    if r.get("tensor")
                    else f"{r['node']} ({r['loss_db']:.1f} dB lost, output SQNR {r['sqnr_out']:.1f} dB)"
                    for r in st["ranking"][:k]]
    return []


@dataclass
class QuantOutcome:
    """What a quantize pass did; passes/quantize.py turns it into a PassResult."""

    changed: bool
    model: ModelProto | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def private_workdir(prefix: str = "onnxslim-quant-") -> Iterator[Path]:
    """A private temporary folder that is also the working directory and ``tempfile``'s folder meanwhile.

    onnxruntime's helpers write next to the process: symbolic shape inference saves
    ``sym_shape_infer_temp.onnx`` + a ``<uuid>`` external-data file into the cwd when it gives up. Inside
    this context they land here, and the folder goes on every exit path (success, refusal, error, Ctrl-C)."""
    old_cwd, old_tmp = os.getcwd(), tempfile.tempdir
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        os.chdir(folder)
        tempfile.tempdir = str(folder)
        yield folder
    finally:
        os.chdir(old_cwd)
        tempfile.tempdir = old_tmp
        shutil.rmtree(folder, ignore_errors=True)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def cpu_description() -> str:
    """e.g. 'AMD EPYC (x86_64, AVX2, no AVX-512, no VNNI)': named in 'INT8 is not faster here' messages."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.processor() or "CPU")
    flags = cpu_flags()
    if not flags:
        return f"{name} ({platform.machine()})"
    isa = ["AVX2" if "avx2" in flags else "no AVX2", "AVX-512" if "avx512f" in flags else "no AVX-512",
           "VNNI" if has_vnni() else "no VNNI"]
    return f"{name} ({platform.machine()}, {', '.join(isa)})"


def _fmt_ratios(table: dict[str, dict[str, Any]]) -> str:
    got = {k.removeprefix("batch"): v["ratio"] for k, v in table.items() if "ratio" in v}
    if not got:
        return "not timed"
    return f"{'/'.join(f'{r:.2f}x' for r in got.values())} the float latency at batch {'/'.join(got)}"


def quantize_pass(model: ModelProto, ctx: Any, kind: str, options: Any) -> QuantOutcome:
    """The body of the quantize-static / quantize-dynamic passes. ``ctx`` is the run's Context (read, and
    warnings / gate failures appended); every temporary file lives in a private folder (``private_workdir``)."""
    from onnxslim.model import PROTO_LIMIT
    from onnxslim.runtime import speed_gate

    if not {n.op_type for n in model.graph.node} & set(COMPUTE_OPS + ("Gather", "EmbedLayerNormalization")):
        ctx.warn(f"quantize-{kind}: nothing to quantize (no {'/'.join(COMPUTE_OPS)} node); the model is left in float")
        return QuantOutcome(changed=False, notes=[f"nothing to quantize: no {'/'.join(COMPUTE_OPS)} node"])
    data = ctx.calibration(model, required=kind == "static")
    holdout = ctx.holdout(model) if hasattr(ctx, "holdout") else None
    cfg, fixed, why = config_from_options(options, kind, model)
    gate = gate_from_options(ctx.run)
    notes: list[str] = []
    reference = ctx.original.proto if ctx.original is not None and ctx.original.proto.ByteSize() < PROTO_LIMIT else model
    # The gate judges on data the calibration did not see: --inputs, else the held-out part of --calib.
    feeds, labels = ctx.inputs, getattr(ctx, "labels", None)
    if feeds is None and holdout is not None:
        feeds, labels = holdout.inputs, holdout.labels
    if feeds is None:
        if data is not None and data.measured:
            feeds, labels = data.inputs, data.labels
        else:
            feeds = make_inputs(reference, ctx.input_shapes)
    # Timing runs on the user's data where there is some (valid ids, real sequence lengths).
    latency_data = ctx.inputs if ctx.inputs is not None else (data.inputs if data is not None else None)
    custom = os.path.abspath(ctx.custom_op_library) if ctx.custom_op_library else None  # the cwd changes below
    with private_workdir() as tmp:
        prep, cfg = _prepare(model, cfg, kind, notes)
        encoder = None
        if kind == "static" and data is not None:
            prep, cfg, encoder = encoder_static_prepare(prep, cfg, fixed, data, notes)
        if kind == "dynamic":
            cfg = encoder_dynamic_defaults(prep, cfg, fixed, notes)
        search = QuantSearch(prep, Quantizer(prep, data, tmp), reference, feeds, labels, gate, fixed,
                             ctx.input_shapes, ctx.progress, custom, search=gate.min_speedup is not None,
                             latency_data=latency_data)
        if encoder is not None:
            search.ranker = encoder.pop("ranker")
        elif kind == "dynamic" and "Gather" in (cfg.op_types or ()) and embedding_tables(prep):
            search.ranker = embeddings_first_ranker(prep)
            if gate.objective == "size" and "weight" not in fixed and cfg.weight == "int8" and _is_x86() and not has_vnni():
                # --objective size: keep the tables in INT8 (file 0.25x) with the more accurate u8 weights,
                # 0.61x/0.76x; for speed the tables go to float first (s8 stays, 0.56x/0.63x, file 0.65x).
                # MiniLM at the default gate: s8 per-channel 0.9889 on real tokens, u8 0.9919; moving MatMuls
                # to float instead needed 43 of them (0.94x) -- the other weight type comes first.
                search.accuracy_forms = [replace(cfg, weight="uint8")]
        # The fallback ranks nodes on calibration data, else (dynamic without --calib) on the validation inputs.
        best = search.run(cfg, data if data is not None else CalibrationData(feeds, None, "validation inputs"))

    first = search.tried[0]
    float_nodes = sorted(set(best.cfg.exclude) | set(search.q._nodes_for(best.cfg)) - set(cfg.exclude))
    size_x = size_ratio(model, best.model)
    speed_txt = _fmt_ratios(best.speed) if best.speed else "not timed (it misses the accuracy gate)"
    notes.insert(0, f"{kind} quantization: {best.cfg.label()} (defaults for this machine: {why})")

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:6]) + (f" and {len(xs) - 6} more" if len(xs) > 6 else "")

    if search.fallback_steps:
        pre = search.before_fallback.quality
        notes.append(f"before the fallback: {pre.summary()} ({pre.reason})")
    for st in search.fallback_steps:
        what = st.get("change") or f"{names(st['moved_to_float'])} -> float"
        notes.append(f"fallback step {st['step']}: {what}; {st['metric']}")
    if float_nodes:
        notes.append(f"kept in float: {names(float_nodes)}")
    for f in search.failed:
        notes.append(f"skipped (onnxruntime failed): {f}")
    early = sum(1 for c in search.tried if c.stopped_early)
    if early:
        notes.append(f"{early} configuration(s) stopped after batch {next(iter(search.latency_feeds))}: "
                     f"more than {CLEARLY_SLOWER:.2f}x the best one's latency there")
    notes.append(f"result: file {size_x:.2f}x, {speed_txt}; {best.quality.summary()}")
    if kind == "dynamic" and "Conv" in {n.op_type for n in prep.graph.node} and first.speed:
        slow = 1 / first.worst_speedup if first.worst_speedup else float("inf")
        if slow > 1:
            ctx.warn(f"quantize-{kind}: dynamic INT8 Conv (ConvInteger) ran up to {slow:.1f}x slower than float; " + ("Conv kept in float. " if "Conv" in best.cfg.float_ops else "")
                     + "For Conv-heavy models use --passes quantize-static (calibrated QDQ)")
    timed = [c for c in search.tried if c.speed and not c.stopped_early]
    if best.speed and best.ratio is not None and best.ratio > 1.0 - NOISE / 2:
        fastest = min(timed, key=lambda c: c.ratio or float("inf"), default=best)
        ctx.warn(f"quantize-{kind}: INT8 is NOT FASTER than float on this CPU ({cpu_description()}): "
                 f"{speed_txt} ({best.cfg.label()}); fastest of {len(search.tried)} configuration(s) tried: "
                 f"{_fmt_ratios(fastest.speed)}")
    if size_x >= 1.0:
        why_big = (f"{len(float_nodes)} node(s) are kept in float" if float_nodes
                   else "the model is too small for the quantization parameters to pay off")
        ctx.warn(f"quantize-{kind}: the INT8 file is not smaller ({size_x:.2f}x): {why_big}")
    left = _quantizable_nodes(prep, best.cfg) - set(best.cfg.exclude) - set(search.q._nodes_for(best.cfg))
    if best.quality.passed and search.fallback_steps and not left:
        pre = search.before_fallback.quality if search.before_fallback is not None else first.quality
        broke = breaking_tensors(search)
        ctx.gate_failures.append(f"quantize-{kind}: the accuracy gate is met only with every quantizable node in float "
                                 f"(INT8: {pre.summary()})" + (f"; worst quantized: {'; '.join(broke)}" if broke else ""))
    if not best.quality.passed:  # first: the one line the user sees names it
        broke = breaking_tensors(search)
        ctx.gate_failures.append(f"quantize-{kind}: {best.quality.reason} with {len(float_nodes)} node(s) in float"
                                 + (f"; worst quantized: {'; '.join(broke)}" if broke else ""))
    if gate.min_speedup is not None and best.speed:
        failure = speed_gate(f"quantize-{kind}", best.speed, gate.min_speedup)
        if failure:
            ctx.gate_failures.append(f"{failure} ({len(search.tried)} configuration(s) tried on {cpu_description()}; "
                                     "--objective size keeps it for its size)")
    if gate.objective == "size" and size_x >= 1.0:
        ctx.gate_failures.append(f"quantize-{kind}: --objective size but the file is {size_x:.2f}x the float file")

    details = {
        "kind": kind, "config": best.cfg.label(), "machine_defaults": why, "cpu": cpu_description(),
        "settings": {"format": best.cfg.fmt, "method": best.cfg.method, "activation_type": best.cfg.activation,
                     "weight_type": best.cfg.weight, "per_channel": best.cfg.per_channel,
                     "symmetric": best.cfg.symmetric, "reduce_range": best.cfg.reduce_range,
                     "op_types": list(best.cfg.op_types or []), "float_op_types": list(best.cfg.float_ops)},
        "notes": notes, "size_ratio": round(size_x, 4), "quality": best.quality.to_dict(),
        "latency": best.speed,
        "candidates": [c.row() for c in search.tried],
        "fallback": search.fallback_steps, "nodes_in_float": float_nodes, "failed_configurations": search.failed,
        "quant_ops": quant_op_counts(best.model), "encoder": encoder,
        "calibration": None if data is None else {"source": data.source, "samples": data.size,
                                                  "batch": data.batch_size, "measured": data.measured},
    }
    stats = {"size_ratio": round(size_x, 4), "candidates": len(search.tried), "nodes_in_float": len(float_nodes)}
    for k, v in best.speed.items():
        if "ratio" in v:
            stats[f"latency_ratio_{k.replace('batch', 'b')}"] = v["ratio"]
    return QuantOutcome(changed=True, model=best.model, stats=stats, notes=notes, details=details)
