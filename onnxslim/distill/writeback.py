"""Write trained values back into a copy of the ModelProto: same initializer names, dtypes and shapes,
nodes untouched. Only initializers whose values changed are re-encoded (as raw_data), so an untrained
tensor keeps its exact bytes."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, helper, numpy_helper


def write_back(model: ModelProto, values: dict[str, np.ndarray]) -> tuple[ModelProto, list[str]]:
    """A new model with ``values`` in place of the initializers of the same names, and the names changed.

    A value whose dtype or shape differs from its initializer's is a bug in the caller: ValueError.
    """
    out = ModelProto()
    out.CopyFrom(model)
    changed: list[str] = []
    for t in out.graph.initializer:
        v = values.get(t.name)
        if v is None:
            continue
        old = numpy_helper.to_array(t)
        want = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if v.dtype != want or tuple(v.shape) != tuple(old.shape):
            raise ValueError(f"write-back of '{t.name}': {v.dtype}{list(v.shape)} does not match "
                             f"{want}{list(old.shape)}")
        if np.array_equal(old, v):
            continue
        new = numpy_helper.from_array(np.ascontiguousarray(v), t.name)
        t.ClearField("float_data")
        t.ClearField("int32_data")
        t.ClearField("int64_data")
        t.ClearField("double_data")
        t.raw_data = new.raw_data
        changed.append(t.name)
    return out, changed
