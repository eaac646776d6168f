"""Python API; the CLI is a thin layer over these functions.

    model, report = onnxslim.optimize("in.onnx", "out.onnx", passes="lossless")
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import ModelProto

from onnxslim.errors import GateError, InputError, PassError
from onnxslim.manager import PRESETS, Context, PassManager, load_passes, parse_pipeline, resolve_options
from onnxslim import weights
from onnxslim.model import (PROTO_LIMIT, Model, StagedModel, check_model, check_output_path, load_model,
                            session_source, stage_model)
from onnxslim.report import Report, model_summary
from onnxslim.options import DEFAULT_MAX_ACC_DROP, DEFAULT_MIN_CENTRED_COSINE, DEFAULT_MIN_COSINE
from onnxslim.runtime import latency_table
from onnxslim.validate import (DEFAULT_ATOL, DEFAULT_RTOL, NotValidatable, ReferenceOutputs, ValidationResult,
                               compare_models,
                               describe_feeds, latency_feeds, load_inputs, make_inputs, score_outputs,
                               static_batch)


def checked_custom_op_library(path: str | os.PathLike | None) -> str | None:
    """The user's --custom-op-library as an absolute path to a library that loads, or one-line InputError.

    This is the only library onnxslim loads besides onnxruntime-extensions' own. The path is made
    absolute because the loader searches system folders for a bare name (``foo.so`` would not mean
    ``./foo.so``); a library that does not load is an error, not a reason to skip validation.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--custom-op-library '{path}': no such file")
    resolved = str(p.resolve())
    import onnxruntime as ort

    try:
        ort.SessionOptions().register_custom_ops_library(resolved)
    except Exception as e:  # noqa: BLE001
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InputError(f"--custom-op-library '{path}' does not load: {msg[-200:]}") from None
    return resolved


@functools.lru_cache(maxsize=1)
def _return_freed_memory() -> None:
    """Make freed large blocks go back to the OS (glibc only; elsewhere nothing to do).

    glibc raises its mmap threshold after each large free (up to 32 MB), so weights of the first
    validation session stay in the heap and still count while the second session loads: peak
    memory grows by a whole model. A fixed threshold keeps large blocks mmapped, returned on free.
    """
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 4 << 20)
    except Exception:  # noqa: BLE001 - not glibc
        pass


def _validation_data(m: Model, ctx: Context, inputs: str | os.PathLike | dict | None, lossy: bool,
                     val_shapes: dict[str, list[int]] | None = None, val_samples: int | None = None,
                     val_seed: int = 0, val_range: tuple[float, float] | None = None
                     ) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None, str]:
    """Inputs for the final comparison: the user's, else held-out calibration data for lossy runs, else
    generated (valid) inputs: ``val_samples`` of them at ``val_shapes`` (data only: the model is not changed)."""
    if isinstance(inputs, dict):
        return {k: np.asarray(v) for k, v in inputs.items() if k != "labels"}, inputs.get("labels"), "given"
    if inputs is not None:
        feeds, labels = load_inputs(inputs, m.proto)
        return feeds, labels, str(inputs)
    if lossy and ctx.run.calib:
        held = ctx.holdout(m.proto)
        if held is not None:  # data no pass fitted: the gate sees what a refit or a search overfitted
            return held.inputs, held.labels, f"calibration data {held.source}"
        calib = ctx.calibration(m.proto)
        if calib is not None and calib.measured:
            return calib.inputs, calib.labels, f"calibration data {calib.source}"
    try:
        shapes = {**ctx.input_shapes, **(val_shapes or {})}
        try:
            return make_inputs(m.proto, shapes, batch=val_samples, seed=val_seed, float_range=val_range), None, "random"
        except InputError as e:
            if not val_shapes:
                raise
            raise InputError(str(e).replace("--input-shape", "--val-shape")) from None
    except NotValidatable as e:
        return None, None, str(e)


