"""Calibration data readers shared by pruning (refit, sensitivity) and quantization.

``load_calibration(spec, model)`` returns a CalibrationData: arrays keyed by input name with
samples on axis 0, plus optional integer labels. Every problem with the data is an
InputError naming the file and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from onnx import ModelProto

from onnxslim.errors import InputError
from onnxslim.validate import input_specs


@dataclass
class CalibrationData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    measured: bool = True  # False for random data: accuracy is not measured on it

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive slices of ``batch_size`` samples."""
        for s in range(0, self.size, max(1, batch_size)):
            yield {k: v[s:s + batch_size] for k, v in self.inputs.items()}

    def subset(self, n: int) -> "CalibrationData":
        return CalibrationData({k: v[:n] for k, v in self.inputs.items()},
                               None if self.labels is None else self.labels[:n], self.source, self.measured)


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
        want = ["N"] + [d if isinstance(d, int) and d > 0 else "?" for d in dims[1:]]
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
            else:
                raise InputError(f"calibration data '{source}': input '{name}' has dtype {arr.dtype}, expected {dtype}")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise InputError(f"calibration data '{source}': inputs have different sample counts")
    if not n:
        raise InputError(f"calibration data '{source}' has no samples")


def read_npz(path: Path, model: ModelProto) -> CalibrationData:
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"calibration data '{path}': cannot read as .npz ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    labels = arrays.pop("labels", None)
    _check_against_model(arrays, model, str(path))
    if labels is not None:
        n = next(iter(arrays.values())).shape[0]
        if labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"calibration data '{path}': 'labels' must be {n} integer class ids")
    return CalibrationData(arrays, labels, str(path))


def load_calibration(spec: str | Path, model: ModelProto, *, size: int | None = None,
                     options: dict[str, Any] | None = None) -> CalibrationData:
    """Dispatch on the spec: an .npz file (more readers: folders, images, random)."""
    path = Path(spec)
    if not path.exists():
        raise InputError(f"calibration data '{spec}': no such file or folder")
    if path.is_file() and path.suffix == ".npz":
        data = read_npz(path, model)
    else:
        raise InputError(f"calibration data '{spec}': unsupported (expected an .npz file)")
    if size:
        data = data.subset(size)
    return data
