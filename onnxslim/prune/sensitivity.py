"""Pruning sensitivity: how much each group's pruning moves the outputs, and per-group ratios for a target.

``measure`` prunes one group at a time at each ratio and records the output drift against the original
on calibration data (mean per-sample cosine, the worst output; accuracy too when labels exist) and the
parameters/MACs that ratio removes. With ``refit`` each trial refits the group's readers first: the
pass refits, so that is the drift that predicts its result (on the digits CNN the no-refit ranking
gave a params=0.5 allocation with lower cosine than the refit one; see tools/bench_prune.py).
``allocate`` turns that into one ratio per group for a global target (``params=0.5``: remove half the
parameters) with the least summed drift: a Lagrangian sweep (minimize drift - lam * saving per group, bisect lam until the real
joint reduction, computed on the pruned graph's shapes, reaches the target).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from onnx import ModelProto

from onnxslim import prune as ch
from onnxslim.calibration import CalibrationData

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAX_SAMPLES = 256


def _run(model: ModelProto, calib: CalibrationData, batch: int) -> list[np.ndarray]:
    from onnxslim.runtime import make_session

    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, feeds) for feeds in calib.batches(batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def _metrics(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> dict[str, float | None]:
    from onnxslim.validate import accuracy, output_metrics

    cos = min(output_metrics(str(k), a, b, 0, 0).cosine for k, (a, b) in enumerate(zip(ref, out)))
    acc = accuracy(out[0], labels) if labels is not None else None
    return {"cosine": float(cos), "drift": float(1.0 - cos), "accuracy": acc}


def measure(model: ModelProto, calib: CalibrationData, *, an: ch.Analysis | None = None,
            imp: np.ndarray | None = None, ratios: tuple[float, ...] = RATIOS, importance: str = "l1",
            round_to: int = ch.DEFAULT_ROUND_TO, min_channels: int = 1, batch: int | None = None,
            max_samples: int = MAX_SAMPLES, refit: bool = False, select=None,
            progress=lambda m: None) -> dict[str, Any]:
    """Per group and ratio: channels kept, drift, accuracy, params/MACs removed (see module doc)."""
    if an is None:
        an = ch.analyze(ch.traced_graph(model))
    if imp is None:
        imp = ch.importance(an, "l2" if importance == "l2" else "l1")
    batch = batch or calib.batch_size  # the model's fixed batch when it has one
    n = min(calib.size, max_samples)
    data = calib.subset(n - n % batch if n > batch else n)
    ref = _run(model, data, batch)
    labels = data.labels if data.measured else None
    base = ch.cost(an)
    result: dict[str, Any] = {
        "samples": data.size, "ratios": list(ratios), "round_to": round_to, "importance": importance, "refit": refit,
        "params": base.params, "macs": base.macs,
        "accuracy": _metrics(ref, ref, labels)["accuracy"] if labels is not None else None, "groups": [],
    }
    prunable = [g for g in an.groups if g.prunable]
    for gi, g in enumerate(an.groups):
        row: dict[str, Any] = {"group": g.id, "layers": [an.sources[s].name or an.sources[s].op for s in g.sources],
                               "channels": g.channels, "width": g.width, "kind": g.kind, "skipped": "; ".join(g.reasons) if g.reasons else None,
                               "points": []}
        none = np.ones(an.n_atoms, bool)
        for u in g.units:
            none[u] = False
        whole = ch.cost(an, none)
        row["params_share"] = (base.params - whole.params) / base.params if base.params else 0.0
        row["macs_share"] = (base.macs - whole.macs) / base.macs if base.macs else 0.0
        if g.prunable:
            progress(f"sensitivity: group {prunable.index(g) + 1}/{len(prunable)}")
            last_keep, last = None, None
            for r in ratios:
                keep = ch.plan(an, {g.id: r}, imp, round_to=round_to, min_channels=min_channels, select=select)
                if last_keep is not None and np.array_equal(keep, last_keep):
                    m = dict(last)
                else:
                    graph, nodes = ch.pruned_copy(an, keep)
                    from onnxslim.graph import to_proto

                    if refit:
                        from onnxslim.prune.refit import refit_layers

                        refit_layers(graph, nodes, an, keep, model, model, data, batch=batch)

                    m = _metrics(ref, _run(to_proto(graph, model), data, batch), labels)
                c = ch.cost(an, keep)
                m.update({"ratio": r, "kept": int(sum(bool(keep[u[0]]) for u in g.units)),
                          "params_removed": (base.params - c.params) / base.params if base.params else 0.0,
                          "macs_removed": (base.macs - c.macs) / base.macs if base.macs else 0.0})
                row["points"].append(m)
                last_keep, last = keep, m
        result["groups"].append(row)
    return result


def allocate(sens: dict[str, Any], an: ch.Analysis, imp: np.ndarray, kind: str, fraction: float, *,
             round_to: int = ch.DEFAULT_ROUND_TO, min_channels: int = 1) -> tuple[dict[str, float], float]:
    """Per-group ratios removing ``fraction`` of ``kind`` ("params" or "macs") with the least summed drift.
    Returns the ratios and the fraction actually removed."""
    key = f"{kind}_removed"
    base = getattr(ch.cost(an), kind)
    options: dict[str, list[tuple[float, float, float]]] = {}
    for row in sens["groups"]:
        if not row["points"]:
            continue
        pts = [(0.0, 0.0, 0.0)]
        worst = 0.0
        for p in row["points"]:
            worst = max(worst, p["drift"])  # drift never decreases with the ratio: smooths noise
            pts.append((p["ratio"], worst, p[key]))
        options[row["group"]] = pts

    def choose(lam: float) -> dict[str, float]:
        return {g: min(pts, key=lambda o: (o[1] - lam * o[2], o[0]))[0] for g, pts in options.items()}

    def reached(ratios: dict[str, float]) -> float:
        keep = ch.plan(an, ratios, imp, round_to=round_to, min_channels=min_channels)
        return (base - getattr(ch.cost(an, keep), kind)) / base if base else 0.0

    best = _bisect_lambda(choose, reached, fraction, hi=1.0, grow=10, limit=1e12)
    return best, reached(best)


def _bisect_lambda(choose: Callable[[float], Any], amount: Callable[[Any], float], target: float, *,
                   hi: float, grow: float, limit: float) -> Any:
    """The Lagrangian sweep both allocators share: ``choose(lam)`` picks per group the option with the least
    cost - lam * amount; the smallest lam whose pick reaches ``target`` (bisected) gives the cheapest pick
    that does. When no lam up to ``limit`` reaches it, the pick at the largest lam tried."""
    while amount(choose(hi)) < target and hi < limit:
        hi *= grow
    best = choose(hi)
    if amount(best) < target:
        return best
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        pick = choose(mid)
        if amount(pick) >= target:
            hi, best = mid, pick
        else:
            lo = mid
    return best


MAX_ALLOCATED_RATIO = 0.5  # a cap per group: the closed-form costs are local (no propagation through later
# layers); on MiniLM at 0.3 with perturbed calibration the cap 0.75 gave min cosine 0.935, 0.5 gave 0.949
# (with the drifted-reader refit the caps 0.4 and 0.5 gave the same result, min cosine 0.9526)


def allocate_predicted(select, an: ch.Analysis, imp: np.ndarray, ratios: dict[str, float], *,
                       round_to: int = ch.DEFAULT_ROUND_TO, min_channels: int = 1,
                       max_ratio: float = MAX_ALLOCATED_RATIO) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-group ratios that remove at least the parameters ``ratios`` remove, with the least predicted error.

    ``select``: a ReconSelector; its greedy removal order per group gives the predicted error after each
    removed unit (the refit's closed-form error increase, relative to the residual sum the group's
    reader writes into: comparable across layers). Per group the allowed removals are those that keep a
    count ``plan`` can make (multiples of ``round_to`` for channels, whole heads, at least one kept);
    a Lagrangian sweep (least cost - lam * parameters removed, bisect lam) meets the budget. The
    measured-sensitivity counterpart is ``allocate`` (one refit run per group and ratio: 10-100x slower).
    Returns the ratios and a report: budget, reached, per group the chosen count and predicted error."""
    base = ch.cost(an).params
    budget = base - ch.cost(an, ch.plan(an, ratios, imp, round_to=round_to, min_channels=min_channels)).params
    options: dict[str, list[tuple[int, float, int]]] = {}  # group -> [(removed, predicted error, params)]
    for g in an.groups:
        if not g.prunable or g.id not in ratios:
            continue
        units = len(g.units)
        step = 1 if g.kind == "heads" or units < round_to else round_to
        low = 1 if g.kind == "heads" else max(min_channels, step)
        n_max = min(int(units * max_ratio), units - low)
        n_max -= (units - n_max) % step  # kept count on the grid
        if n_max <= 0:
            continue
        curves: dict[str, list[tuple[int, float]]] = {}
        select({g.id: n_max}, curves)
        curve = dict(curves.get(g.id, [(0, 0.0)]))
        none = np.ones(an.n_atoms, bool)
        for u in g.units:
            none[u] = False
        per_unit = (base - ch.cost(an, none).params) / units  # linear layers: the same for every unit
        pts = []
        for k in range(0, n_max + 1):
            if (units - k) % step == 0 and k in curve:
                pts.append((k, curve[k], int(round(k * per_unit))))
        options[g.id] = pts

    def choose(lam: float) -> dict[str, tuple[int, float, int]]:
        return {gid: min(pts, key=lambda o: (o[1] - lam * o[2], o[0])) for gid, pts in options.items()}

    def removed(pick: dict[str, tuple[int, float, int]]) -> int:
        return sum(o[2] for o in pick.values())

    best = _bisect_lambda(choose, removed, budget, hi=1e-12, grow=4, limit=1e6)
    by_id = {g.id: g for g in an.groups}
    out = dict(ratios)
    for gid, (k, _, _) in best.items():
        out[gid] = k / len(by_id[gid].units)
    reached = base - ch.cost(an, ch.plan(an, out, imp, round_to=round_to, min_channels=min_channels)).params
    report = {"budget_params": int(budget), "removed_params": int(reached),
              "groups": {gid: {"removed": k, "of": len(by_id[gid].units), "predicted_error": err}
                         for gid, (k, err, _) in best.items()}}
    return out, report


