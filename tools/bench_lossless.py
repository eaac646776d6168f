"""Lossless start-up benchmark: `onnxslim IN OUT` (defaults) against the onnx load+save floor, per model.

    python tools/bench_lossless.py                        # PP-OCR det/rec/cls (rapidocr wheel) + the zoo
    python tools/bench_lossless.py --rounds 3 --json out.json
    python tools/bench_lossless.py --split ch_ppocr_mobile_v2.0_cls_infer   # where one run's time goes
    python tools/bench_lossless.py path/to/a.onnx other.onnx                # any files

Models: the det/rec/cls ONNX files of the installed ``rapidocr-onnxruntime`` wheel and every
``~/.cache/onnxslim/zoo/torchvision/<name>/model.onnx`` (``tools/make_zoo.py``; absent in CI, then skipped).

Per model, each command is one fresh child process, interleaved over --rounds rounds (best wall time:
load from other processes only ever adds; worst peak RSS):
  floor     ``python -c "import onnx; onnx.save(onnx.load(IN), OUT)"``
  onnxslim  ``onnxslim IN OUT --quiet``: the default lossless pipeline with validation, as a user runs it
  onnxsim   ``onnxsim IN OUT`` with its defaults, when installed (a benchmark-only tool, not a dependency)
Columns: nodes (subgraph bodies included) of the original and of each tool's output; wall time, CPU time
(user + system of the child) and peak RSS as ratios of the floor's; ``outputs`` = each output run in
onnxruntime on the same random valid inputs as the original (PP-OCR at det 320x320, rec 48x320,
cls 48x192), same names and shapes, within atol 1e-4 + rtol 1e-3; ``lat b1`` = batch-1 latency of the
onnxslim output over the original's (one thread, alternating runs, median run-by-run ratio).
The last line is the geometric mean of onnxslim's wall-time ratio (the start-up goal: <= 2.0).

``--split MODEL`` runs one child that times the phases of a run: interpreter start, imports
(``import onnxslim.cli``), then ``report.extra["timing"]`` of ``onnxslim.api.optimize`` (load, setup,
passes, write, validation, commit) and the passes one by one; the floor's child is split the same way
(import onnx, load, save).

Children run with bytecode caching on (PYTHONDONTWRITEBYTECODE removed from their environment): an
installed package has its .pyc files, and compiling onnxslim's sources on every run would add ~0.5 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench import REAL_SHAPES, WRAPPER, count_nodes, latency, md_table, outputs_match  # noqa: E402

from make_zoo import DEFAULT_OUT as ZOO  # noqa: E402
CHILD_TIMEOUT = 1800

FLOOR = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"


SPLIT_SLIM = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import onnxslim.cli  # what `onnxslim IN OUT` imports before it looks at its arguments
from onnxslim.api import optimize
t1, c1 = time.perf_counter(), time.process_time()
_, report = optimize(sys.argv[1], sys.argv[2], keep_model=False)
t2 = time.perf_counter()
passes = {}
for p in report.passes:
    passes[p["name"]] = passes.get(p["name"], 0.0) + p["seconds"]
print(json.dumps({"imports": {"wall": t1 - t0, "cpu": c1 - c0}, "run": t2 - t1,
                  "timing": report.extra.get("timing", {}), "passes": passes, "modules": len(sys.modules)}))
"""

SPLIT_FLOOR = """
import json, sys, time
def now():
    return {"wall": time.perf_counter(), "cpu": time.process_time()}
def since(a, b):
    return {k: b[k] - a[k] for k in a}
t0 = now()
import onnx
t1 = now()
m = onnx.load(sys.argv[1])
t2 = now()
onnx.save(m, sys.argv[2])
t3 = now()
print(json.dumps({"imports": since(t0, t1), "load": since(t1, t2), "save": since(t2, t3), "modules": len(sys.modules)}))
"""


@dataclass
class Run:
    wall: float
    cpu: float
    peak_mb: float
    ok: bool
    error: str = ""


