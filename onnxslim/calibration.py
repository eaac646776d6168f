"""Calibration data readers shared by pruning (refit, sensitivity) and quantization.

``load_calibration(spec, model)`` returns a CalibrationData: arrays keyed by input name with
samples on axis 0, plus optional integer labels. ``spec`` is one of

- ``FILE.npz``: keys = input names, samples on axis 0, optional ``labels``;
- ``FILE.npy``: one array for a single-input model;
- a folder of ``.npy``/``.npz`` files, each one sample or one batch (concatenated in name order);
- a folder of ``.png``/``.jpg`` images (decoded and resized with onnxruntime-extensions' image
  operators, normalized with mean/std, NCHW or NHWC, RGB or BGR; subfolders named by integer
  class ids become labels);
- ``random``: uniform data in a range; accuracy cannot be measured on it (a warning says so).

Every problem with the data is an InputError naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from onnx import ModelProto

from onnxslim.errors import InputError
from onnxslim.options import RunOptions
from onnxslim.validate import DEFAULT_DIM, NotValidatable, input_specs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
DEFAULT_RANDOM_SIZE = 32
DEFAULT_BATCH = 16
# Each image is decoded in a child process: the native decoders behind onnxruntime-extensions'
# DecodeImage exit the process on some non-image data and loop forever on a truncated JPEG (measured
# with onnxruntime-extensions 0.15). The child can die or be killed; onnxslim then names the file.
IMAGE_SECONDS_BASE = 60.0
IMAGE_SECONDS_EACH = 2.0


@dataclass
class CalibrationData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    measured: bool = True  # False for random data: accuracy is not measured on it
    warnings: list[str] = field(default_factory=list)
    batch_size: int = DEFAULT_BATCH  # --calib-batch, else the model's fixed batch, else DEFAULT_BATCH
    fixed_batch: bool = False  # batch_size is the model's own fixed batch: feed whole batches only

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive slices of ``batch_size`` samples (default: the data's own batch size)."""
        b = max(1, batch_size or self.batch_size)
        for s in range(0, self.size, b):
            yield {k: v[s:s + b] for k, v in self.inputs.items()}

    def subset(self, n: int) -> "CalibrationData":
        return CalibrationData({k: v[:n] for k, v in self.inputs.items()},
                               None if self.labels is None else self.labels[:n], self.source, self.measured,
                               list(self.warnings), self.batch_size, self.fixed_batch)


def _expected(dims: list) -> list:
    return ["N"] + [d if isinstance(d, int) and d > 0 else "?" for d in dims[1:]]


def _check_against_model(inputs: dict[str, np.ndarray], model: ModelProto, source: str) -> None:
    specs = input_specs(model)
    missing = [n for n in specs if n not in inputs]
    extra = [k for k in inputs if k not in specs]
    if missing or extra:
        raise InputError(f"calibration data '{source}': keys {sorted(inputs)} do not match the model's inputs "
                         f"{list(specs)}")
    n = None
    for name, (dtype, dims) in specs.items():
        arr = inputs[name]
        want = _expected(dims)
        if arr.ndim != len(dims):
            raise InputError(f"calibration data '{source}': input '{name}' has shape {list(arr.shape)}, "
                             f"expected {want} (samples on axis 0)")
        for got, d in zip(arr.shape[1:], dims[1:]):
            if isinstance(d, int) and d > 0 and got != d:
                raise InputError(f"calibration data '{source}': input '{name}' has shape {list(arr.shape)}, "
                                 f"expected {want}")
        if arr.dtype != dtype:
            if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(dtype, np.floating):
                inputs[name] = arr.astype(dtype)
            elif np.issubdtype(arr.dtype, np.integer) and np.issubdtype(dtype, np.integer):
                inputs[name] = arr.astype(dtype)  # int32 ids for an int64 input: same values
            else:
                raise InputError(f"calibration data '{source}': input '{name}' has dtype {arr.dtype}, expected {dtype}")
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise InputError(f"calibration data '{source}': input '{name}' has {bad} NaN/Inf value(s) of {arr.size}; "
                             "calibration needs finite data")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise InputError(f"calibration data '{source}': inputs have different sample counts")
    if not n:
        raise InputError(f"calibration data '{source}' has no samples")


