"""Lossless benchmark: onnxslim against the onnx load+save floor, onnxsim and onnxruntime's offline optimizer.

    python tools/bench.py                       # every .onnx in models/
    python tools/bench.py --real                # also the PP-OCR det/rec/cls models of the rapidocr-onnxruntime wheel
    python tools/bench.py --only-real           # only those
    python tools/bench.py --big-mb 300          # a generated ~300 MB model with external data
    python tools/bench.py --big-mb 300 --big-kind conv [--big-embedded]   # the Conv+BN stack (issue 13)
    python tools/bench.py DIR --json out.json   # any folder; --json writes every number

Per model and tool, each command runs in its own child process, interleaved over --rounds rounds:
  time      wall time of the child (best round: load from other processes only ever adds)
  peak MB   ru_maxrss of the child, read by a small wrapper process (see run_child; worst round)
  nodes     all nodes, subgraph bodies included; size = .onnx file plus the external data it references
  latency   onnxruntime, 1 thread, batch 1: the original and the tool's output run alternately in this
            process (onnxslim.runtime.paired_latency), ratio = median of the run-by-run ratios
  outputs   the tool's output run on the same random inputs as the original (at batch 1 and, when the
            batch is dynamic, batch 2): same names and shapes, values within atol 1e-4 + rtol 1e-3

Tools: floor = onnx.load + onnx.save (external data kept when the model has it); onnxslim = the CLI
(lossless preset) with validation and with --no-validate; onnxsim = its CLI with default options (when
installed; they do not check outputs); ort-basic / ort-extended = onnxruntime SessionOptions.optimized_model_filepath at
ORT_ENABLE_BASIC / ORT_ENABLE_EXTENDED (extended writes com.microsoft fused ops: onnxruntime-only models).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim.runtime import _extensions_library, make_session, paired_latency  # noqa: E402
from onnxslim.validate import make_inputs, output_metrics, run_model  # noqa: E402

ATOL, RTOL = 1e-4, 1e-3
CHILD_TIMEOUT = 1800

# Dynamic spatial dims of the PP-OCR models need real sizes (a 1x1 image does not go through a detector).
REAL_SHAPES = {"det": [1, 3, 320, 320], "rec": [1, 3, 48, 320], "cls": [1, 3, 48, 192]}

FLOOR = """
import sys, onnx
src, out, external = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = onnx.load(src)
onnx.save(m, out, save_as_external_data=external, location=out.rsplit("/", 1)[-1] + ".data")
"""

ORT_OFFLINE = """
import sys, onnxruntime as ort
src, out, external, lib, level = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
so.optimized_model_filepath = out
if external:
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                out.rsplit("/", 1)[-1] + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
if lib:
    so.register_custom_ops_library(lib)
ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
"""


WRAPPER = """
import os, sys, time, resource
err = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
null = os.open(os.devnull, os.O_WRONLY)
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], dict(os.environ),
                      file_actions=[(os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, err, 2)])
