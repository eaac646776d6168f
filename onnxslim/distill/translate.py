"""A small ONNX -> torch translator whose parameters map back to initializers exactly.

Why not onnx2torch: it builds a torch.fx module of ``nn.Conv2d``/``nn.Linear`` submodules and copies the
initializers into them under module paths, so mapping a trained weight back to its initializer needs a
reverse lookup per converter (and initializers it folds or reshapes have no way back); it has no notion of
an int8 weight behind DequantizeLinear, and it is one more dependency. Here every trainable float
initializer is one ``torch.nn.Parameter`` keyed by its initializer name, every other initializer a buffer,
and the graph runs node by node in ONNX order with functional torch ops, so write-back is a name lookup.

Trainable: float32 initializers read as a weight/bias of Conv, ConvTranspose, Gemm, MatMul, as the scale/bias
of BatchNormalization (never its running mean/var), LayerNormalization and InstanceNormalization, as a PRelu
slope, or as a non-scalar operand of Add/Sub/Mul (biases and per-channel scales of exported transformers),
and never also read where a value is structural (a shape, an index, a Resize scale, a Clip bound, a Q/DQ
scale...). Everything else, including float16/float64 initializers and Constant nodes, is a fixed buffer.

Quantization (QAT): QuantizeLinear/DequantizeLinear are fake quantization with a straight-through
estimator: the forward pass rounds and clips exactly as the int8 model does, the backward pass treats the
rounding as identity (and the clip as a hard cut). Scales and zero points stay fixed (they are buffers).
An integer weight stored as an initializer feeding DequantizeLinear becomes a float "shadow" parameter
initialized to its dequantized value; the forward pass fake-quantizes it, and ``export_values`` writes it
back as ``clip(round(shadow / scale) + zero_point)`` in the initializer's integer type.

An op without a translation (or an attribute value it does not cover) is an InputError naming the op and
the node, raised before any training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import ModelProto, TensorProto, numpy_helper

from onnxslim.errors import InputError

_TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
_QRANGE: dict[int, tuple[int, int]] = {
    TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535), TensorProto.INT32: (-2**31, 2**31 - 1),
}
_NP_QDTYPE = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
              TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32}

# Input positions whose initializer is trained.
_TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "PRelu": (1,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
    "QuantizeLinear": (0,),  # a float weight quantized in the graph (QDQ with float initializers)
}
# Input positions that are structural (shapes, indices, ranges, quantization parameters): an initializer
# read here is never trained, even if another node reads it as a weight.
_STATIC_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,),
    "Split": (1,), "Resize": (1, 2, 3), "Upsample": (1,), "Pad": (1, 2, 3), "Clip": (1, 2), "Gather": (1,),
    "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "TopK": (1,), "CumSum": (1,), "Where": (0,),
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "BatchNormalization": (3, 4), "Pow": (1,),
}
_MIN_TRAINABLE_ELEMENTS = {"Add": 2, "Sub": 2, "Mul": 2}  # scalars there are constants (eps, 0.5, sqrt 2)


@dataclass
class QuantInfo:
    """How a shadow parameter maps back to its integer initializer."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    onnx_dtype: int


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise InputError(f"distill: cannot translate op '{node.op_type}' (node '{node.name}'); "
                             "control flow with subgraphs is not supported")
        out[a.name] = onnx.helper.get_attribute_value(a)
    return out


def _untranslatable(node: onnx.NodeProto, why: str = "") -> InputError:
    tail = why or "no torch translation for it"
    return InputError(f"distill: cannot translate op '{node.op_type}' (node '{node.name}'); {tail}")


