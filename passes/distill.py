"""distill: train the current model's float parameters against the original model (knowledge distillation).

The teacher is the original model (``ctx.original``), run in onnxruntime; the student is the model this
pass receives (after ``prune``, or a QDQ model after ``quantize-static``: quantization-aware fine-tuning
with fixed scales). The engine (onnxslim.distill, torch as the autograd engine, an optional extra)
translates the student to torch, trains on the ``--calib`` data (labels used when given) with a held-out
split for early stopping, and the trained values are written back into the same ONNX graph: same nodes,
names and shapes, only initializer values change. See onnxslim/distill/train.py for the loss and its
weights. The report (``report.extra["distill"]``) has the loss curve, the time, and held-out loss, top-1
agreement and cosine against the teacher before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx import ModelProto

from onnxslim.errors import InputError
from onnxslim.manager import Context, Pass, PassResult, register

INSTALL_HINT = 'distill needs torch: pip install -e ".[distill]"'


@dataclass(frozen=True)
class DistillOptions:
    distill_steps: int = field(default=300, metadata={"help": "Training steps (at most).", "min": 1})
    distill_time: float = field(default=0.0, metadata={
        "help": "Time limit in seconds (0 = none; a run stopped by time is not reproducible step for step).",
        "min": 0.0})
    distill_lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate (warm-up, cosine decay over the steps or the time limit); default 3e-3, "
                "3e-4 on a quantized (QDQ) model or an encoder (an attention_mask input).",
        "min": 0.0})
    distill_batch: int = field(default=32, metadata={"help": "Batch size.", "min": 1})
    distill_seed: int = field(default=0, metadata={"help": "Seed: split, order, augmentation.", "min": 0})
    distill_temperature: float = field(default=4.0, metadata={"help": "KD temperature on score outputs.",
                                                              "min": 0.0})
    distill_holdout: float = field(default=0.2, metadata={
        "help": "Fraction of --calib held out for early stopping and the report (at most 256 samples).",
        "min": 0.0, "max": 0.9})
    distill_loss: str = field(default="auto", metadata={
        "help": "Output loss: auto (KL on [N, C] scores, else MSE), kl or mse.", "choices": ("auto", "kl", "mse")})
    distill_feature_weight: float = field(default=0.5, metadata={
        "help": "Weight of feature matching on intermediate tensors (0 = off).", "min": 0.0})
    distill_label_weight: float = field(default=0.5, metadata={
        "help": "Weight of the cross-entropy on --calib labels (when given).", "min": 0.0})
    distill_hard_weight: float = field(default=0.0, metadata={
        "help": "Weight of a cross-entropy against the teacher's top-1 class (hard pseudo-labels; 0 = off).",
        "min": 0.0})
    distill_augment: bool = field(default=True, metadata={
        "help": "Augment (from the second pass over the data): mixup, shifts and noise on images, "
                "token dropout on ids."})
    distill_ema: float = field(default=0.98, metadata={
        "help": "Decay of the moving average of the weights that is evaluated and kept (0 = the last step's).",
        "min": 0.0, "max": 0.9999})
    distill_patience: int = field(default=8, metadata={
        "help": "Held-out evaluations without improvement before stopping early.", "min": 1})
    distill_threads: int = field(default=1, metadata={"help": "torch threads (fixed for reproducibility).",
                                                      "min": 1})


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


@register
class Distill(Pass):
    name = "distill"
    description = ("Knowledge distillation from the original model on --calib data (torch, optional extra); "
                   "trains weights only, QAT through Q/DQ on quantized models")
    lossless = False
    level = "model"
    Options = DistillOptions

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        opts = self.options
        try:
            import torch  # noqa: F401 - only to tell a missing extra from a failure inside the engine
        except ImportError:
            raise InputError(INSTALL_HINT) from None
        from onnxslim.distill.train import DistillConfig, distill
        from onnxslim.distill.writeback import write_back

        calib = ctx.calibration(model, required=True)
        if not calib.measured:
            ctx.warn("distill: random calibration data: the student learns the teacher on noise")
        cfg = DistillConfig(steps=opts.distill_steps, time_limit=opts.distill_time, lr=opts.distill_lr,  # None: by model kind
                            batch=opts.distill_batch, seed=opts.distill_seed,
                            temperature=opts.distill_temperature, holdout=opts.distill_holdout,
                            loss=opts.distill_loss, feature_weight=opts.distill_feature_weight,
                            label_weight=opts.distill_label_weight, hard_weight=opts.distill_hard_weight,
                            augment=opts.distill_augment,
                            patience=opts.distill_patience, ema=opts.distill_ema, threads=opts.distill_threads)
        ctx.progress("distill: translating to torch")
        outcome = distill(model, ctx.original.proto, calib.inputs, calib.labels if calib.measured else None,
                          cfg, progress=ctx.progress)
        new, changed = write_back(model, outcome.values)
        details = outcome.summary()
        details["changed_initializers"] = len(changed)
        b, a = outcome.before, outcome.after
        where = "training data (no hold-out)" if outcome.holdout_is_train else f"{b.samples} held-out samples"
        notes = [f"held-out loss {b.loss:.4g} -> {a.loss:.4g}, top-1 agreement {_pct(b.top1)} -> {_pct(a.top1)}, "
                 f"cosine {b.cosine:.4f} -> {a.cosine:.4f} ({where})",
                 f"{outcome.steps} steps in {outcome.seconds:.1f} s (stopped: {outcome.stopped}; best at step "
                 f"{outcome.best_step}), {len(changed)} of {len(outcome.trained)} trainable initializers changed, "
                 f"{len(outcome.features)} feature(s) matched"]
        notes += [f"distill: {n}" for n in outcome.notes]
        if not changed:
            notes.append("training did not improve the held-out loss: the model is unchanged")
        stats = {"steps": outcome.steps, "seconds": round(outcome.seconds, 3),
                 "holdout_loss_before": b.loss, "holdout_loss_after": a.loss,
                 "initializers_changed": len(changed)}
        if a.top1 is not None:
            stats.update(top1_before=b.top1, top1_after=a.top1)
        return PassResult(bool(changed), stats=stats, notes=notes, model=new if changed else None, details=details)
