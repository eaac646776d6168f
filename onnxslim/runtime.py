"""onnxruntime sessions (with onnxruntime-extensions' custom ops), running and timing models."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
from onnx import ModelProto

from onnxslim.errors import InputError
from onnxslim.model import PROTO_LIMIT

@contextlib.contextmanager
def quiet_ort() -> Iterator[list[str]]:
    """Silence onnxruntime's Python tools' advice on the root logger (quantization, float16, shape
    inference: it would break "one line on stderr"); collect their errors instead."""
    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage().splitlines()[0])

    handler = Catch()
    root = logging.getLogger()
    prev_disable = logging.root.manager.disable
    loggers = [root, logging.getLogger("onnxruntime.quantization.shape_inference")]
    for lg in loggers:
        lg.addHandler(handler)
    logging.disable(logging.WARNING)  # drops WARNING and below everywhere, keeps ERROR for Catch
    try:
        yield errors
    finally:
        logging.disable(prev_disable)
        for lg in loggers:
            lg.removeHandler(handler)


ort.set_default_logger_severity(4)  # errors reach us as exceptions; C++ log lines would break "one line on stderr"


@functools.lru_cache(maxsize=1)
def _extensions_library() -> str | None:
    """Path of onnxruntime-extensions' custom-op library, found without importing the package:
    its __init__ imports torch when installed (about 1 s and 200 MB for nothing we use)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("onnxruntime_extensions")
        folder = Path(next(iter(spec.submodule_search_locations)))
        libs = sorted(p for p in folder.glob("_extensions_pydll*") if p.suffix in (".so", ".pyd", ".dylib"))
        if libs:
            return str(libs[0])
        from onnxruntime_extensions import get_library_path

        return get_library_path()
    except Exception:  # noqa: BLE001 - extensions are optional at run time
        return None


