"""Distillation of encoders (models/bert_tiny.onnx): tensors with a [batch, sequence] layout are matched only
at the real tokens (the attention_mask's ones); padding positions are read by nothing downstream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxslim.api import optimize  # noqa: E402
from onnxslim.distill.train import DistillConfig, _Trainer  # noqa: E402
from onnxslim.validate import token_mask_input  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BERT, CALIB = ROOT / "models" / "bert_tiny.onnx", ROOT / "models" / "bert_calib.npz"


def _setup(encoder: bool) -> tuple[_Trainer, dict[str, np.ndarray]]:
    model, _ = optimize(onnx.load(str(BERT)), None, passes="lossless", validate=False, latency=False)
    d = np.load(CALIB)
    inputs = {k: d[k][:24] for k in ("input_ids", "attention_mask", "token_type_ids")}
    cfg = DistillConfig(steps=1, batch=8, augment=False, feature_weight=0.0, encoder=encoder)
    return _Trainer(model, model, inputs, None, cfg, lambda m: None), inputs


def test_mask_input_is_found_by_name_and_values() -> None:
    d = np.load(CALIB)
    assert token_mask_input({k: d[k] for k in d.files}) == "attention_mask"
    assert token_mask_input({"attention_mask": np.full((2, 3), 2, np.int64)}) is None  # not 0/1
    assert token_mask_input({"x": np.zeros((2, 3, 8, 8), np.float32)}) is None


@pytest.mark.parametrize("encoder", [True, False])
def test_padding_positions_do_not_count(encoder: bool) -> None:
    """A student that differs from the teacher only at padding positions has zero output loss when the
    tokens are masked, and a positive one when they are not (the old behaviour)."""
    tr, inputs = _setup(encoder)
    feeds = {k: v[:8] for k, v in inputs.items()}
    pad = feeds["attention_mask"] == 0
    assert pad.any() and (~pad).any()
    t = tr.run_teacher(feeds)
    s = {o: torch.from_numpy(t[o].copy()) for o in tr.kinds}
    seq = [o for o in tr.kinds if t[o].ndim == 3]
    assert seq
    for o in seq:
        s[o][torch.from_numpy(pad)] += 5.0
    loss = float(tr.output_loss(s, t, tr._mask(feeds)))
    assert (loss == 0.0) if encoder else (loss > 1e-3)
    s[seq[0]][torch.from_numpy(~pad)] += 1.0  # a real token off: seen either way
    assert float(tr.output_loss(s, t, tr._mask(feeds))) > 0.0


def test_encoder_features_are_the_residual_stream_and_lr_is_small() -> None:
    """Every matched feature is read by a MatMul and by a residual Add (a block's LayerNorm output), and the
    default learning rate is the encoder one; ``encoder=False`` falls back to the generic choices."""
    from onnxslim.distill.train import LR_ENCODER, LR_FLOAT

    model, _ = optimize(onnx.load(str(BERT)), None, passes="lossless", validate=False, latency=False)
    d = np.load(CALIB)
    inputs = {k: d[k][:24] for k in ("input_ids", "attention_mask", "token_type_ids")}
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    on = _Trainer(model, model, inputs, None, DistillConfig(steps=1, batch=8), lambda m: None)
    off = _Trainer(model, model, inputs, None, DistillConfig(steps=1, batch=8, encoder=False), lambda m: None)
    assert on.features and all({"Add", "MatMul"} <= readers[f] for f in on.features)
    assert on.lr == LR_ENCODER and off.lr == LR_FLOAT and on.token_mask == "attention_mask"
    assert off.token_mask is None and set(off.features) != set(on.features)
