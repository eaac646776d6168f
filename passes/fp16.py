"""fp16: float32 -> float16 weights and activations (onnxruntime's transformers.float16 converter).

Halves the file. Inputs and outputs stay float32 by default (--fp16-keep-io) so callers need no change;
--fp16-block-ops keeps more op types in float32 on top of the converter's own block list. On x86 CPUs
onnxruntime has few float16 kernels, so the model is usually no faster (measured 1.0x): the pass times
it against the float32 model and says so; a speed gate applies only when --min-speedup is given.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from onnx import ModelProto

from onnxslim.manager import Context, Pass, PassResult, register
from onnxslim.options import option
from onnxslim.protowalk import opset_of, prune_opsets
from onnxslim.runtime import latency_table, quiet_ort, speed_gate
from onnxslim.validate import latency_feeds


@dataclass(frozen=True)
class Fp16Options:
    fp16_keep_io: bool = option(True, "Keep float32 inputs/outputs.", cli="--fp16-keep-io/--no-fp16-keep-io")
    fp16_block_ops: str | None = option(None, "Comma-separated op types kept in float32.")


@register
class Float16(Pass):
    name = "fp16"
    description = "Convert to float16 (float32 inputs/outputs kept by default); halves the file, validated and timed"
    lossless = False
    level = "model"
    Options = Fp16Options

    def run(self, model: ModelProto, ctx: Context) -> PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        keep_io = self.options.fp16_keep_io
        extra = [t.strip() for t in str(self.options.fp16_block_ops or "").split(",") if t.strip()]
        block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(extra))
        with quiet_ort():
            out = convert_float_to_float16(copy.deepcopy(model), keep_io_types=bool(keep_io), op_block_list=block)
        prune_opsets(out)
        size_x = out.ByteSize() / max(1, model.ByteSize())
        notes = ["float16 with float32 inputs/outputs" if keep_io else "float16 inputs/outputs",
                 f"file {size_x:.2f}x"]
        if extra:
            notes.append(f"kept in float32 (--fp16-block-ops): {', '.join(extra)}")
        details: dict = {"size_ratio": round(size_x, 4), "keep_io_types": bool(keep_io), "block_ops": extra,
                         "opset": opset_of(out)}
        if ctx.run.latency is not False:
            table = latency_table(model, out, latency_feeds(model, ctx.input_shapes, ctx.inputs),
                                  custom_op_library=ctx.custom_op_library)
            details["latency"] = table
            timed = {k: v for k, v in table.items() if "ratio" in v}
            txt = ", ".join(f"{k.replace('batch', 'batch ')}: {v['ratio']:.2f}x the float32 latency"
                            for k, v in timed.items())
            if txt:
                notes.append(txt)
            if any(v["ratio"] > 1.0 for v in timed.values()):
                ctx.warn(f"fp16: not faster than float32 on this CPU ({txt}); it is smaller ({size_x:.2f}x)")
            # No speed gate unless asked: fp16 is chosen for its size (onnxruntime on x86 has few fp16 kernels).
            if "min_speedup" in ctx.given and ctx.run.objective != "size":
                failure = speed_gate("fp16", table, ctx.run.min_speedup)
                if failure:
                    ctx.gate_failures.append(failure)
        return PassResult(changed=True, stats={"size_ratio": round(size_x, 4)}, notes=notes, model=out,
                          details=details)