def _check_labels(labels: np.ndarray | None, n: int, source: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1) if np.asarray(labels).ndim <= 1 else np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"calibration data '{source}': 'labels' must be {n} integer class ids "
                         f"(got {labels.dtype} {list(labels.shape)})")
    return labels.astype(np.int64)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one .npz (by key) or .npy (key ''), or an InputError naming the file."""
    try:
        if path.suffix == ".npy":
            return {"": np.asarray(np.load(path, allow_pickle=False))}
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"calibration data '{path}': cannot read as {path.suffix} ({why})") from None


def _single_input(model: ModelProto, path: Path, what: str) -> tuple[str, Any, list]:
    specs = input_specs(model)
    if len(specs) != 1:
        raise InputError(f"calibration data '{path}': {what} holds one array but the model has inputs "
                         f"{list(specs)}: use .npz files with one key per input")
    name, (dtype, dims) = next(iter(specs.items()))
    return name, dtype, dims


def read_npz(path: Path, model: ModelProto) -> CalibrationData:
    arrays = _load_arrays(path)
    labels = arrays.pop("labels", None)
    _check_against_model(arrays, model, str(path))
    labels = _check_labels(labels, next(iter(arrays.values())).shape[0], str(path))
    return CalibrationData(arrays, labels, str(path))


def read_npy(path: Path, model: ModelProto) -> CalibrationData:
    name, _, _ = _single_input(model, path, "a .npy file")
    arrays = {name: _load_arrays(path)[""]}
    _check_against_model(arrays, model, str(path))
    return CalibrationData(arrays, None, str(path))


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _as_batch(arr: np.ndarray, dims: list, path: Path, name: str) -> np.ndarray:
    """One sample (rank of the input minus one) gets a batch axis; a batch passes as is."""
    sample_ok = arr.ndim == len(dims) - 1 and all(
        not (isinstance(d, int) and d > 0) or got == d for got, d in zip(arr.shape, dims[1:]))
    if sample_ok:
        return arr[None]
    if arr.ndim == len(dims):
        return arr  # a batch: checked against the model by the caller
    raise InputError(f"calibration data '{path}': input '{name}' has shape {list(arr.shape)}, expected one sample "
                     f"{_expected(dims)[1:]} or a batch {_expected(dims)}")


def read_array_folder(folder: Path, files: list[Path], model: ModelProto, size: int | None) -> CalibrationData:
    """One sample or one batch per file; .npy for single-input models, .npz keys = input names."""
    specs = input_specs(model)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in specs}
    label_parts: list[np.ndarray] = []
    with_labels: list[Path] = []
    total = 0
    for path in files:
        arrays = _load_arrays(path)
        labels = arrays.pop("labels", None)
        if path.suffix == ".npy":
            name, _, _ = _single_input(model, path, "a .npy file")
            arrays = {name: arrays[""]}
        elif len(specs) == 1 and len(arrays) == 1 and next(iter(specs)) not in arrays:
            # np.savez(f, x) names its array 'arr_0': unambiguous for a single-input model.
            arrays = {next(iter(specs)): next(iter(arrays.values()))}
        arrays = {k: _as_batch(v, specs[k][1], path, k) if k in specs else v for k, v in arrays.items()}
        _check_against_model(arrays, model, str(path))
        n = next(iter(arrays.values())).shape[0]
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            label_parts.append(_check_labels(labels, n, str(path)))
            with_labels.append(path)
        for k in specs:
            if parts[k] and parts[k][0].shape[1:] != arrays[k].shape[1:]:
                raise InputError(f"calibration data '{path}': input '{k}' has sample shape {list(arrays[k].shape[1:])}, "
                                 f"but '{files[0].name}' has {list(parts[k][0].shape[1:])}; all files must agree")
            parts[k].append(arrays[k])
        total += n
        if size and total >= size:
            break
    if label_parts and len(with_labels) != len(parts[next(iter(specs))]):
        missing = next(p for p in files if p not in with_labels)
        raise InputError(f"calibration data '{missing}': has no 'labels' while other files in '{folder}' do")
    inputs = {k: np.concatenate(v) for k, v in parts.items()}
    labels = np.concatenate(label_parts) if label_parts else None
    return CalibrationData(inputs, labels, str(folder))


# ---------------------------------------------------------------------------------------------- images

def _parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None or text == "":
        return None
    try:
        vals = [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"{what} '{text}': expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if not vals:
        raise InputError(f"{what} '{text}': expected comma-separated numbers")
    return vals


def _image_geometry(model: ModelProto, input_shapes: dict[str, list[int]], layout: str | None,
                    folder: Path) -> tuple[str, Any, list[int], str]:
    """Input name, dtype, [N, C, H, W] or [N, H, W, C] and the layout of the model's image input."""
    specs = input_specs(model)
    if len(specs) != 1:
        raise InputError(f"calibration folder '{folder}' holds images but the model has inputs {list(specs)}: "
                         f"image calibration needs one image input")
    name, (dtype, dims) = next(iter(specs.items()))
    if name in input_shapes:
        dims = list(input_shapes[name])
    if len(dims) != 4:
        raise InputError(f"calibration folder '{folder}' holds images but input '{name}' has rank {len(dims)}, "
                         f"expected 4 ([N,C,H,W] or [N,H,W,C])")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if layout is None:
        if fixed[1] in (1, 3):
            layout = "nchw"
        elif fixed[3] in (1, 3):
            layout = "nhwc"
        else:
            raise InputError(f"calibration folder '{folder}': cannot tell the layout of input '{name}' {_expected(dims)}; "
                             f"give --layout nchw|nhwc")
    c, h, w = (fixed[1], fixed[2], fixed[3]) if layout == "nchw" else (fixed[3], fixed[1], fixed[2])
    if c not in (1, 3):
        raise InputError(f"calibration folder '{folder}': input '{name}' {_expected(dims)} in {layout} has "
                         f"{c if c else 'a dynamic number of'} channels, expected 1 or 3")
    if h is None or w is None:
        raise InputError(f"calibration folder '{folder}': input '{name}' {_expected(dims)} has a dynamic height or "
                         f"width; fix it with --input-shape {name}:1,...")
    if not (np.issubdtype(dtype, np.floating) or dtype == np.uint8):
        raise InputError(f"calibration folder '{folder}': input '{name}' has dtype {dtype}, expected a float or "
                         f"uint8 image input")
    return name, dtype, [c, h, w], layout


