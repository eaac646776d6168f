"""quantize-static / quantize-dynamic: INT8 through onnxruntime.quantization, made fast and safe.

quantize-static: calibrated activation ranges (QDQ by default). quantize-dynamic: INT8 weights,
activations quantized at run time, for MatMul/Gemm/Attention/LSTM-heavy models (no calibration needed;
dynamic Conv is usually slower than float, so it is timed and kept in float when slower).
The work is in onnxslim.quantization: machine-specific defaults, pre-processing with fallbacks, the
opset-13 upgrade per-channel QDQ needs, a latency search when INT8 is slower than float, and an
accuracy-aware fallback that moves the nodes losing the most signal back to float until the gate passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import ModelProto

from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.options import option
from onnxslim.quantization import QuantOutcome, quantize_pass


@dataclass(frozen=True)
class QuantOptions:
    """Settings of both quantize passes; unset (None) ones are chosen per CPU and searched."""

    quant_format: str | None = option(None, "Static quantization format (default qdq).", choices=("qdq", "qoperator"))
    quant_method: str | None = option(None, "Calibration method (default minmax).",
                                      choices=("minmax", "entropy", "percentile"))
    per_channel: bool | None = option(None, "Per-channel weight quantization.", cli="--per-channel/--no-per-channel")
    activation_type: str | None = option(None, "Activation type.", choices=("uint8", "int8"))
    weight_type: str | None = option(None, "Weight type.", choices=("int8", "uint8"))
    quant_symmetric: bool | None = option(None, "Symmetric activations.", cli="--symmetric/--asymmetric")
    quant_op_types: str | None = option(None, "Comma-separated op types to quantize.")
    quant_exclude: str | None = option(None, "Comma-separated node names kept in float.")


def _result(out: QuantOutcome) -> PassResult:
    return PassResult(changed=out.changed, stats=out.stats, notes=out.notes, model=out.model, details=out.details)


@register
class QuantizeStatic(Pass):
    name = "quantize-static"
    description = ("INT8 static quantization with calibration (--calib): QDQ, fastest settings for this CPU, "
                   "latency-checked, accuracy-aware float fallback")
    lossless = False
    level = "model"
    Options = QuantOptions
    report_section = "quantize"

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        return _result(quantize_pass(model, ctx, "static", self.options))


@register
class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    description = "INT8 dynamic quantization (weights INT8, activations at run time) for MatMul/Gemm-heavy models"
    lossless = False
    level = "model"
    Options = QuantOptions
    report_section = "quantize"

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        return _result(quantize_pass(model, ctx, "dynamic", self.options))
