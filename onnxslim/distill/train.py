"""The distillation loop: train the student's parameters (torch) against the teacher (onnxruntime).

Loss (weights chosen so that each term is about 1 at the start and none needs tuning per model):

- output term, per float graph output, averaged over outputs:
  - class scores (a 2-D ``[N, C]`` output with ``C > 1``; ``distill_loss=kl`` forces it): KL divergence
    between the teacher's and the student's softmax at temperature T, times T^2 (Hinton et al. 2015: keeps
    the gradient scale independent of T). An output that already is a probability distribution (rows
    in [0, 1] summing to 1) is turned back into log-probabilities first;
  - anything else: mean squared error divided by the teacher's variance of that output (measured once on
    the first batch), so 1.0 means "as far off as predicting the mean";
- label term (only with labels, weight ``distill_label_weight``, default 0.5): cross-entropy of the first
  score output against the labels;
- hard-label term (weight ``distill_hard_weight``, default 0 = off): cross-entropy of the first score output
  against the teacher's argmax, at T=1;
- feature term (FitNets, weight ``distill_feature_weight``, default 0.5): on up to 8 intermediate tensors that
  exist by the same name in both graphs, produced by the same op type, where that op is one whose output
  means the same before and after folding (activations, Add, Concat, pooling, normalization; never the
  output of a Conv/Gemm/MatMul, whose name bn-fold keeps for a different value). Same shape: variance-
  normalized MSE. One axis differs (pruned channels): a linear regressor along that axis maps the student's
  channels to the teacher's (initialized by ridge least squares on the first batch, trained along, never
  written back), then the same normalized MSE.

Encoders (an input named like ``attention_mask`` of 0/1 values; ``DistillConfig.encoder``): outputs and
features with a [batch, sequence, ...] layout are matched at the real tokens only (padding rows are read by
nothing), the features are the residual stream (tensors a MatMul and a residual Add both read: the blocks'
LayerNorm outputs) and the default learning rate is LR_ENCODER.

The held-out loss (the report's and early stopping's) is the output term alone, without augmentation.

Data: samples are split once (seeded) into training and held-out parts (the held-out part at most
``MAX_HOLDOUT`` samples). The first pass over the training samples is clean; from the second pass on (when
samples repeat), float 4-D inputs get mixup with
probability 1/2 (lambda ~ Beta(0.4, 0.4), the teacher labels the mixed image, labels mix in the
cross-entropy) and a random translation with probability 1/2 (up to 1/8 of the height/width, edge pixels
repeated; the teacher labels the shifted image, so this is safe for dense outputs too), and all float
inputs a small gaussian noise (5% of the input's std); integer token inputs
(more than two distinct values) get token dropout: 10% of the ids, never the first position nor a masked
one (an integer input of 0/1 values of the same shape is taken as the mask), are replaced by another id
from the batch. Masks are never changed. The teacher runs in onnxruntime on every augmented batch, so
memory is bounded by the batch, not the data set.

Optimizer: Adam, linear warm-up over 5% of the steps, then cosine decay to 10% over the step budget or the
time limit, whichever ends first; the exponential moving average of the weights (``ema``) is what the held-out
split judges and what is kept (the best evaluation of it).

Determinism: numpy RandomState and torch seeded from ``seed``, deterministic torch algorithms, a fixed
number of torch threads and a one-thread teacher session: the same seed and inputs give the same values,
unless the time limit (``time_limit``) stops training first (the number of steps then depends on speed).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import ModelProto

from onnxslim.distill.translate import OnnxModule, translate
from onnxslim.model import session_source
from onnxslim.runtime import make_session
from onnxslim.validate import token_mask_input

# Ops whose output name survives the lossless passes with the same meaning (see the module docstring).
FEATURE_OPS = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Tanh",
               "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "LayerNormalization", "Softmax", "Mul"}
MAX_FEATURES = 8
MIXUP_PROB, MIXUP_ALPHA, NOISE_REL, TOKEN_DROP = 0.5, 0.4, 0.05, 0.10
SHIFT_PROB, SHIFT_FRAC = 0.5, 1 / 8  # random translation of 4-D inputs by up to 1/8 of each spatial size
# Steps on a fixed rounding grid are noisy: quantization-aware training takes a 10x smaller learning rate
# (measured on the digits CNN with coarse activations: 3e-3 never beat PTQ in 120 steps, 3e-4 did).
# Float: 3e-3 once the first pass is clean (PP-OCR cls pruned 0.5 + refit, 150 steps without augmentation:
# 3e-3 95.5% test agreement, 1e-3 92.5%; digits CNN prune 0.7, 1000 steps: 0.67 vs 1.33 points drop).
LR_FLOAT, LR_QAT = 3e-3, 3e-4
# Encoders (a token-mask input): all-MiniLM-L6-v2 pruned 0.5 + refit, 300 steps of 32 sentences: at 3e-3 no
# step beat the start (held-out 0.0254, early stop, nothing kept); at 3e-4 0.0254 -> 0.0226, min embedding
# cosine 0.825 -> 0.859 (tools/bench_encoder.py sentences). Transformer fine-tuning wants small steps.
LR_ENCODER = 3e-4
# Weight averaging: the held-out loss of single steps jumps by 20-30% from one evaluation to the next at these
# batch sizes; the average of the last ~50 steps is what is judged and kept.
EMA = 0.98
# Early stopping needs a few hundred samples, not more: the rest of a large --calib trains (each evaluation
# costs a forward pass over the held-out split).
MAX_HOLDOUT = 256
WARMUP = 0.05  # fraction of steps with a linear learning-rate warm-up; cosine decay to 10% after it


@dataclass
class DistillConfig:
    steps: int = 300
    time_limit: float = 0.0  # seconds of training steps (at least one step runs); 0 = none
    lr: float | None = None  # None: LR_FLOAT, or LR_QAT when the student has Q/DQ nodes
    batch: int = 32
    seed: int = 0
    temperature: float = 4.0  # T=2 measured worse on the PP-OCR cls and the digits CNN (README, recipe rows 20-25)
    holdout: float = 0.2
    loss: str = "auto"  # auto | kl | mse
    feature_weight: float = 0.5
    label_weight: float = 0.5
    hard_weight: float = 0.0  # cross-entropy against the teacher's argmax (hard pseudo-labels)
    augment: bool = True
    mixup: float = MIXUP_PROB  # probability a batch is mixed (with augment)
    shift: float = SHIFT_PROB  # probability a batch is translated (with augment)
    ema: float = EMA  # decay of an exponential moving average of the weights (0 = off)
    patience: int = 8  # held-out evaluations without improvement before stopping
    threads: int = 1
    # A token-mask input (``attention_mask``) marks an encoder: [batch, sequence, ...] tensors are matched at
    # the real tokens only, the features are the residual stream, the learning rate LR_ENCODER (False: as any)
    encoder: bool = True


@dataclass
class HeldOut:
    loss: float
    cosine: float
    top1: float | None = None  # argmax agreement with the teacher on the first score output
    accuracy: float | None = None  # against the labels, when given
    samples: int = 0


@dataclass
class LossCurve:
    first: float
    min: float
    last: float
    every: int
    averages: list[float] = field(default_factory=list)


@dataclass
class DistillOutcome:
    values: dict[str, np.ndarray]  # trained initializers by name, in their own dtype
    trained: list[str]
    steps: int
    best_step: int
    stopped: str  # steps | time | early-stop
    seconds: float
    curve: LossCurve
    before: HeldOut
    after: HeldOut
    outputs: dict[str, str]  # output -> kl | mse
    features: list[str]
    train_samples: int
    holdout_samples: int
    holdout_is_train: bool = False
    lr: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("values")
        d["trained"] = len(self.trained)
        return d


def _teacher_session(teacher: ModelProto, extra: list[str]) -> tuple[ort.InferenceSession, list[str]]:
    m = ModelProto()
    m.CopyFrom(teacher)
    have = {o.name for o in m.graph.output}
    for name in extra:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    with session_source(m) as src:
        sess = make_session(src, threads=1)
    return sess, [o.name for o in sess.get_outputs()]


def _produced(model: ModelProto) -> dict[str, str]:
    return {o: n.op_type for n in model.graph.node for o in n.output if o}


def _feature_candidates(student: ModelProto, teacher: ModelProto) -> list[str]:
    s, t = _produced(student), _produced(teacher)
    outs = {o.name for o in student.graph.output}
    names = [k for k, op in s.items() if op in FEATURE_OPS and t.get(k) == op and k not in outs]
    if len(names) > MAX_FEATURES:  # evenly spread over depth, keeping the deepest
        idx = np.linspace(len(names) - 1, 0, MAX_FEATURES).round().astype(int)[::-1]
        names = [names[i] for i in sorted(set(idx.tolist()))]
    return names


def _stream_candidates(student: ModelProto, teacher: ModelProto) -> list[str]:
    """Encoders: the residual stream between blocks -- tensors (by name in both graphs, same op) that a
    MatMul/Gemm and a residual Add both read (each block's LayerNorm output, the embeddings' one), evenly
    spread over depth as ``_feature_candidates``. The generic candidates on MiniLM were a mix of bias Adds
    and the attention's scale Mul, which pruning changes by design."""
    s, t = _produced(student), _produced(teacher)
    outs = {o.name for o in student.graph.output}
    readers: dict[str, set[str]] = {}
    for n in student.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    names = [k for k, op in s.items() if op in FEATURE_OPS and t.get(k) == op and k not in outs
             and {"Add"} <= readers.get(k, set()) and readers[k] & {"MatMul", "Gemm"}]
    if len(names) > MAX_FEATURES:
        idx = np.linspace(len(names) - 1, 0, MAX_FEATURES).round().astype(int)[::-1]
        names = [names[i] for i in sorted(set(idx.tolist()))]
    return names