def run_sensitivity(model: ModelProto, calib_spec: str, *, settings: Any, importance: str | None = None,
                    round_to: int = ch.DEFAULT_ROUND_TO, min_channels: int = 1, refit: bool = True,
                    ratios: tuple[float, ...] = RATIOS, input_shapes: dict[str, list[int]] | None = None,
                    progress=lambda m: None) -> dict[str, Any]:
    """The ``onnxslim sensitivity`` command's work on a (cleaned) model: calibration, analysis, measurement.

    ``settings``: the run-level options (``onnxslim.options.RunOptions``: calibration size, batch, images)."""
    from onnxslim.calibration import load_calibration

    calib = load_calibration(calib_spec, model, settings=settings, input_shapes=input_shapes)
    model = with_data_dims(model, calib)  # MACs per sample need the spatial size the data has
    importance = importance or ("recon" if refit else "l1")
    an = ch.analyze(ch.traced_graph(model))
    imp = ch.importance(an, "l2" if importance == "l2" else "l1")
    select = None
    if importance == "recon":  # the same channel choice as the prune pass makes
        from onnxslim.prune.refit import ReconSelector

        select = ReconSelector(an, model, calib, imp, batch=calib.batch_size, progress=progress)
    res = measure(model, calib, an=an, imp=imp, ratios=ratios, importance=importance, round_to=round_to,
                  min_channels=min_channels, refit=refit, select=select, progress=progress)
    res["calibration"] = calib.source
    res["warnings"] = list(calib.warnings)
    if not calib.measured:
        res["warnings"].append("random calibration data: the drift is measured on noise, not on what the model "
                               "sees in use; give real samples for a table to act on")
    return res


