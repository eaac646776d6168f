"""Calibration readers: .npz, .npy, folders of arrays, folders of images, 'random', and every bad-data case
(one-line InputError naming the file and what was expected)."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from onnxslim.options import RunOptions
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim.calibration import CalibrationData, load_calibration
from onnxslim.errors import InputError
from onnxslim.manager import Context

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def conv_model(shape=("N", 3, 16, 16), dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    c = shape[1] if isinstance(shape[1], int) and shape[1] in (1, 3) else shape[3]
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, c, 1, 1], np.ones(4 * c, np.float32))
    x = helper.make_tensor_value_info("x", dtype, list(shape))
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)]
    if shape[1] not in (1, 3):
        nodes.append(helper.make_node("Transpose", ["xf"], ["xt"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Conv", ["xt", "w"], ["y"]))
    else:
        nodes.append(helper.make_node("Conv", ["xf", "w"], ["y"]))
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def png_bytes(rgb: np.ndarray) -> bytes:
    """A minimal PNG encoder (8-bit RGB, no filter): test images need no imaging library."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------ npz

def test_npz_reads_inputs_labels_and_size(tmp_path):
    m = conv_model()
    x = np.random.rand(10, 3, 16, 16).astype(np.float64)  # float64 is cast to the model's float32
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(10))
    d = load_calibration(tmp_path / "c.npz", m, size=6)
    assert d.size == 6 and d.inputs["x"].dtype == np.float32
    np.testing.assert_allclose(d.inputs["x"], x[:6].astype(np.float32))
    assert list(d.labels) == list(range(6)) and d.measured


@pytest.mark.parametrize("arrays, expect", [
    ({"wrong": np.zeros((2, 3, 16, 16), np.float32)}, "do not match the model's inputs ['x']"),
    ({"x": np.zeros((2, 3, 8, 8), np.float32)}, "expected ['N', 3, 16, 16]"),
    ({"x": np.zeros((3, 16, 16), np.float32)}, "expected ['N', 3, 16, 16] (samples on axis 0)"),
    ({"x": np.zeros((2, 3, 16, 16), np.int32)}, "has dtype int32, expected float32"),
    ({"x": np.zeros((0, 3, 16, 16), np.float32)}, "has no samples"),
    ({"x": np.zeros((2, 3, 16, 16), np.float32), "labels": np.zeros(3, np.int64)}, "'labels' must be 2 integer"),
    ({"x": np.zeros((2, 3, 16, 16), np.float32), "labels": np.zeros(2, np.float32)}, "'labels' must be 2 integer"),
])
def test_npz_bad_data_names_file_and_expectation(tmp_path, arrays, expect):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "bad.npz", conv_model())
    msg = message(e)
    assert "bad.npz" in msg and expect in msg


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "broken.npz", conv_model())
    assert "broken.npz" in message(e) and "cannot read" in message(e)
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "nope.npz", conv_model())
    assert "no such file" in message(e)
    (tmp_path / "c.txt").write_text("1,2,3")
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "c.txt", conv_model())
    assert "unsupported" in message(e)


def test_single_npy_file(tmp_path):
    np.save(tmp_path / "x.npy", np.random.rand(5, 3, 16, 16).astype(np.float32))
    assert load_calibration(tmp_path / "x.npy", conv_model()).size == 5
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "x.npy", two_input_model())
    assert "x.npy" in message(e) and "['a', 'b']" in message(e)


# -------------------------------------------------------------------------------------- array folders

def test_folder_of_npy_samples_and_batches(tmp_path):
    rng = np.random.default_rng(0)
    one = rng.random((3, 16, 16), dtype=np.float32)
    batch = rng.random((4, 3, 16, 16), dtype=np.float32)
    np.save(tmp_path / "s2.npy", one)        # one sample: gets a batch axis
    np.save(tmp_path / "s10.npy", batch)     # a batch; natural order puts s2 before s10
    d = load_calibration(tmp_path, conv_model())
    assert d.size == 5 and d.source == str(tmp_path)
    np.testing.assert_array_equal(d.inputs["x"][0], one)
    np.testing.assert_array_equal(d.inputs["x"][1:], batch)
    assert load_calibration(tmp_path, conv_model(), size=2).size == 2


def test_folder_of_npz_multi_input_with_labels(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", a=np.full((2, 4), i, np.float32), b=np.ones((2, 4), np.float32),
                 labels=np.array([i, i]))
    d = load_calibration(tmp_path, two_input_model())
    assert d.size == 6 and list(d.labels) == [0, 0, 1, 1, 2, 2]
    assert d.inputs["a"][4, 0] == 2