def _compare(original: Model, optimized: ModelProto | Path, feeds: dict[str, np.ndarray], labels, *,
             lossy: bool, atol: float, rtol: float, min_cosine: float, max_acc_drop: float,
             custom_op_library: str | None, min_top1: float | None = None,
             fixed_batch: int | None = None, reference: ReferenceOutputs | None = None,
             min_centred_cosine: float = DEFAULT_MIN_CENTRED_COSINE) -> ValidationResult:
    # The original runs from its file when it has one: its proto may hold stubs (weights left on disk).
    orig_src: ModelProto | Path = original.path if original.path is not None else original.proto
    too_big = _oversized_tensor(original.proto)
    if too_big:
        raise NotValidatable(too_big)
    chunk = static_batch(original.proto)
    if chunk is None:  # --input-shape can fix the result's batch while the original's stays dynamic
        chunk = fixed_batch if fixed_batch is not None else (
            static_batch(optimized) if isinstance(optimized, ModelProto) else None)
    n = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else 0
    if chunk is None and lossy and n > 256:
        chunk = 256
    if chunk is not None and n == chunk:
        chunk = None
    return compare_models(orig_src, optimized, feeds, atol=atol, rtol=rtol, labels=labels, lossy=lossy,
                          min_cosine=min_cosine, max_acc_drop=max_acc_drop, chunk=chunk,
                          custom_op_library=custom_op_library, min_top1=min_top1,
                          score_outputs=score_outputs(original.proto), reference=reference,
                          min_centred_cosine=min_centred_cosine)


# A tensor the model itself would compute at this size (e.g. ConstantOfShape to billions of elements)
# is not run for validation: onnxruntime would allocate and fill it, for minutes or until memory is gone.
MAX_RUN_TENSOR_BYTES = 2 << 30
_oversized_cache: dict[int, tuple[ModelProto, str | None]] = {}


def _oversized_tensor(model: ModelProto) -> str | None:
    """Why running the model is unsafe (a statically known tensor over MAX_RUN_TENSOR_BYTES), or None."""
    hit = _oversized_cache.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    reason = None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        for v in inferred.graph.value_info:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if not tt.HasField("shape") or any(d < 0 for d in dims):
                continue
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
            except Exception:  # noqa: BLE001
                itemsize = 4
            nbytes = float(np.prod(dims, dtype=np.float64)) * itemsize
            if nbytes > MAX_RUN_TENSOR_BYTES:
                reason = f"running the model would create tensor '{v.name}' of shape {dims} ({nbytes / 2**30:.3g} GB)"
                break
    except Exception:  # noqa: BLE001 - no inference, no guard: the run timeout still applies
        pass
    _oversized_cache.clear()
    _oversized_cache[id(model)] = (model, reason)
    return reason


def _keep_input_value_info(result: ModelProto, original: ModelProto) -> int:
    """Drop the main graph's value_info entries the input model did not have; returns how many.

    Passes use inferred shapes while they run; written out, onnxruntime trusts them at load and fused
    SkipLayerNormalization on a MiniLM export where it did not on the raw file: 2-8% slower at batch 1 and
    16. Without them it sees the graph as the original's author wrote it."""
    had = {v.name for v in original.graph.value_info}
    keep = [v for v in result.graph.value_info if v.name in had]
    dropped = len(result.graph.value_info) - len(keep)
    if dropped:
        del result.graph.value_info[:]
        result.graph.value_info.extend(keep)
    return dropped


def with_lossless_first(names: list[str]) -> tuple[list[str], bool]:
    """The pipeline with the lossless preset in front of its first lossy pass, unless lossless passes
    already run before it: lossy passes are designed for (and much faster on) the cleaned graph."""
    registry = load_passes()
    first_lossy = next((i for i, n in enumerate(names) if not registry[n].lossless), None)
    if first_lossy is None or any(registry[n].lossless for n in names[:first_lossy]):
        return names, False
    return PRESETS["lossless"] + names, True


