"""Build the real-architecture zoo: torchvision classifiers and a YOLO-style detector exported with torch.

    python tools/make_zoo.py                              # every default model into ~/.cache/onnxslim/zoo/torchvision
    python tools/make_zoo.py --models resnet18,yolov8n --out /tmp/zoo
    python tools/make_zoo.py --list

Each model gets a folder ``OUT/<name>/`` with ``model.onnx`` (opset 17, dynamic batch, input ``input``
[batch, 3, S, S]), ``calib.npz`` (64 images) and ``test.npz`` (16 other images). Weights are random (no
download): the architecture is what the zoo is about, since structured pruners and INT8 searches break on
graph shapes (channel shuffle, grouped convs, Split/Concat across branches, LayerNorm, attention), not on
trained values. BatchNorm running statistics are set by a few forward passes in train mode over the same
kind of images the calibration data holds, so that BN folding and activation ranges look like a real
export's rather than the identity statistics of a fresh module.

Images are smooth random fields (a few random low-frequency waves per channel, in [0, 1]) normalised with the
ImageNet mean/std: white noise would make every channel equally informative, which real images are not.

torch, torchvision (and optionally ultralytics, for yolov8n's own model definition) are needed by this tool
only; the zoo itself is a cache, never committed. Without ultralytics the detector is a small C2f/SPPF model
written here (``yolo_c2f``), with the same Split/Concat/residual structure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# One cache root for every zoo script: torchvision exports here, the encoder and the wheel models beside them.
ZOO_ROOT = Path(os.environ.get("ONNXSLIM_ZOO") or Path.home() / ".cache" / "onnxslim" / "zoo")
DEFAULT_OUT = ZOO_ROOT / "torchvision"
SIZE = 160
OPSET = 17
CALIB_N, TEST_N = 64, 16
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def smooth_images(n: int, size: tuple[int, int] = (SIZE, SIZE), channels: int = 3, seed: int = 0,
                  normalise: bool = True) -> np.ndarray:
    """``n`` smooth random images [n, channels, H, W] float32 (numpy only: tests use it without torch).

    Each channel is a sum of 4 random plane waves of 0.5-4 cycles per image passed through a sigmoid, so
    values lie in (0, 1) with image-like spatial correlation; then (x - mean) / std for 3 channels."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.meshgrid(np.linspace(0, 1, h, dtype=np.float32), np.linspace(0, 1, w, dtype=np.float32),
                         indexing="ij")
    out = np.empty((n, channels, h, w), np.float32)
    for i in range(n):
        for c in range(channels):
            f = rng.uniform(0.5, 4.0, (4, 2)) * rng.choice([-1, 1], (4, 2))
            phase, amp = rng.uniform(0, 2 * np.pi, 4), rng.uniform(0.3, 1.0, 4)
            field = sum(amp[k] * np.cos(2 * np.pi * (f[k, 0] * yy + f[k, 1] * xx) + phase[k]) for k in range(4))
            out[i, c] = 1.0 / (1.0 + np.exp(-1.5 * field - rng.normal(0, 0.3)))
    if normalise and channels == 3:
        out = (out - MEAN) / STD
    return out.astype(np.float32)


# --- model builders (torch imported lazily: smooth_images must work without it) -------------------------

def _tv(name: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        import torchvision.models as tvm
        return getattr(tvm, name)(weights=None, **kw)
    return build


def _vit_s_16() -> Any:
    # ViT-S/16 (22 M parameters): vit_b_16's 86 M would not fit the 2-core budget of a zoo run.
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=SIZE, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                             mlp_dim=1536, num_classes=1000)


def _yolov8n() -> Any:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        print("make_zoo: ultralytics not installed: building the in-tree C2f/SPPF detector instead", file=sys.stderr)
        return _yolo_c2f()
    m = DetectionModel("yolov8n.yaml", nc=80, verbose=False)  # the package's own yaml; random init, no download
    head = m.model[-1]
    head.export, head.format = True, "onnx"  # one [batch, 84, anchors] output, as `yolo export format=onnx`
    return m