def test_folder_bad_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(InputError) as e:
        load_calibration(empty, conv_model())
    assert "empty" in message(e) and "has no .npy, .npz, .png or .jpg files" in message(e)

    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a.npy", np.zeros((3, 16, 16), np.float32))
    np.save(bad / "b.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError) as e:
        load_calibration(bad, conv_model())
    assert "b.npy" in message(e) and "[3, 16, 16]" in message(e)

    multi = tmp_path / "multi"
    multi.mkdir()
    np.save(multi / "a.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(InputError) as e:
        load_calibration(multi, two_input_model())
    assert "a.npy" in message(e) and "use .npz files" in message(e)

    names = tmp_path / "names"
    names.mkdir()
    np.savez(names / "a.npz", a=np.zeros((2, 4), np.float32), c=np.zeros((2, 4), np.float32))
    with pytest.raises(InputError) as e:
        load_calibration(names, two_input_model())
    assert "a.npz" in message(e) and "['a', 'b']" in message(e)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((3, 16, 16), np.float32))
    (mixed / "b.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(InputError) as e:
        load_calibration(mixed, conv_model())
    assert "mixes images" in message(e)


# ------------------------------------------------------------------------------------------- images

def write_pngs(folder: Path, n: int, size=(20, 24)) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    imgs = []
    for i in range(n):
        rgb = np.zeros((*size, 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 20 * i, 100  # constant colours: resize leaves them exact
        (folder / f"im{i}.png").write_bytes(png_bytes(rgb))
        imgs.append(rgb)
    return imgs


def test_image_folder_decodes_resizes_normalizes(tmp_path):
    write_pngs(tmp_path / "imgs", 3)
    d = load_calibration(tmp_path / "imgs", conv_model(),
                         settings=RunOptions(calib_mean="0.5,0.5,0.5", calib_std="0.25,0.25,0.25"))
    x = d.inputs["x"]
    assert x.shape == (3, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, :, 5, 5], (np.array([200, 20, 100]) / 255 - 0.5) / 0.25, atol=1e-4)
    # BGR order and NHWC layout, 0..255 mean
    d = load_calibration(tmp_path / "imgs", conv_model(("N", 16, 16, 3)),
                         settings=RunOptions(calib_color="bgr", calib_mean="100", calib_std="2"))
    np.testing.assert_allclose(d.inputs["x"][2, 5, 5], (np.array([100, 40, 200]) - 100) / 2, atol=1e-3)


def test_image_folder_grayscale_uint8_and_labels_from_subfolders(tmp_path):
    write_pngs(tmp_path / "data" / "0", 2)
    write_pngs(tmp_path / "data" / "7", 1)
    d = load_calibration(tmp_path / "data", conv_model(("N", 1, 16, 16), TensorProto.UINT8))
    assert d.inputs["x"].dtype == np.uint8 and d.inputs["x"].shape == (3, 1, 16, 16)
    assert int(d.inputs["x"][0, 0, 3, 3]) == round(0.299 * 200 + 0.587 * 0 + 0.114 * 100)
    assert list(d.labels) == [0, 0, 7]


def test_image_folder_jpeg_and_generated_images(tmp_path):
    mi = _tool("make_image_model")
    mi.write_images(tmp_path / "gen", n=4, jpeg_every=2)
    model = mi.build_model()
    d = load_calibration(tmp_path / "gen", model, settings=RunOptions(calib_mean="0.485,0.456,0.406",
                                                            calib_std="0.229,0.224,0.225"))
    assert d.inputs["image"].shape == (4, 3, 32, 32)
    assert np.isfinite(d.inputs["image"]).all() and d.inputs["image"].std() > 0.1


@pytest.mark.parametrize("name, data, expect", [
    ("empty.png", b"", "empty file"),
    ("text.png", b"hello, I am not an image at all....", "not a PNG or JPEG file"),
    ("cut.png", png_bytes(np.zeros((8, 8, 3), np.uint8))[:-20], "truncated PNG"),
    ("cut.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 100, "truncated JPEG"),
    ("crc.png", None, "cannot decode"),
    # passes the structural check; libjpeg then exits the decoding process: the child dies, not onnxslim
    ("bad.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9", "decoder crashed"),
])
def test_unreadable_images_are_named(tmp_path, name, data, expect):
    folder = tmp_path / "imgs"
    write_pngs(folder, 2)
    if data is None:  # structurally complete PNG with a corrupted compressed stream
        good = bytearray(png_bytes(np.full((8, 8, 3), 7, np.uint8)))
        good[45:55] = b"\xff" * 10
        data = bytes(good)
    (folder / name).write_bytes(data)
    with pytest.raises(InputError) as e:
        load_calibration(folder, conv_model())
    assert name in message(e) and expect in message(e)


def test_image_folder_needs_an_image_input(tmp_path):
    write_pngs(tmp_path / "imgs", 1)
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "imgs", two_input_model())
    assert "one image input" in message(e)
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "imgs", conv_model(("N", 3, "H", "W")))
    assert "dynamic height or width" in message(e) and "--input-shape" in message(e)
    d = load_calibration(tmp_path / "imgs", conv_model(("N", 3, "H", "W")), input_shapes={"x": [1, 3, 12, 10]})
    assert d.inputs["x"].shape == (1, 3, 12, 10)
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "imgs", conv_model(), settings=RunOptions(calib_mean="0.1,0.2"))
    assert "--mean" in message(e) and "3 channel" in message(e)


# ------------------------------------------------------------------------------------------- random

def test_random_warns_and_follows_range(tmp_path):
    ctx = Context(run=RunOptions(calib="random", calib_random_range="-2,3", calib_size=7))
    m = two_input_model()
    d = ctx.calibration(m)
    assert d.size == 7 and not d.measured and d.labels is None
    assert d.inputs["a"].min() >= -2 and d.inputs["a"].max() <= 3 and d.inputs["a"].min() < -1
    assert any("random" in w and "accuracy is not measured" in w for w in ctx.warnings)
    with pytest.raises(InputError) as e:
        load_calibration("random", m, settings=RunOptions(calib_random_range="3,1"))
    assert "--random-range" in message(e)


def test_batches_and_fixed_batch_models(tmp_path):
    d = CalibrationData({"x": np.zeros((10, 2), np.float32)}, batch_size=4)
    assert [b["x"].shape[0] for b in d.batches()] == [4, 4, 2]
    fixed = conv_model((4, 3, 16, 16))
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 3, 16, 16), np.float32))
    d = load_calibration(tmp_path / "c.npz", fixed)
    assert d.batch_size == 4 and d.size == 8 and any("dropped" in w for w in d.warnings)
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path / "c.npz", fixed, settings=RunOptions(calib_batch=3))
    assert "fixed batch size of 4" in message(e)
    assert load_calibration(tmp_path / "c.npz", conv_model(), settings=RunOptions(calib_batch=5)).batch_size == 5