def optimize(model: str | os.PathLike | ModelProto, output: str | os.PathLike | None = None, *,
             passes: str | list[str] | None = "lossless",
             input_shapes: dict[str, list[int]] | None = None,
             inputs: str | os.PathLike | dict | None = None,
             validate: bool = True,
             atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
             min_cosine: float | None = None, max_acc_drop: float | None = None,
             check_each_pass: bool = False, force: bool = False,
             latency: bool | None = None,
             options: dict[str, Any] | None = None,
             custom_op_library: str | None = None,
             progress: Callable[[str], None] | None = None,
             keep_model: bool = True, auto_lossless: bool = True,
             val_shapes: dict[str, list[int]] | None = None, val_samples: int | None = None,
             val_seed: int = 0, val_range: tuple[float, float] | None = None) -> tuple[ModelProto | None, Report]:
    """Run a pipeline over a model, validate the result, and (if ``output``) write it atomically.

    Returns the optimized ModelProto and the Report. Raises InputError for bad input, GateError when
    the result misses its gate (nothing is written unless ``force``), PassError when a pass fails.
    ``options`` carries pass settings by name (``prune_ratio``, ``calib``, ``quant_format`` ...): each must
    be declared by ``onnxslim.options.RunOptions`` or by a pass in the pipeline (else InputError).
    ``keep_model=False`` returns None instead of the model (the CLI: weights never need to be in memory).
    ``auto_lossless``: run the lossless preset before the first lossy pass when nothing cleans the graph first.
    ``val_shapes`` / ``val_samples`` / ``val_seed`` / ``val_range``: generated validation inputs (when no
    ``inputs``); ``val_range`` draws float inputs uniformly from (low, high) instead of a standard normal.
    """
    t0 = time.perf_counter()
    _return_freed_memory()
    custom_op_library = checked_custom_op_library(custom_op_library)
    options = dict(options or {})
    out_path = Path(output) if output is not None else None
    if out_path is not None and not isinstance(model, ModelProto):
        check_output_path(out_path, model)  # fail before any work
    elif out_path is not None:
        check_output_path(out_path)
    names = parse_pipeline(passes)
    prepended = False
    if auto_lossless:
        names, prepended = with_lossless_first(names)
    registry = load_passes()
    lossy = any(not registry[n].lossless for n in names)
    if latency is not None:
        options["latency"] = latency  # the same switch for every pass's own timing and the final table
    if min_cosine is not None:
        options["min_cosine"] = min_cosine
    if max_acc_drop is not None:
        options["max_acc_drop"] = max_acc_drop
    if latency is not None and options.get("latency") is None:
        options["latency"] = latency  # the passes read ctx.run.latency (--no-latency reaches prune)
    given = frozenset(k for k, v in options.items() if v is not None)
    run_options, pass_options = resolve_options(names, options)  # every option checked before any work
    compacted = run_options.objective == "size" and lossy and "compact-names" not in names
    if compacted:  # on small models the names are a third of an INT8 file
        names = names + ["compact-names"]
    # Lossless pipelines leave large weights on disk (onnxslim.weights): graph passes read them lazily
    # and the save streams them, so memory stays near one copy of the model. Lossy passes may hand the
    # proto to tools that need every byte (onnxruntime.quantization), so they get it loaded.
    timing = _Timing(t0)
    m = load_model(model, lazy=not lossy)
    timing.lap("load")
    if out_path is not None and m.data_files:
        check_output_path(out_path, m.path, m.data_paths())
    min_cosine, max_acc_drop = run_options.min_cosine, run_options.max_acc_drop
    ctx = Context(original=m, input_shapes=dict(input_shapes or {}), run=run_options, given=given,
                  custom_op_library=custom_op_library, progress=progress or (lambda msg: None))
    report = Report(input=str(m.path or "<ModelProto>"), output=str(out_path or ""), pipeline=names)
    if prepended:
        report.notes.append("ran the lossless preset before the first lossy pass (lossy passes need the cleaned "
                            "graph; --no-auto-lossless turns this off)")
    if compacted:
        report.notes.append("--objective size: internal tensor and node names shortened (compact-names; the graph's "
                            "inputs and outputs keep theirs)")
    report.before = model_summary(m.proto, m.file_size or None)
    # The original's outputs, computed once and shared by --check-each-pass, lossy stages and the final check.
    reference = ReferenceOutputs(m.file_size if m.path is not None else None)

    feeds = labels = None
    source = ""
    if validate or check_each_pass:
        feeds, labels, source = _validation_data(m, ctx, inputs, lossy, val_shapes, val_samples, val_seed, val_range)
        ctx.inputs, ctx.labels = feeds, labels
    timing.lap("setup")

    verify = None
    if check_each_pass:
        verify = _make_verifier(m, ctx, feeds, atol, rtol, custom_op_library, source, reference)

    on_stage = None
    if lossy:
        report.stages.append(_stage_metrics(m, m.proto, "original", ctx, feeds, labels, reference))
        on_stage = lambda proto, name: report.stages.append(  # noqa: E731
            _stage_metrics(m, proto, name, ctx, feeds, labels, reference))
    pm = PassManager(names, options=pass_options, verify=verify, on_stage=on_stage)
    # Lossless runs: large weights the passes rewrite go to a spill file beside OUT (onnxslim.weights).
    spill = contextlib.ExitStack()
    if not lossy:
        spill.enter_context(weights.spilling(out_path.parent if out_path is not None else None))
    try:
        result = pm.run(m.proto, ctx)
    except BaseException:
        spill.close()
        raise
    finally:
        report.passes = [r.to_dict() for r in pm.records]
        report.warnings.extend(pm.warnings)
    report.extra.update(pm.sections())
    lossy_records = [r for r in pm.records if r.name in {p.name for p in pm.passes if not p.lossless}]
    for stage, rec in zip(report.stages[1:], lossy_records):  # stage 0 is the original
        if rec.dropped is not None:
            stage["dropped"] = rec.dropped
    timing.lap("passes")
    dropped = _keep_input_value_info(result, m.proto)
    if dropped:
        report.notes.append(f"{dropped} value_info entr{'y' if dropped == 1 else 'ies'} the passes inferred are not "
                            "written (onnxruntime infers shapes itself; inferred symbolic shapes made it pick "
                            "slower fused kernels on encoders)")
    # Weights the passes read are mapped pages that still count as ours: drop them before onnxruntime
    # maps the same weights again for validation (they are re-read from the page cache if needed).
    weights.release_pages()

    validation: ValidationResult | None = None
    tmpdir = None
    staged: StagedModel | None = None
    try:
        candidate: ModelProto | Path = result
        if out_path is not None or weights.has_stubs(result) or weights.logical_size(result) >= PROTO_LIMIT:
            # Write first, into a private folder beside OUT, and validate that file: the check sees
            # exactly the bytes that get committed, onnxruntime reads the weights from disk (a proto
            # with stubs or over 2 GB cannot go to it in memory), and nothing is written twice.
            ctx.progress("writing")
            if out_path is None:
                tmpdir = tempfile.mkdtemp(prefix="onnxslim-")
            staged = stage_model(result, out_path or Path(tmpdir) / "candidate.onnx",
                                 external_data=True if m.external_data else None)
            candidate = staged.path
        timing.lap("write")
        if validate and feeds is not None:
            ctx.progress("validating")
            validation, source = _compare_any(m, candidate, feeds, labels, source, lossy=lossy, atol=atol,
                                              rtol=rtol, min_cosine=min_cosine, max_acc_drop=max_acc_drop,
                                              custom_op_library=custom_op_library, min_top1=run_options.min_top1,
                                              fixed_batch=static_batch(result), reference=reference,
                                              min_centred_cosine=run_options.min_centred_cosine)
            if validation is not None:
                report.validation = validation.to_dict()
                report.validation["inputs"] = source
                report.validation["data"] = describe_feeds(feeds if not source.startswith("all-ones") else
                                                           _ones_like(feeds), source)
                report.warnings.extend(f"{w}: the comparison cannot tell a changed model from this one; "
                                       "give --inputs with real data" for w in validation.warnings)
            else:
                report.validation = ValidationResult(True, "", skipped=source).to_dict()
                report.warnings.append(f"validation skipped: {source}")
                if lossy:  # a lossy change nobody measured is never written silently
                    ctx.gate_failures.append(f"the lossy result could not be validated ({source}); give --inputs")
        elif validate:
            report.validation = ValidationResult(True, "", skipped=source).to_dict()
            report.warnings.append(f"validation skipped: {source}")
        else:
            report.warnings.append("validation disabled (--no-validate): outputs were not compared")
        timing.lap("validation")
        if latency if latency is not None else lossy:
            ctx.progress("measuring latency")
            report.latency = latency_table(m.path or m.proto, candidate,
                                           latency_feeds(result if static_batch(result) else m.proto,
                                                         ctx.input_shapes, feeds),
                                           custom_op_library=custom_op_library)
            kept = [st for st in report.stages if "dropped" not in st]
            if len(kept) > 1 and report.latency.get("batch1", {}).get("ratio"):
                kept[-1]["latency"] = report.latency["batch1"]  # the final model: the same figure
        timing.lap("latency")
        report.warnings.extend(ctx.warnings)
        size = staged.size() if staged is not None else None
        report.after = model_summary(result, size)  # shown also when the gate refuses the candidate
        if validation is not None and not validation.passed:
            if not force:
                report.seconds = time.perf_counter() - t0
                report.refused = f"validation failed: {validation.reason}"
                raise GateError(f"validation failed: {validation.reason}; nothing written (use --force to write anyway)",
                                report)
            report.warnings.append(f"validation failed but --force given: {validation.reason}")
        gate_msg = "; ".join(ctx.gate_failures)
        if gate_msg:
            if not force:
                report.seconds = time.perf_counter() - t0
                report.refused = gate_msg
                raise GateError(f"{gate_msg}; nothing written (use --force to write anyway)", report)
            report.warnings.append(f"{gate_msg} (written because of --force)")
        if out_path is not None:
            staged.commit(protect=m.data_paths())  # never deletes the input's data files
            report.written = True
        timing.lap("commit")
        if keep_model:
            weights.materialize_all(result)  # the caller gets a complete model, not stubs
    finally:
        report.extra["timing"] = timing.laps  # also in the report of a refused run
        spill.close()  # after the save and materialize_all: nothing refers to the spill file any more
        if staged is not None:
            staged.discard()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if m is not model:
            m.close()
    report.seconds = time.perf_counter() - t0
    return (result if keep_model else None), report


