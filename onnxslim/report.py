"""The run report: one data structure; the CLI table and ``--json`` are views of it."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import ModelProto, TensorProto

from onnxslim.graph import count_params, op_histogram


def _io(model: ModelProto) -> list[dict[str, Any]]:
    inits = {t.name for t in model.graph.initializer}
    rows = []
    for kind, vis in (("input", [v for v in model.graph.input if v.name not in inits]), ("output", model.graph.output)):
        for v in vis:
            tt = v.type.tensor_type
            dtype = TensorProto.DataType.Name(tt.elem_type) if v.type.HasField("tensor_type") else "?"
            shape = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
                     if tt.HasField("shape") else None)
            rows.append({"kind": kind, "name": v.name, "dtype": dtype.lower(), "shape": shape})
    return rows


def model_summary(model: ModelProto, file_size: int | None = None) -> dict[str, Any]:
    return {
        "nodes": sum(op_histogram(model).values()),
        "ops": op_histogram(model),
        "initializers": len(model.graph.initializer),
        "params": count_params(model),
        "size": int(file_size) if file_size is not None else int(model.ByteSize()),
        "io": _io(model),
    }


@dataclass
class Report:
    input: str = ""
    output: str = ""
    pipeline: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)  # lossy stages: metrics after each
    validation: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the run decided on its own (e.g. lossless first)
    seconds: float = 0.0
    written: bool = False
    refused: str | None = None  # why the candidate was not written (its numbers are still in ``after``)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def write_json(self, path: str | os.PathLike) -> None:
        from onnxslim.model import _fsync_write

        tmp = Path(str(path) + ".tmp")
        _fsync_write(tmp, [self.to_json().encode()])
        os.replace(tmp, path)

    def to_json(self) -> str:
        """Standard JSON (no NaN/Infinity, which JSON.parse rejects: they become null)."""
        return json.dumps(strict_json(self.to_dict()), indent=2, allow_nan=False)


def strict_json(o: Any) -> Any:
    """``o`` with non-finite floats as None and numpy values as Python ones."""
    if isinstance(o, dict):
        return {str(k): strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    if isinstance(o, (bool, str, int)) or o is None:
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if hasattr(o, "item") and getattr(o, "ndim", 1) == 0:  # numpy scalar
        return strict_json(o.item())
    return strict_json(_jsonable(o)) if not isinstance(o, str) else o


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _ratio(b: float, a: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_report(r: Report, totals: bool = True, warnings: bool = True) -> str:
    """Before/after table, per-pass times, validation numbers."""
    b, a = r.before, r.after
    rows = [["", "before", "after", "ratio"]]
    ops = sorted(set(b.get("ops", {})) | set(a.get("ops", {})))
    for op in ops:
        nb, na = b.get("ops", {}).get(op, 0), a.get("ops", {}).get(op, 0)
        if nb != na:
            rows.append([f"  {op}", str(nb), str(na), ""])
    for key, label in (("nodes", "nodes"), ("initializers", "initializers"), ("params", "parameters")):
        if key in b and key in a:
            rows.append([label, f"{b[key]:,}", f"{a[key]:,}", _ratio(b[key], a[key])])
    if "size" in b and "size" in a:
        rows.append(["file size", human_bytes(b["size"]), human_bytes(a["size"]), _ratio(b["size"], a["size"])])
    if r.latency:
        for key, val in r.latency.items():
            if isinstance(val, dict) and "before_ms" in val:
                rows.append([f"latency {key}", f"{val['before_ms']:.3f} ms", f"{val['after_ms']:.3f} ms",
                             f"{val['ratio']:.2f}x" if val.get("ratio") else _ratio(val["before_ms"], val["after_ms"])])
    lines = [_table(rows)] if len(rows) > 1 else []
    if b.get("io") and a.get("io"):
        fmt = lambda io: f"{io['kind']} {io['name']}: {io['dtype']} {io['shape']}"  # noqa: E731
        if b["io"] == a["io"]:
            lines.append("interface unchanged: " + "; ".join(fmt(io) for io in b["io"]))
        else:
            lines += ["interface CHANGED:"] + [f"  before {fmt(io)}" for io in b["io"]] + \
                     [f"  after  {fmt(io)}" for io in a["io"]]
    if r.passes:
        agg: dict[str, dict[str, float]] = {}
        for p in r.passes:
            e = agg.setdefault(p["name"], {"seconds": 0.0, "runs": 0, "changed": 0, "nodes": 0})
            e["seconds"] += p["seconds"]
            e["runs"] += 1
            e["changed"] += int(p["changed"])
            e["nodes"] += p["before"].get("nodes", 0) - p["after"].get("nodes", 0)
        prow = [["pass", "runs", "changed", "nodes", "time"]]
        for name, e in agg.items():
            prow.append([name, str(e["runs"]), str(e["changed"]), f"{-int(e['nodes']):+d}" if e["nodes"] else "0",
                         f"{e['seconds']:.3f} s"])
        lines += ["", _table(prow)]
        # What a pass decided and why (e.g. the quantization settings chosen, nodes kept in float).
        notes = dict.fromkeys(f"{p['name']}: {n}" for p in r.passes for n in p.get("notes", []))
        if notes:
            lines += [""] + list(notes)
    if r.stages:
        srow = [["stage", "size", "params", "cosine", "accuracy", "latency b1 vs original"]]
        for s in r.stages:
            acc = s.get("accuracy")
            lat = (s.get("latency") or {}).get("ratio")
            srow.append([s["name"] + (" (dropped)" if "dropped" in s else ""), human_bytes(s.get("size", 0)), f"{s.get('params', 0):,}",
                         f"{s['cosine']:.4f}" if s.get("cosine") is not None else "-",
                         f"{acc:.2f}%" if acc is not None else "-",
                         f"{lat:.2f}x" if lat is not None else "-"])
        lines += ["", _table(srow)]
    v = r.validation
    if v:
        if lines:
            lines.append("")
        if v.get("skipped"):
            lines.append(f"validation: skipped ({v['skipped']})")
        else:
            head = "validation: " + ("outputs within the gate" if v["passed"] else f"FAILED: {v['reason']}")
            lines.append(head + f" ({v['mode']}, {v['samples']} sample(s))")
            data = v.get("data")
            if data:
                shown = ", ".join(f"{i['name']} {i['shape']} {i['dtype']}"
                                  + (f" in [{i['min']:.3g}, {i['max']:.3g}]" if "min" in i else "")
                                  for i in data["inputs"])
                lines.append(f"validation inputs: {data['source']}: {shown}")
            centred = v["mode"] == "lossy"  # what the lossy gate also judges; lossless checks tolerances
            vrow = [["output", "max abs", "max rel", "cosine"] + (["centred cos"] if centred else []) + ["top-1 agree"]]
            for o in v["outputs"]:
                cc = [f"{o['centred_cosine']:.4f}" if o.get("centred_cosine") is not None else "-"] if centred else []
                vrow.append([o["name"], f"{o['max_abs']:.3g}", f"{o['max_rel']:.3g}", f"{o['cosine']:.6f}"] + cc +
                            [f"{o['top1_agreement'] * 100:.1f}%" if o.get("top1_agreement") is not None else "-"])
            lines.append(_table(vrow))
            if v.get("accuracy_before") is not None:
                lines.append(f"accuracy: {v['accuracy_before']:.2f}% -> {v['accuracy_after']:.2f}%")
    for section in r.extra.values():  # a pass's own section (e.g. prune) may carry its text lines
        if isinstance(section, dict) and section.get("summary"):
            lines += [""] + [str(s) for s in section["summary"]]
    for n in r.notes:
        lines.append(f"note: {n}")
    for w in r.warnings if warnings else ():
        lines.append(f"warning: {w}")
    if r.refused:
        lines.append(f"result: REFUSED, nothing written: {r.refused}")
    if totals:
        lines.append(f"total time: {r.seconds:.2f} s")
    return "\n".join(lines)


def format_warnings(r: Report) -> str:
    """The report's warnings, one line each, for stderr."""
    return "\n".join(f"warning: {w}" for w in dict.fromkeys(r.warnings))