@dataclass
class Row:
    model: str
    size_mb: float
    nodes: dict[str, int | None] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)  # tool -> Run as dict
    outputs: dict[str, str] = field(default_factory=dict)  # tool -> "ok" or why not
    latency_b1: float | None = None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_child(cmd: list[str], timeout: float = CHILD_TIMEOUT) -> Run:
    with tempfile.NamedTemporaryFile(suffix=".err") as err:
        try:
            p = subprocess.run([sys.executable, "-c", WRAPPER, err.name, *cmd], capture_output=True, text=True,
                               timeout=timeout, env=child_env())
        except subprocess.TimeoutExpired:
            return Run(timeout, timeout, 0.0, False, f"timeout after {timeout:g} s")
        text = Path(err.name).read_text(errors="replace")
    wall, cpu, rss, code = p.stdout.split()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ok = int(code) == 0
    return Run(float(wall), float(cpu), int(rss) / 1024, ok, "" if ok else (lines[-1][:160] if lines else f"exit {code}"))


def _exe(name: str) -> str | None:
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else shutil.which(name)


def commands(model: Path, out: Path) -> dict[str, list[str]]:
    slim = _exe("onnxslim")
    cmds = {"floor": [sys.executable, "-c", FLOOR, str(model), str(out)],
            "onnxslim": ([slim] if slim else [sys.executable, "-m", "onnxslim.cli"]) + [str(model), str(out), "--quiet"]}
    if _exe("onnxsim") and importlib.util.find_spec("onnxsim"):
        cmds["onnxsim"] = [_exe("onnxsim"), str(model), str(out)]
    return cmds


def default_models() -> list[tuple[str, Path]]:
    out = []
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is not None and spec.submodule_search_locations:
        for p in sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.onnx")):
            kind = next((k for k in REAL_SHAPES if f"_{k}_" in p.name), p.stem)
            out.append((f"ppocr_{kind}", p))
    if ZOO.is_dir():
        out += [(d.name, d / "model.onnx") for d in sorted(ZOO.iterdir()) if (d / "model.onnx").is_file()]
    return out


def check_feeds(name: str, model: Path) -> list[dict]:
    import onnx

    from onnxslim.validate import make_inputs

    proto = onnx.load(str(model), load_external_data=False)
    shapes = {}
    kind = name.removeprefix("ppocr_")
    if kind in REAL_SHAPES and len(proto.graph.input) == 1:
        shapes = {proto.graph.input[0].name: REAL_SHAPES[kind]}
    return [make_inputs(proto, shapes, seed=0)]


def bench_model(name: str, model: Path, work: Path, rounds: int, do_latency: bool) -> Row:
    work.mkdir(parents=True, exist_ok=True)
    row = Row(name, model.stat().st_size / 2**20, {"original": count_nodes(model)})
    outs = {t: work / f"{t}.onnx" for t in commands(model, work / "x.onnx")}
    cmds = {t: commands(model, outs[t])[t] for t in outs}
    runs: dict[str, list[Run]] = {t: [] for t in cmds}
    run_child(cmds["onnxslim"])  # warm-up: page cache and .pyc files, for every tool alike
    for _ in range(rounds):
        for t, cmd in cmds.items():
            if runs[t] and not runs[t][-1].ok:
                continue
            runs[t].append(run_child(cmd))
    for t, rs in runs.items():
        good = [r for r in rs if r.ok]
        best = Run(min(r.wall for r in good), min(r.cpu for r in good), max(r.peak_mb for r in good), True) \
            if good else rs[-1]
        row.runs[t] = asdict(best)
    feeds = check_feeds(name, model)
    reference = [__import__("onnxslim.validate", fromlist=["run_model"]).run_model(model, f) for f in feeds]
    for t, out in outs.items():
        if t == "floor":
            continue
        if not row.runs[t]["ok"] or not out.exists():
            row.nodes[t], row.outputs[t] = None, f"failed: {row.runs[t]['error']}"
            continue
        row.nodes[t] = count_nodes(out)
        ok, why = outputs_match(out, feeds, reference)
        row.outputs[t] = "ok" if ok else why
        if t == "onnxslim" and ok and do_latency:
            row.latency_b1 = latency(model, out, feeds[0], 2.0)[2]
    return row