class _Timing:
    """Seconds per phase of one run (``report.extra["timing"]``): where a run's time goes, for the
    start-up benchmark (tools/bench_lossless.py --split) and for anyone reading a --json report."""

    def __init__(self, start: float) -> None:
        self.last, self.last_cpu = start, time.process_time()
        self.laps: dict[str, dict[str, float]] = {}

    def lap(self, name: str) -> None:
        """Close phase ``name``: wall seconds and CPU seconds (all threads: onnxruntime's pool too)."""
        now, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall": round(now - self.last, 4), "cpu": round(cpu - self.last_cpu, 4)}
        self.last, self.last_cpu = now, cpu


def _ones_like(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (np.ones_like(v) if v.dtype.kind in "biufc" else v) for k, v in feeds.items()}


def _compare_any(original: Model, candidate: ModelProto | Path, feeds: dict[str, np.ndarray], labels, source: str,
                 **kw: Any) -> tuple[ValidationResult | None, str]:
    """Compare on ``feeds``; if the original itself fails on random inputs, retry on all-ones inputs
    (random integers break ops that take indices, axes or divisors). ``None``: no usable inputs, and why."""
    attempts = [(feeds, source)]
    if source == "random":
        reference = kw.get("reference")
        ones = reference.derived(feeds, _ones_like) if reference is not None else _ones_like(feeds)
        attempts.append((ones, "all-ones (the original fails on random inputs)"))
    reason = source
    for f, src in attempts:
        try:
            return _compare(original, candidate, f, labels, **kw), src
        except NotValidatable as e:
            reason = str(e)
    # No outputs to compare; still, a result that onnxruntime cannot even load is never acceptable.
    from onnxslim.runtime import make_session

    lib = kw.get("custom_op_library")
    try:
        make_session(original.path if original.path is not None else original.proto,  # proto may hold stubs
                     custom_op_library=lib)
    except Exception:  # noqa: BLE001 - the original does not load either: nothing to hold the result to
        return None, reason
    try:
        make_session(candidate, custom_op_library=lib)
    except Exception as e:  # noqa: BLE001
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return ValidationResult(False, f"the optimized model does not load in onnxruntime: {first[-200:]}"), reason
    return None, reason


