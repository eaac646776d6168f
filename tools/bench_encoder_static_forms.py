"""Where static INT8 of a real encoder spends its latency: the QDQ forms of all-MiniLM-L6-v2 side by side.

Each row is built from the same SmoothQuant-prepared model (``onnxslim.quantization.encoder_static_prepare``)
with onnxruntime's quantizers directly, so one change at a time is measured:

  ffn-float         the FFN down projections (GELU inputs) in float, MatMul outputs re-quantized (the old default)
  ffn-float-outf    same, MatMul outputs float (OpTypesToExcludeOutputQuantization: MatMulIntegerToFloat)
  ffn-dyn           the FFN down projections dynamic (DynamicQuantizeLinear + MatMulInteger), outputs float
  ffn-dyn+resid     same, the residual Adds read the float LayerNorm output, not its Q/DQ copy (float_side_readers)
  nomul+resid       as ffn-dyn+resid but no SmoothQuant Mul inserted (only folded sites smoothed)
  nosmooth+resid    as ffn-dyn+resid without any SmoothQuant
  clip99.99+resid   FFN down projections static, their input range clipped at p99.99 (TensorQuantOverrides)
  onnxslim          what ``Quantizer`` builds from the prepared config (the pass's first candidate, no search)

Metrics as tools/bench_encoder.py (sentence embeddings of 200 + 200 perturbed sentences vs the float model);
latency: ratio to the lossless float model, one thread, thread CPU time, paired interleaved runs, median of
--rounds fresh session pairs, all rows timed in one process. Prints the ops left after onnxruntime's own graph
optimization (``SessionOptions.optimized_model_filepath``) and the DequantizeLinear -> float MatMul paths.

Run: python tools/bench_encoder_static_forms.py [--model DIR/minilm_l6/model.onnx] [--rows a,b] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = ["ffn-float", "ffn-float-outf", "ffn-dyn", "ffn-dyn+resid", "nomul+resid", "nosmooth+resid",
        "clip99.99+resid", "onnxslim"]
COUNTED = ["QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMul", "QuantizeLinear",
           "DequantizeLinear", "Mul"]


def main(argv: list[str] | None = None) -> None:
    import bench_encoder as be
    from make_zoo_encoder import NAME, default_cache
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from onnxslim import optimize
    from onnxslim import quantization as Q
    from onnxslim.calibration import CalibrationData
    from onnxslim.runtime import make_session, paired_latency

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_cache() / NAME / "model.onnx"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    src = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_static_forms."))
    os.chdir(work)  # onnxruntime's helpers leave files in the working directory

    task = be.Task(src.parent / "tokenizer.json")
    batches = task.batches(16)
    calib = CalibrationData(dict(task.calib()), None, "template sentences")
    lat_feeds = {1: task.encode(task.texts[:1]), 16: task.encode(task.texts[:16])}
    fm, _ = optimize(str(src), None, passes="lossless", validate=False, latency=False)
    ref = be.embed(make_session(fm, threads=0), batches)
    ref_nn = be.nearest(ref, len(task.originals))

    def prepared(allow_mul: bool = True, smooth: bool = True):
        cfg = Q.QuantConfig(kind="static", **{k: v for k, v in Q.machine_defaults().items() if k != "why"})
        prep, cfg = Q._prepare(fm, cfg, "static", [])
        sm, cfg, _ = Q.encoder_static_prepare(prep, cfg, set(), calib, [], allow_mul=allow_mul)
        return (sm if smooth else prep), cfg

    def static(model, cfg, exclude, out_float, overrides=None):
        p, o = work / "in.onnx", work / "out.onnx"
        onnx.save(model, str(p))
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if out_float:
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        quantize_static(str(p), str(o), Q.calib_reader(calib, model), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=cfg.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=sorted(exclude),
                        calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
        return onnx.load(str(o))

    def dynamic(model, cfg, nodes):
        p, o = work / "din.onnx", work / "dout.onnx"
        onnx.save(model, str(p))
        quantize_dynamic(str(p), str(o), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=cfg.reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(o))

    def resid(q):
        q = copy.deepcopy(q)
        Q.float_side_readers(q, {"MatMul", "Gemm"})
        return q

    def ffn_inputs_clipped(model, names, pct):
        probe = copy.deepcopy(model)
        ins = [n.input[0] for n in model.graph.node if n.name in names]
        for t in ins:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        sess = make_session(probe)
        feeds = {i.name for i in sess.get_inputs()}
        vals: dict[str, list] = {t: [] for t in ins}
        for b in calib.batches():
            for t, v in zip(ins, sess.run(ins, {k: x for k, x in b.items() if k in feeds})):
                vals[t].append(v.reshape(-1))
        out = {}
        for t, v in vals.items():
            v = np.concatenate(v)
            out[t] = [{"rmin": np.float32(min(0.0, v.min())), "rmax": np.float32(np.percentile(v, pct))}]
        return out

    sm, cfg = prepared()
    ffn = [n.name for n in sm.graph.node if n.name.endswith("/output/dense/MatMul") and "attention" not in n.name]
    base_ex = set(cfg.exclude) - set(ffn)  # the attention-score MatMuls (two activations)
    models = {}
    for r in rows:
        if r == "ffn-float":
            models[r] = static(sm, cfg, base_ex | set(ffn), False)
        elif r == "ffn-float-outf":
            models[r] = static(sm, cfg, base_ex | set(ffn), True)
        elif r == "ffn-dyn":
            models[r] = dynamic(static(sm, cfg, base_ex | set(ffn), True), cfg, ffn)
        elif r == "ffn-dyn+resid":
            models[r] = dynamic(resid(static(sm, cfg, base_ex | set(ffn), True)), cfg, ffn)
        elif r in ("nomul+resid", "nosmooth+resid"):
            m2, c2 = prepared(allow_mul=False, smooth=r == "nomul+resid")
            models[r] = dynamic(resid(static(m2, c2, base_ex | set(ffn), True)), c2, ffn)
        elif r.startswith("clip"):
            pct = float(r.removeprefix("clip").split("+")[0])
            models[r] = resid(static(sm, cfg, base_ex, True, ffn_inputs_clipped(sm, set(ffn), pct)))
        elif r == "onnxslim":
            models[r] = Q.Quantizer(sm, calib, work).quantize(cfg)
            print(f"onnxslim config: {cfg.label()}; dynamic: {', '.join(cfg.dynamic_nodes)}")
        else:
            raise SystemExit(f"unknown row {r!r}: {', '.join(ROWS)}")
    import onnxruntime as ort

    print("| form | min cos | NN agree | ops after onnxruntime optimization | DQ->float MatMul |")
    print("|---|---|---|---|---|")
    for name, m in models.items():
        emb = be.embed(make_session(m, threads=0), batches)
        cos = np.sum(emb * ref, 1)
        agree = float(np.mean(be.nearest(emb, len(task.originals)) == ref_nn))
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(work / "opt.onnx")
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        g = onnx.load(str(work / "opt.onnx"))
        hist = {k: sum(n.op_type == k for n in g.graph.node) for k in COUNTED}
        prod = {o: n for n in g.graph.node for o in n.output}
        dq_mm = sum(1 for n in g.graph.node if n.op_type in ("MatMul", "FusedMatMul")
                    and any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input))
        print(f"| {name} | {cos.min():.4f} | {100 * agree:.1f}% | "
              f"{', '.join(f'{k} {v}' for k, v in hist.items() if v)} | {dq_mm} |", flush=True)
    load0 = os.getloadavg()[0]
    got: dict[str, dict[int, list[float]]] = {k: {b: [] for b in lat_feeds} for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            sa, sb = make_session(fm, threads=1), make_session(m, threads=1)
            for b, f in lat_feeds.items():
                got[k][b].append(paired_latency(sa, sb, f, seconds=args.seconds)[2])
    print(f"\nlatency ratio to float (median of {args.rounds}), load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| form | b1 | b16 |\n|---|---|---|")
    for k, d in got.items():
        print(f"| {k} | {np.median(d[1]):.3f}x | {np.median(d[16]):.3f}x |")


if __name__ == "__main__":
    main()