def _image_problem(path: Path, data: bytes) -> str | None:
    """A cheap structural check that keeps most broken files away from the native decoders."""
    if not data:
        return "empty file"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in data[-16:]:
            return "truncated PNG (no IEND chunk at the end)"
        return None
    if data.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" not in data.rstrip(b"\x00")[-2:]:
            return "truncated JPEG (no end-of-image marker)"
        return None
    return "not a PNG or JPEG file"


def _decoder_model():
    """bytes -> DecodeImage (BGR, HxWx3 uint8) -> float -> antialiased linear Resize to ``sizes``."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("DecodeImage", ["image"], ["bgr"], domain="com.microsoft.extensions"),
             helper.make_node("Cast", ["bgr"], ["bgr_f"], to=TensorProto.FLOAT),
             helper.make_node("Resize", ["bgr_f", "", "", "sizes"], ["out"], mode="linear", antialias=1)]
    g = helper.make_graph(nodes, "decode_resize",
                          [helper.make_tensor_value_info("image", TensorProto.UINT8, ["bytes"]),
                           helper.make_tensor_value_info("sizes", TensorProto.INT64, [3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["h", "w", 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                               helper.make_opsetid("com.microsoft.extensions", 1)])


# The child's whole program: it imports only numpy and onnxruntime (importing onnxruntime_extensions
# would cost ~2 s); the parent passes the custom-op library path and the decoder model.
_WORKER = """
import json, sys
import numpy as np
import onnxruntime as ort
ort.set_default_logger_severity(4)
job = json.loads(sys.stdin.read())
so = ort.SessionOptions()
so.log_severity_level = 4
so.register_custom_ops_library(job["library"])
sess = ort.InferenceSession(job["model"], so, providers=["CPUExecutionProvider"])
sizes = np.array([job["height"], job["width"], 3], dtype=np.int64)
out = np.zeros((len(job["files"]), job["height"], job["width"], 3), dtype=np.float32)
for i, f in enumerate(job["files"]):
    print(f"start {i}", flush=True)
    try:
        out[i] = sess.run(None, {"image": np.fromfile(f, dtype=np.uint8), "sizes": sizes})[0]
    except Exception as e:
        msg = str(e).split("Status Message:")[-1].strip().splitlines()[0] if str(e) else type(e).__name__
        print(f"error {i} {msg}", flush=True)
        sys.exit(3)