def _stage_metrics(original: Model, proto: ModelProto, name: str, ctx: Context, feeds, labels,
                   reference: ReferenceOutputs | None = None) -> dict[str, Any]:
    """Size, parameters, cosine/accuracy vs the original and batch-1 latency after one lossy stage."""
    from onnxslim.graph import count_params

    stage: dict[str, Any] = {"name": name, "size": proto.ByteSize(), "params": count_params(proto),
                             "cosine": None, "accuracy": None, "latency": None}
    if proto.ByteSize() >= PROTO_LIMIT:
        return stage
    try:
        if feeds is not None:
            res = _compare(original, proto, feeds, labels, lossy=True, atol=0, rtol=0, min_cosine=0,
                           max_acc_drop=100, custom_op_library=ctx.custom_op_library, min_top1=0.0,
                           reference=reference)
            stage["cosine"] = min((o.cosine for o in res.outputs), default=None)
            stage["accuracy"] = res.accuracy_after
        if name != "original" and ctx.run.latency is not False:
            # batch 1 against the original, by the same function as the final latency table
            table = latency_table(original.path or original.proto, proto,
                                  latency_feeds(proto if static_batch(proto) else original.proto, ctx.input_shapes,
                                                feeds, batches=(1,)),
                                  custom_op_library=ctx.custom_op_library, seconds=0.5)
            stage["latency"] = next(iter(table.values()), None)
    except Exception as e:  # noqa: BLE001 - stage metrics inform; the final validation decides
        stage["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return stage


def _make_verifier(original: Model, ctx: Context, feeds, atol: float, rtol: float,
                   custom_op_library: str | None, source: str = "given",
                   reference: ReferenceOutputs | None = None) -> Callable[[ModelProto, str], None]:
    """After each pass: onnx.checker, then (for lossless passes) outputs vs the original."""
    registry = load_passes()

    def verify(model: ModelProto, pass_name: str) -> None:
        try:
            check_model(model)  # handles stubs (weights left on disk)
        except Exception as e:  # noqa: BLE001
            raise PassError(f"pass '{pass_name}' produced an invalid model: {str(e).splitlines()[0]}") from None
        if feeds is None or not registry[pass_name].lossless:
            return
        with session_source(model) as src:
            res, _ = _compare_any(original, src, feeds, None, source, lossy=False, atol=atol, rtol=rtol,
                                  min_cosine=1.0, max_acc_drop=0.0, custom_op_library=custom_op_library,
                                  reference=reference)
        if res is not None and not res.passed:
            raise PassError(f"pass '{pass_name}' changed the outputs (first pass to do so): {res.reason}")

    return verify


def inspect_model(model: str | os.PathLike | ModelProto) -> dict[str, Any]:
    """Opsets, inputs/outputs, op histogram, parameters, size, subgraphs, custom domains, external data."""
    from onnxslim.graph import DEFAULT_DOMAINS

    m = load_model(model, check=False, lazy=True)  # weights stay on disk: inspecting reads only the structure
    m.close()  # stubs keep dims and types, which is all that is shown
    p = m.proto

    def vi(v: onnx.ValueInfoProto) -> dict[str, Any]:
        t = v.type
        if t.HasField("tensor_type"):
            dtype = onnx.TensorProto.DataType.Name(t.tensor_type.elem_type)
            shape = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim]
                     if t.tensor_type.HasField("shape") else None)
        else:
            dtype, shape = t.WhichOneof("value") or "unknown", None
        return {"name": v.name, "dtype": dtype, "shape": shape}

    subgraphs = 0

    def walk(g: onnx.GraphProto) -> None:
        nonlocal subgraphs
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    subgraphs += 1
                    walk(a.g)
                for sg in a.graphs:
                    subgraphs += 1
                    walk(sg)

    walk(p.graph)
    summary = model_summary(p, m.file_size or None)
    inits = {t.name for t in p.graph.initializer}
    return {
        "path": str(m.path or ""),
        "ir_version": p.ir_version,
        "producer": f"{p.producer_name} {p.producer_version}".strip(),
        "opsets": {(imp.domain or "ai.onnx"): imp.version for imp in p.opset_import},
        "inputs": [vi(v) for v in p.graph.input if v.name not in inits],
        "outputs": [vi(v) for v in p.graph.output],
        "ops": summary["ops"],
        "nodes": summary["nodes"],
        "initializers": summary["initializers"],
        "params": summary["params"],
        "size": summary["size"],
        "subgraphs": subgraphs,
        "functions": len(p.functions),
        "custom_domains": sorted({imp.domain for imp in p.opset_import if imp.domain not in DEFAULT_DOMAINS}),
        "external_data": m.data_files,
    }


