"""A small ONNX graph builder: the operations imat's CNNs need, written from numpy parameters.

Why not trace the JAX function (jax2onnx and friends)? Measured on jax2onnx 0.17.1:
max-pool with explicit (1, 1) padding was exported as VALID without a warning, NHWC
shape metadata after Relu was wrong (full_check failed), the weights went to an
external-data sidecar, and it pinned an old orbax. Writing the graph from the model's
parameters keeps every padding, epsilon and layout decision explicit and testable.

Layout: the graph takes uint8 NHWC images (what the engine decodes), does the model's
normalisation in NHWC, transposes once to NCHW (ONNX Conv is NCHW) and runs every conv
in NCHW. Flax kernels are HWIO; ONNX wants OIHW. BatchNorm (eval mode: running stats) is
folded into the preceding conv in float64 by default, then cast to float32.

The builder tracks the static shape of every tensor it creates (batch is symbolic) so that
"SAME" padding can be resolved exactly and mistakes fail here, not inside onnxruntime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

# Opset 17: supported by onnx 1.23's checker and ReferenceEvaluator and by every
# onnxruntime >= 1.14; nothing newer is needed (ReduceL2 still takes axes as an attribute).
OPSET = 17
IR_VERSION = 8  # the IR version that introduced opset 17; older runtimes can still load it
BATCH = "batch"

Shape = tuple  # ("batch" | int, ...)


@dataclasses.dataclass(frozen=True)
class BatchNormParams:
    """Eval-mode BatchNorm: y = (x - mean) / sqrt(var + eps) * scale + bias, per channel."""

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray | None
    bias: np.ndarray | None
    epsilon: float

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(multiplier, offset) in float64 so that y = x * multiplier + offset."""
        mean = np.asarray(self.mean, np.float64)
        var = np.asarray(self.var, np.float64)
        scale = np.ones_like(mean) if self.scale is None else np.asarray(self.scale, np.float64)
        bias = np.zeros_like(mean) if self.bias is None else np.asarray(self.bias, np.float64)
        multiplier = scale / np.sqrt(var + float(self.epsilon))
        return multiplier, bias - mean * multiplier


