"""Fetch real If/Loop/LSTM-heavy ONNX models shipped inside PyPI wheels into a cache folder (never committed).

Wheels (pinned; ``pip download --no-deps``, the ordinary client, like tools/make_zoo_encoder.py):

  silero-vad 6.2.3  silero_vad/data/*.onnx   voice activity: If on the sample rate (8k/16k), LSTM state,
                                             a half-precision variant and an If-less opset-18 one
  ddddocr 1.6.1     ddddocr/*.onnx           captcha OCR: CNN + LSTM (common_old at opset 12), a detector

Output: DIR/real/<wheel-stem>/<file>.onnx and DIR/real/index.json (file -> wheel, sha256, size, nodes, opset).
Models already extracted are kept unless ``--force``.

Run: python tools/make_real_models.py [--cache DIR] [--only silero-vad,ddddocr] [--force]
Default cache: $ONNXSLIM_ZOO, else ~/.cache/onnxslim/zoo (the same as tools/make_zoo_encoder.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS: dict[str, str] = {"silero-vad": "6.2.3", "ddddocr": "1.6.1"}


def default_cache() -> Path:
    from make_zoo import ZOO_ROOT  # numpy only

    return ZOO_ROOT


def wheel_file(cache: Path, package: str, version: str) -> Path:
    """The wheel in ``cache/wheels``, downloaded now when it is not there yet."""
    folder = cache / "wheels"
    stem = package.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                    f"{package}=={version}"], check=True)
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download of {package}=={version} left no wheel in {folder}")
    return found[0]


def extract(whl: Path, out: Path, force: bool) -> list[Path]:
    """Every .onnx member of the wheel into ``out`` (flat, by base name)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(whl) as z:
        for member in z.namelist():
            if not member.endswith(".onnx"):
                continue
            dest = out / Path(member).name
            if force or not dest.exists():
                tmp = dest.with_suffix(".part")
                tmp.write_bytes(z.read(member))
                tmp.replace(dest)
            written.append(dest)
    return written


def describe(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size,
            "nodes": len(m.graph.node), "opset": opset,
            "ops": sorted({n.op_type for n in m.graph.node} & {"If", "Loop", "Scan", "LSTM", "GRU"})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--only", default=",".join(WHEELS), help="comma-separated packages (default: all)")
    ap.add_argument("--force", action="store_true", help="extract again models already in the cache")
    a = ap.parse_args(argv)
    wanted = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in WHEELS]
    if unknown:
        print(f"unknown package(s) {', '.join(unknown)} (known: {', '.join(WHEELS)})", file=sys.stderr)
        return 2
    index_path = a.cache / "real" / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for package in wanted:
        whl = wheel_file(a.cache, package, WHEELS[package])
        for path in extract(whl, a.cache / "real" / package.replace("-", "_"), a.force):
            info = {"wheel": whl.name, **describe(path)}
            index[str(path.relative_to(a.cache / "real"))] = info
            print(f"{path}: {info['nodes']} nodes, opset {info['opset']}, {info['bytes'] / 1e6:.1f} MB {info['ops']}")
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