def _yolo_c2f() -> Any:
    import torch
    from torch import nn

    class ConvBnAct(nn.Sequential):
        def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
            super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c: int, shortcut: bool = True) -> None:
            super().__init__()
            self.cv1, self.cv2, self.add = ConvBnAct(c, c, 3), ConvBnAct(c, c, 3), shortcut

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
            super().__init__()
            self.c = c2 // 2
            self.cv1 = ConvBnAct(c1, 2 * self.c)
            self.cv2 = ConvBnAct((2 + n) * self.c, c2)
            self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = list(self.cv1(x).split((self.c, self.c), 1))  # exports as Split: the case pruners break on
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1: int, c2: int) -> None:
            super().__init__()
            c_ = c1 // 2
            self.cv1, self.cv2 = ConvBnAct(c1, c_), ConvBnAct(c_ * 4, c2)
            self.m = nn.MaxPool2d(5, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))

    class Det(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(ConvBnAct(3, 16, 3, 2), ConvBnAct(16, 32, 3, 2), C2f(32, 32, 1))
            self.p3 = nn.Sequential(ConvBnAct(32, 64, 3, 2), C2f(64, 64, 2))
            self.p4 = nn.Sequential(ConvBnAct(64, 128, 3, 2), C2f(128, 128, 2), SPPF(128, 128))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.neck = C2f(128 + 64, 64, 1, shortcut=False)
            self.head3 = nn.Sequential(ConvBnAct(64, 64, 3), nn.Conv2d(64, 84, 1))
            self.head4 = nn.Sequential(ConvBnAct(128, 64, 3), nn.Conv2d(64, 84, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            n3 = self.neck(torch.cat((self.up(p4), p3), 1))
            o3, o4 = self.head3(n3), self.head4(p4)
            return torch.cat((o3.flatten(2), o4.flatten(2)), 2)

    return Det()


BUILDERS: dict[str, Callable[[], Any]] = {
    "resnet18": _tv("resnet18"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "shufflenet_v2_x1_0": _tv("shufflenet_v2_x1_0"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "densenet121": _tv("densenet121"),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "googlenet": _tv("googlenet", aux_logits=False, init_weights=True),
    "convnext_tiny": _tv("convnext_tiny"),
    "vit_s_16": _vit_s_16,
    "yolov8n": _yolov8n,
    # not in the default set (heavy or duplicates), buildable by name:
    "swin_t": _tv("swin_t"),
    "mnasnet1_0": _tv("mnasnet1_0"),
    "vit_b_16": _tv("vit_b_16", image_size=SIZE),
    "yolo_c2f": _yolo_c2f,
}
DEFAULT = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0",
           "regnet_y_400mf", "densenet121", "squeezenet1_1", "googlenet", "convnext_tiny", "vit_s_16", "yolov8n"]


def set_bn_statistics(model: Any, batches: int = 8, batch: int = 16, size: int = SIZE, seed: int = 100) -> None:
    """Run ``batches`` batches of smooth images in train mode with cumulative BN momentum, so the running
    statistics are the plain mean/var over all of them (not the 0.9-decayed default from 0/1)."""
    import torch
    from torch import nn
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(batches if bns else 0):
            model(torch.from_numpy(smooth_images(batch, (size, size), seed=seed + i)))
    model.eval()


def export(name: str, out: Path, size: int = SIZE) -> dict[str, Any]:
    import torch
    torch.manual_seed(0)
    t0 = time.time()
    model = BUILDERS[name]()
    set_bn_statistics(model, size=size)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    x = torch.from_numpy(smooth_images(1, (size, size), seed=7))
    if hasattr(torch.backends, "mha"):
        # eval + no_grad would take nn.MultiheadAttention's fused fast path, which has no ONNX export
        torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter is what most published exports come from (Shape/Gather
        # chains for flatten, Constant nodes), i.e. the raw graphs the lossless preset has to clean.
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    np.savez(folder / "calib.npz", input=smooth_images(CALIB_N, (size, size), seed=1000))
    np.savez(folder / "test.npz", input=smooth_images(TEST_N, (size, size), seed=2000))
    params = sum(p.numel() for p in model.parameters())
    info = {"name": name, "size": size, "params": int(params), "export_s": round(time.time() - t0, 1),
            "bytes": path.stat().st_size, "torch": torch.__version__}
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    ap.add_argument("--models", default=",".join(DEFAULT), help="comma-separated names (see --list)")
    ap.add_argument("--size", type=int, default=SIZE, help="input height = width (default 160)")
    ap.add_argument("--force", action="store_true", help="rebuild models already in the cache")
    ap.add_argument("--list", action="store_true", help="print the buildable names and exit")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(f"{n}{'' if n in DEFAULT else '  (not default)'}" for n in BUILDERS))
        return 0
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        print(f"make_zoo: unknown model(s) {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    failed = 0
    for n in names:
        if (a.out / n / "model.onnx").exists() and not a.force:
            print(f"{n}: cached in {a.out / n}")
            continue
        try:
            info = export(n, a.out, a.size)
        except Exception as e:  # noqa: BLE001 - one architecture failing must not stop the others
            failed += 1
            print(f"{n}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
            continue
        print(f"{n}: {info['params'] / 1e6:.2f} M params, {info['bytes'] / 1e6:.1f} MB, {info['export_s']} s "
              f"-> {a.out / n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
