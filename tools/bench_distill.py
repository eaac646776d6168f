"""Distillation benchmark: the rows of issue 11's goal table, measured in one run each.

    python tools/bench_distill.py                 # the digits rows (a few minutes on 2 busy cores)
    python tools/bench_distill.py --rows 5,6,7 --steps 800 --distill-time 900   # the PP-OCR cls rows
    python tools/bench_distill.py --rows 2 --steps 600

Every row is one pipeline through onnxslim.api.optimize, as the CLI runs it (`--calib FILE`, validated with
`--inputs TEST`, which neither pruning nor distillation saw). Digits CNN (models/digits_cnn.onnx, calibration
models/digits_calib.npz with labels, test models/digits_test.npz):

  1. lossless,prune          --prune-ratio 0.7                    (least-squares refit only)
  2. lossless,prune,distill  --prune-ratio 0.7                    (goal: <= 1 point drop, weights <= 0.15x,
                                                                   batch-64 latency <= 0.5x)
  3. lossless,prune,distill  --prune-ratio 0.5 --no-prune-refit   (the test's case: no refit at all)
  4. lossless,prune,distill,quantize-static --prune-ratio 0.7      (the headline pipeline, on this small CNN)

PP-OCR text-direction classifier (ch_ppocr_mobile_v2.0_cls_infer.onnx from the rapidocr-onnxruntime wheel: a
MobileNetV3 with depthwise convolutions and squeeze-excitation), on a task labelled by construction: text
lines rendered with PIL (random letters/digits, the DejaVu fonts or PIL's own, random size, colours and
noise), rotated by 180 degrees for label 1, pre-processed as PaddleOCR does (height 48, width padded to 192,
[-1, 1], BGR). The calibration file has the images only (no labels: distillation learns from the teacher);
the test file has other images with their labels:

  5. lossless,prune,distill  --prune-ratio 0.5       (goal: >= 98% agreement, <= 1 point drop, batch-1
                                                      latency <= 0.6x)
  6. lossless,prune,distill,quantize-static --prune-ratio 0.5   (the headline: >= 4x smaller file, >= 2x
                                                      faster at batch 1, <= 1 point drop, >= 98% agreement)
  7. the same with --objective size                  (INT8 kept for its size when it is not faster)
  8. lossless,prune,distill,quantize-static,compact-names --prune-ratio 0.6   (the headline with short internal names)

Recipe mode (``--recipe``): the distillation engine alone on the PP-OCR cls model pruned once (0.5, refit;
cached in ``--workdir``), with DistillConfig fields overridden, so that recipe changes are compared on the same
student without re-pruning each time (3-5 minutes on a busy machine):

    python tools/bench_distill.py --recipe steps=150,lr=0.001,augment=false --cls-calib 2000 --workdir /tmp/bd
    python tools/bench_distill.py --recipe steps=600 --cls-calib 4000 --prune-calib 2000 --workdir /tmp/bd

It prints one JSON line: test agreement and accuracy before/after, held-out loss, steps and seconds.

Columns: test accuracy and its drop in points, agreement of the top-1 class with the original on the test
set, file size and weight bytes (initializers) relative to the original, latency (onnxruntime, 1 thread,
batch 1 and 64, paired alternating runs against the original file in one process: the median of run-by-run
ratios), the distill pass's held-out loss / top-1 agreement before -> after, the stage quantize-static left
(INT8 or float, and why), and the wall time of the whole run and of the distill pass. The CPU and load
average are printed with the table.
"""

from __future__ import annotations

import argparse
import glob
import os
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim.api import optimize  # noqa: E402
from onnxslim.errors import GateError  # noqa: E402
from onnxslim.runtime import make_session, paired_latency  # noqa: E402

MODELS = ROOT / "models"


@dataclass
class Subject:
    """A model with its calibration and test files (the test file has 'labels')."""

    name: str
    model: Path
    calib: Path
    test: Path
    input: str
    shape: tuple[int, ...]  # one sample