def test_cli_reports_bad_calibration_in_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), model)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxslim.cli", str(model), str(out), "--passes", "quantize-static",
                        "--calib", str(tmp_path / "bad.npz")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.npz" in lines[0] and "expected ['N', 3, 16, 16]" in lines[0]
    assert not out.exists()


def _data(n: int, **kw):
    from onnxslim.calibration import CalibrationData

    return CalibrationData({"x": np.arange(n, dtype=np.float32)[:, None]}, np.arange(n), "t", **kw)


def test_holdout_covers_the_order_and_never_overlaps_the_fit_part():
    from onnxslim.calibration import split_holdout

    fit, held = split_holdout(_data(100), 0.2)
    assert held.size == 20 and fit.size == 80
    h, f = set(held.inputs["x"][:, 0].tolist()), set(fit.inputs["x"][:, 0].tolist())
    assert not h & f and len(h | f) == 100
    assert min(h) < 10 and max(h) > 90  # spread over the set, not its tail
    assert (held.labels == held.inputs["x"][:, 0]).all()  # labels follow their samples


def test_small_sets_still_hold_four_samples_out():
    """20 samples at 0.2 round to 4 held out; 16 to 3, raised to 4 (the centred cosine needs 4):
    a gate on fitted data cannot see the refit's overfit, so small sets are split too."""
    from onnxslim.calibration import split_holdout

    for n in (12, 16, 20, 30):
        fit, held = split_holdout(_data(n), 0.2)
        assert held is not None and held.size == max(4, round(n * 0.2)) and fit.size == n - held.size


def test_too_small_random_or_disabled_sets_are_not_split():
    from onnxslim.calibration import split_holdout

    for data, frac in ((_data(11), 0.2), (_data(100, measured=False), 0.2), (_data(100), 0.0)):
        fit, held = split_holdout(data, frac)
        assert held is None and fit.size == data.size


def test_fixed_batch_models_get_whole_batches_on_both_sides():
    from onnxslim.calibration import split_holdout

    fit, held = split_holdout(_data(40, batch_size=8, fixed_batch=True), 0.2)
    assert held.size % 8 == 0 and fit.size % 8 == 0 and held.size >= 8
    fit, held = split_holdout(_data(12, batch_size=8, fixed_batch=True), 0.2)
    assert held is None