class Progress:
    """Status of long work on stderr: a live line on a terminal, a plain line every ``interval`` seconds
    otherwise (a log or CI shows that the run is alive and where it is)."""

    def __init__(self, enabled: bool = True, min_seconds: float = 1.0, interval: float | None = None) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.start = time.perf_counter()
        self.min_seconds = min_seconds
        self.interval = float(os.environ.get("ONNXSLIM_PROGRESS_INTERVAL", "30")) if interval is None else interval
        self.last_plain = self.start
        self.shown = False
        self._counted: dict[str, tuple[float, int]] = {}  # "prune: refit" -> (first seen, first count)

    def eta(self, msg: str, now: float) -> str:
        """' (ETA 1m20s)' for messages counting ``k/n`` (refit layers, sensitivity groups, distill steps):
        the rate since this kind of message first appeared, applied to what is left."""
        import re

        m = re.search(r"(\d+)/(\d+)", msg)
        if not m:
            return ""
        k, n = int(m.group(1)), int(m.group(2))
        key = msg[:m.start()]
        t0, k0 = self._counted.setdefault(key, (now, k))
        if k <= k0 or n <= k or now - t0 < 1.0:
            return ""
        left = (now - t0) / (k - k0) * (n - k)
        return f" (ETA {int(left // 60)}m{int(left % 60):02d}s)" if left >= 60 else f" (ETA {left:.0f}s)"

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        msg = msg + self.eta(msg, now)
        elapsed = now - self.start
        if not self.tty:
            if now - self.last_plain >= self.interval:
                self.last_plain = now
                sys.stderr.write(f"onnxslim: [{elapsed:.0f} s] {msg}\n")
                sys.stderr.flush()
            return
        if elapsed < self.min_seconds and not self.shown:
            return
        self.shown = True
        sys.stderr.write(f"\r\x1b[K[{elapsed:6.1f}s] {msg}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False