_, status = os.waitpid(pid, 0)
wall = time.perf_counter() - t0
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(wall, r.ru_utime + r.ru_stime, r.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


@dataclass
class Run:
    seconds: float
    peak_mb: float
    ok: bool
    error: str = ""


@dataclass
class Result:
    """One tool on one model (the floor row carries the original's nodes, size and latency)."""
    model: str
    tool: str
    seconds: float | None = None
    peak_mb: float | None = None
    time_x: float | None = None
    mem_x: float | None = None
    nodes: int | None = None
    size: int | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    outputs_ok: bool | None = None
    note: str = ""


# ---------------------------------------------------------------- child processes

def run_child(cmd: list[str], timeout: float = CHILD_TIMEOUT) -> Run:
    """Wall time and peak RSS of one child, spawned by a small fresh wrapper process.

    Not os.wait4 from here: the child is vforked, and at exec Linux records the high-water RSS of the
    address space it leaves (ours) as the child's ru_maxrss, so every child would show at least this
    process's peak. The wrapper's own peak (~14 MB) is below any child's (python + onnx is ~45 MB)."""
    with tempfile.NamedTemporaryFile(suffix=".err") as err:
        # Own session: on timeout the wrapper and the tool go together (killpg), nothing left running.
        p = subprocess.Popen([sys.executable, "-c", WRAPPER, err.name, *cmd], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return Run(timeout, 0.0, False, f"timeout after {timeout:g} s")
        text = Path(err.name).read_text(errors="replace")
    seconds, _cpu, maxrss_kb, code = stdout.split()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ok = int(code) == 0
    return Run(float(seconds), int(maxrss_kb) / 1024, ok,
               "" if ok else (lines[-1][:160] if lines else f"exit {code}"))


def _exe(name: str) -> str | None:
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else shutil.which(name)


def floor_cmd(model: Path, out: Path, ctx: dict) -> list[str]:
    return [sys.executable, "-c", FLOOR, str(model), str(out), "1" if ctx["external"] else "0"]


def onnxslim_cmd(model: Path, out: Path, ctx: dict, validate: bool = True) -> list[str]:
    cmd = [_exe("onnxslim") or sys.executable, str(model), str(out), "--quiet"]
    if not _exe("onnxslim"):
        cmd[1:1] = ["-m", "onnxslim.cli"]
    if ctx.get("inputs_npz"):
        cmd += ["--inputs", str(ctx["inputs_npz"])]
    return cmd if validate else cmd + ["--no-validate"]


def onnxsim_cmd(model: Path, out: Path, ctx: dict) -> list[str]:
    cmd = [_exe("onnxsim"), str(model), str(out)]
    if ctx["external"]:
        cmd.append("--save-as-external-data")
    if ctx.get("shape_args"):
        cmd += ["--test-input-shape", *ctx["shape_args"]]
    return cmd


def ort_offline_cmd(level: str):
    def cmd(model: Path, out: Path, ctx: dict) -> list[str]:
        return [sys.executable, "-c", ORT_OFFLINE, str(model), str(out), "1" if ctx["external"] else "0",
                _extensions_library() or "", level]
    return cmd


def tools_available(skip: tuple[str, ...] = ()) -> dict:
    tools = {"floor": floor_cmd,
             "onnxslim --no-validate": lambda m, o, c: onnxslim_cmd(m, o, c, validate=False),
             "onnxslim": onnxslim_cmd}
    if _exe("onnxsim") and importlib.util.find_spec("onnxsim"):
        tools["onnxsim"] = onnxsim_cmd
    tools["ort-basic"] = ort_offline_cmd("ORT_ENABLE_BASIC")
    tools["ort-extended"] = ort_offline_cmd("ORT_ENABLE_EXTENDED")
    return {k: v for k, v in tools.items() if k == "floor" or k not in skip}


def time_tools(model: Path, work: Path, ctx: dict, rounds: int) -> dict[str, tuple[Run, Path]]:
    """Every tool on the model, interleaved over rounds; best time, worst memory, first failure kept."""
    tools = tools_available(ctx.get("skip", ()))
    runs: dict[str, list[Run]] = {t: [] for t in tools}
    outs = {}
    for _ in range(rounds):
        for tool, make_cmd in tools.items():
            if runs[tool] and not runs[tool][-1].ok:
                continue  # a tool that failed once fails again: do not pay for it every round
            folder = work / tool.replace(" ", "_").replace("-", "")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            outs[tool] = folder / "out.onnx"
            runs[tool].append(run_child(make_cmd(model, outs[tool], ctx)))
    best = {}
    for tool, rs in runs.items():
        good = [r for r in rs if r.ok]
        if good:
            best[tool] = (Run(min(r.seconds for r in good), max(r.peak_mb for r in good), True), outs[tool])
        else:
            best[tool] = (rs[-1], outs[tool])
    return best


# ---------------------------------------------------------------- model facts

def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def count_nodes(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(len(g.node) for g in _graphs(m.graph)) + sum(len(f.node) for f in m.functions)


def external_files(path: Path) -> set[Path]:
    m = onnx.load(str(path), load_external_data=False)
    files = set()
    for g in _graphs(m.graph):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                files.update(path.parent / e.value for e in t.external_data if e.key == "location")
    return files


def model_size(path: Path) -> int:
    """Bytes of the .onnx file plus the external data files it references."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))


# ---------------------------------------------------------------- correctness and latency

def feeds_for(model: Path, ctx: dict) -> list[dict[str, np.ndarray]]:
    """Inputs at the given/default shape and, when the batch is dynamic, at batch 2 too."""
    proto = onnx.load(str(model), load_external_data=False)
    shapes = ctx.get("input_shapes") or {}
    feeds = [make_inputs(proto, shapes, seed=0)]
    dynamic = any(not (vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_value > 0)
                  for vi in proto.graph.input if vi.name not in {t.name for t in proto.graph.initializer})
    if dynamic and not ctx.get("big"):
        shapes2 = {k: [2, *v[1:]] for k, v in shapes.items()}
        feeds.append(make_inputs(proto, shapes2, seed=1, batch=2))
    return feeds


def reference_outputs(model: Path, feeds: list[dict]) -> list[tuple[list[str], list[np.ndarray]]]:
    return [run_model(model, f) for f in feeds]


def outputs_match(candidate: Path, feeds: list[dict], reference: list) -> tuple[bool, str]:
    """Same output names, shapes and values (atol/rtol) as the original on every feed."""
    for f, (names, ref) in zip(feeds, reference):
        try:
            cand_names, outs = run_model(candidate, f)
        except Exception as e:  # noqa: BLE001 - a tool output that does not run is a finding, not a crash
            return False, f"does not run: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
        if cand_names != names:
            return False, f"output names {cand_names} != {names}"
        batch = next(iter(f.values())).shape[:1] if f else ()
        for nm, a, b in zip(names, ref, outs):
            m = output_metrics(nm, a, b, ATOL, RTOL)
            if m.shape != m.shape_optimized:
                return False, f"'{nm}' shape {m.shape_optimized} != {m.shape} (input batch {list(batch)})"
            if not m.within_tolerance:
                return False, f"'{nm}' max abs err {m.max_abs:.2e}, max rel {m.max_rel:.2e}"
    return True, ""


def latency(original: Path, candidate: Path, feeds: dict, seconds: float) -> tuple[float, float, float]:
    """(original ms, candidate ms, median run-by-run ratio) at 1 thread, alternating runs."""
    a, b = make_session(original, threads=1), make_session(candidate, threads=1)
    return paired_latency(a, b, feeds, seconds=seconds)


# ---------------------------------------------------------------- one model

def model_context(model: Path, work: Path, big: bool) -> dict:
    proto = onnx.load(str(model), load_external_data=False)
    ctx: dict = {"external": bool(external_files(model)), "big": big}
    real = next((v for k, v in REAL_SHAPES.items() if f"_{k}_" in model.name or model.stem.endswith(f"_{k}")), None)
    if real and len(proto.graph.input) == 1:
        name = proto.graph.input[0].name
        ctx["input_shapes"] = {name: real}
        ctx["shape_args"] = [f"{name}:{','.join(map(str, real))}"]
        # onnxslim's --input-shape would fix the dims in the output; --inputs only feeds validation.
        ctx["inputs_npz"] = work / "inputs.npz"
        np.savez(ctx["inputs_npz"], **make_inputs(proto, ctx["input_shapes"], seed=0))
    return ctx


def bench_model(model: Path, work: Path, *, rounds: int, big: bool = False, lat_seconds: float = 1.0,
                do_latency: bool = True, skip: tuple[str, ...] = ()) -> list[Result]:
    work.mkdir(parents=True, exist_ok=True)
    ctx = model_context(model, work, big)
    ctx["skip"] = skip
    timed = time_tools(model, work, ctx, rounds)
    floor_run, _ = timed["floor"]
    try:
        feeds = feeds_for(model, ctx)
        reference = reference_outputs(model, feeds)
    except Exception as e:  # noqa: BLE001 - NotValidatable or an original that does not run
        feeds, reference = [], []
        ref_error = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    results = []
    base = Result(model.stem, "original / floor", floor_run.seconds, floor_run.peak_mb, 1.0, 1.0,
                  count_nodes(model), model_size(model), note="" if floor_run.ok else floor_run.error)
    results.append(base)
    if not reference:
        base.note = f"original does not run: {ref_error}"
    for tool, (r, out) in timed.items():
        if tool == "floor":
            continue
        res = Result(model.stem, tool, r.seconds, r.peak_mb,
                     r.seconds / floor_run.seconds if floor_run.ok else None,
                     r.peak_mb / floor_run.peak_mb if floor_run.ok else None)
        results.append(res)
        if not r.ok or not out.exists():
            res.outputs_ok, res.note = False, f"failed: {r.error}"
            continue
        res.nodes, res.size = count_nodes(out), model_size(out)
        if reference:
            res.outputs_ok, res.note = outputs_match(out, feeds, reference)
        if do_latency and reference and res.outputs_ok and tool != "onnxslim --no-validate":
            try:
                before, after, ratio = latency(model, out, feeds[0], lat_seconds)
                # Shown: the paired ratio. Milliseconds of different pairs are not comparable on a busy machine.
                res.latency_ms, res.latency_ratio = after, ratio
                if base.latency_ms is None:
                    base.latency_ms = before
            except Exception as e:  # noqa: BLE001 - latency is information
                res.note = f"latency: {str(e).splitlines()[0][:100]}"
    return results


# ---------------------------------------------------------------- report

def _fmt_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit, div in (("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def latency_cell(r: Result) -> str:
    if r.latency_ratio is not None:
        return f"{r.latency_ratio:.2f}x"
    return "" if r.latency_ms is None else (f"{r.latency_ms:.3f} ms" if r.latency_ms < 1 else f"{r.latency_ms:.1f} ms")


def md_table(rows: list[list[str]]) -> str:
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(row)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows[1:]])


def summary(results: list[Result]) -> str:
    """One row per model: node counts of every tool (outputs checked), onnxslim's time and memory vs the floor."""
    tools = list(dict.fromkeys(r.tool for r in results if r.tool not in ("original / floor", "onnxslim --no-validate")))
    by_model: dict[str, dict[str, Result]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.tool] = r
    rows = [["model", "nodes", *[f"{t} nodes" for t in tools], "onnxslim time × floor (--no-validate)",
             "onnxslim peak × floor"]]
    for name, rs in by_model.items():
        def nodes(t: str) -> str:
            r = rs.get(t)
            if r is None or r.nodes is None:
                return "failed" if r is not None else "-"
            return f"{r.nodes}" + ("" if r.outputs_ok else " (outputs differ)")
        slim, nv = rs.get("onnxslim"), rs.get("onnxslim --no-validate")
        rows.append([name, str(rs["original / floor"].nodes), *[nodes(t) for t in tools],
                     f"{slim.time_x:.2f} ({nv.time_x:.2f})" if slim and nv and slim.time_x and nv.time_x else "",
                     f"{slim.mem_x:.2f}" if slim and slim.mem_x else ""])
    return md_table(rows)


def markdown(results: list[Result]) -> str:
    head = ["model", "tool", "time s", "× floor", "peak MB", "× floor", "nodes", "size", "latency", "outputs"]
    rows = [head]
    last = None
    for r in results:
        ok = "" if r.outputs_ok is None else ("ok" if r.outputs_ok else "**NO**")
        rows.append([
            r.model if r.model != last else "", r.tool,
            "" if r.seconds is None else f"{r.seconds:.2f}",
            "" if r.time_x is None else f"{r.time_x:.2f}",
            "" if r.peak_mb is None else f"{r.peak_mb:.0f}",
            "" if r.mem_x is None else f"{r.mem_x:.2f}",
            "" if r.nodes is None else str(r.nodes), _fmt_size(r.size),
            latency_cell(r),
            ok + (f" ({r.note})" if r.note else "")])
        last = r.model
    return md_table(rows)


def acceptance(results: list[Result], big: bool) -> list[str]:
    """The issue's lossless acceptance numbers, checked on these results."""
    lines = []
    by_model: dict[str, dict[str, Result]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.tool] = r
    for name, rs in by_model.items():
        slim, sim = rs.get("onnxslim"), rs.get("onnxsim")
        if slim and (not slim.outputs_ok):
            lines.append(f"FAIL {name}: onnxslim output does not match the original ({slim.note})")
        if slim and sim and sim.nodes is not None and slim.nodes is not None and slim.nodes > sim.nodes:
            lines.append(f"FAIL {name}: onnxslim {slim.nodes} nodes > onnxsim {sim.nodes}")
        if big:
            nv = rs.get("onnxslim --no-validate")
            for r, limit in ((nv, 2.0), (slim, 3.0)):
                if r and r.time_x is not None and r.time_x > limit:
                    lines.append(f"FAIL {name}: {r.tool} time {r.time_x:.2f}x floor > {limit}x")
            for r in (nv, slim):
                if r and r.mem_x is not None and r.mem_x > 1.5:
                    lines.append(f"FAIL {name}: {r.tool} peak memory {r.mem_x:.2f}x floor > 1.5x")
    return lines or ["acceptance: all checks passed"]


def real_models() -> list[Path]:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("--real: rapidocr-onnxruntime is not installed (pip install rapidocr-onnxruntime)")
    return sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.onnx"))


def make_big(folder: Path, mb: int, kind: str = "matmul", embedded: bool = False) -> Path:
    """The generated big model: the MatMul stack (no pass rewrites its weights) of tools/make_models.py, or
    the Conv+BatchNorm stack of tools/make_big_models.py (bn-fold rewrites every conv weight)."""
    if kind == "matmul" and not embedded:
        cmd = [sys.executable, str(ROOT / "tools" / "make_models.py"), "--big", str(folder), "--big-mb", str(mb)]
    else:
        cmd = [sys.executable, str(ROOT / "tools" / "make_big_models.py"), str(folder), "--mb", str(mb), "--kind",
               "conv" if kind == "conv" else "matmul"] + (["--embedded"] if embedded else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder / "big.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=ROOT / "models")
    ap.add_argument("--real", action="store_true", help="also the PP-OCR models of the rapidocr-onnxruntime wheel")
    ap.add_argument("--only-real", action="store_true", help="only the PP-OCR models")
    ap.add_argument("--big-mb", type=int, help="only a generated model of about this many MB (external data)")
    ap.add_argument("--big-kind", choices=("matmul", "conv"), default="matmul",
                    help="--big-mb: a MatMul stack (weights kept) or a Conv+BatchNorm stack (every weight rewritten)")
    ap.add_argument("--big-embedded", action="store_true", help="--big-mb: weights inside the .onnx (below 2 GB)")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3; 2 with --big-mb)")
    ap.add_argument("--filter", default="", help="only models whose name contains this")
    ap.add_argument("--skip", action="append", default=[], help="leave out a tool (onnxsim, ort-basic, ...); repeatable")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--latency-seconds", type=float, default=2.0, help="time budget of each paired latency")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--work", type=Path, help="keep outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="onnxslim-bench-"))
    results: list[Result] = []
    try:
        if args.big_mb:
            model = make_big(work / "model", args.big_mb, args.big_kind, args.big_embedded)
            models, big = [model], True
        else:
            models = [] if args.only_real else sorted(args.folder.glob("*.onnx"))
            if args.real or args.only_real:
                models += real_models()
            big = False
        models = [m for m in models if args.filter in m.name]
        for m in models:
            t0 = time.perf_counter()
            rs = bench_model(m, work / m.stem, rounds=args.rounds or (2 if big else 3), big=big,
                             lat_seconds=args.latency_seconds, do_latency=not (args.no_latency or big),
                             skip=tuple(args.skip))
            results += rs
            print(f"{m.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(results))
    print()
    print(markdown(results))
    print()
    for line in acceptance(results, big):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