np.save(job["out"], out)
print("done", flush=True)
"""


def decode_images(files: list[Path], height: int, width: int) -> np.ndarray:
    """[N, H, W, 3] float32 BGR pixels in 0..255, resized; an InputError names any unreadable file."""
    for f in files:
        try:
            with open(f, "rb") as fh:
                head = fh.read(16)
                fh.seek(max(0, f.stat().st_size - 64))
                tail = fh.read()
        except OSError as e:
            raise InputError(f"calibration image '{f}': cannot read ({e.strerror or e})") from None
        problem = _image_problem(f, head + (tail if len(head) == 16 else b""))
        if problem:
            raise InputError(f"calibration image '{f}': {problem}")
    from onnxslim.runtime import _extensions_library

    library = _extensions_library()
    if library is None:
        raise InputError(f"calibration images in '{files[0].parent}': decoding needs onnxruntime-extensions "
                         f"(pip install onnxruntime-extensions)")
    with tempfile.TemporaryDirectory(prefix="onnxslim-images-") as tmp:
        out, decoder = Path(tmp) / "pixels.npy", Path(tmp) / "decoder.onnx"
        decoder.write_bytes(_decoder_model().SerializeToString())
        job = json.dumps({"files": [str(f) for f in files], "height": height, "width": width, "out": str(out),
                          "library": library, "model": str(decoder)})
        cmd = [sys.executable, "-c", _WORKER]
        timeout = IMAGE_SECONDS_BASE + IMAGE_SECONDS_EACH * len(files)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            stdout, _ = proc.communicate(job, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            timed_out = True
        lines = [ln for ln in stdout.splitlines() if ln]
        if proc.returncode == 0 and lines and lines[-1] == "done" and out.exists():
            return np.load(out)
        started = [int(ln.split()[1]) for ln in lines if ln.startswith("start ")]
        errors = [ln for ln in lines if ln.startswith("error ")]
        if errors:
            _, i, msg = errors[-1].split(" ", 2)
            raise InputError(f"calibration image '{files[int(i)]}': cannot decode ({msg})")
        if started:
            why = "the decoder hung" if timed_out else f"the decoder crashed (exit {proc.returncode})"
            raise InputError(f"calibration image '{files[started[-1]]}': cannot decode ({why})")
        raise InputError(f"calibration images in '{files[0].parent}': the image decoder could not start "
                         f"(exit {proc.returncode})")


def read_image_folder(folder: Path, files: list[Path], model: ModelProto, size: int | None,
                      options: RunOptions, input_shapes: dict[str, list[int]]) -> CalibrationData:
    name, dtype, (c, h, w), layout = _image_geometry(model, input_shapes, options.calib_layout, folder)
    files = files[:size] if size else files
    labels = None
    parents = {f.parent for f in files}
    if folder not in parents and all(p.name.isdigit() for p in parents):
        labels = np.array([int(f.parent.name) for f in files], dtype=np.int64)
    mean = _parse_floats(options.calib_mean, "--mean")
    std = _parse_floats(options.calib_std, "--std")
    if dtype == np.uint8 and (mean or std):
        raise InputError(f"--mean/--std: input '{name}' takes uint8 pixels; normalization does not apply")
    for vals, what in ((mean, "--mean"), (std, "--std")):
        if vals is not None and len(vals) not in (1, c):
            raise InputError(f"{what}: {len(vals)} values for an image input with {c} channel(s)")
    if std is not None and any(v == 0 for v in std):
        raise InputError("--std: values must be non-zero")
    bgr = decode_images(files, h, w)
    pix = bgr[..., ::-1] if (options.calib_color or "rgb") == "rgb" else bgr
    if c == 1:
        rgb = bgr[..., ::-1]
        pix = (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]  # ITU-R BT.601 luma
    if dtype == np.uint8:
        x = np.clip(np.rint(pix), 0, 255).astype(np.uint8)
    else:
        # torchvision convention: mean/std in the 0..1 pixel scale, unless a value > 1 says 0..255.
        scale_255 = any(v > 1 for v in (mean or []) + (std or []))
        x = pix if scale_255 else pix / 255.0
        x = (x - np.asarray(mean or [0.0], dtype=np.float32)) / np.asarray(std or [1.0], dtype=np.float32)
        x = x.astype(dtype)
    if layout == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    inputs = {name: x}
    _check_against_model(inputs, model, str(folder))
    return CalibrationData(inputs, labels, str(folder))


# ---------------------------------------------------------------------------------------------- random

def read_random(model: ModelProto, size: int | None, options: RunOptions,
                input_shapes: dict[str, list[int]]) -> CalibrationData:
    from onnxslim.validate import resolve_shape

    rng_text = options.calib_random_range or "0,1"
    vals = _parse_floats(rng_text, "--random-range")
    if len(vals) != 2 or not vals[0] < vals[1]:
        raise InputError(f"--random-range '{rng_text}': expected LOW,HIGH with LOW < HIGH")
    low, high = vals
    n = size or DEFAULT_RANDOM_SIZE
    rng = np.random.default_rng(0)
    symbols: dict[str, int] = {}
    inputs = {}
    try:
        specs = input_specs(model)
    except NotValidatable as e:
        raise InputError(f"calibration data 'random': {e}") from None
    for name, (dtype, dims) in specs.items():
        shape = resolve_shape(name, dims, input_shapes, symbols, batch=n)
        if name in input_shapes:
            shape[0] = n
        if np.issubdtype(dtype, np.floating):
            inputs[name] = rng.uniform(low, high, size=shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            inputs[name] = rng.integers(int(np.ceil(low)), int(np.floor(high)) + 1, size=shape).astype(dtype)
        elif dtype == np.bool_:
            inputs[name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise InputError(f"calibration data 'random': input '{name}' has dtype {dtype}; give real data")
    unset = [d for _, (_, dims) in specs.items() for d in dims[1:] if not (isinstance(d, int) and d > 0)]
    warn = (f"calibration data is random (uniform in [{low:g}, {high:g}], {n} samples): ranges and refits follow "
            f"random inputs and accuracy is not measured; pass real data with --calib for a trustworthy result")
    if unset and not input_shapes:
        warn += f" (dynamic dimensions set to {DEFAULT_DIM}; fix them with --input-shape)"
    return CalibrationData(inputs, None, "random", measured=False, warnings=[warn])


# ---------------------------------------------------------------------------------------------- dispatch

def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    images, arrays = [], []
    for p in sorted(folder.rglob("*"), key=_natural_key):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        suf = p.suffix.lower()
        if suf in IMAGE_SUFFIXES:
            images.append(p)
        elif suf in ARRAY_SUFFIXES and p.parent == folder:
            arrays.append(p)
    return images, arrays


def _batch_size(options: RunOptions, model: ModelProto) -> int:
    from onnxslim.validate import static_batch

    fixed = static_batch(model)
    given = options.calib_batch
    if fixed is not None:
        if given and given != fixed:
            raise InputError(f"--calib-batch {given}: the model's inputs have a fixed batch size of {fixed}")
        return fixed
    return int(given) if given else DEFAULT_BATCH


def load_calibration(spec: str | Path, model: ModelProto, *, size: int | None = None,
                     settings: RunOptions | None = None,
                     input_shapes: dict[str, list[int]] | None = None) -> CalibrationData:
    """Dispatch on the spec: .npz/.npy file, folder of arrays or images, or 'random'.

    ``settings``: the run's options (image geometry, random range, batch and sample counts)."""
    options = settings or RunOptions()
    input_shapes = input_shapes or {}
    size = size or options.calib_size
    if str(spec) == "random":
        data = read_random(model, size, options, input_shapes)
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"calibration data '{spec}': no such file or folder")
        if path.is_dir():
            images, arrays = _folder_files(path)
            if images and arrays:
                raise InputError(f"calibration folder '{path}' mixes images and .npy/.npz files; keep one kind")
            if not images and not arrays:
                raise InputError(f"calibration folder '{path}' has no .npy, .npz, .png or .jpg files")
            if images:
                data = read_image_folder(path, images, model, size, options, input_shapes)
            else:
                data = read_array_folder(path, arrays, model, size)
        elif path.suffix.lower() == ".npz":
            data = read_npz(path, model)
        elif path.suffix.lower() == ".npy":
            data = read_npy(path, model)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"calibration data '{spec}': one image is not enough; give the folder that holds it")
        else:
            raise InputError(f"calibration data '{spec}': unsupported (expected .npz, .npy, a folder, or 'random')")
    if size and data.size > size:
        data = data.subset(size)
    data.batch_size = _batch_size(options, model)
    data.fixed_batch = _fixed_batch(model) is not None
    if data.batch_size > 1 and data.size % data.batch_size and data.batch_size == _fixed_batch(model):
        # A fixed-batch model can only take whole batches: drop the remainder, and say so.
        keep = data.size - data.size % data.batch_size
        if keep == 0:
            raise InputError(f"calibration data '{data.source}': {data.size} sample(s), but the model's fixed batch "
                             f"size is {data.batch_size}")
        data.warnings.append(f"calibration data: {data.size - keep} sample(s) dropped to fill whole batches of "
                             f"{data.batch_size} (the model's fixed batch size)")
        data = data.subset(keep)
    return data


