"""Zoo benchmark: lossless, prune 0.3 and quantize-static on real architectures, through the CLI.

    python tools/make_zoo.py                                  # build the torch exports once (needs torch)
    python tools/bench_zoo.py                                 # every cached model + the PP-OCR models
    python tools/bench_zoo.py --models squeezenet1_1,ppocr_cls --json zoo.json

Models: every ``<zoo>/<name>/model.onnx`` built by ``tools/make_zoo.py`` (with its ``calib.npz``, 64 images,
and ``test.npz``, 16 others), plus ``ppocr_det``/``ppocr_rec``/``ppocr_cls`` from the installed
``rapidocr-onnxruntime`` wheel (smooth random images at det 160x160, rec 48x320, cls 48x192).

Per model, each step is one ``onnxslim`` child process, as a user runs it (wall time and the child's CPU
time are reported):
  lossless          nodes original -> onnxslim;
  prune             ``--passes lossless,prune --prune-ratio 0.3 --calib calib.npz``: params/MACs kept, groups
                    left whole with their reasons (``extra.prune.groups``), and on test.npz (never seen by the
                    tool) top-1 agreement, cosine and centred cosine (the original's mean output subtracted:
                    a constant-ish output makes the plain cosine near 1 whatever the model does);
  quantize-static   ``--passes lossless,quantize-static --calib calib.npz``: written or refused (the reason),
                    and when written the same agreement numbers.
Latency is ``onnxslim.runtime.latency_table`` (one thread, interleaved, CPU-time paired ratio) of the written
model against the lossless one at batch 1 and 8 (below 1 is faster). A refused run shows its reason verbatim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_zoo import DEFAULT_OUT, smooth_images  # noqa: E402
from onnxslim.runtime import latency_table, make_session  # noqa: E402

OCR = {"ppocr_det": ("ch_PP-OCRv4_det_infer.onnx", (160, 160)),
       "ppocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", (48, 320)),
       "ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192))}


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    vnni = "" if any("vnni" in f for f in isa) else "; no VNNI"
    return f"{name} ({os.cpu_count()} CPUs; {', '.join(isa) or 'no avx2'}{vnni})"


def zoo_models(zoo: Path) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (model, calib.npz, test.npz)."""
    found = {}
    if zoo.is_dir():
        for d in sorted(zoo.iterdir()):
            if (d / "model.onnx").exists() and (d / "calib.npz").exists():
                found[d.name] = (d / "model.onnx", d / "calib.npz", d / "test.npz")
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is not None and spec.submodule_search_locations:
        mdir = Path(list(spec.submodule_search_locations)[0]) / "models"
        data = Path(tempfile.gettempdir()) / "onnxslim-zoo-ppocr"
        data.mkdir(exist_ok=True)
        for name, (fname, hw) in OCR.items():
            if (mdir / fname).exists():
                c, t = data / f"{name}_calib.npz", data / f"{name}_test.npz"
                if not c.exists():
                    np.savez(c, x=smooth_images(64, hw, seed=1000))
                    np.savez(t, x=smooth_images(16, hw, seed=2000))
                found[name] = (mdir / fname, c, t)
    return found


def run_cli(args: list[str], timeout: float) -> dict[str, Any]:
    """One onnxslim child: exit code, wall/CPU seconds, last stderr line, the JSON report."""
    with tempfile.TemporaryDirectory(prefix="bench_zoo.") as tmp:
        rep = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "onnxslim.cli", *args, "--json", str(rep)]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                               env={**os.environ, "ONNXSLIM_PROGRESS_INTERVAL": "100000"})
            code, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            code, err = -1, f"killed after {timeout:.0f} s (bench timeout)"
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = json.loads(rep.read_text()) if rep.exists() else None
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning")]
    return {"code": code, "wall_s": round(wall, 1), "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
            "message": lines[-1] if lines and code != 0 else "", "report": report}


