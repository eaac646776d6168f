"""Train the two small digits models that the pruning and quantization work is measured on.

Writes (all committed, so tests and CI never need torch):
  models/digits_cnn.onnx    Conv+BN+ReLU blocks, a residual block, a Concat, global average pool, Gemm
  models/digits_mlp.onnx    Flatten -> 64-256-256-10 MLP
  models/digits_calib.npz   "input" (N,1,8,8) float32 + "labels": held out from training
  models/digits_test.npz    "input" (N,1,8,8) float32 + "labels": held out from training and calibration

Data: scikit-learn's bundled 8x8 digits (no download), pixels scaled to [0, 1].
Both models take input "input" of shape (N, 1, 8, 8) and return "logits" (N, 10), so one
calibration file serves both. BatchNormalization is kept in the export (TrainingMode.PRESERVE
on an eval-mode model) so that bn-fold and BN-aware pruning importance have something to do.

Only this script needs torch (`pip install torch scikit-learn`); run: python tools/train_digits.py
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np

SEED = 0
ROOT = Path(__file__).resolve().parent.parent


def load_splits(n_calib: int = 400, n_test: int = 450) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=n_test, random_state=SEED, stratify=y)
    x_train, x_calib, y_train, y_calib = train_test_split(x_rest, y_rest, test_size=n_calib, random_state=SEED,
                                                          stratify=y_rest)
    return {"train": (x_train, y_train), "calib": (x_calib, y_calib), "test": (x_test, y_test)}


def build_models():
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(1, 32)
            self.conv2 = cbr(32, 32)
            # residual block: relu(x + bn(conv(relu(bn(conv(x))))))
            self.res_a = cbr(32, 32)
            self.res_b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
            # two branches joined by a Concat
            self.branch3 = cbr(32, 32, 3)
            self.branch1 = cbr(32, 32, 1)
            self.down = cbr(64, 64, 3, stride=2)
            self.conv6 = cbr(64, 64)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.conv2(self.stem(x))
            x = torch.relu(x + self.res_b(self.res_a(x)))
            x = torch.cat([self.branch3(x), self.branch1(x)], dim=1)
            x = self.conv6(self.down(x))
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.fc(x)

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    return DigitsCNN(), mlp


def shift_augment(x, rng):
    """Random shifts of up to one pixel: cheap augmentation that helps with ~1000 training images."""
    import torch

    dx, dy = rng.integers(-1, 2, size=2)
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(2, 3))


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, augment: bool) -> None:
    import torch

    rng = np.random.default_rng(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(x)))
        for s in range(0, len(x), 64):
            idx = perm[s:s + 64]
            xb = xt[idx]
            if augment:
                xb = shift_augment(xb, rng)
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def export(model, path: Path) -> None:
    import onnx
    import torch

    buf = io.BytesIO()
    # PRESERVE on an eval-mode model skips the exporter's Conv+BN fusion: BN stays a node.
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), buf, dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "onnxslim tools/train_digits.py"
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean() * 100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args(argv)

    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    splits = load_splits()
    xtr, ytr = splits["train"]
    cnn, mlp = build_models()
    train(cnn, xtr, ytr, args.epochs, 3e-3, augment=True)
    # Pixel shifts help the CNN (translation-equivariant) but cost the MLP ~3 points: no augmentation there.
    train(mlp, xtr, ytr, args.epochs, 3e-3, augment=False)

    out = args.out
    export(cnn, out / "digits_cnn.onnx")
    export(mlp, out / "digits_mlp.onnx")
    for split in ("calib", "test"):
        x, y = splits[split]
        np.savez_compressed(out / f"digits_{split}.npz", input=x, labels=y)

    xte, yte = splits["test"]
    with torch.no_grad():
        torch_logits = cnn(torch.from_numpy(xte)).numpy()
    import onnxruntime as ort

    ort_logits = ort.InferenceSession(str(out / "digits_cnn.onnx"),
                                      providers=["CPUExecutionProvider"]).run(None, {"input": xte})[0]
    assert np.allclose(torch_logits, ort_logits, atol=1e-4), "exported CNN disagrees with torch"
    print(f"train {len(xtr)}  calib {len(splits['calib'][0])}  test {len(xte)}")
    for name in ("digits_cnn", "digits_mlp"):
        print(f"{name}: test accuracy {ort_accuracy(out / f'{name}.onnx', xte, yte):.2f}% "
              f"(calib {ort_accuracy(out / f'{name}.onnx', *splits['calib']):.2f}%)")


if __name__ == "__main__":
    main()
