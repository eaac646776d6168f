"""quantize-static: INT8 with calibrated activation ranges (onnxruntime's quantize_static, QDQ by default).

The work is in onnxslim.quantization: machine-specific defaults (uint8 activations + int8 per-channel
weights on x86), pre-processing with fallbacks, the opset-13 upgrade per-channel QDQ needs, a latency
search when INT8 is slower than float, and an accuracy-aware fallback that moves the nodes losing the
most signal back to float until the gate passes.
"""

from __future__ import annotations

from onnx import ModelProto

from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.quantization import quantize_pass


@register
class QuantizeStatic(Pass):
    name = "quantize-static"
    description = ("INT8 static quantization with calibration (--calib): QDQ, fastest settings for this CPU, "
                   "latency-checked, accuracy-aware float fallback")
    lossless = False
    level = "model"

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        return quantize_pass(model, ctx, "static")