def _opset(model: ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 13


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _axis_shape(scale: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """A 1-D per-axis quantization parameter shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if scale.dim() == 0 or scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis % rank] = scale.numel()
    return scale.reshape(shape)


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qdtype: int, axis: int) -> torch.Tensor:
    """QuantizeLinear with a straight-through round: a float tensor holding the integer values."""
    lo, hi = _QRANGE[qdtype]
    s = _axis_shape(scale.to(x.dtype), x.dim(), axis)
    z = _axis_shape(zp.to(x.dtype), x.dim(), axis)
    return torch.clamp(_ste_round(x / s) + z, lo, hi)


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops. ``forward(feeds, extra)`` returns the graph outputs plus the
    intermediate values named in ``extra`` (for feature matching)."""

    def __init__(self, model: ModelProto) -> None:
        super().__init__()
        self.opset = _opset(model)
        g = model.graph
        self.nodes = list(g.node)
        self.output_names = [o.name for o in g.output]
        inits = {t.name: t for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in inits]
        for n in self.nodes:
            if n.domain not in ("", "ai.onnx"):
                raise _untranslatable(n, f"custom domain '{n.domain}'")
            if n.op_type not in _OPS:
                raise _untranslatable(n)
            _attrs(n)  # subgraph attributes are refused here, before any work
        for vi in g.input:
            et = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else -1
            if vi.name not in inits and et not in _TORCH_DTYPES:
                raise InputError(f"distill: cannot translate input '{vi.name}' (element type {et} has no torch "
                                 "equivalent here)")
        for name, t in inits.items():
            if t.data_type not in _TORCH_DTYPES and t.data_type not in _QRANGE:
                raise InputError(f"distill: cannot translate initializer '{name}' (element type {t.data_type} has "
                                 "no torch equivalent here)")
        trainable, shadows = self._trainable(inits)
        self.param_names: list[str] = []
        self.params = torch.nn.ParameterList()
        self.quant: dict[str, QuantInfo] = {}
        self.init_dtypes = {name: t.data_type for name, t in inits.items()}
        self._buffers_by_name: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] = {}
        for name, t in inits.items():
            arr = numpy_helper.to_array(t)
            if name in shadows:
                info = shadows[name]
                q = arr.astype(np.float64)
                w = (q - _np_axis(info.zero_point, q.ndim, info.axis)) * _np_axis(info.scale, q.ndim, info.axis)
                self._add_param(name, w.astype(np.float32))
                self.quant[name] = info
            elif name in trainable:
                self._add_param(name, arr)
            else:
                self._buffers_by_name[name] = torch.from_numpy(np.array(arr))

    def _add_param(self, name: str, arr: np.ndarray) -> None:
        self._index[name] = len(self.param_names)
        self.param_names.append(name)
        self.params.append(torch.nn.Parameter(torch.from_numpy(np.array(arr, dtype=np.float32))))

    def _trainable(self, inits: dict[str, TensorProto]) -> tuple[set[str], dict[str, QuantInfo]]:
        trainable: set[str] = set()
        static: set[str] = set()
        shadows: dict[str, QuantInfo] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name not in inits:
                    continue
                t = inits[name]
                if i in _STATIC_INPUTS.get(n.op_type, ()):
                    static.add(name)
                elif n.op_type == "DequantizeLinear" and i == 0 and t.data_type in _QRANGE:
                    info = self._dq_info(n, inits)
                    if info is not None:
                        shadows[name] = info
                elif (i in _TRAINABLE_INPUTS.get(n.op_type, ()) and t.data_type == TensorProto.FLOAT
                      and int(np.prod(t.dims, dtype=np.int64)) >= _MIN_TRAINABLE_ELEMENTS.get(n.op_type, 1)):
                    trainable.add(name)
                else:
                    static.add(name)
        # An integer weight read by anything but its DequantizeLinear stays an integer buffer.
        readers: dict[str, int] = {}
        for n in self.nodes:
            for name in n.input:
                readers[name] = readers.get(name, 0) + 1
        shadows = {k: v for k, v in shadows.items() if readers.get(k) == 1}
        return trainable - static, shadows

    def _dq_info(self, node: onnx.NodeProto, inits: dict[str, TensorProto]) -> QuantInfo | None:
        if len(node.input) < 2 or node.input[1] not in inits:
            return None
        a = _attrs(node)
        if a.get("block_size", 0):
            raise _untranslatable(node, "blocked quantization (block_size) is not supported")
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        qt = inits[node.input[0]].data_type
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                return None
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        else:
            zp = np.zeros_like(scale)
        return QuantInfo(scale, zp, int(a.get("axis", 1)), qt)

    # -- running -------------------------------------------------------------------------------------

    def value(self, name: str) -> torch.Tensor:
        i = self._index.get(name)
        return self.params[i] if i is not None else self._buffers_by_name[name]

    def forward(self, feeds: dict[str, torch.Tensor], extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor | None] = {"": None}
        env.update(feeds)
        for name in self._buffers_by_name:
            env.setdefault(name, self._buffers_by_name[name])
        for name, i in self._index.items():
            env[name] = self.params[i]
        for n in self.nodes:
            ins = [env[x] if x else None for x in n.input]
            outs = _OPS[n.op_type](self, n, _attrs(n), ins)
            for name, v in zip(n.output, outs):
                if name:
                    env[name] = v
        wanted = list(self.output_names) + [e for e in extra if e not in self.output_names]
        return {k: env[k] for k in wanted}

    # -- write-back -----------------------------------------------------------------------------------

    def export_values(self) -> dict[str, np.ndarray]:
        """Trained values by initializer name, in the initializer's dtype (integers re-quantized)."""
        out: dict[str, np.ndarray] = {}
        for name, p in zip(self.param_names, self.params):
            w = p.detach().cpu().numpy().astype(np.float64)
            info = self.quant.get(name)
            if info is None:
                out[name] = w.astype(np.float32)
                continue
            lo, hi = _QRANGE[info.onnx_dtype]
            q = np.round(w / _np_axis(info.scale, w.ndim, info.axis)) + _np_axis(info.zero_point, w.ndim, info.axis)
            out[name] = np.clip(q, lo, hi).astype(_NP_QDTYPE[info.onnx_dtype])
        return out


def _np_axis(v: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if v.ndim == 0 or v.size == 1 or rank == 0:
        return v.reshape(())
    shape = [1] * rank
    shape[axis % rank] = v.size
    return v.reshape(shape)


def translate(model: ModelProto) -> OnnxModule:
    """The torch module of ``model`` (float32 parameters keyed by initializer name)."""
    return OnnxModule(model)


# ------------------------------------------------------------------------------------------------------
# Op translations: f(module, node, attrs, inputs) -> list of outputs. Inputs missing in ONNX are None.

Op = Callable[[OnnxModule, onnx.NodeProto, dict, list], list]
_OPS: dict[str, Op] = {}


def _op(*names: str) -> Callable[[Op], Op]:
    def deco(f: Op) -> Op:
        for n in names:
            _OPS[n] = f
        return f
    return deco


def _unary(name: str, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
    _OPS[name] = lambda m, n, a, x: [f(x[0])]


for _name, _f in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos,
    "Not": torch.logical_not, "Softplus": F.softplus, "Sign": torch.sign,
    "Identity": lambda t: t, "HardSwish": F.hardswish,
}.items():
    _unary(_name, _f)


def _binary(name: str, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    _OPS[name] = lambda m, n, a, x: [f(x[0], x[1])]


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates (shape arithmetic)
    return a / b


for _name, _f in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "MatMul": torch.matmul,
}.items():
    _binary(_name, _f)


@_op("Pow")
def _pow(m, n, a, x):
    base, exp = x
    if exp.numel() == 1 and not exp.requires_grad:
        return [torch.pow(base, exp.reshape(()).item())]
    return [torch.pow(base, exp.to(base.dtype))]


@_op("Mod")
def _mod(m, n, a, x):
    return [torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])]


