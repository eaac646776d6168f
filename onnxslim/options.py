"""Typed options: each pass declares a frozen dataclass of its settings; lossy passes share ``RunOptions``.

A field's name is its CLI option with ``-`` for ``_`` (``prune_ratio`` -> ``--prune-ratio``) unless its
metadata names another flag (``cli``). Metadata keys: ``help``, ``choices``, ``min``, ``max``, ``cli``.
``build`` turns user values (CLI or API, possibly strings) into an instance and rejects wrong types and
out-of-range values with one line that names the option; the manager decides which class a key belongs to.
This module imports nothing from onnxslim but the errors, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from onnxslim.errors import InputError

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_CENTRED_COSINE = 0.8
DEFAULT_MAX_ACC_DROP = 1.0


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, min: float | None = None,
           max: float | None = None, cli: str | None = None, min_exclusive: bool = False) -> Any:
    """A dataclass field that carries its CLI description."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "cli": cli, "min_exclusive": min_exclusive}
    return field(default=default, metadata=meta)


def cli_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("cli") or "--" + f.name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, type]:
    """Field name -> the base type (int, float, str, bool); ``X | None`` counts as X."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        out[name] = args[0] if isinstance(args[0], type) else str
    return out


def fields_of(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def _coerce(cls: type, f: dataclasses.Field, value: Any) -> Any:
    flag = cli_flag(f)
    kind = field_types(cls)[f.name]
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, (bool, int)):
                raise ValueError
            value = bool(value)
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        elif kind is str:
            if not isinstance(value, str):
                raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"{flag} {value!r}: expected {'a number' if kind in (int, float) else kind.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise InputError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and (value < lo or (f.metadata.get("min_exclusive") and value == lo)):
        raise InputError(f"{flag} {value!r}: must be {'>' if f.metadata.get('min_exclusive') else '>='} {lo:g}")
    if hi is not None and value > hi:
        raise InputError(f"{flag} {value!r}: must be <= {hi:g}")
    return value


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the options class ``cls`` from ``values`` (keys it does not declare are ignored:
    the manager checks ownership); ``None`` means "not given", i.e. the declared default."""
    kwargs = {}
    for f in fields_of(cls):
        if values.get(f.name) is not None:
            kwargs[f.name] = _coerce(cls, f, values[f.name])
    return cls(**kwargs)


@dataclass(frozen=True)
class RunOptions:
    """Settings every lossy pass shares: calibration data, gates, latency measurement."""

    calib: str | None = option(None, "Calibration data: FILE.npz (keys = input names, optional 'labels'), a folder "
                                     "of .npy/.npz or images, or 'random'.")
    calib_size: int | None = option(None, "Use at most N calibration samples.", min=1)
    calib_batch: int | None = option(None, "Calibration batch size.", min=1)
    calib_holdout: float = option(0.2, "Fraction of --calib held out from fitting and used by the gate when "
                                       "--inputs is not given (at least 4 samples where 8 remain to fit on).",
                                       min=0.0, max=0.5)
    calib_mean: str | None = option(None, "Image calibration: per-channel mean, e.g. 0.485,0.456,0.406.", cli="--mean")
    calib_std: str | None = option(None, "Image calibration: per-channel std.", cli="--std")
    calib_layout: str | None = option(None, "Image calibration layout.", choices=("nchw", "nhwc"), cli="--layout")
    calib_color: str | None = option(None, "Image calibration channel order.", choices=("rgb", "bgr"), cli="--color")
    calib_random_range: str | None = option(None, "'random' calibration: LOW,HIGH (default 0,1).", cli="--random-range")
    min_cosine: float = option(DEFAULT_MIN_COSINE, "Lossy gate: minimum cosine of every output with the original's.",
                               min=-1.0, max=1.0)
    min_centred_cosine: float = option(DEFAULT_MIN_CENTRED_COSINE, "Lossy gate: minimum cosine with the original's "
                                       "outputs after subtracting its mean output over the samples (>= 4 samples).",
                                       min=-1.0, max=1.0)
    max_acc_drop: float = option(DEFAULT_MAX_ACC_DROP, "Lossy gate with labels: maximum accuracy drop in points "
                                                       "(negative: the result must be more accurate).",
                                 min=-100.0, max=100.0)
    min_top1: float | None = option(None, "Lossy gate: minimum top-1 agreement with the original on score "
                                          "outputs (0-1; default 0.95 on outputs made by Softmax/Gemm/MatMul, i.e. class scores).",
                                    min=0.0, max=1.0)
    min_speedup: float = option(1.0, "Speed gate of lossy passes: minimum speedup over the input model "
                                     "(geometric mean over the measured batch sizes).", min=0.0, min_exclusive=True)
    objective: str = option("speed", "'size' turns the speed gate off.", choices=("speed", "size"))
    latency: bool | None = option(None, "Measure latency before/after (default: on for lossy pipelines).",
                                  cli="--latency/--no-latency")


LOSSY_RUN_OPTIONS = frozenset(f.name for f in fields_of(RunOptions)) - {"latency"}
