"""Folder mode: ``onnxslim IN_DIR OUT_DIR [options] --jobs N``.

One child process per model (a crash or a refusal in one model cannot take the others down, and each
child's memory is returned when it ends), N at a time; each child is the ordinary command with the same
options and its own JSON report. The parent prints a summary table and, with --json, writes every
report in one file. The exit code is the worst child's (0 all written, 1 some refused/failed, 2 bad input).
For a cluster, run the same command once per model as one task each in an existing engine (a Ray task, a
batch-scheduler array job); the per-model JSON reports aggregate the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from onnxslim.errors import InputError


def _models(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.onnx") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def run_folder(in_dir: Path, out_dir: Path, args: list[str], *, jobs: int = 1, json_path: str | None = None,
               quiet: bool = False) -> int:
    """Optimize every .onnx under ``in_dir`` into the same relative path under ``out_dir``."""
    models = _models(in_dir)
    if not models:
        raise InputError(f"IN folder '{in_dir}' holds no .onnx file")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT '{out_dir}' is a file; folder mode needs an output folder")
    if out_dir.resolve() == in_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise InputError(f"OUT folder '{out_dir}' must not be IN or inside it (its outputs would be inputs)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="onnxslim-folder-"))

    def one(i: int, src: Path) -> dict[str, Any]:
        dst = out_dir / src.relative_to(in_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        rep = tmp / f"{i}.json"
        cmd = [sys.executable, "-m", "onnxslim.cli", str(src), str(dst), *args, "--json", str(rep), "--quiet"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        row: dict[str, Any] = {"model": str(src.relative_to(in_dir)), "exit_code": p.returncode,
                               "seconds": round(time.perf_counter() - t0, 2),
                               "error": p.stderr.strip().splitlines()[-1] if p.returncode and p.stderr.strip() else ""}
        if rep.exists():
            row["report"] = json.loads(rep.read_text())
        return row

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            rows = list(pool.map(lambda a: one(*a), enumerate(models)))
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
    if not quiet:
        print(format_folder(rows))
    if json_path:
        text = json.dumps({"models": rows}, indent=2, allow_nan=False)
        if json_path == "-":
            print(text)
        else:
            Path(json_path).write_text(text)
    return max((r["exit_code"] for r in rows), default=0)


def format_folder(rows: list[dict[str, Any]]) -> str:
    table = [["model", "exit", "nodes", "size", "time", "result"]]
    for r in rows:
        rep = r.get("report") or {}
        b, a = rep.get("before") or {}, rep.get("after") or {}
        nodes = f"{b['nodes']} -> {a['nodes']}" if "nodes" in b and "nodes" in a else "-"
        size = f"{a['size'] / b['size']:.2f}x" if b.get("size") and a.get("size") else "-"
        result = "written" if r["exit_code"] == 0 else (r["error"].removeprefix("onnxslim: error: ") or "failed")
        table.append([r["model"], str(r["exit_code"]), nodes, size, f"{r['seconds']:.1f} s", result[:100]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ok = sum(1 for r in rows if r["exit_code"] == 0)
    lines.append(f"{ok} of {len(rows)} model(s) written")
    return "\n".join(lines)
