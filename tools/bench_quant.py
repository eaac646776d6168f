"""Quantization benchmark: onnxslim beside onnxruntime.quantization's defaults, with the acceptance checks.

    python tools/bench_quant.py [--seconds 2] [--json bench_quant.json]
    python tools/bench_quant.py --forms [--seconds 1] [--rounds 2]   # which INT8 forms are fast on this CPU

Tables (latency: one thread, median of interleaved runs in one process; ratios are per-run ratios
against fp32, so load from other processes hits both sides of each ratio):
  1. digits CNN, static INT8: fp32 | onnxruntime quantize_static(defaults) | onnxslim quantize-static
  2. digits MLP, dynamic INT8: fp32 | onnxruntime quantize_dynamic(defaults) | onnxslim quantize-dynamic
  3. digits CNN, lossless,prune,quantize-static at --prune-ratio 0.3
  4. latency before/after at batch 1 and 64 for every quantized model, including the MobileNetV2-like
     depthwise model, ORT's defaults beside onnxslim's
Needs models/ (tools/train_digits.py, tools/make_structure_models.py, tools/make_image_model.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "tools"))


def sessions(paths: list[Path]):
    from onnxslim.runtime import make_session

    return [make_session(p, threads=1) for p in paths]


def interleaved(paths: list[Path], feeds: dict[str, np.ndarray], seconds: float) -> list[dict[str, float]]:
    """Median ms per model and the median per-run ratio to the first model (fp32)."""
    from onnxslim.runtime import session_feed

    sess = sessions(paths)
    fs = [session_feed(s, feeds) for s in sess]
    for s, f in zip(sess, fs):
        for _ in range(3):
            s.run(None, f)
    t0 = time.perf_counter()
    for s, f in zip(sess, fs):
        s.run(None, f)
    probe = time.perf_counter() - t0
    runs = int(min(500, max(20, seconds / max(probe, 1e-6))))
    times = np.zeros((runs, len(sess)))
    for i in range(runs):
        order = range(len(sess)) if i % 2 == 0 else reversed(range(len(sess)))
        for j in order:
            t = time.perf_counter()
            sess[j].run(None, fs[j])
            times[i, j] = time.perf_counter() - t
    return [{"ms": float(np.median(times[:, j]) * 1e3), "ratio": float(np.median(times[:, j] / times[:, 0]))}
            for j in range(len(sess))]


def latency_table(paths: list[Path], input_name: str, sample_shape: tuple[int, ...], seconds: float,
                  batches=(1, 64)) -> dict[int, list[dict[str, float]]]:
    rng = np.random.default_rng(1)
    return {b: interleaved(paths, {input_name: rng.random((b, *sample_shape), dtype=np.float32)}, seconds)
            for b in batches}


def accuracy(path: Path, npz: Path) -> float:
    from onnxslim.runtime import make_session, run

    d = np.load(npz)
    out = run(make_session(path), {"input": d["input"]})[0]
    return float((out.argmax(1) == d["labels"]).mean() * 100)


def cosine(ref: Path, path: Path, feeds: dict[str, np.ndarray]) -> float:
    from onnxslim.runtime import make_session, run

    a = run(make_session(ref), feeds)[0]
    b = run(make_session(path), feeds)[0]
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def ort_static_default(src: Path, dst: Path, calib: dict[str, np.ndarray]) -> None:
    from onnxruntime.quantization import quantize_static

    from onnxslim.calibration import CalibrationData
    from onnxslim.quantization import calib_reader, quiet_ort

    with quiet_ort():
        quantize_static(str(src), str(dst), calib_reader(CalibrationData(calib, batch_size=32), onnx.load(src)))


def ort_dynamic_default(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    from onnxslim.quantization import quiet_ort

    with quiet_ort():
        quantize_dynamic(str(src), str(dst))


def slim(src: Path, dst: Path, passes: str, **options) -> dict:
    from onnxslim.api import optimize
    from onnxslim.errors import GateError

    inputs = options.pop("inputs", None)
    t0 = time.perf_counter()
    try:
        _, report = optimize(src, dst, passes=passes, inputs=inputs, latency=False, options=options)
    except GateError as e:
        report = e.report
        print(f"  onnxslim refused ({passes} on {src.name}): {e}")
    q = report.extra.get("quantize", {})
    return {"seconds": time.perf_counter() - t0, "config": q.get("config", ""), "written": report.written,
            "nodes_in_float": q.get("nodes_in_float", []), "warnings": report.warnings}


def row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    print(row(header, widths))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(row(r, widths))


def kb(p: Path) -> float:
    return p.stat().st_size / 1024


# ------------------------------------------------------------------------------------ --forms sweep

def cpu_class() -> dict:
    """CPU name and the ISA flags INT8 kernels depend on (x86 /proc/cpuinfo)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return {"cpu": name, "arch": platform.machine(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}


def form_configs(kind: str, ops: set[str]):
    """The INT8 forms worth knowing about: format x types x reduce_range x per-channel (+ op subsets)."""
    from onnxslim.quantization import QuantConfig

    out = []
    if kind == "dynamic":
        for w in ("int8", "uint8"):
            for pc in (False, True):
                for rr in (False, True):
                    out.append(QuantConfig(kind="dynamic", fmt="qoperator", weight=w, per_channel=pc, reduce_range=rr))
        return out
    for fmt in ("qdq", "qoperator"):
        for act, w in (("uint8", "int8"), ("uint8", "uint8"), ("int8", "int8")):
            for pc in (False, True):
                for rr in (False, True):
                    if act == "int8" and rr:
                        continue  # S8S8 has no saturation to avoid
                    out.append(QuantConfig(fmt=fmt, activation=act, weight=w, per_channel=pc, reduce_range=rr,
                                           symmetric=act == "int8"))
    heavy = tuple(o for o in ("Conv", "MatMul", "Gemm") if o in ops)
    out.append(QuantConfig(op_types=heavy))  # compute ops only
    for o in heavy:
        out.append(QuantConfig(op_types=tuple(x for x in heavy if x != o) or None, float_ops=(o,)))
    if any(o == "Conv" for o in ops):
        out.append(QuantConfig(float_ops=("DepthwiseConv",)))
    return out


def forms_main(seconds: float, rounds: int, json_path: str | None, only: list[str] | None) -> int:
    """Per model: every form's latency ratio (INT8 / float, runtime.latency_table) at batch 1 and 64."""
    from onnxslim.calibration import CalibrationData
    from onnxslim.quantization import QuantConfig, Quantizer, _prepare, quiet_ort
    from onnxslim.runtime import latency_table as ratio_table
    from onnxslim.validate import latency_feeds

    cpu = cpu_class()
    print(f"cpu: {cpu['cpu']} ({cpu['arch']}; avx2 {cpu['avx2']}, avx512 {cpu['avx512']}, vnni {cpu['vnni']}); "
          f"load average {Path('/proc/loadavg').read_text().split()[0]}")
    rng = np.random.default_rng(0)
    digits = np.load(MODELS / "digits_calib.npz")["input"]
    plan = [("digits_cnn", "static", digits), ("digits_mlp", "dynamic", digits), ("digits_mlp", "static", digits),
            ("struct_mobilenetv2", "static", rng.standard_normal((32, 3, 64, 64)).astype(np.float32)),
            ("struct_transformer", "dynamic", rng.standard_normal((32, 16, 64)).astype(np.float32))]
    result: dict = {"cpu": cpu, "models": {}}
    for stem, kind, x in plan:
        if only and stem not in only:
            continue
        model = onnx.load(MODELS / f"{stem}.onnx")
        data = CalibrationData({"input": x}, batch_size=16)
        with tempfile.TemporaryDirectory(prefix="bench-forms-") as tmp:
            notes: list[str] = []
            prep, _ = _prepare(model, QuantConfig(kind=kind), kind, notes)
            q = Quantizer(prep, data if kind == "static" else None, Path(tmp))  # one calibration, reused
            feeds = latency_feeds(prep, {}, {"input": x})
            ref = Path(tmp) / "float.onnx"
            rows = []
            for cfg in form_configs(kind, {n.op_type for n in prep.graph.node}):
                try:
                    with quiet_ort():
                        qm = q.quantize(cfg)
                except Exception as e:  # noqa: BLE001 - a form onnxruntime cannot build is a result too
                    rows.append({"form": cfg.label(), "error": str(e).splitlines()[0][:80]})
                    continue
                cand = Path(tmp) / "cand.onnx"
                onnx.save(qm, cand)
                per_b: dict[str, list[float]] = {}
                for _ in range(rounds):
                    for k, v in ratio_table(ref, cand, feeds, seconds=seconds).items():
                        if "ratio" in v:
                            per_b.setdefault(k, []).append(v["ratio"])
                rows.append({"form": cfg.label(), **{k: float(np.median(v)) for k, v in per_b.items()}})
                print(f"  {stem} [{kind}] {cfg.label():<90} " + "  ".join(
                    f"{k} {float(np.median(v)):.2f}x" for k, v in per_b.items()), flush=True)
        result["models"][f"{stem} ({kind})"] = rows
    print("\n| model | form | b1 | b64 |\n|---|---|---|---|")
    for m, rows in result["models"].items():
        for r in sorted(rows, key=lambda r: r.get("batch64", r.get("batch1", 9))):
            cells = [f"{r[k]:.2f}x" if k in r else r.get("error", "-") for k in ("batch1", "batch64")]
            print(f"| {m} | {r['form']} | {cells[0]} | {cells[1]} |")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per model set and batch")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--forms", action="store_true", help="measure every INT8 form on this CPU (see forms_main)")
    ap.add_argument("--rounds", type=int, default=2, help="--forms: measurements per form (median)")
    ap.add_argument("--only", nargs="*", help="--forms: model stems to run")
    args = ap.parse_args()
    if args.forms:
        logging.disable(logging.WARNING)
        return forms_main(args.seconds, args.rounds, args.json, args.only)
    logging.disable(logging.WARNING)
    from onnxslim.quantization import machine_defaults

    cnn, mlp = MODELS / "digits_cnn.onnx", MODELS / "digits_mlp.onnx"
    calib_npz, test_npz = MODELS / "digits_calib.npz", MODELS / "digits_test.npz"
    calib = {"input": np.load(calib_npz)["input"]}
    out: dict = {"machine": machine_defaults()["why"], "tables": {}}
    checks: list[tuple[str, bool, str]] = []
    print(f"machine: {out['machine']}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))

    # ---- 1. digits CNN static
    ort_cnn, slim_cnn = tmp / "cnn_ort_static.onnx", tmp / "cnn_slim_static.onnx"
    ort_static_default(cnn, ort_cnn, calib)
    info = slim(cnn, slim_cnn, "quantize-static", calib=str(calib_npz), inputs=test_npz)
    lat = latency_table([cnn, ort_cnn, slim_cnn], "input", (1, 8, 8), args.seconds)
    accs = [accuracy(p, test_npz) for p in (cnn, ort_cnn, slim_cnn)]
    rows = []
    for j, (name, p) in enumerate([("fp32", cnn), ("onnxruntime quantize_static (defaults)", ort_cnn),
                                   (f"onnxslim quantize-static ({info['config']})", slim_cnn)]):
        rows.append([name, f"{kb(p):.1f} KB ({kb(p) / kb(cnn):.2f}x)", f"{accs[j]:.2f}%",
                     f"{lat[1][j]['ms']:.3f} ms ({lat[1][j]['ratio']:.2f}x)",
                     f"{lat[64][j]['ms']:.3f} ms ({lat[64][j]['ratio']:.2f}x)"])
    print_table("1. digits CNN, static INT8 (calibration: digits_calib.npz; accuracy: digits_test.npz)",
                ["model", "file", "test acc", "latency b1", "latency b64"], rows)
    out["tables"]["cnn_static"] = {"rows": rows, "quantize_seconds": info["seconds"]}
    checks += [("CNN static: file <= 0.35x", kb(slim_cnn) / kb(cnn) <= 0.35, f"{kb(slim_cnn) / kb(cnn):.2f}x"),
               ("CNN static: accuracy within 0.5 pt", accs[2] >= accs[0] - 0.5, f"{accs[2] - accs[0]:+.2f} pt"),
               ("CNN static: accuracy >= ORT defaults", accs[2] >= accs[1], f"{accs[2]:.2f}% vs {accs[1]:.2f}%"),
               ("CNN static: latency b64 <= 0.7x", lat[64][2]["ratio"] <= 0.7, f"{lat[64][2]['ratio']:.2f}x")]

    # ---- 2. digits MLP dynamic
    ort_mlp, slim_mlp = tmp / "mlp_ort_dynamic.onnx", tmp / "mlp_slim_dynamic.onnx"
    ort_dynamic_default(mlp, ort_mlp)
    info = slim(mlp, slim_mlp, "quantize-dynamic", inputs=test_npz)
    lat = latency_table([mlp, ort_mlp, slim_mlp], "input", (1, 8, 8), args.seconds)
    accs = [accuracy(p, test_npz) for p in (mlp, ort_mlp, slim_mlp)]
    rows = []
    for j, (name, p) in enumerate([("fp32", mlp), ("onnxruntime quantize_dynamic (defaults)", ort_mlp),
                                   (f"onnxslim quantize-dynamic ({info['config']})", slim_mlp)]):
        rows.append([name, f"{kb(p):.1f} KB ({kb(p) / kb(mlp):.2f}x)", f"{accs[j]:.2f}%",
                     f"{lat[1][j]['ms']:.4f} ms ({lat[1][j]['ratio']:.2f}x)",
                     f"{lat[64][j]['ms']:.4f} ms ({lat[64][j]['ratio']:.2f}x)"])
    print_table("2. digits MLP, dynamic INT8",
                ["model", "file", "test acc", "latency b1", "latency b64"], rows)
    out["tables"]["mlp_dynamic"] = {"rows": rows}
    checks += [("MLP dynamic: accuracy within 0.5 pt", accs[2] >= accs[0] - 0.5, f"{accs[2] - accs[0]:+.2f} pt"),
               ("MLP dynamic: file <= 0.30x", kb(slim_mlp) / kb(mlp) <= 0.30, f"{kb(slim_mlp) / kb(mlp):.2f}x"),
               ("MLP dynamic: latency b64 <= 0.6x", lat[64][2]["ratio"] <= 0.6, f"{lat[64][2]['ratio']:.2f}x")]

    # ---- 3. prune -> refit -> quantize
    pruned, pipeline = tmp / "cnn_pruned.onnx", tmp / "cnn_prune_quant.onnx"
    slim(cnn, pruned, "lossless,prune", calib=str(calib_npz), prune_ratio=0.3, inputs=test_npz)
    info = slim(cnn, pipeline, "lossless,prune,quantize-static", calib=str(calib_npz), prune_ratio=0.3,
                inputs=test_npz)
    lat = latency_table([cnn, pruned, pipeline], "input", (1, 8, 8), args.seconds)
    accs = [accuracy(p, test_npz) for p in (cnn, pruned, pipeline)]
    rows = []
    for j, (name, p) in enumerate([("fp32", cnn), ("lossless,prune (0.3, refit)", pruned),
                                   ("lossless,prune,quantize-static", pipeline)]):
        rows.append([name, f"{kb(p):.1f} KB ({kb(p) / kb(cnn):.2f}x)", f"{accs[j]:.2f}%",
                     f"{lat[1][j]['ms']:.3f} ms ({lat[1][j]['ratio']:.2f}x)",
                     f"{lat[64][j]['ms']:.3f} ms ({lat[64][j]['ratio']:.2f}x)"])
    print_table("3. digits CNN, prune -> refit -> quantize in one run (--prune-ratio 0.3 --calib digits_calib.npz)",
                ["model", "file", "test acc", "latency b1", "latency b64"], rows)
    out["tables"]["pipeline"] = {"rows": rows}
    checks += [("pipeline: file <= 0.20x", kb(pipeline) / kb(cnn) <= 0.20, f"{kb(pipeline) / kb(cnn):.2f}x"),
               ("pipeline: accuracy within 1.0 pt", accs[2] >= accs[0] - 1.0, f"{accs[2] - accs[0]:+.2f} pt")]

    # ---- 4. latency for every quantized model
    rng = np.random.default_rng(0)
    rows = []
    lat_rows: dict = {}

    def add(name: str, ref: Path, cands: list[tuple[str, Path]], inp: str, shape: tuple[int, ...], feeds=None):
        paths = [ref] + [p for _, p in cands if p.exists()]
        names = [n for n, p in cands if p.exists()]
        lt = latency_table(paths, inp, shape, args.seconds)
        for j, n in enumerate(names, start=1):
            cos = cosine(ref, paths[j], feeds) if feeds is not None else float("nan")
            rows.append([f"{name}: {n}", f"{lt[1][0]['ms']:.3f}", f"{lt[1][j]['ms']:.3f}", f"{lt[1][j]['ratio']:.2f}x",
                         f"{lt[64][0]['ms']:.3f}", f"{lt[64][j]['ms']:.3f}", f"{lt[64][j]['ratio']:.2f}x",
                         f"{kb(paths[j]) / kb(ref):.2f}x", "-" if np.isnan(cos) else f"{cos:.4f}"])
            lat_rows[f"{name}: {n}"] = {"b1": lt[1][j], "b64": lt[64][j]}

    add("digits CNN", cnn, [("ORT static defaults", ort_cnn), ("onnxslim static", slim_cnn),
                            ("onnxslim prune+static", pipeline)], "input", (1, 8, 8), calib)
    add("digits MLP", mlp, [("ORT dynamic defaults", ort_mlp), ("onnxslim dynamic", slim_mlp)], "input", (1, 8, 8), calib)
    for stem, shape, kind in [("struct_mobilenetv2", (3, 64, 64), "static"), ("struct_resnet", (3, 32, 32), "static"),
                              ("struct_transformer", (16, 64), "dynamic")]:
        src = MODELS / f"{stem}.onnx"
        if not src.exists():
            continue
        x = rng.standard_normal((64, *shape)).astype(np.float32)
        npz = tmp / f"{stem}_calib.npz"
        np.savez(npz, input=x)
        ort_p, slim_p = tmp / f"{stem}_ort.onnx", tmp / f"{stem}_slim.onnx"
        if kind == "static":
            ort_static_default(src, ort_p, {"input": x})
            info = slim(src, slim_p, "lossless,quantize-static", calib=str(npz), inputs=npz)
            add(stem, src, [("ORT static defaults", ort_p), (f"onnxslim static ({info['config']})", slim_p)],
                "input", shape, {"input": x})
        else:
            ort_dynamic_default(src, ort_p)
            info = slim(src, slim_p, "quantize-dynamic", inputs=npz)
            add(stem, src, [("ORT dynamic defaults", ort_p), (f"onnxslim dynamic ({info['config']})", slim_p)],
                "input", shape, {"input": x})
    # images folder -> image model, end to end
    import make_image_model as mi

    img_dir, img_model, img_q = tmp / "images", tmp / "image_cnn.onnx", tmp / "image_cnn_int8.onnx"
    mi.write_images(img_dir, 48)
    onnx.save(mi.build_model(), img_model)
    info = slim(img_model, img_q, "lossless,quantize-static", calib=str(img_dir), calib_mean="0.485,0.456,0.406",
                calib_std="0.229,0.224,0.225")
    checks.append(("images folder calibrates an image model end to end", info["written"], info["config"]))
    from onnxslim.calibration import load_calibration

    img_data = load_calibration(img_dir, onnx.load(img_model), options={"calib_mean": "0.485,0.456,0.406",
                                                                      "calib_std": "0.229,0.224,0.225"})
    add("image CNN (48 generated .png/.jpg)", img_model, [("onnxslim static", img_q)], "image", (3, 32, 32),
        img_data.inputs)
    fp16 = tmp / "cnn_fp16.onnx"
    slim(cnn, fp16, "fp16", inputs=test_npz)
    add("digits CNN", cnn, [("onnxslim fp16", fp16)], "input", (1, 8, 8), calib)
    print_table("4. latency before/after (ms, one thread, interleaved; ratio = after/before), size and cosine to fp32",
                ["model", "b1 fp32", "b1 after", "b1 ratio", "b64 fp32", "b64 after", "b64 ratio", "file", "cosine"],
                rows)
    out["tables"]["latency"] = {"rows": rows, "raw": lat_rows}
    mb = [v for k, v in lat_rows.items() if k.startswith("struct_mobilenetv2: onnxslim")]
    if mb:
        checks.append(("MobileNet-like: onnxslim static not slower than fp32 (b1 and b64)",
                       mb[0]["b1"]["ratio"] <= 1.0 and mb[0]["b64"]["ratio"] <= 1.0,
                       f"b1 {mb[0]['b1']['ratio']:.2f}x, b64 {mb[0]['b64']['ratio']:.2f}x"))

    print("\nacceptance")
    for name, ok, val in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {val}")
    out["checks"] = [{"check": n, "passed": bool(ok), "value": v} for n, ok, v in checks]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
