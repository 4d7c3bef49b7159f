"""QLoRA layers: a frozen NF4 (4-bit) base kernel plus a trainable LoRA update.

The base kernel lives in non-trainable variables holding `nf4.NF4Tensor`'s arrays:
packed uint8 codes and the group scales (uint8 codes + float32 `nested_scale` and
`offset` with double quantization, float32 `absmax` without), about 4.127 bits per
parameter; no float copy of the kernel exists in the layer (the storage, and which torch
weight's flattening the NF4 groups follow, live in `qlora_storage`). `call` dequantizes it
(TensorFlow ops, `jit_compile` safe) to the compute dtype under `tf.stop_gradient`, then
runs the parent's LoRA computation unchanged: inputs and adapters get gradients, the
4-bit storage never does. With ``QLoRAConfig(fake_quant=True)`` the layer keeps a float
`kernel` instead and applies `nf4.fake_quant` in the forward pass (straight-through
gradient), for quantization-aware fine-tuning.

Dequantization in `call` unpacks two codes per gather from a 256 x 2 table of NF4 value
pairs and leaves the kernel in bitsandbytes' (out, ...) layout, which the matmul / einsum
reads transposed, so a step costs one pass over the codes instead of a transpose. It
computes the same float32 products as `nf4.dequantize_tensors` (equal values eagerly).

Generation dequantizes once per call, not once per token: a KerasHub `CausalLM`'s generate
function runs inside `dequantize_once()` (`_compat.wrap_generate_functions`), where each
layer's dequantized kernel is made at its first use (the prefill) and reused by the decoding
loop, which captures it as a loop invariant. The float kernels of all quantized layers exist
for the duration of that call (4 bytes a parameter in float32), never at rest.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Tuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lora import _compat, nf4
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense
from tf_lora.layers.qlora_storage import _as_quantization, _EinsumLinearLayout, _NF4Storage  # noqa: F401

# NF4 values of the high and low nibble of each of the 256 bytes: one gather unpacks two codes.
_CODEBOOK = np.asarray(nf4.CODEBOOK, np.float32)
_PAIR_TABLE = np.stack([_CODEBOOK[np.arange(256) >> 4], _CODEBOOK[np.arange(256) & 15]], axis=1)
_DYNAMIC_MAP = np.asarray(nf4.DYNAMIC_MAP, np.float32)


class _Generation(threading.local):
    kernels = None  # {(id(layer), dtype, graph): tensor} inside `dequantize_once()`


_GENERATION = _Generation()


@contextlib.contextmanager
def dequantize_once():
    """Within this context each QLoRA layer dequantizes its kernel once per graph (or once
    eagerly) and reuses it: for inference loops such as generation, at the cost of holding the
    float kernels until the context exits. Not for training: a train step would then keep every
    layer's float kernel alive from the forward to the backward pass.
    """
    if _GENERATION.kernels is not None:  # nested: the outer context owns the cache
        yield
        return
    _GENERATION.kernels = {}
    try:
        yield
    finally:
        _GENERATION.kernels = None


def _reused(layer, dtype: str, compute):
    """``compute()``, or the tensor it gave in this or an enclosing graph inside `dequantize_once()`."""
    kernels = _GENERATION.kernels
    if kernels is None:
        return compute()
    if tf.executing_eagerly():
        graph = graphs = None
    else:
        graph = tf.compat.v1.get_default_graph()
        graphs, g = [], graph
        while g is not None:  # a loop or branch body reads tensors of the graphs around it
            graphs.append(g)
            g = getattr(g, "outer_graph", None)
    for g in graphs or [None]:
        cached = kernels.get((id(layer), dtype, g))
        if cached is not None:
            return cached
    kernels[(id(layer), dtype, graph)] = value = compute()
    return value


def _scale_groups(values: tf.Tensor, scales: tf.Tensor, group_size: int, n: int) -> tf.Tensor:
    """``values[i] * scales[i // group_size]`` for i < n (static sizes, values may be longer)."""
    groups = scales.shape[0]
    padded = groups * group_size
    if values.shape[0] < padded:
        values = tf.pad(values, [[0, padded - values.shape[0]]])
    elif values.shape[0] > padded:
        values = values[:padded]
    out = tf.reshape(tf.reshape(values, [groups, group_size]) * scales[:, None], [-1])
    return out if padded == n else out[:n]


def _dequantize_arrays(codes, absmax, nested_scale=None, offset=None, *, shape, group_size, double_quant):
    """float32 kernel of `shape` from the NF4 storage arrays (the layer's `storage_variables`)."""
    n = math.prod(shape)
    values = tf.reshape(tf.gather(tf.constant(_PAIR_TABLE), tf.cast(codes, tf.int32)), [-1])
    if double_quant:
        centered = tf.gather(tf.constant(_DYNAMIC_MAP), tf.cast(absmax, tf.int32))
        scales = _scale_groups(centered, nested_scale, nf4.NESTED_GROUP_SIZE, absmax.shape[0]) + offset
    else:
        scales = absmax
    return tf.reshape(_scale_groups(values, scales, group_size, n), shape)


_DEQUANTIZE_FUNCTIONS = {}


def _dequantize_function(shape: Tuple[int, ...], group_size: int, double_quant: bool):
    """`_dequantize_arrays` for one kernel shape and NF4 setting as a `tf.function` shared by every
    layer with them: a traced graph holds one call op per dequantization instead of a copy of its
    ~25 ops (SmolLM2 with QLoRA on all 210 linear layers dequantizes 420 times in a train step, with
    5 kernel shapes), so the train step traces faster (issue 23). Same ops, same values."""
    key = (shape, group_size, double_quant)
    if key not in _DEQUANTIZE_FUNCTIONS:
        _DEQUANTIZE_FUNCTIONS[key] = tf.function(
            lambda *arrays: _dequantize_arrays(*arrays, shape=list(shape), group_size=group_size,
                                               double_quant=double_quant),
            autograph=False)
    return _DEQUANTIZE_FUNCTIONS[key]


class _NF4Base(_NF4Storage):
    """The NF4 dequantization and compute shared by the QLoRA layers, on the storage of
    `qlora_storage._NF4Storage`; subclasses read the base kernel through `_base_kernel()`.
    """

    @property
    def base_compute_dtype(self) -> str:
        """The dtype the base kernel is dequantized to and multiplied in."""
        return self.quantization.compute_dtype or self.compute_dtype

    # -- the base kernel -------------------------------------------------
    def _dequantize(self) -> tf.Tensor:
        """float32 kernel in torch layout (out, ...), shape `_torch_shape()` (made once per
        graph inside `dequantize_once()`)."""
        return _reused(self, "float32", self._dequantize_now)

    def _dequantize_now(self) -> tf.Tensor:
        cfg = self.quantization
        function = _dequantize_function(tuple(self._torch_shape()), cfg.group_size, cfg.double_quant)
        return function(*(tf.convert_to_tensor(v) for v in self.storage_variables()))

    def _base_kernel(self) -> Tuple[tf.Tensor, bool]:
        """``(kernel, torch_layout)``: what `_base_call` multiplies with, in `base_compute_dtype`.

        4-bit storage gives the dequantized kernel in torch layout (out, ...) under
        `tf.stop_gradient`; fake-quant mode gives Keras' layout with the straight-through
        gradient (the kernel as is once merged).
        """
        dtype = self.base_compute_dtype
        if self.fake_quant:
            kernel = tf.convert_to_tensor(self.kernel)
            if not self.merged:
                kernel = self._fake_quant(kernel)
            return tf.cast(kernel, dtype), False
        return _reused(self, dtype, lambda: tf.stop_gradient(tf.cast(self._dequantize(), dtype))), True

    def _nf4_product(self, x, forward, backward):
        """``forward(x, K)`` for the dequantized kernel K (torch layout, `base_compute_dtype`),
        differentiable in `x` only, with ``backward(dy, K)`` giving dx.

        The backward pass dequantizes K again instead of keeping the forward's float
        kernel alive until then (as bitsandbytes' 4-bit matmul does), so a train step holds
        at most a layer's float kernel at a time, not one per layer: the peak memory of
        QLoRA training stays near the 4-bit model's, at the cost of a second pass over
        the codes (`benchmarks/bench_models.py`).
        """
        dtype = self.base_compute_dtype
        if _GENERATION.kernels is not None:  # inference inside `dequantize_once()`: no gradient
            return forward(x, self._base_kernel()[0])

        def kernel(after):
            # Dequantize only once `after` exists: a graph would otherwise run every layer's
            # dequantization as early as it can and hold all the float kernels at once.
            with tf.control_dependencies([after]):
                return tf.cast(self._dequantize(), dtype)

        @tf.custom_gradient
        def product(x):
            def grad(dy, variables=None):
                dx = backward(dy, kernel(dy))
                return (dx, [None] * len(variables)) if variables else dx

            return forward(x, kernel(x)), grad

        return product(x)

    def _regularized_kernel(self) -> tf.Tensor:
        """The base kernel the layer computes with, float32 in Keras layout (dequantized)."""
        if self.fake_quant:
            kernel = tf.convert_to_tensor(self.kernel)
            if not self.merged:
                kernel = self._fake_quant(kernel)
            return kernel
        return tf.transpose(self._dequantize(), self._torch_to_kernel_perm())

    def _norm_kernel(self):
        """DoRA's norm reads the kernel the layer computes with (dequantized, Keras layout)."""
        return self._regularized_kernel()

    def _cast_in(self, inputs):
        return tf.cast(inputs, self.base_compute_dtype)

    def _cast_out(self, outputs):
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRADense(_NF4Base, LoRADense):
    """`LoRADense` whose frozen kernel is stored in NF4 (4-bit NormalFloat, bitsandbytes layout).

    Args:
        units, activation, use_bias, rank, alpha, dropout, use_rslora, lora_init, merged:
            as for `LoRADense`.
        quantization: a `tf_lora.QLoRAConfig` or its `to_dict()` (default `QLoRAConfig()`).

    Example:
        >>> dense = keras.layers.Dense(16); dense.build((None, 64))
        >>> layer = QLoRADense.from_layer(dense, quantization=QLoRAConfig(), rank=4)
        >>> [v.dtype for v in layer.storage_variables()]
        ['uint8', 'uint8', 'float32', 'float32']
        >>> layer(np.ones((2, 64), "float32")).shape
        (2, 16)
    """

    def _base_call(self, inputs):
        x = self._cast_in(inputs)
        flat = tf.reshape(x, [-1, self.kernel_shape[0]])
        if self.fake_quant:
            y = tf.matmul(flat, self._base_kernel()[0])
        else:  # y = x K^T, dx = dy K with K (out, in)
            y = self._nf4_product(flat, lambda a, k: tf.matmul(a, k, transpose_b=True), tf.matmul)
        y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.units]], axis=0))
        return self._cast_out(y)

    def to_base_layer(self) -> keras.layers.Dense:
        """A plain built `keras.layers.Dense` with the dequantized kernel plus the LoRA
        update, and this layer's regularizers and constraints."""
        dense = keras.layers.Dense(
            self.units, activation=self.activation, use_bias=self.use_bias,
            name=self.name, dtype=self.dtype_policy, **self._weight_options(),
        )
        dense.build((None, self.kernel_shape[0]))
        dense.kernel.assign(self.merged_kernel())
        if self.use_bias:
            dense.bias.assign(ops.convert_to_numpy(self.bias))
        return dense


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRAEinsumDense(_EinsumLinearLayout, _NF4Base, LoRAEinsumDense):
    """`LoRAEinsumDense` whose frozen kernel is stored in NF4 (see `QLoRADense`).

    Groups follow bitsandbytes' order over the ``nn.Linear`` weight the einsum equals,
    (out_features, in_features) with the kernel's output axes and contracted axes each
    flattened in kernel order (Hugging Face's q/k/v/o_proj weights for KerasHub's attention
    kernels), so the codes equal bitsandbytes' for that weight (`qlora_storage`).

    Args:
        equation, output_shape, ...: as for `LoRAEinsumDense`.
        quantization: as for `QLoRADense`.
        nf4_layout: ``"linear"`` (default), or ``"last_axis_first"``: groups over the kernel
            with its last axis moved first, the layout of layers saved before ``"linear"``
            existed (their configs load with it).

    Example:
        >>> layer = QLoRAEinsumDense("abc,cde->abde", (None, 2, 3), rank=2)
        >>> layer(np.ones((1, 4, 5), "float32")).shape
        (1, 4, 2, 3)
    """

    def __init__(self, equation: str, output_shape: Any, *args, **kwargs):
        super().__init__(equation, output_shape, *args, **kwargs)
        lhs, out = equation.replace(" ", "").split("->")
        x_sub, k_sub = lhs.split(",")
        k_torch = "".join(k_sub[i] for i in self._torch_axes(len(k_sub)))
        self._torch_equation = f"{x_sub},{k_torch}->{out}"
        # dx = einsum(dy, K): possible when each input axis is an output or a kernel axis.
        letters = set(x_sub.replace(".", ""))
        self._input_grad_equation = (f"{out},{k_torch}->{x_sub}"
                                     if letters <= set(out + k_torch) else None)

    def _base_call(self, inputs):
        x = self._cast_in(inputs)
        if self.fake_quant or self._input_grad_equation is None:
            kernel, torch_layout = self._base_kernel()
            return self._cast_out(tf.einsum(self._torch_equation if torch_layout else self.equation, x, kernel))
        y = self._nf4_product(x, lambda a, k: tf.einsum(self._torch_equation, a, k),
                              lambda g, k: tf.einsum(self._input_grad_equation, g, k))
        return self._cast_out(y)


_compat.wrap_generate_functions(dequantize_once)