def _fixed_by(original: ModelProto, optimized: ModelProto) -> dict[str, list[int]]:
    """Inputs whose dynamic dims the optimized model fixed: name -> the optimized model's full shape."""
    from onnxslim.validate import input_specs

    try:
        a, b = input_specs(original), input_specs(optimized)
    except NotValidatable:
        return {}
    out = {}
    for name, (_, dims) in a.items():
        other = b.get(name, (None, None))[1]
        if other and len(other) == len(dims) and all(isinstance(d, int) and d > 0 for d in other) and \
                any(not isinstance(d, int) or d <= 0 for d in dims):
            out[name] = list(other)
    return out


def validate_files(original: str | os.PathLike, optimized: str | os.PathLike, *,
                   inputs: str | os.PathLike | None = None, input_shapes: dict[str, list[int]] | None = None,
                   atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, lossy: bool = False,
                   min_cosine: float = DEFAULT_MIN_COSINE, max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
                   custom_op_library: str | None = None) -> ValidationResult:
    """The numeric comparison alone (``onnxslim validate``)."""
    custom_op_library = checked_custom_op_library(custom_op_library)
    a = load_model(original, lazy=True)  # onnxruntime reads the weights from the files
    b = load_model(optimized, lazy=True)
    a.close()
    b.close()
    if inputs is not None:
        feeds, labels = load_inputs(inputs, a.proto)
    else:
        # Dims the optimized model fixed (optimize --input-shape) shape the data, so a model made for
        # 1x3x224x224 is compared on such inputs rather than refused for "invalid dimensions".
        shapes = dict(_fixed_by(a.proto, b.proto))
        shapes.update(input_shapes or {})
        try:
            feeds, labels = make_inputs(a.proto, shapes), None
        except NotValidatable as e:
            raise InputError(f"cannot build inputs: {e}; give --inputs") from None
    b_src: ModelProto | Path = b.path if b.path is not None else b.proto
    try:
        return _compare(a, b_src, feeds, labels, lossy=lossy, atol=atol, rtol=rtol, min_cosine=min_cosine,
                        max_acc_drop=max_acc_drop, custom_op_library=custom_op_library)
    except NotValidatable as e:
        raise InputError(f"cannot validate: {e}") from None