@dataclass
class Row:
    subject: str
    passes: str
    extra: dict[str, Any] = field(default_factory=dict)
    goal: str = ""


HEADLINE = "file <= 0.25x, b1 latency <= 0.5x, drop <= 1 pt, agreement >= 98%"
ROWS = {
    1: Row("digits", "lossless,prune", {"prune_ratio": 0.7}),
    2: Row("digits", "lossless,prune,distill", {"prune_ratio": 0.7},
           "drop <= 1 pt, weights <= 0.15x, b64 latency <= 0.5x"),
    3: Row("digits", "lossless,prune,distill", {"prune_ratio": 0.5, "prune_refit": False}),
    4: Row("digits", "lossless,prune,distill,quantize-static", {"prune_ratio": 0.7}),
    5: Row("cls", "lossless,prune,distill", {"prune_ratio": 0.5},
           "agreement >= 98%, drop <= 1 pt, b1 latency <= 0.6x"),
    6: Row("cls", "lossless,prune,distill,quantize-static", {"prune_ratio": 0.5},
           HEADLINE),
    7: Row("cls", "lossless,prune,distill,quantize-static", {"prune_ratio": 0.5, "objective": "size"},
           HEADLINE),
    # The headline at 0.6 with internal names shortened (graph inputs/outputs keep theirs): on this 44 K-parameter
    # model the names are a tenth of the file.
    8: Row("cls", "lossless,prune,distill,quantize-static,compact-names", {"prune_ratio": 0.6},
           HEADLINE),
}


# ------------------------------------------------------------------------ PP-OCR cls: rendered text lines

TEXT = string.ascii_letters + string.digits + "  .,:-()"


