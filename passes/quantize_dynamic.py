"""quantize-dynamic: INT8 weights, activations quantized at run time (onnxruntime's quantize_dynamic).

For MatMul/Gemm/Attention/LSTM-heavy models; needs no calibration data. Dynamic Conv (ConvInteger) is
usually much slower than float: it is timed, kept in float when slower, and the report suggests
quantize-static.
"""

from __future__ import annotations

from onnx import ModelProto

from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.quantization import quantize_pass


@register
class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    description = "INT8 dynamic quantization (weights INT8, activations at run time) for MatMul/Gemm-heavy models"
    lossless = False
    level = "model"

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        return quantize_pass(model, ctx, "dynamic")