def with_data_dims(model: ModelProto, calib: CalibrationData) -> ModelProto:
    """A copy of ``model`` whose dynamic input dims past the batch are the calibration data's.

    Shape inference then knows every activation's size, so MACs per sample count the real spatial
    size (a dynamic-size detector otherwise counts 1x1 feature maps: 130x too few MACs). Only the
    analysis sees the copy; the prune pass keeps the model's interface."""
    out = ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        arr = calib.inputs.get(vi.name)
        if arr is None or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != arr.ndim:
            continue
        for i, d in enumerate(dims):
            if i > 0 and not d.HasField("dim_value"):
                d.dim_value = int(arr.shape[i])
    return out


def format_sensitivity(res: dict[str, Any]) -> str:
    """Per group: channels, share of params/MACs, cosine (and accuracy) at each ratio; skipped groups last."""
    ratios = res["ratios"]
    head = ["group", "channels", "params", "MACs"] + [f"r={r:g}" for r in ratios]
    rows = [head]
    acc_rows = [["group"] + [f"r={r:g}" for r in ratios]]
    skipped = []
    for g in res["groups"]:
        if not g["points"]:
            skipped.append(f"  {g['group']} ({', '.join(g['layers'][:3])}): {g['skipped'] or 'nothing to prune'}")
            continue
        unit = " heads" if g.get("kind") == "heads" else (f"x{g['width']}" if g.get("width", 1) > 1 else "")
        rows.append([g["group"], f"{g['channels']}{unit}", f"{g['params_share']:.1%}", f"{g['macs_share']:.1%}"]
                    + [f"{p['cosine']:.4f} ({p['kept']})" for p in g["points"]])
        if res.get("accuracy") is not None:
            acc_rows.append([g["group"]] + [f"{p['accuracy']:.2f}" for p in g["points"]])
    refit = " (after refitting its readers)" if res.get("refit") else ""
    lines = [f"sensitivity of {res.get('model', 'model')}: {res['samples']} calibration samples, "
             f"importance {res['importance']}, round-to {res['round_to']}, "
             + ("readers refit" if res.get("refit") else "no refit"),
             f"parameters {res['params']:,}, MACs/sample {res['macs']:,}", "",
             f"output cosine to the original when only that group is pruned at ratio r{refit} "
             "(channels kept after rounding in parentheses):"]
    lines.append(_table(rows))
    if res.get("accuracy") is not None:
        lines += ["", f"accuracy (%) when only that group is pruned (original {res['accuracy']:.2f}%):",
                  _table(acc_rows)]
    for g in res["groups"]:
        if g["points"]:
            names = ", ".join(g["layers"][:4]) + (" ..." if len(g["layers"]) > 4 else "")
            lines.append(f"  {g['group']}: {names}")
    if skipped:
        lines += ["", "left whole:"] + skipped
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def write_json(res: dict[str, Any], path: str | Path) -> None:
    """Standard JSON (non-finite numbers as null); ``-`` is standard output."""
    from onnxslim.report import strict_json

    text = json.dumps(strict_json(res), indent=2, allow_nan=False)
    if str(path) == "-":
        print(text)
    else:
        Path(path).write_text(text)