def _text_line(rng: np.random.Generator, fonts: list[str]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    txt = "".join(rng.choice(list(TEXT), int(rng.integers(4, 25)))).strip() or "text"
    size = int(rng.integers(18, 40))
    font = (ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size) if fonts
            else ImageFont.load_default(size))
    left, top, right, bottom = font.getbbox(txt)
    pad = rng.integers(2, 10, 4)
    bg, fg = int(rng.integers(170, 256)), int(rng.integers(0, 90))
    jitter = lambda v, d: tuple(int(np.clip(v + rng.integers(-d, d + 1), 0, 255)) for _ in range(3))  # noqa: E731
    im = Image.new("RGB", (right - left + pad[0] + pad[2], bottom - top + pad[1] + pad[3]), jitter(bg, 15))
    ImageDraw.Draw(im).text((pad[0] - left, pad[1] - top), txt, font=font, fill=jitter(fg, 20))
    a = np.asarray(im).astype(np.float32)
    a += rng.normal(0, rng.uniform(0, 8), a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def _ppocr_cls_input(a: np.ndarray) -> np.ndarray:
    """PaddleOCR's cls pre-processing: height 48 (aspect kept), width padded to 192, [-1, 1], BGR."""
    from PIL import Image

    h, w = a.shape[:2]
    nw = min(192, int(np.ceil(48 * w / h)))
    im = np.asarray(Image.fromarray(a).resize((nw, 48), Image.BILINEAR)).astype(np.float32)
    x = np.zeros((3, 48, 192), np.float32)
    x[:, :, :nw] = ((im / 255 - 0.5) / 0.5).transpose(2, 0, 1)[::-1]
    return x


def text_direction_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered text lines as [n, 3, 48, 192] cls inputs, and their labels (1: rotated 180 degrees)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        sys.exit("the PP-OCR cls rows render text with PIL: pip install pillow")
    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        a, y = _text_line(rng, fonts), int(rng.integers(2))
        if y:
            a = np.ascontiguousarray(a[::-1, ::-1])
        xs.append(_ppocr_cls_input(a))
        ys.append(y)
    return np.stack(xs), np.array(ys, np.int64)


def ppocr_cls_model() -> Path:
    try:
        import rapidocr_onnxruntime
    except ImportError:
        sys.exit("the PP-OCR cls rows need the model of the rapidocr-onnxruntime wheel: pip install -e \".[test]\"")
    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.exists():
        sys.exit(f"{path.name} is not in this rapidocr_onnxruntime wheel")
    return path


def subject(name: str, workdir: Path, calib_n: int, test_n: int) -> Subject:
    if name == "digits":
        return Subject("digits CNN", MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz",
                       MODELS / "digits_test.npz", "input", (1, 8, 8))
    calib, test = workdir / f"cls_calib{calib_n}.npz", workdir / f"cls_test{test_n}.npz"
    if not calib.exists():
        np.savez(calib, x=text_direction_task(calib_n, 11)[0])  # images only: no labels
    if not test.exists():
        x, y = text_direction_task(test_n, 1)
        np.savez(test, x=x, labels=y)
    return Subject("PP-OCR cls", ppocr_cls_model(), calib, test, "x", (3, 48, 192))


# ------------------------------------------------------------------------------------------- measures

def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def weight_bytes(m: onnx.ModelProto) -> int:
    """Initializers plus Constant-node tensors (the PP-OCR files keep their weights in Constant nodes)."""
    consts = [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(len(t.raw_data) or t.ByteSize() for t in list(m.graph.initializer) + consts)


def top1(m: onnx.ModelProto | str, s: Subject) -> np.ndarray:
    d = np.load(s.test)
    return make_session(m if isinstance(m, onnx.ModelProto) else str(m), threads=1).run(
        None, {s.input: d[s.input]})[0].argmax(1)


def latency_ratio(a: onnx.ModelProto, b: onnx.ModelProto, s: Subject, batch: int, repeats: int) -> float:
    x = {s.input: np.random.default_rng(0).standard_normal((batch, *s.shape)).astype(np.float32)}
    sa, sb = make_session(a, threads=1), make_session(b, threads=1)
    return float(np.median([paired_latency(sa, sb, x, seconds=1.0)[2] for _ in range(repeats)]))


def quant_state(rep: Any) -> str:
    """What quantize-static left: INT8 or float, and the first reason given."""
    q = rep.extra.get("quantize")
    if not q:
        return ""
    ops = q.get("quant_ops") or {}
    n_q = sum(v for k, v in ops.items() if k in ("QuantizeLinear", "QLinearConv", "ConvInteger"))
    kept = len(q.get("nodes_in_float") or [])
    state = f"INT8 ({q['config']})" if n_q else "float"
    if kept:
        state += f", {kept} node(s) in float"
    lat = q.get("latency") or {}
    b1 = lat.get("batch1", {}).get("ratio")
    if b1:
        state += f", INT8/float b1 {b1:.2f}x"
    # In a pipeline a stage that fails its own gate is undone: the written model is then its float input.
    dropped = next((st["dropped"] for st in rep.stages if st.get("name") == "quantize-static" and "dropped" in st), None)
    if dropped is not None:
        state = f"dropped ({dropped}); measured: {state}"
    return state


def md(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])


def shown(extra: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                    f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in extra.items())


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def recipe(spec: str, workdir: Path, calib_n: int, test_n: int, seed: int,
           prune_calib: int | None = None, prune_set: dict[str, Any] | None = None) -> dict[str, Any]:
    """The distill engine on the cached pruned PP-OCR cls model with the DistillConfig fields of ``spec``.

    The student is pruned once on ``prune_calib`` rendered lines (default ``calib_n``; the prune pass sees the
    fit part, 80%, as in the pipeline) and cached; distillation then trains on the fit part of ``calib_n``
    lines, so more unlabelled lines for distillation can be compared from the same start."""
    import json

    from onnxslim.distill.train import DistillConfig, distill
    from onnxslim.distill.writeback import write_back

    workdir.mkdir(parents=True, exist_ok=True)
    prune_calib = prune_calib or calib_n
    prune_set = prune_set or {}  # --set options for the prune (e.g. prune_allocate=predicted): another student
    tag = "".join(f"_{k}-{v}" for k, v in sorted(prune_set.items()))
    student_path = workdir / f"cls_pruned_0.5_calib{prune_calib}{tag}.onnx"
    if not student_path.exists():
        p = subject("cls", workdir, prune_calib, test_n)
        student, _ = optimize(str(p.model), None, passes="lossless,prune", validate=False, latency=False,
                              options={"prune_ratio": 0.5, "calib": str(p.calib), "latency": False, **prune_set})
        onnx.save(student, str(student_path))
    s = subject("cls", workdir, calib_n, test_n)
    student, teacher = onnx.load(str(student_path)), onnx.load(str(s.model))
    kw = {k: _value(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item)}
    kw.setdefault("seed", seed)
    # The pipeline's split: the gate keeps --calib-holdout (0.2) of --calib, distill gets the rest.
    from onnxslim.calibration import CalibrationData, split_holdout

    fit, _ = split_holdout(CalibrationData({s.input: np.load(s.calib)["x"]}, None, "calib", True), 0.2)
    x = fit.inputs[s.input]
    out = distill(student, teacher, {s.input: x}, None, DistillConfig(**kw),
                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    trained, _ = write_back(student, out.values)
    labels, base = np.load(s.test)["labels"], top1(teacher, s)
    p0, p1 = top1(student, s), top1(trained, s)
    row = {"recipe": kw, "calib": calib_n, "prune_calib": prune_calib, "prune_set": prune_set, "agree": [round(float((p == base).mean() * 100), 1) for p in (p0, p1)],
           "acc": [round(float((p == labels).mean() * 100), 2) for p in (p0, p1)],
           "original_acc": round(float((base == labels).mean() * 100), 2),
           "holdout_loss": [round(out.before.loss, 4), round(out.after.loss, 4)], "steps": out.steps,
           "best_step": out.best_step, "stopped": out.stopped, "seconds": round(out.seconds, 1),
           "latency_b1": round(latency_ratio(teacher, trained, s, 1, 3), 3)}
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=None, help="--distill-steps (default: the pass's)")
    ap.add_argument("--distill-time", type=float, default=None, help="--distill-time seconds (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="paired latency measurements per ratio")
    ap.add_argument("--cls-calib", type=int, default=600, help="rendered calibration images (PP-OCR cls rows)")
    ap.add_argument("--cls-test", type=int, default=1000, help="rendered test images (PP-OCR cls rows)")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="an extra pass option for every row, e.g. distill_lr=0.003 (repeatable); with --recipe: "
                    "prune options of the cached student, e.g. prune_allocate=predicted")
    ap.add_argument("--recipe", default=None, help="DistillConfig overrides k=v,k=v: the engine alone on the "
                    "PP-OCR cls model pruned once (see the module docstring)")
    ap.add_argument("--workdir", default=None, help="where the rendered PP-OCR cls lines (and, with --recipe, "
                    "the pruned model) are cached; default: a temporary directory (--recipe: a fixed one)")
    ap.add_argument("--prune-calib", type=int, default=None, help="--recipe: rendered lines the student is pruned "
                    "on (default --cls-calib)")
    args = ap.parse_args(argv)
    if args.recipe is not None:
        wd = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "bench-distill-recipe"
        recipe(args.recipe, wd, args.cls_calib, args.cls_test, args.seed, args.prune_calib,
               {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)})
        return
    header = ["model", "pipeline", "options", "test acc", "drop (pts)", "agree", "file", "weights", "latency b1",
              "latency b64", "held-out loss", "held-out agree", "quantize-static", "distill s", "run s"]
    table, goals = [header], [["row", "goal", "result", "run s"]]
    originals: dict[str, tuple[Subject, onnx.ModelProto, float, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for r in [int(v) for v in args.rows.split(",")]:
            row = ROWS[r]
            if row.subject not in originals:
                s = subject(row.subject, Path(args.workdir) if args.workdir else Path(tmp), args.cls_calib,
                            args.cls_test)
                orig = onnx.load(str(s.model))
                pred = top1(orig, s)
                acc = float((pred == np.load(s.test)["labels"]).mean() * 100)
                originals[row.subject] = (s, orig, acc, pred)
                table.append([s.name, "original", "", f"{acc:.2f}%", "", "", f"{s.model.stat().st_size / 1024:.0f} KB",
                              f"{weight_bytes(orig) / 1024:.0f} KB", "1.00x", "1.00x", "", "", "", "", ""])
            s, orig, base_acc, base_pred = originals[row.subject]
            opts = {"calib": str(s.calib), "latency": False, "distill_seed": args.seed, **row.extra,
                    **{k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}}
            if args.steps and "distill" in row.passes:
                opts["distill_steps"] = args.steps
            if args.distill_time and "distill" in row.passes:
                opts["distill_time"] = args.distill_time
            t0 = time.perf_counter()
            refused = ""
            try:
                out, rep = optimize(str(s.model), None, passes=row.passes, inputs=str(s.test), force=True,
                                    latency=False, options=opts)
            except GateError as e:  # not raised with force=True; kept for clarity of the table
                out, rep, refused = None, e.report, str(e)
            run_s = time.perf_counter() - t0
            refused = refused or next((w for w in rep.warnings if "written because of --force" in w
                                       or "validation failed but --force" in w), "")
            with tempfile.TemporaryDirectory() as t2:
                path = Path(t2) / "out.onnx"
                onnx.save(out, str(path))
                size_x = path.stat().st_size / s.model.stat().st_size
            pred = top1(out, s)
            labels = np.load(s.test)["labels"]
            acc = float((pred == labels).mean() * 100)
            agree = float((pred == base_pred).mean() * 100)
            d = rep.extra.get("distill")
            dist_s = next((p["seconds"] for p in rep.passes if p["name"] == "distill"), None)
            b1 = latency_ratio(orig, out, s, 1, args.repeats)
            b64 = latency_ratio(orig, out, s, 64, args.repeats)
            table.append([s.name, row.passes, shown(row.extra), f"{acc:.2f}%", f"{base_acc - acc:.2f}", f"{agree:.1f}%",
                          f"{size_x:.3f}x", f"{weight_bytes(out) / weight_bytes(orig):.3f}x", f"{b1:.2f}x", f"{b64:.2f}x",
                          f"{d['before']['loss']:.3g} -> {d['after']['loss']:.3g}" if d else "",
                          f"{d['before']['top1']:.1%} -> {d['after']['top1']:.1%}" if d else "",
                          quant_state(rep),
                          f"{dist_s:.0f} ({d['steps']} steps, {d['stopped']})" if d else "", f"{run_s:.0f}"])
            if row.goal:
                goals.append([str(r), f"{s.name}: {row.goal}",
                              f"drop {base_acc - acc:.2f} pt, agreement {agree:.1f}%, file {size_x:.3f}x, weights "
                              f"{weight_bytes(out) / weight_bytes(orig):.3f}x, b1 {b1:.2f}x, b64 {b64:.2f}x"
                              + (f"; the run's gate: {refused}" if refused else "; passes the run's gate"),
                              f"{run_s:.0f}"])
            print(f"row {r} done in {run_s:.1f} s: {table[-1]}", file=sys.stderr, flush=True)
    print(md(table))
    if len(goals) > 1:
        print()
        print(md(goals))
    print(f"\nCPU: {cpu()}; load average {os.getloadavg()[0]:.1f} at the end; torch threads 1, onnxruntime 1 thread.")


if __name__ == "__main__":
    main()
