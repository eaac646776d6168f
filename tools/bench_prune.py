"""Pruning benchmark: the acceptance tables of the pruning issue, measured in one run.

    python tools/bench_prune.py            # everything (a few minutes on 2 busy cores)
    python tools/bench_prune.py --tables 1,3,4 --rounds 5   # quicker (no target table)

Tables (markdown):
  1. digits CNN at 0.3 / 0.5 and digits MLP at 0.5, with and without refit: params, MACs, size,
     test accuracy (models/digits_test.npz, never seen by training or refit) and cosine to the original.
  2. --prune-target params=0.5 against uniform --prune-ratio at the nearest parameter counts (the uniform
     row with at least as many parameters is the fair opponent), per --round-to.
  3. Latency (onnxruntime, 1 thread, batch 1 and 64) of the digits CNN and the ResNet-like model pruned by
     0.3 for several --round-to, against the original after lossless cleanup (BN folded: the fair
     baseline). Models are timed interleaved in rounds; each number is the best round's median.
  4. Every structure model pruned at 0.3: channels per group or the reason a group was left whole.
  5. The refit's ridge, fixed 0.01 against cross-validated: held-out and test accuracy, test cosine.
  6. CPU seconds per prune stage on the structure models (trace, select, rewrite, refit).

All pruning goes through onnxslim.api.optimize with --passes lossless,prune, as a user would run it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim import prune as ch  # noqa: E402
from onnxslim.api import optimize  # noqa: E402
from onnxslim.runtime import make_session  # noqa: E402

MODELS = ROOT / "models"
CALIB = str(MODELS / "digits_calib.npz")
STRUCT = ["struct_resnet", "struct_mobilenetv2", "struct_unet", "struct_transformer", "struct_detector", "struct_ops"]


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / f"{name}.onnx"))


def prune(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    out, rep = optimize(model, None, passes="lossless,prune", validate=False, latency=False,
                        options={"latency": False, **options})
    return out, rep.extra["prune"]


class Digits:
    def __init__(self) -> None:
        t = np.load(MODELS / "digits_test.npz")
        self.x, self.y = {"input": t["input"]}, t["labels"]

    def logits(self, model: onnx.ModelProto) -> np.ndarray:
        return make_session(model).run(None, self.x)[0]

    def acc(self, model: onnx.ModelProto) -> float:
        return float((self.logits(model).argmax(1) == self.y).mean() * 100)

    def cos(self, model: onnx.ModelProto, ref: np.ndarray) -> float:
        o = self.logits(model)
        return float(np.mean(np.sum(o * ref, 1) / np.linalg.norm(o, axis=1) / np.linalg.norm(ref, axis=1)))


def md(rows: list[list[str]]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows[1:]])


def pct(before: float, after: float) -> str:
    return f"{(after / before - 1) * 100:+.1f}%"


def table_accuracy(d: Digits) -> str:
    rows = [["model", "ratio", "refit", "params", "MACs", "size", "test acc", "Δ acc", "cosine", "criterion"]]
    cases = [("digits_cnn", 0.3, "Δ ≥ -1.0, params & MACs ≤ -40%"), ("digits_cnn", 0.5, "Δ ≥ -3.0"),
             ("digits_mlp", 0.5, "Δ ≥ -1.0")]
    for name, ratio, crit in cases:
        model = load(name)
        ref, acc0 = d.logits(model), d.acc(model)
        for refit in (True, False):
            out, rep = prune(model, prune_ratio=ratio, calib=CALIB, prune_refit=refit)
            acc = d.acc(out)
            p, m = rep["params"], rep["macs"]
            ok = "-"
            if refit:
                lim = -1.0 if "-1.0" in crit else -3.0
                ok = acc - acc0 >= lim
                if "40%" in crit:
                    ok = ok and p["after"] <= 0.6 * p["before"] and m["after"] <= 0.6 * m["before"]
                ok = ("PASS " if ok else "FAIL ") + crit
            rows.append([name, f"{ratio:g}", "yes" if refit else "no",
                         f"{p['before']:,} → {p['after']:,} ({pct(p['before'], p['after'])})",
                         f"{pct(m['before'], m['after'])}", f"{rep['size']['after'] / 1024:.0f} KB",
                         f"{acc0:.2f} → {acc:.2f}", f"{acc - acc0:+.2f}", f"{d.cos(out, ref):.4f}", ok])
    return md(rows)


def table_target(d: Digits, round_tos: list[int]) -> str:
    rows = [["model", "round-to", "how", "ratios", "params", "test acc", "cosine"]]
    for name in ("digits_cnn", "digits_mlp"):
        model = load(name)
        ref = d.logits(model)
        for rt in round_tos:
            out, rep = prune(model, prune_target="params=0.5", calib=CALIB, round_to=rt)
            pt = rep["params"]["after"]
            rat = ", ".join(f"{v:g}" for v in rep["ratios"].values())
            rows.append([name, str(rt), "**target params=0.5**", rat, f"{pt:,}", f"{d.acc(out):.2f}",
                         f"{d.cos(out, ref):.5f}"])
            # Neighbours by parameter count, found on the cost model (no pruning needed), then pruned for real.
            clean, _ = optimize(model, None, passes="lossless", validate=False, latency=False)
            an = ch.analyze(ch.traced_graph(clean))
            imp = ch.importance(an)
            above = below = None
            for r in np.arange(0.01, 0.96, 0.01):
                n = ch.cost(an, ch.plan(an, float(r), imp, round_to=rt)).params
                if n >= pt:
                    above = float(r)
                else:
                    below = float(r)
                    break
            above = None if above is None else (above, *_uniform(model, above, rt))
            below = None if below is None else (below, *_uniform(model, below, rt))
            for tag, item in (("uniform, ≥ params", above), ("uniform, < params", below)):
                if item is not None:
                    r, o2, n = item
                    rows.append([name, str(rt), tag, f"{r:.2f}", f"{n:,}", f"{d.acc(o2):.2f}", f"{d.cos(o2, ref):.5f}"])
    return md(rows)


def _uniform(model: onnx.ModelProto, ratio: float, rt: int) -> tuple[onnx.ModelProto, int]:
    out, rep = prune(model, prune_ratio=ratio, calib=CALIB, round_to=rt)
    return out, rep["params"]["after"]


def timed(models: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], rounds: int, runs: int) -> dict[str, float]:
    sessions = {k: make_session(m, threads=1) for k, m in models.items()}
    for s in sessions.values():
        s.run(None, feeds)
    best = {k: float("inf") for k in sessions}
    for rnd in range(rounds + 1):  # round 0 warms caches and allocators and is not counted
        for k, s in sessions.items():
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, feeds)
                ts.append(time.perf_counter() - t0)
            if rnd:
                best[k] = min(best[k], float(np.median(ts)))
    return best


def table_latency(round_tos: list[int], rounds: int) -> str:
    rows = [["model", "variant", "channels", "params", "b1 ms", "b1 ratio", "b64 ms", "b64 ratio"]]
    for name in ("digits_cnn", "struct_resnet"):
        model = load(name)
        base, _ = optimize(model, None, passes="lossless", validate=False, latency=False)
        variants = {"original (lossless)": (base, "", ch.cost(ch.analyze(ch.traced_graph(base))).params)}
        for rt in round_tos:
            out, rep = prune(model, prune_ratio=0.3, round_to=rt)
            counts = sorted({f"{g['channels']}→{g['kept']}" for g in rep["groups"] if not g["skipped"]})
            tag = f"prune 0.3, round-to {rt}" + (" (default)" if rt == ch.DEFAULT_ROUND_TO else "")
            variants[tag] = (out, " ".join(counts), rep["params"]["after"])
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        res = {}
        for b, runs in ((1, 30), (64, 5)):
            rng = np.random.default_rng(0)
            x = {model.graph.input[0].name: rng.standard_normal([b] + shape[1:]).astype(np.float32)}
            res[b] = timed({k: v[0] for k, v in variants.items()}, x, rounds, runs)
        b1, b64 = res[1]["original (lossless)"], res[64]["original (lossless)"]
        for k, (_, counts, params) in variants.items():
            rows.append([name, k, counts, f"{params:,}", f"{res[1][k] * 1e3:.3f}", f"{res[1][k] / b1:.2f}x",
                         f"{res[64][k] * 1e3:.3f}", f"{res[64][k] / b64:.2f}x"])
    return md(rows)


def table_structure() -> str:
    rows = [["model", "group", "layers", "channels", "after 0.3 / reason left whole"]]
    for name in STRUCT:
        model = load(name)
        out, rep = prune(model, prune_ratio=0.3)
        onnx.checker.check_model(out, full_check=True)
        for g in rep["groups"]:
            layers = ", ".join(g["layers"][:3]) + (" …" if len(g["layers"]) > 3 else "")
            rows.append([name, g["group"], layers, str(g["channels"]), g["skipped"] or str(g["kept"])])
        p = rep["params"]
        rows.append([name, "total", "", "", f"params {p['before']:,} → {p['after']:,}; checker OK"])
    return md(rows)


def table_ridge(d: Digits) -> str:
    """The refit's ridge: the old fixed 0.01 against the default (cross-validated where rows are few),
    on the digits models with 400 or 64 calibration samples (the tool holds 20% out), and on a random
    Gemm-Relu-Gemm whose classifier sees 160 rows for 129 inputs (where an exact fit overfits)."""
    from onnxslim.calibration import CalibrationData, split_holdout

    calib = np.load(CALIB)
    rows = [["model", "calib", "ratio", "ridge", "held-out acc", "test acc", "test cosine", "refit CPU s"]]
    for size in (400, 64):
        _, hold = split_holdout(CalibrationData({"input": calib["input"][:size]}, calib["labels"][:size]), 0.2)
        for name in ("digits_mlp", "digits_cnn"):
            model = load(name)
            ref = d.logits(model)
            for ratio in (0.3, 0.5):
                for ridge in (0.01, None):
                    out, rep = prune(model, prune_ratio=ratio, calib=CALIB, calib_size=size, prune_ridge=ridge)
                    held = make_session(out).run(None, hold.inputs)[0].argmax(1) == hold.labels
                    chosen = ",".join("keep" if f.get("skipped") else f"{f['ridge']:g}" for f in rep["refit_layers"])
                    rows.append([name, str(size), f"{ratio:g}", "0.01 (fixed)" if ridge else f"CV: {chosen}",
                                 f"{held.mean() * 100:.2f}%", f"{d.acc(out):.2f}%", f"{d.cos(out, ref):.4f}",
                                 f"{rep['cpu_seconds']['refit']:.1f}"])
    return md(rows)


def table_stages() -> str:
    """CPU seconds per prune stage (--calib random, 64 samples, ratio 0.3)."""
    rows = [["model", "params kept", "trace", "select", "rewrite", "refit", "total"]]
    for name in STRUCT:
        out, rep = prune(load(name), prune_ratio=0.3, calib="random", calib_size=64)
        c = rep["cpu_seconds"]
        rows.append([name, f"{rep['params']['after'] / rep['params']['before']:.0%}"]
                    + [f"{c.get(k, 0.0):.2f}" for k in ("trace", "select", "rewrite", "refit")]
                    + [f"{sum(c.values()):.2f}"])
    return md(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (interleaved)")
    ap.add_argument("--tables", default="1,2,3,4,5,6", help="which tables to print (comma-separated numbers)")
    args = ap.parse_args(argv)
    want = {int(t) for t in args.tables.split(",") if t.strip()}
    d = Digits()
    print(f"default --round-to on this machine: {ch.DEFAULT_ROUND_TO}\n")
    if 1 in want:
        print("## 1. Accuracy (digits, default round-to, lossless,prune with --calib models/digits_calib.npz)\n")
        print(table_accuracy(d) + "\n", flush=True)
    if 2 in want:
        print("## 2. --prune-target params=0.5 vs uniform --prune-ratio (with refit)\n")
        print(table_target(d, [1, 8, ch.DEFAULT_ROUND_TO]) + "\n", flush=True)
    if 3 in want:
        print("## 3. Latency (onnxruntime CPU, 1 thread)\n")
        print(table_latency(sorted({1, 8, ch.DEFAULT_ROUND_TO}), args.rounds) + "\n", flush=True)
    if 4 in want:
        print("## 4. Structure models at --prune-ratio 0.3 (no calibration, no refit)\n")
        print(table_structure() + "\n", flush=True)
    if 5 in want:
        print("## 5. Refit ridge: fixed 0.01 vs cross-validated (default)\n")
        print(table_ridge(d) + "\n", flush=True)
    if 6 in want:
        print("## 6. CPU seconds per prune stage\n")
        print(table_stages())


if __name__ == "__main__":
    main()
