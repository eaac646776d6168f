"""prune: structured channel pruning with dependency groups, adaptive ratios and least-squares refit.

1. Trace channel dependencies (onnxslim.prune: tracing, grouping): groups of layers whose output channels must be
   removed together, the rewrites each removal needs, and the groups that must stay whole (why).
   In transformer encoders each attention layer is one group of whole heads (onnxslim.prune.attention:
   the same heads leave Q, K and V, the reshape head counts are rewritten, the output projection loses
   the heads' input rows and is refit); FFN units are ordinary channel groups. ``--prune-scope`` limits a
   run to heads or to channels; heads are never rounded by --round-to (at least one stays per layer).
2. Rank each group's channels by weight norm (L1/L2, times the scale of a following BatchNorm),
   summed over the group's layers; keep ``1 - ratio`` of them, rounded to multiples of --round-to.
   ``--prune-target params=F|macs=F`` instead picks one ratio per group from a sensitivity analysis
   on the calibration data (onnxslim.prune.sensitivity) to remove that fraction with the least drift;
   ``--prune-allocate predicted`` keeps --prune-ratio's parameter budget but spreads it over the groups by
   the refit's closed-form predicted error (no extra model runs).
3. Rewrite weights, biases, norms, per-channel constants, Split/Slice/Reshape/Resize parameters.
4. With calibration data, refit every layer that lost inputs by least squares against the original
   model's outputs (onnxslim.prune.refit); ``--no-prune-refit`` turns it off. Layers with few rows per input
   get their ridge by cross-validation over the calibration samples (or keep the pruned weights).
   On encoders (calibration with an attention mask) the MatMul/Gemm readers downstream of a refit layer are
   refit too, to their original outputs (the stream they read has drifted).

Graph inputs and outputs never change shape. The report (``report.extra["prune"]``) gives params, MACs,
size and latency before/after, the refit errors, and per group the channels kept or why it was skipped.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import ModelProto

from onnxslim import prune as ch
from onnxslim.errors import InputError
from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.options import option
from onnxslim.runtime import latency_table
from onnxslim.validate import latency_feeds


SCOPES = ("all", "heads", "channels")


@dataclass(frozen=True)
class PruneOptions:
    prune_ratio: float | None = option(None, "Fraction of channels removed per group.", min=0.0, max=0.95)
    prune_target: str | None = option(None, "Global target instead of a ratio: params=0.5 or macs=0.5 "
                                             "(fraction removed).")
    prune_importance: str | None = option(None, "Channel ranking: weight norm l1/l2, or recon (what the refit can "
                                                "rebuild; default with --calib).", choices=("l1", "l2", "recon"))
    round_to: int = option(ch.DEFAULT_ROUND_TO, "Keep channel counts multiples of N (default: onnxruntime's conv "
                                                "block on this CPU, 16 with AVX-512, else 8).", min=1)
    prune_min_channels: int = option(1, "Minimum channels kept per layer.", min=1)
    prune_refit: bool | None = option(None, "Least-squares refit of consumers on --calib (default on with --calib).",
                                      cli="--prune-refit/--no-prune-refit")
    prune_scope: str = option("all", "What a ratio prunes: all groups, only attention heads (whole heads of Q/K/V "
                                     "and the output projection's rows), or only channels (FFN units, conv/linear "
                                     "channels).", choices=SCOPES)
    prune_head_ratio: float | None = option(None, "Fraction of attention heads removed per layer (default: "
                                                  "--prune-ratio).", min=0.0, max=0.95)
    prune_allocate: str = option("uniform", "Per-group ratios of --prune-ratio: uniform, or predicted (the same "
                                            "parameter budget spread over the groups by the refit's predicted "
                                            "error; needs --calib).", choices=("uniform", "predicted"))
    prune_ridge: float | None = option(None, "Ridge strength of the refit, relative to the mean input energy "
                                             "(default: 0.01 for layers with many rows per input, else chosen "
                                             "by cross-validation over the calibration samples).", min=0.0)

    def __post_init__(self) -> None:
        if self.prune_target is not None:
            parse_target(self.prune_target)
        if self.prune_ratio is not None and self.prune_target is not None:
            raise InputError("prune: give either --prune-ratio or --prune-target, not both")
        if self.prune_head_ratio is not None and self.prune_ratio is None:
            raise InputError("prune: --prune-head-ratio needs --prune-ratio (the ratio of the other groups)")



def parse_target(spec: str) -> tuple[str, float]:
    """``params=0.5`` / ``macs=0.5``: the fraction of parameters or MACs to remove."""
    kind, sep, value = spec.partition("=")
    kind = kind.strip().lower()
    try:
        frac = float(value)
    except ValueError:
        frac = -1.0
    if not sep or kind not in ("params", "macs") or not 0.0 < frac < 1.0:
        raise InputError(f"--prune-target '{spec}': expected params=F or macs=F with 0 < F < 1 (fraction removed)")
    return kind, frac


@register
class Prune(Pass):
    name = "prune"
    description = ("Structured channel pruning (--prune-ratio R or --prune-target params=F|macs=F) with "
                   "dependency groups and a least-squares refit on --calib data")
    lossless = False
    level = "model"
    Options = PruneOptions

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        from onnxslim.prune.sensitivity import allocate, measure

        o: PruneOptions = self.options
        ratio, target = o.prune_ratio, o.prune_target
        if ratio is None and target is None:
            raise InputError("prune: give --prune-ratio R (fraction of channels removed per group) "
                             "or --prune-target params=F|macs=F")
        s = {"importance": o.prune_importance, "round_to": o.round_to, "min_channels": o.prune_min_channels}
        calib = ctx.calibration(model)
        if calib is not None and not calib.measured:
            calib_note = "random calibration data: the refit fits noise, accuracy is not measured"
            ctx.warn(f"prune: {calib_note}")
        refit = o.prune_refit
        refit = calib is not None if refit is None else bool(refit)
        if refit and calib is None:
            raise InputError("prune: --prune-refit needs calibration data (--calib FILE.npz)")

        # With calibration data the channels go by what the refit can rebuild (ReconSelector); the
        # weight norms rank them otherwise, and always for counting (allocation) and fallbacks.
        importance = s["importance"] or ("recon" if refit else "l1")
        if importance == "recon" and calib is None:
            raise InputError("prune: --prune-importance recon needs calibration data (--calib)")
        report: dict[str, Any] = {"importance": importance, "scope": o.prune_scope, "round_to": s["round_to"],
                                  "min_channels": s["min_channels"], "refit": refit}
        timed = _Stages(report)
        ctx.progress("prune: tracing channels")
        with timed("trace"):
            an = ch.analyze(ch.traced_graph(model))
            _limit_scope(an, o.prune_scope)
            imp = ch.importance(an, "l2" if importance == "l2" else "l1")
        select = None
        if importance == "recon":
            from onnxslim.prune.refit import ReconSelector

            with timed("select"):
                select = ReconSelector(an, model, calib, imp, batch=calib.batch_size, progress=ctx.progress)
        if target is not None:
            kind, frac = parse_target(target)
            if calib is None:
                raise InputError("prune: --prune-target needs calibration data for its sensitivity analysis (--calib)")
            ctx.progress("prune: sensitivity analysis")
            with timed("sensitivity"):
                sens = measure(model, calib, an=an, imp=imp, round_to=s["round_to"], min_channels=s["min_channels"],
                               refit=refit, select=select, importance=importance, progress=ctx.progress)
            ratios, reached = allocate(sens, an, imp, kind, frac, round_to=s["round_to"],
                                       min_channels=s["min_channels"])
            report["target"] = {"kind": kind, "fraction": frac, "reached": reached}
            if reached + 1e-9 < frac:
                ctx.warn(f"prune: --prune-target {kind}={frac:g} not reachable; removed {reached:.1%} "
                         "(groups that must stay whole limit it)")
        else:
            heads = ratio if o.prune_head_ratio is None else o.prune_head_ratio
            ratios = {g.id: float(heads if g.kind == "heads" else ratio) for g in an.groups if g.prunable}
            if o.prune_allocate == "predicted":
                from onnxslim.prune.sensitivity import allocate_predicted

                if select is None:
                    raise InputError("prune: --prune-allocate predicted needs --calib and the recon importance")
                with timed("select"):
                    ratios, report["allocation"] = allocate_predicted(select, an, imp, ratios, round_to=s["round_to"],
                                                                      min_channels=s["min_channels"])
        report["ratios"] = ratios
        with timed("select"):
            keep = ch.plan(an, ratios, imp, round_to=s["round_to"], min_channels=s["min_channels"], select=select)
        before, after = ch.cost(an), ch.cost(an, keep)
        report["groups"] = ch.group_table(an, keep)
        report["params"] = {"before": before.params, "after": after.params}
        report["macs"] = {"before": before.macs, "after": after.macs}
        if keep.all():
            report["summary"] = _summary(report)
            return PassResult(False, stats={"channels_removed": 0}, notes=["no channel removed"], details=report)

        ctx.progress("prune: rewriting")
        with timed("rewrite"):
            graph, nodes = ch.pruned_copy(an, keep)
        if refit:
            from onnxslim.prune.refit import refit_layers

            with timed("refit"):
                fits = refit_layers(graph, nodes, an, keep, model, model, calib, batch=calib.batch_size,
                                    ridge=o.prune_ridge, progress=ctx.progress)
            report["refit_layers"] = [f.to_dict() for f in fits]
        with timed("rewrite"):
            out = ch.export(graph, model)
        report["size"] = {"before": model.ByteSize(), "after": out.ByteSize()}
        if ctx.run.latency is not False:
            ctx.progress("prune: latency")
            with timed("latency"):
                report["latency"] = latency_table(model, out, latency_feeds(model, ctx.input_shapes, ctx.inputs),
                                                  custom_op_library=ctx.custom_op_library)
        removed = int((~keep).sum())
        report["summary"] = _summary(report)
        stats = {"channels_removed": removed,
                 "groups_pruned": sum(1 for r in report["groups"] if r["kept"] < r["channels"]),
                 "groups_skipped": sum(1 for r in report["groups"] if r["skipped"])}
        return PassResult(True, stats=stats, model=out, details=report,
                          notes=[f"params {before.params:,} -> {after.params:,}, "
                                 f"MACs {before.macs:,} -> {after.macs:,}"])


def _limit_scope(an: ch.Analysis, scope: str) -> None:
    """Groups outside --prune-scope stay whole (a reason like any other: the report names it)."""
    if scope == "all":
        return
    for g in an.groups:
        if g.prunable and (g.kind == "heads") != (scope == "heads"):
            g.reasons.append(f"outside --prune-scope {scope}")


class _Stages:
    """Wall and CPU seconds per stage, summed into ``report["seconds"]`` / ``report["cpu_seconds"]``
    (CPU time as well: on a loaded machine wall time says more about the neighbours than about us)."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.wall = report.setdefault("seconds", {})
        self.cpu = report.setdefault("cpu_seconds", {})

    @contextmanager
    def __call__(self, stage: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = round(self.wall.get(stage, 0.0) + time.perf_counter() - w, 3)
            self.cpu[stage] = round(self.cpu.get(stage, 0.0) + time.process_time() - c, 3)


def _pct(b: float, a: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%" if b else "-"


def _summary(r: dict[str, Any]) -> list[str]:
    """The report's text lines: totals, then one line per group."""
    lines = ["prune: " + ", ".join(f"{k} {r[k]['before']:,} -> {r[k]['after']:,} "
                                   f"({_pct(r[k]['before'], r[k]['after'])})" for k in ("params", "macs") if k in r)]
    if "size" in r:
        lines.append(f"prune: size {r['size']['before']:,} -> {r['size']['after']:,} bytes")
    # The pass's own latency stays in the JSON (details.latency); the printed report shows one latency per
    # batch size, the final table's, so that two measurements of the same model never disagree on screen.
    if r.get("seconds"):
        lines.append("prune: seconds " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
                     + " (CPU " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("cpu_seconds", {}).items()) + ")")
    if r.get("refit_layers"):
        done = [f for f in r["refit_layers"] if not f.get("skipped")]
        if done:
            eb = np.mean([f["error_before"] for f in done])
            ea = np.mean([f["error_after"] for f in done])
            lines.append(f"prune: refit {len(done)} layer(s), mean relative error {eb:.4f} -> {ea:.4f}")
    width = max((len(g["group"]) for g in r.get("groups", [])), default=2)
    for g in r.get("groups", []):
        layers = ", ".join(g["layers"][:3]) + (f" (+{len(g['layers']) - 3})" if len(g["layers"]) > 3 else "")
        unit = " heads" if g.get("kind") == "heads" else (f" groups of {g['width']}" if g.get("width", 1) > 1 else "")
        state = f"skipped: {g['skipped']}" if g["skipped"] else f"{g['channels']} -> {g['kept']}{unit}"
        lines.append(f"  {g['group']:<{width}}  {state}  [{layers}]")
    return lines