@_op("Max", "Min", "Sum", "Mean")
def _variadic(m, n, a, x):
    out = x[0]
    for t in x[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(n.op_type, torch.add)(out, t)
    return [out / len(x) if n.op_type == "Mean" else out]


@_op("LeakyRelu")
def _leaky(m, n, a, x):
    return [F.leaky_relu(x[0], float(a.get("alpha", 0.01)))]


@_op("Elu")
def _elu(m, n, a, x):
    return [F.elu(x[0], float(a.get("alpha", 1.0)))]


@_op("PRelu")
def _prelu(m, n, a, x):
    return [torch.where(x[0] >= 0, x[0], x[0] * x[1])]


@_op("HardSigmoid")
def _hsig(m, n, a, x):
    return [torch.clamp(float(a.get("alpha", 0.2)) * x[0] + float(a.get("beta", 0.5)), 0.0, 1.0)]


@_op("Clip")
def _clip(m, n, a, x):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    lo = lo.item() if isinstance(lo, torch.Tensor) else lo
    hi = hi.item() if isinstance(hi, torch.Tensor) else hi
    return [x[0] if lo is None and hi is None else torch.clamp(x[0], lo, hi)]


@_op("Gelu")
def _gelu(m, n, a, x):
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return [F.gelu(x[0], approximate=approx)]


def _softmax_like(m, n, a, x, f):
    t = x[0]
    if m.opset < 13:  # coerced to 2-D at axis (default 1)
        axis = int(a.get("axis", 1)) % max(t.dim(), 1)
        shape = t.shape
        lead = int(np.prod(shape[:axis], dtype=np.int64))
        return [f(t.reshape(lead, -1), -1).reshape(shape)]
    return [f(t, int(a.get("axis", -1)))]


@_op("Softmax")
def _softmax(m, n, a, x):
    return _softmax_like(m, n, a, x, torch.softmax)


@_op("LogSoftmax")
def _logsoftmax(m, n, a, x):
    return _softmax_like(m, n, a, x, torch.log_softmax)


# -- linear layers -------------------------------------------------------------------------------------

def _pads(n, a, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads per spatial axis, resolving auto_pad."""
    k = len(spatial)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(k):
            out = math.ceil(spatial[i] / strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * k, [0] * k
    p = list(a.get("pads", [0] * (2 * k)))
    return p[:k], p[k:]


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis begin/end -> F.pad's last-axis-first pairs."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_args(n, a, x, table: dict, what: str) -> tuple:
    """(input, weight, bias, spatial rank, strides, dilations) of a Conv or ConvTranspose node."""
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    k = w.dim() - 2
    if k not in table:
        raise _untranslatable(n, f"{k}-D {what}")
    return inp, w, b, k, list(a.get("strides", [1] * k)), list(a.get("dilations", [1] * k))


@_op("Conv")
def _conv(m, n, a, x):
    inp, w, b, k, strides, dil = _conv_args(n, a, x, _CONV, "convolution")
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    begin, end = _pads(n, a, list(inp.shape[2:]), kernel, strides, dil)
    if begin == end:
        return [_CONV[k](inp, w, b, strides, begin, dil, int(a.get("group", 1)))]
    inp = F.pad(inp, _torch_pad(begin, end))
    return [_CONV[k](inp, w, b, strides, 0, dil, int(a.get("group", 1)))]


@_op("ConvTranspose")
def _convt(m, n, a, x):
    inp, w, b, k, strides, dil = _conv_args(n, a, x, _CONVT, "transposed convolution")
    opad = list(a.get("output_padding", [0] * k))
    y = _CONVT[k](inp, w, None, strides, 0, opad, int(a.get("group", 1)), dil)
    full = list(y.shape[2:])
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(a["output_shape"])[-k:] if "output_shape" in a else [s * st for s, st in zip(inp.shape[2:], strides)]
        begin, end = [], []
        for i in range(k):
            total = full[i] - target[i]
            lower = auto == "SAME_LOWER"
            begin.append(total - total // 2 if lower else total // 2)
            end.append(total // 2 if lower else total - total // 2)
    else:
        p = list(a.get("pads", [0] * (2 * k)))
        begin, end = p[:k], p[k:]
    for i in range(k):
        if begin[i] < 0 or end[i] < 0:  # output_shape beyond the full result: zeros (then the bias)
            pad = [0, 0] * (k - 1 - i) + [max(0, -begin[i]), max(0, -end[i])]
            y = F.pad(y, pad)
            full[i] = y.shape[2 + i]
            begin[i], end[i] = max(0, begin[i]), max(0, end[i])
        if begin[i] or end[i]:
            y = y.narrow(2 + i, begin[i], full[i] - begin[i] - end[i])
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * k)
    return [y]


@_op("Gemm")
def _gemm(m, n, a, x):
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[1].t() if a.get("transB", 0) else x[1]
    y = float(a.get("alpha", 1.0)) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + float(a.get("beta", 1.0)) * x[2]
    return [y]


# -- normalization ----------------------------------------------------------------------------------------

@_op("BatchNormalization")
def _bn(m, n, a, x):
    if a.get("training_mode", 0):
        raise _untranslatable(n, "training_mode=1")
    if len([o for o in n.output if o]) > 1:
        raise _untranslatable(n, "running-statistics outputs")
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, float(a.get("epsilon", 1e-5)))]


@_op("LayerNormalization")
def _ln(m, n, a, x):
    t = x[0]
    axis = int(a.get("axis", -1)) % t.dim()
    dims = list(range(axis, t.dim()))
    mean = t.mean(dims, keepdim=True)
    var = ((t - mean) ** 2).mean(dims, keepdim=True)
    inv = torch.rsqrt(var + float(a.get("epsilon", 1e-5)))
    y = (t - mean) * inv * x[1]
    if len(x) > 2 and x[2] is not None:
        y = y + x[2]
    return [y, mean, inv]


@_op("InstanceNormalization")
def _in(m, n, a, x):
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=float(a.get("epsilon", 1e-5)))]


# -- pooling ----------------------------------------------------------------------------------------------

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool", "AveragePool")
def _pool(m, n, a, x):
    t = x[0]
    k = t.dim() - 2
    if k not in _MAXPOOL:
        raise _untranslatable(n, f"{k}-D pooling")
    if len([o for o in n.output if o]) > 1:
        raise _untranslatable(n, "the Indices output")
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    ceil = bool(a.get("ceil_mode", 0))
    begin, end = _pads(n, a, list(t.shape[2:]), kernel, strides, dil)
    symmetric = begin == end and all(p <= kk // 2 for p, kk in zip(begin, kernel))
    if n.op_type == "MaxPool":
        if not symmetric:
            t = F.pad(t, _torch_pad(begin, end), value=float("-inf"))
            begin = [0] * k
        return [_MAXPOOL[k](t, kernel, strides, begin, dil, ceil_mode=ceil)]
    if any(d != 1 for d in dil):
        raise _untranslatable(n, "dilated AveragePool")
    include = bool(a.get("count_include_pad", 0))
    if symmetric:
        return [_AVGPOOL[k](t, kernel, strides, begin, ceil, include)]
    padded = F.pad(t, _torch_pad(begin, end))
    y = _AVGPOOL[k](padded, kernel, strides, 0, ceil, True)
    if not include:
        ones = F.pad(torch.ones_like(t[:1, :1]), _torch_pad(begin, end))
        y = y / _AVGPOOL[k](ones, kernel, strides, 0, ceil, True)
    return [y]


@_op("GlobalAveragePool")
def _gap(m, n, a, x):
    return [x[0].mean(list(range(2, x[0].dim())), keepdim=True)]


@_op("GlobalMaxPool")
def _gmp(m, n, a, x):
    return [x[0].amax(list(range(2, x[0].dim())), keepdim=True)]


# -- shapes and data movement ------------------------------------------------------------------------------

@_op("Flatten")
def _flatten(m, n, a, x):
    t = x[0]
    axis = int(a.get("axis", 1))
    axis = axis % t.dim() if axis < 0 else axis
    lead = int(np.prod(t.shape[:axis], dtype=np.int64))
    return [t.reshape(lead, -1) if t.numel() else t.reshape(lead, int(np.prod(t.shape[axis:], dtype=np.int64)))]


@_op("Reshape")
def _reshape(m, n, a, x):
    t = x[0]
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [t.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [t.reshape(shape)]


@_op("Transpose")
def _transpose(m, n, a, x):
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


def _axes(n, a, x, index: int) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    if len(x) > index and x[index] is not None:
        return _ints(x[index])
    return None


@_op("Squeeze")
def _squeeze(m, n, a, x):
    t = x[0]
    axes = _axes(n, a, x, 1)
    if axes is None:
        return [t.reshape([d for d in t.shape if d != 1])]
    axes = {ax % t.dim() for ax in axes}
    return [t.reshape([d for i, d in enumerate(t.shape) if i not in axes])]


@_op("Unsqueeze")
def _unsqueeze(m, n, a, x):
    t = x[0]
    axes = _axes(n, a, x, 1)
    rank = t.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        t = t.unsqueeze(ax)
    return [t]


@_op("Concat")
def _concat(m, n, a, x):
    parts = [t for t in x if t is not None and not (t.dim() == 1 and t.numel() == 0 and x[0].dim() != 1)]
    return [torch.cat(parts, int(a["axis"]))]


@_op("Split")
def _split(m, n, a, x):
    t = x[0]
    axis = int(a.get("axis", 0)) % t.dim()
    sizes = list(a["split"]) if "split" in a else _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    if sizes is None:
        parts = int(a.get("num_outputs", len(n.output)))
        each = -(-t.shape[axis] // parts)
        sizes = [min(each, t.shape[axis] - i * each) for i in range(parts)]
    return list(torch.split(t, sizes, axis))


@_op("Slice")
def _slice(m, n, a, x):
    t = x[0]
    if m.opset < 10 or len(x) == 1:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax %= t.dim()
        idx = range(t.shape[ax])[slice(s, e, st)]  # python's slice clamps exactly as ONNX does
        if st == 1:
            t = t.narrow(ax, idx.start if len(idx) else 0, len(idx))
        else:
            t = t.index_select(ax, torch.tensor(list(idx), dtype=torch.int64))
    return [t]


@_op("Gather")
def _gather(m, n, a, x):
    data, idx = x
    axis = int(a.get("axis", 0)) % data.dim()
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return [out.reshape(list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:]))]


@_op("Shape")
def _shape(m, n, a, x):
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return [torch.tensor(dims[slice(start, end)], dtype=torch.int64)]


@_op("Size")
def _size(m, n, a, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@_op("Cast")
def _cast(m, n, a, x):
    to = int(a["to"])
    if to not in _TORCH_DTYPES:
        raise _untranslatable(n, f"cast to element type {to}")
    return [x[0].to(_TORCH_DTYPES[to])]


@_op("CastLike")
def _castlike(m, n, a, x):
    return [x[0].to(x[1].dtype)]


def _tensor_attr(t: TensorProto) -> torch.Tensor:
    return torch.from_numpy(np.array(numpy_helper.to_array(t)))


@_op("Constant")
def _constant(m, n, a, x):
    if "value" in a:
        return [_tensor_attr(a["value"])]
    if "value_float" in a:
        return [torch.tensor(a["value_float"], dtype=torch.float32)]
    if "value_floats" in a:
        return [torch.tensor(list(a["value_floats"]), dtype=torch.float32)]
    if "value_int" in a:
        return [torch.tensor(a["value_int"], dtype=torch.int64)]
    if "value_ints" in a:
        return [torch.tensor(list(a["value_ints"]), dtype=torch.int64)]
    raise _untranslatable(n, "sparse or string constant")


@_op("ConstantOfShape")
def _cos(m, n, a, x):
    shape = _ints(x[0])
    v = _tensor_attr(a["value"]).reshape(-1) if "value" in a else torch.zeros(1)
    return [torch.full(shape, v[0].item(), dtype=v.dtype)]


@_op("Dropout")
def _dropout(m, n, a, x):
    if len(x) > 2 and x[2] is not None and bool(x[2].reshape(-1)[0]):
        raise _untranslatable(n, "training-mode Dropout (random)")
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)]


def _reduce(n, a, x, f):
    t = x[0]
    axes = _axes(n, a, x, 1)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return [t]
        axes = list(range(t.dim()))
    return [f(t, [ax % t.dim() for ax in axes], keep)]


def _prod(t: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):  # torch.prod takes one axis at a time
        t = t.prod(d, keepdim=keep)
    return t


def _reducer(f: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Op:
    return lambda m, n, a, x: _reduce(n, a, x, f)


for _name, _f in {
    "ReduceMean": lambda t, d, k: t.mean(d, keepdim=k), "ReduceSum": lambda t, d, k: t.sum(d, keepdim=k),
    "ReduceMax": lambda t, d, k: t.amax(d, keepdim=k), "ReduceMin": lambda t, d, k: t.amin(d, keepdim=k),
    "ReduceProd": _prod,
}.items():
    _OPS[_name] = _reducer(_f)


@_op("ArgMax", "ArgMin")
def _argmax(m, n, a, x):
    f = torch.argmax if n.op_type == "ArgMax" else torch.argmin
    if a.get("select_last_index", 0):
        raise _untranslatable(n, "select_last_index=1")
    return [f(x[0], int(a.get("axis", 0)), keepdim=bool(a.get("keepdims", 1)))]


@_op("Where")
def _where(m, n, a, x):
    return [torch.where(x[0].to(torch.bool), x[1], x[2])]


@_op("Expand")
def _expand(m, n, a, x):
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))
    return [x[0].expand(shape)]


@_op("Tile")
def _tile(m, n, a, x):
    return [x[0].repeat(*_ints(x[1]))]


@_op("Range")
def _range(m, n, a, x):
    s, e, d = (v.item() for v in x)
    return [torch.arange(s, e, d, dtype=x[0].dtype)]


@_op("CumSum")
def _cumsum(m, n, a, x):
    if a.get("exclusive", 0) or a.get("reverse", 0):
        raise _untranslatable(n, "exclusive/reverse CumSum")
    return [torch.cumsum(x[0], int(x[1].item()))]


@_op("Einsum")
def _einsum(m, n, a, x):
    eq = a["equation"]
    return [torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *x)]


@_op("Pad")
def _pad(m, n, a, x):
    t = x[0]
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if m.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
        axes = list(range(t.dim()))
    else:
        pads = _ints(x[1])
        value = x[2].reshape(-1)[0].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(t.dim()))
    k = len(axes)
    begin, end = [0] * t.dim(), [0] * t.dim()
    for i, ax in enumerate(axes):
        begin[ax % t.dim()], end[ax % t.dim()] = pads[i], pads[k + i]
    tp = _torch_pad(begin, end)
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:  # F.pad takes pairs for the last axes only
        tp = tp[:-2]
    if mode == "constant":
        return [F.pad(t, tp, value=value)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or len(tp) // 2 > t.dim() - 2:
        raise _untranslatable(n, f"mode '{mode}' on these axes")
    return [F.pad(t, tp, mode=torch_mode)]


# -- Resize: separable index arithmetic, exactly as the ONNX reference computes coordinates -------------

def _coord(mode: str, out_idx: np.ndarray, scale: float, in_len: int, out_len: float) -> np.ndarray:
    if mode == "half_pixel":
        return (out_idx + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (out_idx + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(out_idx)
    if mode == "align_corners":
        return out_idx * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(out_idx)
    if mode == "asymmetric":
        return out_idx / scale
    if mode == "tf_half_pixel_for_nn":
        return (out_idx + 0.5) / scale
    raise ValueError(mode)


def _nearest(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "round_prefer_floor":
        return np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    if mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    raise ValueError(mode)


@_op("Resize", "Upsample")
def _resize(m, n, a, x):
    t = x[0]
    dec = lambda v, d: (v.decode() if isinstance(v, bytes) else v) if v is not None else d  # noqa: E731
    mode = dec(a.get("mode"), "nearest")
    ctm = dec(a.get("coordinate_transformation_mode"), "half_pixel" if n.op_type == "Resize" and m.opset >= 11
              else "asymmetric")
    nmode = dec(a.get("nearest_mode"), "round_prefer_floor" if n.op_type == "Resize" and m.opset >= 11 else "floor")
    if mode not in ("nearest", "linear") or a.get("antialias", 0) or a.get("keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
        raise _untranslatable(n, f"mode '{mode}' (nearest and linear, without antialias, are supported)")
    if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"):
        raise _untranslatable(n, f"coordinate_transformation_mode '{ctm}'")
    if n.op_type == "Upsample" or m.opset < 11:
        scales_t, sizes_t = (x[1] if len(x) > 1 else None), None
        if scales_t is None and "scales" in a:
            scales_t = torch.tensor(a["scales"])
    else:
        scales_t = x[2] if len(x) > 2 else None
        sizes_t = x[3] if len(x) > 3 else None
    in_shape = list(t.shape)
    axes = [ax % t.dim() for ax in a.get("axes", range(t.dim()))]
    sizes, scales = list(in_shape), [1.0] * t.dim()
    lengths: list[float] = [float(v) for v in in_shape]  # the reference maps coordinates with in * scale
    if sizes_t is not None and sizes_t.numel():
        for ax, o in zip(axes, _ints(sizes_t)):
            sizes[ax], scales[ax], lengths[ax] = o, o / in_shape[ax], float(o)
    else:
        for ax, sc in zip(axes, scales_t.reshape(-1).tolist()):
            sizes[ax], scales[ax] = int(math.floor(in_shape[ax] * sc)), float(sc)
            lengths[ax] = in_shape[ax] * float(sc)
    for ax in range(t.dim()):
        if sizes[ax] == in_shape[ax] and scales[ax] == 1.0:
            continue
        out_idx = np.arange(sizes[ax], dtype=np.float64)
        src = _coord(ctm, out_idx, scales[ax], in_shape[ax], lengths[ax])
        if mode == "nearest":
            idx = np.clip(_nearest(src, nmode), 0, in_shape[ax] - 1).astype(np.int64)
            t = t.index_select(ax, torch.from_numpy(idx))
        else:
            src = np.clip(src, 0, in_shape[ax] - 1)
            lo = np.floor(src).astype(np.int64)
            hi = np.minimum(lo + 1, in_shape[ax] - 1)
            w = torch.from_numpy((src - lo).astype(np.float32)).to(t.dtype)
            shape = [1] * t.dim()
            shape[ax] = -1
            w = w.reshape(shape)
            t = t.index_select(ax, torch.from_numpy(lo)) * (1 - w) + t.index_select(ax, torch.from_numpy(hi)) * w
    return [t]


# -- quantization: fake quant with a straight-through estimator ----------------------------------------------

@_op("QuantizeLinear")
def _quantize(m, n, a, x):
    if a.get("block_size", 0):
        raise _untranslatable(n, "blocked quantization (block_size)")
    zp = x[2] if len(x) > 2 and x[2] is not None else None
    qdtype = TensorProto.UINT8 if zp is None else _onnx_dtype(zp)
    if qdtype not in _QRANGE:
        raise _untranslatable(n, "this output type (float8/int4)")
    zpv = zp if zp is not None else torch.zeros((), dtype=torch.uint8)
    return [_fake_quant(x[0], x[1], zpv, qdtype, int(a.get("axis", 1)))]


def _onnx_dtype(t: torch.Tensor) -> int:
    for k, v in _TORCH_DTYPES.items():
        if v == t.dtype:
            return k
    return -1


@_op("DequantizeLinear")
def _dequantize(m, n, a, x):
    if a.get("block_size", 0):
        raise _untranslatable(n, "blocked quantization (block_size)")
    axis = int(a.get("axis", 1))
    q, scale = x[0], x[1]
    zp = x[2] if len(x) > 2 and x[2] is not None else torch.zeros((), dtype=torch.float32)
    name = n.input[0]
    if name in m.quant:  # a float shadow of an integer weight: fake-quantize it on its fixed grid
        info = m.quant[name]
        q = _fake_quant(q, scale, zp, info.onnx_dtype, axis)
    rank = q.dim()
    s = _axis_shape(scale.to(torch.float32), rank, axis)
    z = _axis_shape(zp.to(torch.float32), rank, axis)
    return [(q.to(torch.float32) - z) * s]