def ratio(row: Row, tool: str, key: str) -> float | None:
    a, f = row.runs.get(tool), row.runs.get("floor")
    if not a or not f or not a["ok"] or not f["ok"] or not f[key]:
        return None
    return a[key] / f[key]


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def table(rows: list[Row]) -> str:
    tools = [t for t in ("onnxslim", "onnxsim") if any(t in r.runs for r in rows)]
    head = ["model", "MB", "nodes", *[f"{t} nodes" for t in tools], "floor s"]
    for t in tools:
        head += [f"{t} time ×", f"{t} cpu ×", f"{t} peak ×"]
    head += ["outputs", "lat b1"]
    out = [head]
    for r in rows:
        f = r.runs["floor"]
        cells = [r.model, f"{r.size_mb:.1f}", str(r.nodes["original"])]
        cells += ["-" if t not in r.runs else ("failed" if r.nodes.get(t) is None else str(r.nodes[t])) for t in tools]
        cells.append(f"{f['wall']:.2f}")
        for t in tools:
            for key in ("wall", "cpu", "peak_mb"):
                x = ratio(r, t, key)
                cells.append("-" if x is None else f"{x:.2f}")
        cells.append(", ".join(f"{t} {v}" if v != "ok" else f"{t} ok" for t, v in r.outputs.items()))
        cells.append("" if r.latency_b1 is None else f"{r.latency_b1:.2f}x")
        out.append(cells)
    return md_table(out)


def split(model: Path, rounds: int, label: str = "") -> str:
    """Phases of one onnxslim run and of the floor, each the median over ``rounds`` fresh children."""
    with tempfile.TemporaryDirectory(prefix="onnxslim-split-") as tmp:
        def child(code: str) -> tuple[dict, float]:
            import time

            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", code, str(model), str(Path(tmp) / "out.onnx")],
                               capture_output=True, text=True, env=child_env(), check=True)
            return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t0

        child(SPLIT_SLIM)  # warm-up
        slim = sorted((child(SPLIT_SLIM) for _ in range(rounds)), key=lambda x: x[1])[rounds // 2]
        floor = sorted((child(SPLIT_FLOOR) for _ in range(rounds)), key=lambda x: x[1])[rounds // 2]
    (s, s_wall), (f, f_wall) = slim, floor
    label = label or model.name
    lines = [f"{label} ({model.stat().st_size / 2**20:.1f} MB), median of {rounds} fresh processes "
             "(wall seconds; CPU seconds of all threads in brackets):", ""]
    cell = lambda x: f"{x['wall']:.3f} ({x['cpu']:.3f})"  # noqa: E731
    t = s["timing"]
    f_run = f["imports"]["wall"] + f["load"]["wall"] + f["save"]["wall"]
    rows = [["phase", "onnxslim", "floor"],
            ["interpreter start + exit", f"{s_wall - s['imports']['wall'] - s['run']:.3f}", f"{f_wall - f_run:.3f}"],
            [f"imports ({s['modules']} / {f['modules']} modules)", cell(s["imports"]), cell(f["imports"])]]
    floor_cells = {"load": cell(f["load"]), "write": cell(f["save"])}
    for phase in ("load", "setup", "passes", "write", "validation", "latency", "commit"):
        if phase in t:
            rows.append([phase, cell(t[phase]), floor_cells.get(phase, "")])
    rows.append(["total (wall of the child)", f"{s_wall:.3f}", f"{f_wall:.3f}"])
    lines.append(md_table(rows))
    lines += ["", "passes: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(s["passes"].items(), key=lambda kv: -kv[1]))]
    return "\n".join(lines)


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, help="model files (default: PP-OCR + zoo)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per model (default 2)")
    ap.add_argument("--filter", default="", help="only models whose name contains this")
    ap.add_argument("--split", metavar="MODEL", help="time split of one run (a name from the default set, or a path)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)

    models = [(p.stem, p) for p in args.models] or default_models()
    if args.split:
        path, label = Path(args.split), args.split
        if not path.is_file():
            path = next((p for n, p in models if args.split in (n, p.stem)), None)
            if path is None:
                sys.exit(f"--split {args.split}: no such model")
        print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.1f}\n")
        print(split(path, max(args.rounds, 3), label))
        return 0
    models = [(n, p) for n, p in models if args.filter in n]
    if not models:
        sys.exit("no models (install rapidocr-onnxruntime, build the zoo with tools/make_zoo.py, or give files)")
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="onnxslim-bench-") as tmp:
        for name, path in models:
            rows.append(bench_model(name, path, Path(tmp) / name, args.rounds, not args.no_latency))
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"CPU: {cpu_line()}; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows))
    print()
    for t in ("onnxslim", "onnxsim"):
        g = geomean([ratio(r, t, "wall") for r in rows])
        c = geomean([ratio(r, t, "cpu") for r in rows])
        if g:
            print(f"{t}: wall time {g:.2f}x the floor, CPU time {c:.2f}x (geometric mean over {len(rows)} models)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