def session_options(threads: int = 0, custom_op_library: str | None = None,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    prepack: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = level
    if not prepack:
        # Prepacking re-lays out every MatMul/Conv weight at session start: it pays off over many runs
        # (latency), not for the one or two runs of a validation, where it doubles the weights' memory
        # and dominates the time on large models (1.1 s of 1.4 s per session on 300 MB).
        so.add_session_config_entry("session.disable_prepacking", "1")
        # The same sessions run once or twice: worker threads that spin between runs only burn CPU
        # other processes (and our own next step) need; 0.03-0.06 s of CPU per session on small models.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    lib = _extensions_library()
    if lib:
        so.register_custom_ops_library(lib)
    if custom_op_library:
        so.register_custom_ops_library(custom_op_library)
    return so


def make_session(model: ModelProto | str | Path, threads: int = 0, custom_op_library: str | None = None,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 prepack: bool = True) -> ort.InferenceSession:
    """A CPU session. Models of 2 GB or more must be given as a path (protobuf's limit).
    ``prepack=False`` for sessions that run only a few times (validation)."""
    so = session_options(threads, custom_op_library, level, prepack)
    if isinstance(model, ModelProto):
        if model.ByteSize() >= PROTO_LIMIT:
            raise InputError("model is over 2 GB: save it with external data and run it from its path")
        src: bytes | str = model.SerializeToString()
    else:
        src = os.fspath(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    sess._onnxslim_threads = threads  # paired_latency times one-thread sessions by CPU time
    return sess


def session_feed(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The session's inputs from ``inputs``; float32 data is cast for a float16 input (fp16 without
    float32 I/O), so one set of inputs serves the original and the converted model."""
    feed = {}
    for i in session.get_inputs():
        if i.name in inputs:
            v = inputs[i.name]
            if i.type == "tensor(float16)" and getattr(v, "dtype", None) == np.float32:
                v = v.astype(np.float16)
            feed[i.name] = v
    return feed


# One inference (a validation run) longer than this is stopped: a model can loop forever (a Loop whose
# condition never turns false is valid ONNX), and onnxslim must never hang on a hostile file.
# A stop for endless Loops, not a speed limit: 20 s fired on a legitimate 2-GMAC swin_t validation batch on a
# busy 2-core machine. ONNXSLIM_RUN_TIMEOUT sets it (the fuzz tests use 5 s).
RUN_TIMEOUT = float(os.environ.get("ONNXSLIM_RUN_TIMEOUT", "120"))


def run(session: ort.InferenceSession, inputs: dict[str, np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
    """Outputs of one inference; InputError if it does not finish within ``timeout`` seconds."""
    import threading

    names = [o.name for o in session.get_outputs()]
    limit = RUN_TIMEOUT if timeout is None else timeout
    options = ort.RunOptions()
    timer = threading.Timer(limit, lambda: setattr(options, "terminate", True))
    timer.daemon = True
    timer.start()
    try:
        return session.run(names, session_feed(session, inputs), options)
    except Exception:
        if options.terminate:
            raise InputError(f"one inference did not finish within {limit:g} s (an endless Loop?); "
                             "give --inputs, or --no-validate to skip the check, or raise ONNXSLIM_RUN_TIMEOUT "
                             "for a large model on a busy machine") from None
        raise
    finally:
        timer.cancel()


def latency_ms(session: ort.InferenceSession, inputs: dict[str, np.ndarray], *, runs: int = 30,
               warmup: int = 3, max_seconds: float = 10.0) -> float:
    """Median wall time of one run in milliseconds (bounded in total time)."""
    feed = session_feed(session, inputs)
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 5:
            break
    return float(np.median(times) * 1000.0)


def paired_latency(a: ort.InferenceSession, b: ort.InferenceSession, inputs: dict[str, np.ndarray], *,
                   seconds: float = 1.0, min_runs: int = 15, max_runs: int = 400) -> tuple[float, float, float]:
    """Median ms of two sessions and the median of their per-run ratio b/a.

    Runs alternate a, b, b, a, a, b ...: a burst of load from other processes hits both sides of a
    pair, so the paired ratio stays stable on a shared machine where separate medians drift by 2x."""
    fa, fb = session_feed(a, inputs), session_feed(b, inputs)

    # One-thread sessions compute in this thread: its CPU time is what the model costs, and other
    # processes on a busy machine do not inflate it the way they inflate wall time.
    clock = time.thread_time if _single_threaded(a) and _single_threaded(b) else time.perf_counter

    def timed(s: ort.InferenceSession, f: dict[str, np.ndarray]) -> float:
        t0 = clock()
        s.run(None, f)
        return clock() - t0

    for _ in range(3):
        timed(a, fa), timed(b, fb)
    probe = timed(a, fa) + timed(b, fb)
    runs = int(min(max_runs, max(min_runs, seconds / max(probe, 1e-6))))
    ta, tb = [], []
    for i in range(runs):
        if i % 2:  # alternate which goes first: neither side always gets the warm cache
            tb.append(timed(b, fb))
            ta.append(timed(a, fa))
        else:
            ta.append(timed(a, fa))
            tb.append(timed(b, fb))
    ratio = float(np.median(np.asarray(tb) / np.asarray(ta)))
    before = float(np.median(ta)) * 1e3
    # "after" is derived from the paired ratio so that the two times and the ratio printed together agree.
    return before, before * ratio, ratio


def _single_threaded(s: ort.InferenceSession) -> bool:
    return getattr(s, "_onnxslim_threads", 0) == 1


def latency_table(original: ModelProto | str | Path, optimized: ModelProto | str | Path,
                  feeds_by_batch: dict[int, dict[str, np.ndarray]], *, custom_op_library: str | None = None,
                  seconds: float = 1.0) -> dict[str, dict[str, Any]]:
    """The one latency measurement: both models, one thread, interleaved, per batch size.

    ``{"batch1": {"before_ms", "after_ms", "ratio"}, ...}`` with ratio = optimized / original (below 1 is
    faster), the same number everywhere it is shown and gated. A batch that fails to run gets ``error``."""
    out: dict[str, dict[str, Any]] = {}
    sa = sb = None
    for b, feeds in feeds_by_batch.items():
        try:
            if sa is None:
                sa = make_session(original, threads=1, custom_op_library=custom_op_library)
                sb = make_session(optimized, threads=1, custom_op_library=custom_op_library)
            before, after, ratio = paired_latency(sa, sb, feeds, seconds=seconds)
        except Exception as e:  # noqa: BLE001 - latency is information, never a reason to fail
            out[f"batch{b}"] = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
            continue
        out[f"batch{b}"] = {"before_ms": round(before, 4), "after_ms": round(after, 4), "ratio": round(ratio, 4)}
    return out


def mean_ratio(table: dict[str, dict[str, Any]]) -> float | None:
    """Geometric mean of the latency ratios of a ``latency_table`` (None when nothing was measured)."""
    ratios = [v["ratio"] for v in table.values() if "ratio" in v and v["ratio"] > 0]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else None


def speed_gate(what: str, table: dict[str, dict[str, Any]], min_speedup: float) -> str | None:
    """The speed gate of every lossy pass: None when it passes, else the one-line reason."""
    ratio = mean_ratio(table)
    if ratio is None or ratio <= 1.0 / min_speedup:
        return None
    batches = " and ".join(k.removeprefix("batch") for k, v in table.items() if "ratio" in v)
    return (f"{what}: latency {ratio:.2f}x the input model's (geometric mean over batch {batches}) misses "
            f"--min-speedup {min_speedup:g} (needs <= {1.0 / min_speedup:.2f}x)")