def fold_batchnorm(
    kernel_oihw: np.ndarray, conv_bias: np.ndarray | None, bn: BatchNormParams
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BatchNorm into the conv before it (float64 maths, float32 result)."""
    multiplier, offset = bn.affine()
    w = np.asarray(kernel_oihw, np.float64) * multiplier[:, None, None, None]
    b0 = np.zeros(w.shape[0]) if conv_bias is None else np.asarray(conv_bias, np.float64)
    b = b0 * multiplier + offset
    return w.astype(np.float32), b.astype(np.float32)


def resolve_padding(
    padding, in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int], dilations: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Flax/lax padding spec -> ((top, bottom), (left, right)) for a known input size.

    Accepts "VALID", "SAME" (lax's rule: the extra pixel goes at the end), an int, a pair of
    ints (symmetric per axis) or a pair of (low, high) pairs.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode == "SAME":
            pads = []
            for size, k, s, d in zip(in_hw, kernel_hw, strides, dilations):
                out = -(-size // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            return pads[0], pads[1]
        raise ValueError(f"unsupported padding {padding!r} (expected VALID, SAME or explicit pairs)")
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    items = list(padding)
    if len(items) != 2:
        raise ValueError(f"unsupported padding {padding!r}: need one entry per spatial axis")
    out = []
    for item in items:
        if isinstance(item, int):
            out.append((item, item))
        else:
            lo, hi = item
            out.append((int(lo), int(hi)))
    return out[0], out[1]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class GraphBuilder:
    """Accumulates nodes and initializers; every name it hands out is unique."""

    def __init__(self, *, fold_bn: bool = True, opset: int = OPSET):
        self.fold_bn = fold_bn
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, Shape] = {}
        self._used: set[str] = set()
        self._counts: dict[str, int] = {}
        self._scalars: dict[tuple[str, float], str] = {}

    # ---- names, initializers, nodes -------------------------------------------------------

    def unique(self, base: str) -> str:
        """A fresh name derived from base (base itself if unused, else base_1, base_2, ...)."""
        base = base or "t"
        name = base
        while name in self._used:
            self._counts[base] = self._counts.get(base, 0) + 1
            name = f"{base}_{self._counts[base]}"
        self._used.add(name)
        return name

    def initializer(self, base: str, array) -> str:
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.unique(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.shapes[name] = tuple(array.shape)
        return name

    def scalar(self, base: str, value: float) -> str:
        """A float32 scalar initializer, shared by every node that needs the same constant."""
        key = (base, float(value))
        if key not in self._scalars:
            self._scalars[key] = self.initializer(base, np.array(value, np.float32))
        return self._scalars[key]

    def node(self, op: str, inputs: Sequence[str], *, name: str, shape: Shape | None = None, **attrs) -> str:
        """Add one single-output node; returns its output name (unique, derived from name)."""
        out = self.unique(name)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        if shape is not None:
            self.shapes[out] = tuple(shape)
        return out

    def shape(self, x: str) -> Shape:
        return self.shapes[x]

    # ---- graph boundary --------------------------------------------------------------------

    def add_input(self, name: str, elem_type: int, shape: Shape) -> str:
        if name in self._used:
            raise ValueError(f"input name {name!r} is already used")
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        self.shapes[name] = tuple(shape)
        return name

    def add_output(self, x: str, name: str, elem_type: int = TensorProto.FLOAT) -> str:
        """Expose x as graph output `name` (through an Identity so the name is exactly `name`)."""
        if name in self._used:
            raise ValueError(f"output name {name!r} is already used")
        self._used.add(name)
        self.nodes.append(helper.make_node("Identity", [x], [name], name=f"{name}_out"))
        shape = self.shapes[x]
        self.shapes[name] = shape
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def build(self, graph_name: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, initializer=self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name="imat",
            ir_version=IR_VERSION,
        )
        if metadata:
            helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
        return model

    def fingerprint(self) -> str:
        """sha256 over every initializer, in graph order: name, dtype, shape, raw bytes."""
        return initializer_fingerprint(self.initializers)

    # ---- preprocessing ---------------------------------------------------------------------

    def preprocess_uint8_nhwc(self, images: str, mean: Sequence[float], std: Sequence[float]) -> str:
        """uint8 NHWC -> float NCHW, exactly as the model: x/255, then (x - mean) / std."""
        b, h, w, c = self.shape(images)
        shape = (b, h, w, c)
        x = self.node("Cast", [images], name="images_f32", to=TensorProto.FLOAT, shape=shape)
        x = self.node("Div", [x, self.scalar("c255", 255.0)], name="scaled", shape=shape)
        x = self.node("Sub", [x, self.initializer("mean", np.asarray(mean, np.float32).reshape(1, 1, 1, c))],
                      name="centred", shape=shape)
        x = self.node("Div", [x, self.initializer("std", np.asarray(std, np.float32).reshape(1, 1, 1, c))],
                      name="normalised", shape=shape)
        return self.node("Transpose", [x], name="nchw", perm=[0, 3, 1, 2], shape=(b, c, h, w))

    # ---- layers (NCHW) ---------------------------------------------------------------------

    def conv(
        self,
        x: str,
        kernel_hwio: np.ndarray,
        *,
        name: str,
        bias: np.ndarray | None = None,
        strides=1,
        padding=0,
        dilations=1,
        groups: int = 1,
        bn: BatchNormParams | None = None,
    ) -> str:
        """Conv (optionally + eval BatchNorm). kernel_hwio is Flax's (kh, kw, Cin/groups, Cout).

        A depthwise conv is groups=C with kernel (kh, kw, 1, C): always the standard grouped
        ONNX Conv, whatever formulation the JAX model used to compute it.
        """
        b, c_in, h, w = self.shape(x)
        kernel_hwio = np.asarray(kernel_hwio)
        kh, kw, cin_g, c_out = kernel_hwio.shape
        if cin_g * groups != c_in:
            raise ValueError(
                f"{name}: kernel {kernel_hwio.shape} with groups={groups} does not fit {c_in} input channels"
            )
        strides, dilations = _pair(strides), _pair(dilations)
        (pt, pb), (pl, pr) = resolve_padding(padding, (h, w), (kh, kw), strides, dilations)
        weight = np.transpose(kernel_hwio, (3, 2, 0, 1))  # HWIO -> OIHW
        out_h = (h + pt + pb - dilations[0] * (kh - 1) - 1) // strides[0] + 1
        out_w = (w + pl + pr - dilations[1] * (kw - 1) - 1) // strides[1] + 1
        out_shape = (b, c_out, out_h, out_w)
        if bn is not None and self.fold_bn:
            weight, bias = fold_batchnorm(weight, bias, bn)
        inputs = [x, self.initializer(f"{name}.weight", weight.astype(np.float32))]
        if bias is not None:
            inputs.append(self.initializer(f"{name}.bias", np.asarray(bias, np.float32)))
        y = self.node(
            "Conv", inputs, name=name, shape=out_shape,
            kernel_shape=[kh, kw], strides=list(strides), pads=[pt, pl, pb, pr],
            dilations=list(dilations), group=groups,
        )
        if bn is not None and not self.fold_bn:
            y = self.batchnorm(y, bn, name=f"{name}.bn")
        return y

    def batchnorm(self, x: str, bn: BatchNormParams, *, name: str) -> str:
        """An explicit (eval-mode) BatchNormalization node, for fold_bn=False."""
        c = self.shape(x)[1]
        scale = np.ones(c, np.float32) if bn.scale is None else bn.scale
        bias = np.zeros(c, np.float32) if bn.bias is None else bn.bias
        inputs = [
            x,
            self.initializer(f"{name}.scale", np.asarray(scale, np.float32)),
            self.initializer(f"{name}.bias", np.asarray(bias, np.float32)),
            self.initializer(f"{name}.mean", np.asarray(bn.mean, np.float32)),
            self.initializer(f"{name}.var", np.asarray(bn.var, np.float32)),
        ]
        return self.node("BatchNormalization", inputs, name=name, shape=self.shape(x), epsilon=float(bn.epsilon))

    def relu(self, x: str, *, name: str = "relu") -> str:
        return self.node("Relu", [x], name=name, shape=self.shape(x))

    def relu6(self, x: str, *, name: str = "relu6") -> str:
        lo, hi = self.scalar("zero", 0.0), self.scalar("six", 6.0)
        return self.node("Clip", [x, lo, hi], name=name, shape=self.shape(x))

    def add(self, a: str, b: str, *, name: str = "add") -> str:
        if self.shape(a) != self.shape(b):
            raise ValueError(f"{name}: shapes differ {self.shape(a)} vs {self.shape(b)}")
        return self.node("Add", [a, b], name=name, shape=self.shape(a))

    def maxpool(self, x: str, *, name: str = "maxpool", kernel=3, strides=2, padding=1) -> str:
        """Max pool; padded cells never win (ONNX pads max-pool with -inf, like lax.reduce_window)."""
        b, c, h, w = self.shape(x)
        kh, kw = _pair(kernel)
        strides = _pair(strides)
        (pt, pb), (pl, pr) = resolve_padding(padding, (h, w), (kh, kw), strides, (1, 1))
        out_h = (h + pt + pb - kh) // strides[0] + 1
        out_w = (w + pl + pr - kw) // strides[1] + 1
        return self.node(
            "MaxPool", [x], name=name, shape=(b, c, out_h, out_w),
            kernel_shape=[kh, kw], strides=list(strides), pads=[pt, pl, pb, pr],
        )

    def avg_pool(self, x: str, k: int, *, name: str = "avgpool_in") -> str:
        """k x k average pooling with stride k (NCHW; H and W divisible by k)."""
        b, c, h, w = self.shape(x)
        return self.node("AveragePool", [x], name=name, shape=(b, c, h // k, w // k), kernel_shape=[k, k],
                         strides=[k, k])

    def global_avg_pool(self, x: str, *, name: str = "pool") -> str:
        """NCHW -> [B, C] mean over H and W."""
        b, c, _, _ = self.shape(x)
        y = self.node("GlobalAveragePool", [x], name=name, shape=(b, c, 1, 1))
        return self.node("Flatten", [y], name=f"{name}_flat", axis=1, shape=(b, c))

    def dense(self, x: str, kernel: np.ndarray, bias: np.ndarray | None, *, name: str) -> str:
        """x @ kernel + bias with a Flax (in, out) kernel."""
        b, f = self.shape(x)
        kernel = np.asarray(kernel, np.float32)
        if kernel.shape[0] != f:
            raise ValueError(f"{name}: kernel {kernel.shape} does not fit {f} features")
        inputs = [x, self.initializer(f"{name}.kernel", kernel)]
        if bias is not None:
            inputs.append(self.initializer(f"{name}.bias", np.asarray(bias, np.float32)))
        return self.node("Gemm", inputs, name=name, shape=(b, kernel.shape[1]))

    def l2_normalize(self, x: str, *, eps: float, mode: str = "max", name: str = "l2norm") -> str:
        """Divide rows by their L2 norm, with the same epsilon rule as the JAX model.

        mode "max":  x / max(||x||, eps)            (ReduceL2, Max, Div)
        mode "add":  x / sqrt(sum(x^2) + eps)       (ReduceSumSquare, Add, Sqrt, Div)
        mode "add_norm": x / (||x|| + eps)          (ReduceL2, Add, Div)
        """
        b, f = self.shape(x)
        e = self.initializer(f"{name}.eps", np.array(eps, np.float32))
        if mode == "max":
            n = self.node("ReduceL2", [x], name=f"{name}.norm", axes=[1], keepdims=1, shape=(b, 1))
            d = self.node("Max", [n, e], name=f"{name}.denom", shape=(b, 1))
        elif mode == "add":
            s = self.node("ReduceSumSquare", [x], name=f"{name}.sumsq", axes=[1], keepdims=1, shape=(b, 1))
            s = self.node("Add", [s, e], name=f"{name}.sumsq_eps", shape=(b, 1))
            d = self.node("Sqrt", [s], name=f"{name}.denom", shape=(b, 1))
        elif mode == "add_norm":
            n = self.node("ReduceL2", [x], name=f"{name}.norm", axes=[1], keepdims=1, shape=(b, 1))
            d = self.node("Add", [n, e], name=f"{name}.denom", shape=(b, 1))
        else:
            raise ValueError(f"unknown l2 normalisation mode {mode!r}")
        return self.node("Div", [x, d], name=name, shape=(b, f))

    def sigmoid(self, x: str, *, name: str = "sigmoid") -> str:
        return self.node("Sigmoid", [x], name=name, shape=self.shape(x))


def initializer_fingerprint(initializers: Sequence[onnx.TensorProto]) -> str:
    """sha256 hex over initializers in the given (graph) order: name, dtype, shape, bytes.

    The engine recomputes nothing; it compares this string with the index's, so any
    change of weights (or of how they were folded) gives a different fingerprint.
    """
    h = hashlib.sha256()
    for t in initializers:
        arr = numpy_helper.to_array(t)
        h.update(t.name.encode())
        h.update(str(arr.dtype).encode())
        h.update(repr(tuple(arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