def agreement(original: Path, candidate: Path, test: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 agreement, cosine and centred cosine of the first output on the held-out images."""
    a = make_session(str(original)).run(None, test)[0].astype(np.float64)
    b = make_session(str(candidate)).run(None, test)[0].astype(np.float64)
    n = a.shape[0]
    fa, fb = a.reshape(n, -1), b.reshape(n, -1)

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        d = np.linalg.norm(x) * np.linalg.norm(y)
        return float((x * y).sum() / d) if d else 1.0

    mu = fa.mean(0, keepdims=True)
    top1 = float(np.mean(a.reshape(n, a.shape[1], -1).argmax(1) == b.reshape(n, b.shape[1], -1).argmax(1))) \
        if a.ndim >= 2 else float("nan")
    return {"top1": top1, "cosine": cos(fa, fb), "centred": cos(fa - mu, fb - mu)}


def feeds(test: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    return {b: {k: v[:b] for k, v in test.items()} for b in (1, 8)}


def whole_groups(groups: list[dict]) -> tuple[int, int, str]:
    """(groups left whole, groups, the reasons counted by kind)."""
    reasons = Counter()
    for g in groups:
        if g.get("skipped"):
            first = g["skipped"].split(";")[0]
            reasons[re.sub(r"'[^']*'", "'…'", re.sub(r"\d+", "N", first))[:70]] += 1
    whole = sum(1 for g in groups if g.get("skipped"))
    return whole, len(groups), "; ".join(f"{n}x {r}" for r, n in reasons.most_common(3))


def bench_model(name: str, model: Path, calib: Path, test_npz: Path, work: Path, timeout: float,
                lossy_args: list[str]) -> dict[str, Any]:
    test = dict(np.load(test_npz))
    row: dict[str, Any] = {"model": name}
    base = work / f"{name}.lossless.onnx"
    r = run_cli([str(model), str(base), "-q"], timeout)
    rep = r["report"] or {}
    row["lossless"] = {"code": r["code"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "message": r["message"],
                       "nodes": [rep.get("before", {}).get("nodes"), rep.get("after", {}).get("nodes")],
                       "params": rep.get("before", {}).get("params")}
    if r["code"] != 0:
        base = model  # compare against the raw export then
    for step, passes, extra in (("prune", "lossless,prune", ["--prune-ratio", "0.3"]),
                                ("quantize-static", "lossless,quantize-static", [])):
        out = work / f"{name}.{step}.onnx"
        r = run_cli([str(model), str(out), "--passes", passes, "--calib", str(calib), *extra, *lossy_args, "-q"],
                    timeout)
        rep = r["report"] or {}
        res = {"code": r["code"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "message": r["message"],
               "refused": rep.get("refused"), "stages": rep.get("stages")}
        if step == "prune":
            pr = (rep.get("extra") or {}).get("prune") or {}
            if pr.get("params"):
                res["params_kept"] = pr["params"]["after"] / max(1, pr["params"]["before"])
                res["macs_kept"] = pr["macs"]["after"] / max(1, pr["macs"]["before"])
            if pr.get("groups"):
                res["whole"], res["groups"], res["why"] = whole_groups(pr["groups"])
        else:
            q = (rep.get("extra") or {}).get("quantize") or {}
            res["config"] = q.get("config")
            res["size_ratio"] = q.get("size_ratio")
        if r["code"] == 0 and out.exists():
            try:
                res["agree"] = agreement(model, out, test)
            except Exception as e:  # noqa: BLE001 - a written model that does not run is a finding
                res["agree_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            res["latency"] = latency_table(str(base), str(out), feeds(test), seconds=1.5)
        row[step] = res
    return row


def _lat(t: dict | None) -> str:
    if not t:
        return ""
    return "/".join(f"{t[k]['ratio']:.2f}" if "ratio" in t.get(k, {}) else "err" for k in ("batch1", "batch8"))


def _agree(r: dict) -> str:
    a = r.get("agree")
    if not a:
        return r.get("agree_error", "")
    return f"{a['top1']:.0%} / {a['cosine']:.3f} / {a['centred']:.2f}"


def _status(r: dict) -> str:
    if r["code"] == 0:
        return "written"
    return f"exit {r['code']}" if r["code"] != 1 or not r.get("refused") else "refused"


def table(rows: list[dict]) -> str:
    out = ["| model | lossless nodes | prune: params / MACs kept | groups whole (why) | prune held-out top-1 / cos / centred cos "
           "| prune latency b1/b8 | prune time s (CPU) | INT8 static | INT8 held-out top-1 / cos / centred | INT8 latency b1/b8 "
           "| INT8 time s (CPU) |", "|" + "---|" * 11]
    for r in rows:
        ll, pr, qs = r["lossless"], r["prune"], r["quantize-static"]
        nodes = f"{ll['nodes'][0]} -> {ll['nodes'][1]}" if ll["code"] == 0 else f"exit {ll['code']}"
        kept = (f"{pr['params_kept']:.0%} / {pr['macs_kept']:.0%}" if "params_kept" in pr else "") + \
            ("" if pr["code"] == 0 else f" ({_status(pr)})")
        whole = f"{pr['whole']}/{pr['groups']} ({pr['why']})" if "groups" in pr else ""
        q = _status(qs) + (f", {qs['size_ratio']:.2f}x size" if qs["code"] == 0 and qs.get("size_ratio") else "")
        out.append(f"| {r['model']} | {nodes} | {kept} | {whole} | {_agree(pr)} | {_lat(pr.get('latency'))} | "
                   f"{pr['wall_s']:.0f} ({pr['cpu_s']:.0f}) | {q} | {_agree(qs)} | {_lat(qs.get('latency'))} | "
                   f"{qs['wall_s']:.0f} ({qs['cpu_s']:.0f}) |")
    msgs = [f"- {r['model']} {step}: exit {r[step]['code']}: `{r[step]['refused'] or r[step]['message']}`"
            for r in rows for step in ("lossless", "prune", "quantize-static") if r[step]["code"] != 0]
    return "\n".join(out + ([""] + ["Failures and refusals (verbatim):"] + msgs if msgs else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=DEFAULT_OUT, help=f"make_zoo.py's cache (default {DEFAULT_OUT})")
    ap.add_argument("--models", help="comma-separated names (default: all found)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per onnxslim run (default 1800)")
    ap.add_argument("--json", type=Path, help="write every number here (rewritten after each model)")
    ap.add_argument("--lossy-arg", action="append", default=[], help="extra CLI argument for the lossy runs")
    a = ap.parse_args(argv)
    found = zoo_models(a.zoo)
    names = [n.strip() for n in a.models.split(",")] if a.models else list(found)
    missing = [n for n in names if n not in found]
    if missing:
        print(f"bench_zoo: not found: {', '.join(missing)} (build with tools/make_zoo.py; have: "
              f"{', '.join(found)})", file=sys.stderr)
        return 2
    command = "python tools/bench_zoo.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_zoo_out.") as work:
        for n in names:
            t0 = time.time()
            print(f"bench_zoo: {n} ...", file=sys.stderr, flush=True)
            try:
                rows.append(bench_model(n, *found[n], Path(work), a.timeout, a.lossy_arg))
            except Exception as e:  # noqa: BLE001 - a bench bug on one model must not lose the others
                print(f"bench_zoo: {n}: bench error {type(e).__name__}: {e}", file=sys.stderr)
                continue
            print(f"bench_zoo: {n} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            if a.json:
                a.json.write_text(json.dumps({"cpu": cpu_line(), "command": command, "rows": rows}, indent=1,
                                             default=str))
    print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.1f} at the end\n\n`{command}`\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