def split_holdout(data: CalibrationData, fraction: float, min_held: int = 4,
                  min_fit: int = 8) -> tuple[CalibrationData, CalibrationData | None]:
    """(fit part, held-out part): every k-th sample is held out so both parts cover the data set's order.

    At least ``min_held`` samples are held out even where ``fraction`` gives fewer (the centred cosine
    needs 4; a gate on 4 unseen samples still catches the overfit a gate on fitted data cannot see), as
    long as ``min_fit`` remain to fit on. Random data has nothing to hold out (it measures nothing); a
    set smaller than that is not split (the caller warns)."""
    n = data.size
    fixed = data.batch_size if data.fixed_batch else 1
    if not data.measured or fraction <= 0:
        return data, None
    k = max(int(round(n * fraction)), min_held)
    k = -(-k // fixed) * fixed  # a fixed-batch model takes whole batches only, on both sides
    if n - k < max(min_fit, fixed):
        return data, None
    step = n / k
    held = np.unique((np.arange(k) * step + step / 2).astype(np.int64).clip(0, n - 1))
    mask = np.zeros(n, dtype=bool)
    mask[held] = True

    def part(m: np.ndarray, what: str) -> CalibrationData:
        return CalibrationData({name: v[m] for name, v in data.inputs.items()},
                               None if data.labels is None else data.labels[m], f"{data.source} ({what})",
                               data.measured, [], data.batch_size, data.fixed_batch)

    fit, hold = part(~mask, f"{int((~mask).sum())} fitted"), part(mask, f"{int(mask.sum())} held out")
    fit.warnings = list(data.warnings)
    return fit, hold


def _fixed_batch(model: ModelProto) -> int | None:
    from onnxslim.validate import static_batch

    return static_batch(model)