def _is_prob(t: np.ndarray) -> bool:
    return bool(t.min() >= 0 and t.max() <= 1 and np.allclose(t.sum(-1), 1, atol=1e-3))


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate NCHW images by (dy, dx) pixels, repeating the edge into the uncovered border."""
    h, w = x.shape[2], x.shape[3]
    p = np.pad(x, ((0, 0), (0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    return np.ascontiguousarray(p[:, :, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w])


class _Regressor(torch.nn.Module):
    """A linear map along one axis (student channels -> teacher channels)."""

    def __init__(self, s: np.ndarray, t: np.ndarray, axis: int) -> None:
        super().__init__()
        self.axis = axis
        S = np.moveaxis(s, axis, -1).reshape(-1, s.shape[axis]).astype(np.float64)
        T = np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]).astype(np.float64)
        G = S.T @ S
        ridge = 1e-3 * (np.trace(G) / max(G.shape[0], 1) + 1e-12)
        W = np.linalg.solve(G + ridge * np.eye(G.shape[0]), S.T @ T)  # [Cs, Ct]
        self.weight = torch.nn.Parameter(torch.from_numpy(W.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.movedim(torch.movedim(x, self.axis, -1) @ self.weight, -1, self.axis)


class _Trainer:
    def __init__(self, student: ModelProto, teacher: ModelProto, inputs: dict[str, np.ndarray],
                 labels: np.ndarray | None, cfg: DistillConfig, progress: Callable[[str], None]) -> None:
        self.cfg, self.progress = cfg, progress
        self.module: OnnxModule = translate(student)
        self.module.eval()
        self.student = student
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.labels = labels
        self.rng = np.random.RandomState(cfg.seed)
        n = next(iter(inputs.values())).shape[0]
        perm = self.rng.permutation(n)
        n_hold = min(int(round(n * cfg.holdout)), MAX_HOLDOUT) if n >= 2 else 0
        n_hold = min(max(n_hold, 1 if cfg.holdout > 0 and n >= 2 else 0), n - 1)
        self.hold_idx = np.sort(perm[:n_hold]) if n_hold else np.sort(perm)
        self.train_idx = np.sort(perm[n_hold:])
        self.holdout_is_train = n_hold == 0
        self.batch = max(1, min(cfg.batch, len(self.train_idx)))
        self.features = []
        if cfg.feature_weight > 0:  # a token-mask input: an encoder, whose blocks meet in the residual stream
            stream = _stream_candidates(student, teacher) if cfg.encoder and token_mask_input(inputs) else []
            self.features = stream or _feature_candidates(student, teacher)
        self.teacher, self.teacher_names = _teacher_session(teacher, self.features)
        self.teacher_inputs = [i.name for i in self.teacher.get_inputs()]
        self.notes: list[str] = []
        self.qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in student.graph.node)
        encoder = cfg.encoder and token_mask_input(self.inputs) is not None
        self.lr = cfg.lr if cfg.lr is not None else (LR_QAT if self.qdq else LR_ENCODER if encoder else LR_FLOAT)
        self._held_teacher: dict[int, dict[str, np.ndarray]] = {}
        self._init_losses()

    # -- data ----------------------------------------------------------------------------------------

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.inputs.items()}

    def run_teacher(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vals = self.teacher.run(None, {k: feeds[k] for k in self.teacher_inputs})
        return dict(zip(self.teacher_names, vals))

    def run_student(self, feeds: dict[str, np.ndarray], extra: list[str] = ()) -> dict[str, torch.Tensor]:
        return self.module({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}, extra)

    def augment(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, np.ndarray | None]:
        """Mixup + noise on float inputs, token dropout on id inputs. Returns (feeds, lambda, partner order)."""
        out = dict(feeds)
        lam, perm = 1.0, None
        n = next(iter(feeds.values())).shape[0]
        images = [k for k, v in feeds.items() if v.dtype.kind == "f" and v.ndim == 4]
        if images and n > 1 and self.rng.rand() < self.cfg.mixup:
            lam = float(self.rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            lam = max(lam, 1 - lam)  # the first sample dominates: its label stays the main one
            perm = self.rng.permutation(n)
            for k in images:
                out[k] = (lam * feeds[k] + (1 - lam) * feeds[k][perm]).astype(feeds[k].dtype)
        if images and self.rng.rand() < self.cfg.shift:
            dy, dx = (int(self.rng.randint(-r, r + 1)) for r in
                      (max(1, int(feeds[images[0]].shape[d] * SHIFT_FRAC)) for d in (2, 3)))
            for k in images:
                out[k] = _shift(out[k], dy, dx)
        for k, v in out.items():
            if v.dtype.kind == "f":
                out[k] = (v + self.rng.standard_normal(v.shape) * self.noise[k]).astype(v.dtype)
        for k in self.tokens:
            ids = out[k].copy()
            mask = out.get(self.masks.get(k)) if self.masks.get(k) else None
            valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
            valid[..., 0] = False
            pool = ids[valid]
            if pool.size:
                drop = valid & (self.rng.rand(*ids.shape) < TOKEN_DROP)
                ids[drop] = pool[self.rng.randint(0, pool.size, int(drop.sum()))]
            out[k] = ids
        return out, lam, perm

    # -- losses ---------------------------------------------------------------------------------------

    def _init_losses(self) -> None:
        cfg = self.cfg
        first = self.take(self.train_idx[:self.batch])
        t = self.run_teacher(first)
        self.token_mask = token_mask_input(self.inputs) if cfg.encoder else None
        self.noise = {k: NOISE_REL * float(v[self.train_idx].std()) if cfg.augment else 0.0
                      for k, v in self.inputs.items() if v.dtype.kind == "f"}
        self.tokens, self.masks = [], {}
        if cfg.augment:
            ints = {k: v for k, v in self.inputs.items() if v.dtype.kind in "iu"}
            binary = [k for k, v in ints.items() if np.isin(np.unique(v), (0, 1)).all()]
            for k, v in ints.items():
                if k not in binary and len(np.unique(v)) > 2:
                    self.tokens.append(k)
                    same = [b for b in binary if ints[b].shape == v.shape]
                    prefer = [b for b in same if "mask" in b.lower()] or same
                    if prefer:
                        self.masks[k] = prefer[0]
        self.kinds: dict[str, str] = {}
        self.prob_outputs: set[str] = set()
        self.norm: dict[str, float] = {}
        for o in self.module.output_names:
            v = t.get(o)
            if v is None or v.dtype.kind != "f":
                continue
            score = v.ndim == 2 and v.shape[1] > 1
            kind = "kl" if cfg.loss == "kl" or (cfg.loss == "auto" and score) else "mse"
            if kind == "kl" and v.ndim < 1:
                kind = "mse"
            self.kinds[o] = kind
            if kind == "kl" and _is_prob(v):
                self.prob_outputs.add(o)
            self.norm[o] = max(float(self._real(v, first).var()), 1e-12)
        if not self.kinds:
            raise ValueError("distill: the model has no float output to learn from")
        self.score = next((o for o, k in self.kinds.items() if k == "kl"), None)
        self.use_labels = (self.labels is not None and cfg.label_weight > 0 and self.score is not None
                           and int(self.labels.max()) < t[self.score].shape[-1] and int(self.labels.min()) >= 0)
        if self.labels is not None and cfg.label_weight > 0 and not self.use_labels:
            self.notes.append("labels not used: no score output they index")
        # Features: keep those whose teacher value is float and whose shape the student can be mapped to.
        s = {}
        if self.features:
            with torch.no_grad():
                s = self.run_student(first, self.features)
        self.regressors = torch.nn.ModuleDict()
        self.feat_keys: dict[str, str] = {}
        kept = []
        for name in self.features:
            tv, sv = t.get(name), s.get(name)
            if tv is None or sv is None or tv.dtype.kind != "f" or tv.ndim != sv.dim():
                continue
            diff = [i for i, (a, b) in enumerate(zip(tv.shape, sv.shape)) if a != b]
            if len(diff) > 1 or (diff and diff[0] == 0):
                continue
            key = f"f{len(kept)}"
            if diff:
                self.regressors[key] = _Regressor(sv.numpy(), tv, diff[0])
            self.feat_keys[name] = key
            self.norm[name] = max(float(self._real(tv, first).var()), 1e-12)
            kept.append(name)
        self.features = kept

    # -- token masks (encoders) --------------------------------------------------------------------------
    # A [batch, sequence] 0/1 input named like a mask marks the real tokens: a [batch, sequence, ...] output
    # or feature is matched only there (padding positions are read by nothing downstream -- the mask hides
    # them from attention, mean pooling skips them -- and fitting them spends the student on nothing).

    def _mask(self, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        k = self.token_mask
        return None if k is None or k not in feeds else feeds[k] != 0

    def _real(self, v: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        m = self._mask(feeds)
        return v[m] if m is not None and v.ndim >= 3 and v.shape[:2] == m.shape else v

    def _mse(self, sv: torch.Tensor, tv: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
        if mask is not None and sv.dim() >= 3 and tuple(sv.shape[:2]) == mask.shape:
            w = torch.from_numpy(mask.astype(np.float32)).reshape(mask.shape + (1,) * (sv.dim() - 2))
            per = int(np.prod(sv.shape[2:]))
            return (((sv - tv) ** 2) * w).sum() / max(float(w.sum()) * per, 1.0)
        return ((sv - tv) ** 2).mean()

    def _logits(self, name: str, v: torch.Tensor) -> torch.Tensor:
        return torch.log(v.clamp_min(1e-12)) if name in self.prob_outputs else v

    def output_loss(self, s: dict[str, torch.Tensor], t: dict[str, np.ndarray],
                    mask: np.ndarray | None = None) -> torch.Tensor:
        T = max(self.cfg.temperature, 1e-6)
        terms = []
        for o, kind in self.kinds.items():
            tv = torch.from_numpy(t[o])
            if kind == "kl":
                ls = torch.log_softmax(self._logits(o, s[o]) / T, -1)
                lt = torch.log_softmax(self._logits(o, tv) / T, -1)
                terms.append(F.kl_div(ls.reshape(-1, ls.shape[-1]), lt.reshape(-1, lt.shape[-1]),
                                      log_target=True, reduction="batchmean") * T * T)
            else:
                terms.append(self._mse(s[o], tv, mask) / self.norm[o])
        return torch.stack(terms).mean()

    def feature_loss(self, s: dict[str, torch.Tensor], t: dict[str, np.ndarray],
                     mask: np.ndarray | None = None) -> torch.Tensor:
        terms = []
        for name, key in self.feat_keys.items():
            sv = s[name]
            if key in self.regressors:
                sv = self.regressors[key](sv)
            terms.append(self._mse(sv, torch.from_numpy(t[name]), mask) / self.norm[name])
        return torch.stack(terms).mean()

    # -- evaluation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> HeldOut:
        n = len(self.hold_idx)
        loss = cos = 0.0
        agree = correct = 0
        for b in range(0, n, self.batch):
            idx = self.hold_idx[b:b + self.batch]
            feeds = self.take(idx)
            if b not in self._held_teacher:  # the held-out split is fixed and clean: its teacher outputs too
                t = self.run_teacher(feeds)
                self._held_teacher[b] = {o: t[o] for o in self.kinds}
            t = self._held_teacher[b]
            s = self.run_student(feeds)
            loss += float(self.output_loss(s, t, self._mask(feeds))) * len(idx)
            c = []
            for o in self.kinds:
                a = s[o].reshape(len(idx), -1).double()
                r = torch.from_numpy(t[o]).reshape(len(idx), -1).double()
                c.append(F.cosine_similarity(a, r, dim=1, eps=1e-12))
            cos += float(torch.stack(c).mean(0).sum())
            if self.score is not None:
                ps = s[self.score].reshape(len(idx), -1).argmax(-1).numpy()
                agree += int((ps == t[self.score].reshape(len(idx), -1).argmax(-1)).sum())
                if self.labels is not None:
                    correct += int((ps == self.labels[idx]).sum())
        return HeldOut(loss / n, cos / n, agree / n if self.score else None,
                       correct / n if self.score and self.labels is not None else None, n)

    def check_translation(self) -> None:
        """The torch module must compute what onnxruntime computes on the student (a translator bug
        would otherwise train the wrong function)."""
        feeds = self.take(self.hold_idx[:self.batch])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        with session_source(self.student) as src:
            src = src.SerializeToString() if isinstance(src, ModelProto) else str(src)
            sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        with torch.no_grad():
            got = self.run_student(feeds)
        tol = 2e-2 if self.qdq else 1e-3  # fake quant can land on the other side of a rounding tie
        for o in self.kinds:
            r, g = ref[o].astype(np.float64), got[o].numpy().astype(np.float64)
            err = float(np.abs(r - g).max() / (np.abs(r).max() + 1e-6)) if r.size else 0.0
            if err > tol:
                raise RuntimeError(f"distill: the torch translation differs from onnxruntime on output '{o}' "
                                   f"(relative error {err:.2e}); nothing was trained")

    # -- the loop ---------------------------------------------------------------------------------------

    def lr_at(self, step: int, elapsed: float = 0.0) -> float:
        """Warm-up, then cosine decay over the budget: the step budget, or the time limit when that is
        nearer (a run stopped by time ends at the low learning rate too, not in the middle of the schedule)."""
        cfg = self.cfg
        warm = max(1, int(cfg.steps * WARMUP))
        if step < warm:
            return self.lr * (step + 1) / warm
        frac = (step - warm) / max(1, cfg.steps - warm)
        if cfg.time_limit:
            frac = max(frac, elapsed / cfg.time_limit)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def _swap(self, params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values):
                tmp = p.detach().clone()
                p.copy_(v)
                v.copy_(tmp)

    def train(self) -> DistillOutcome:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.check_translation()
        before = self.evaluate()
        params = list(self.module.params)
        opt = torch.optim.Adam(params + list(self.regressors.parameters()), lr=self.lr)
        every = max(5, min(50, cfg.steps // 20))
        best, best_step, bad = before.loss, 0, 0
        best_state = [p.detach().clone() for p in params]
        ema = [p.detach().clone() for p in params] if cfg.ema > 0 else None
        losses: list[float] = []
        order = np.array([], dtype=np.int64)
        stopped, step, passes = "steps", 0, 0
        t_loop = time.perf_counter()  # the limit is on training steps; the checks before them always run
        while step < cfg.steps:
            if cfg.time_limit and step and time.perf_counter() - t_loop > cfg.time_limit:
                stopped = "time"
                break
            if len(order) < self.batch:
                order = np.concatenate([order, self.rng.permutation(self.train_idx)])
                passes += 1
            idx, order = order[:self.batch], order[self.batch:]
            feeds = self.take(idx)
            lam, perm = 1.0, None
            # The first pass over the data is clean: augmented views only pay once samples repeat
            # (measured on PP-OCR cls: mixup/shift from step 0 undo the refit's start for tens of steps).
            if cfg.augment and passes > 1:
                feeds, lam, perm = self.augment(feeds)
            t = self.run_teacher(feeds)
            s = self.run_student(feeds, self.features)
            mask = self._mask(feeds)
            loss = self.output_loss(s, t, mask)
            if self.features:
                loss = loss + cfg.feature_weight * self.feature_loss(s, t, mask)
            if cfg.hard_weight > 0 and self.score is not None:
                # Agreement is an argmax metric: a direct push on the teacher's top-1, at T=1.
                y_t = torch.from_numpy(t[self.score].reshape(len(idx), -1).argmax(-1))
                loss = loss + cfg.hard_weight * F.cross_entropy(
                    self._logits(self.score, s[self.score]).reshape(len(idx), -1), y_t)
            if self.use_labels:
                y = torch.from_numpy(self.labels[idx].astype(np.int64))
                logits = self._logits(self.score, s[self.score])
                ce = F.cross_entropy(logits, y)
                if perm is not None:
                    ce = lam * ce + (1 - lam) * F.cross_entropy(logits, y[perm])
                loss = loss + cfg.label_weight * ce
            for g in opt.param_groups:
                g["lr"] = self.lr_at(step, time.perf_counter() - t_loop)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:  # Polyak averaging, with a short horizon for the first steps
                d = min(cfg.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.mul_(d).add_(p.detach(), alpha=1 - d)
            losses.append(float(loss.detach()))
            step += 1
            if step % every == 0 or step == cfg.steps:
                if ema is not None:
                    self._swap(params, ema)  # judge (and keep) the averaged weights
                ho = self.evaluate()
                if ho.loss < best * (1 - 1e-4):
                    best, best_step, bad = ho.loss, step, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    bad += 1
                if ema is not None:
                    self._swap(params, ema)
                self.progress(f"distill: step {step}/{cfg.steps} loss {np.mean(losses[-every:]):.4f} "
                              f"held-out {ho.loss:.4f} (best {best:.4f})")
                if bad >= cfg.patience:
                    stopped = "early-stop"
                    break
        with torch.no_grad():
            for p, v in zip(params, best_state):
                p.copy_(v)
        after = self.evaluate() if best_step else before
        seconds = time.perf_counter() - t0
        avgs = [float(np.mean(losses[i:i + every])) for i in range(0, len(losses), every)]
        curve = LossCurve(losses[0] if losses else float("nan"), min(losses) if losses else float("nan"),
                          losses[-1] if losses else float("nan"), every, avgs[:40])
        values = self.module.export_values()
        return DistillOutcome(values, list(self.module.param_names), step, best_step, stopped, seconds, curve,
                              before, after, dict(self.kinds), list(self.features), len(self.train_idx),
                              len(self.hold_idx), self.holdout_is_train, self.lr, self.notes)


def distill(student: ModelProto, teacher: ModelProto, inputs: dict[str, np.ndarray],
            labels: np.ndarray | None = None, config: DistillConfig | None = None,
            progress: Callable[[str], None] = lambda msg: None) -> DistillOutcome:
    """Train ``student``'s float parameters to match ``teacher`` on ``inputs`` (arrays, samples on axis 0).

    Neither proto is modified; the trained values come back in ``DistillOutcome.values`` for
    ``onnxslim.distill.writeback.write_back``.
    """
    cfg = config or DistillConfig()
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    state = torch.random.get_rng_state()
    torch.set_num_threads(max(1, cfg.threads))
    _set_deterministic(True)
    torch.manual_seed(cfg.seed)
    try:
        return _Trainer(student, teacher, inputs, labels, cfg, progress).train()
    finally:
        torch.set_num_threads(threads)
        _set_deterministic(det)
        torch.random.set_rng_state(state)


def _set_deterministic(on: bool) -> None:
    """torch.use_deterministic_algorithms without its import of torch's compiler stack (torch._inductor:
    about 3 s idle and 18 s on a loaded machine, for a flag). The CPU kernels used here are deterministic at a
    fixed thread count either way; the flag makes torch warn if one is not."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(on, warn_only=True)
    else:
        setter(on, warn_only=True)
