"""A small image classifier and a folder of generated images, for image-folder calibration.

    python tools/make_image_model.py                       # writes models/image_cnn.onnx
    python tools/make_image_model.py --images /tmp/imgs    # also writes 24 .png/.jpg images there

The model takes ``image`` [N, 3, 32, 32] float (RGB, ImageNet mean/std normalization) and returns
``logits`` [N, 10]. Its weights are random but fixed (seeded), and each conv is followed by BN so
that the lossless passes have something to fold. The images are smooth synthetic scenes (gradients,
discs, stripes) of varying sizes, encoded with onnxruntime-extensions' EncodeImage, so no imaging
library is needed to make or to read them. Tests import ``build_model`` and ``write_images``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SEED = 0


def build_model(opset: int = 17, size: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv_bn_relu(x: str, cin: int, cout: int, name: str, stride: int = 1, group: int = 1) -> str:
        w = rng.standard_normal((cout, cin // group, 3, 3)) * np.sqrt(2.0 / (9 * cin // group))
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.w", w)], [f"{name}.c"], name=f"{name}_conv",
                                      pads=[1, 1, 1, 1], strides=[stride, stride], group=group))
        nodes.append(helper.make_node(
            "BatchNormalization",
            [f"{name}.c", const(f"{name}.g", rng.uniform(0.5, 1.5, cout)), const(f"{name}.b", rng.normal(0, 0.1, cout)),
             const(f"{name}.m", rng.normal(0, 0.1, cout)), const(f"{name}.v", rng.uniform(0.5, 2.0, cout))],
            [f"{name}.bn"], name=f"{name}_bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.out"], name=f"{name}_relu"))
        return f"{name}.out"

    x = conv_bn_relu("image", 3, 16, "stem", stride=2)
    x = conv_bn_relu(x, 16, 32, "block1", stride=2)
    x = conv_bn_relu(x, 32, 32, "block2")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", rng.standard_normal((10, 32)) * 0.3),
                                           const("fc.b", np.zeros(10))], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "image_cnn",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxslim tools/make_image_model.py")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def synthetic_image(i: int, height: int, width: int) -> np.ndarray:
    """An RGB uint8 scene: a two-colour gradient, a disc and stripes, all depending on ``i``."""
    rng = np.random.default_rng(1000 + i)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / max(1, width - 1))[..., None]
    img = c0 * (1 - t) + c1 * t
    cy, cx, r = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(0.1, 0.4) * min(height, width)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
    img = np.where(disc, rng.uniform(0, 255, 3), img)
    stripes = (np.sin(yy * rng.uniform(0.2, 1.0)) > 0.6)[..., None]
    img = np.where(stripes, img * 0.5, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_image(rgb: np.ndarray, fmt: str = "png") -> bytes:
    """PNG or JPEG bytes of an RGB uint8 image, with onnxruntime-extensions' EncodeImage (which takes BGR)."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    node = helper.make_node("EncodeImage", ["bgr"], ["bytes"], domain="com.microsoft.extensions", format=fmt)
    g = helper.make_graph([node], "encode", [helper.make_tensor_value_info("bgr", TensorProto.UINT8, ["h", "w", 3])],
                          [helper.make_tensor_value_info("bytes", TensorProto.UINT8, ["n"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft.extensions", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"bgr": np.ascontiguousarray(rgb[..., ::-1])})[0].tobytes()


def write_images(folder: str | Path, n: int = 24, jpeg_every: int = 4) -> list[Path]:
    """``n`` images of varying sizes (every ``jpeg_every``-th one a JPEG, the rest PNG)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 28 + (i * 7) % 24, 30 + (i * 11) % 30
        fmt = "jpg" if jpeg_every and i % jpeg_every == jpeg_every - 1 else "png"
        p = folder / f"img_{i:03d}.{fmt}"
        p.write_bytes(encode_image(synthetic_image(i, h, w), fmt))
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "models" / "image_cnn.onnx"))
    ap.add_argument("--images", help="also write generated images to this folder")
    ap.add_argument("-n", type=int, default=24, help="number of images")
    args = ap.parse_args()
    onnx.save(build_model(), args.out)
    print(f"wrote {args.out}")
    if args.images:
        paths = write_images(args.images, args.n)
        print(f"wrote {len(paths)} images to {args.images}")


if __name__ == "__main__":
    main()
