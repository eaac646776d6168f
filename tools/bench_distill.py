"""Distillation benchmark: the digits-CNN rows of issue 11's goal table, measured in one run.

    python tools/bench_distill.py                 # all rows (a few minutes on 2 busy cores)
    python tools/bench_distill.py --rows 2 --steps 600

Every row is one pipeline through onnxslim.api.optimize, as the CLI runs it (`--calib
models/digits_calib.npz`, validated on models/digits_test.npz, which neither pruning nor distillation saw):

  1. lossless,prune          --prune-ratio 0.7                    (least-squares refit only)
  2. lossless,prune,distill  --prune-ratio 0.7                    (goal: <= 1 point drop, weights <= 0.15x,
                                                                   batch-64 latency <= 0.5x)
  3. lossless,prune,distill  --prune-ratio 0.5 --no-prune-refit   (the test's case: no refit at all)
  4. lossless,prune,distill,quantize-static --prune-ratio 0.7      (the headline pipeline, on this small CNN)

Columns: test accuracy and its drop in points, weight bytes (initializers) and latency (onnxruntime, 1
thread, batch 1 and 64, paired alternating runs against the original file in one process: the median of
run-by-run ratios), the distill pass's held-out loss / top-1 agreement before -> after, and the wall time
of the whole run and of the distill pass. The CPU and load average are printed with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim.api import optimize  # noqa: E402
from onnxslim.runtime import make_session, paired_latency  # noqa: E402

MODELS = ROOT / "models"
CALIB = str(MODELS / "digits_calib.npz")
TEST = MODELS / "digits_test.npz"
ROWS = {
    1: ("lossless,prune", {"prune_ratio": 0.7}),
    2: ("lossless,prune,distill", {"prune_ratio": 0.7}),
    3: ("lossless,prune,distill", {"prune_ratio": 0.5, "prune_refit": False}),
    4: ("lossless,prune,distill,quantize-static", {"prune_ratio": 0.7}),
}


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def weight_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in m.graph.initializer)


def accuracy(m: onnx.ModelProto) -> float:
    d = np.load(TEST)
    return float((make_session(m, threads=1).run(None, {"input": d["input"]})[0].argmax(1) == d["labels"]).mean() * 100)


def latency_ratio(a: onnx.ModelProto, b: onnx.ModelProto, batch: int, repeats: int) -> float:
    x = {"input": np.random.default_rng(0).standard_normal((batch, 1, 8, 8)).astype(np.float32)}
    sa, sb = make_session(a, threads=1), make_session(b, threads=1)
    return float(np.median([paired_latency(sa, sb, x, seconds=1.0)[2] for _ in range(repeats)]))


def md(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=None, help="--distill-steps (default: the pass's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="paired latency measurements per ratio")
    args = ap.parse_args(argv)
    original = onnx.load(str(MODELS / "digits_cnn.onnx"))
    base_acc = accuracy(original)
    header = ["pipeline", "options", "test acc", "drop (pts)", "weights", "latency b1", "latency b64",
              "held-out loss", "top-1 agree", "distill s", "run s"]
    rows = [header, ["original", "", f"{base_acc:.2f}%", "", f"{weight_bytes(original) / 1024:.0f} KB", "1.00x",
                     "1.00x", "", "", "", ""]]
    for r in [int(v) for v in args.rows.split(",")]:
        passes, extra = ROWS[r]
        opts = {"calib": CALIB, "latency": False, "distill_seed": args.seed, **extra}
        if args.steps:
            opts["distill_steps"] = args.steps
        t0 = time.perf_counter()
        out, rep = optimize(str(MODELS / "digits_cnn.onnx"), None, passes=passes, inputs=str(TEST), force=True,
                            latency=False, options=opts)
        run_s = time.perf_counter() - t0
        acc = accuracy(out)
        d = rep.extra.get("distill")
        dist_s = next((p["seconds"] for p in rep.passes if p["name"] == "distill"), None)
        shown = " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--no-{k.replace('_', '-')}"
                         for k, v in extra.items())
        rows.append([passes, shown, f"{acc:.2f}%", f"{base_acc - acc:.2f}",
                     f"{weight_bytes(out) / weight_bytes(original):.3f}x",
                     f"{latency_ratio(original, out, 1, args.repeats):.2f}x",
                     f"{latency_ratio(original, out, 64, args.repeats):.2f}x",
                     f"{d['before']['loss']:.3g} -> {d['after']['loss']:.3g}" if d else "",
                     f"{d['before']['top1']:.1%} -> {d['after']['top1']:.1%}" if d else "",
                     f"{dist_s:.1f} ({d['steps']} steps, {d['stopped']})" if d else "", f"{run_s:.1f}"])
        print(f"row {r} done in {run_s:.1f} s", file=sys.stderr)
    print(md(rows))
    print(f"\nCPU: {cpu()}; load average {os.getloadavg()[0]:.1f} at the end; torch threads 1, onnxruntime 1 thread.")


if __name__ == "__main__":
    main()
