"""QLoRA layers: a frozen NF4 (4-bit) base kernel plus a trainable LoRA update.

The base kernel lives in non-trainable variables holding `nf4.NF4Tensor`'s arrays:
packed uint8 codes and the group scales (uint8 codes + float32 `nested_scale` and
`offset` with double quantization, float32 `absmax` without), about 4.127 bits per
parameter; no float copy of the kernel exists in the layer. `call` dequantizes it
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
from typing import Any, List, Mapping, Tuple, Union

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lora import _compat, nf4
from tf_lora.config import QLoRAConfig
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, _invalid

# NF4 values of the high and low nibble of each of the 256 bytes: one gather unpacks two codes.
_CODEBOOK = np.asarray(nf4.CODEBOOK, np.float32)
_PAIR_TABLE = np.stack([_CODEBOOK[np.arange(256) >> 4], _CODEBOOK[np.arange(256) & 15]], axis=1)
_DYNAMIC_MAP = np.asarray(nf4.DYNAMIC_MAP, np.float32)


def _as_quantization(quantization: Any) -> QLoRAConfig:
    if quantization is None:
        return QLoRAConfig()
    if isinstance(quantization, QLoRAConfig):
        return quantization
    if isinstance(quantization, Mapping):
        return QLoRAConfig.from_dict(quantization)
    raise TypeError(_invalid("quantization", "a tf_lora.QLoRAConfig, its to_dict() or None", quantization))


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


class _NF4Base:
    """The NF4 storage, dequantization, merge rules and hooks shared by both layers.

    It replaces the parents' `_build_kernel` (a float kernel) with NF4 storage;
    subclasses read the base kernel through `_base_kernel()`.
    """

    @classmethod
    def from_layer(cls, layer, quantization: Union[QLoRAConfig, Mapping, None] = None, rank: int = 8,
                   alpha: float = 32.0, dropout: float = 0.0, use_rslora: bool = False,
                   lora_init: str = "he_uniform", **kwargs):
        """A built adapter with `layer`'s name, dtype policy, bias and NF4-quantized kernel
        (or table), for every QLoRA class: the float class's `from_layer` plus `quantization`.

        `layer` is not modified. Raises `ValueError` naming the layer if its kernel holds NaN/Inf.
        """
        return super().from_layer(
            layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            lora_init=lora_init, quantization=_as_quantization(quantization), **kwargs,
        )

    def __init__(self, *args, quantization: Union[QLoRAConfig, Mapping, None] = None, **kwargs):
        quantization = _as_quantization(quantization)
        super().__init__(*args, **kwargs)
        self.quantization = quantization
        if self.merged and not self.quantization.fake_quant:
            raise NotImplementedError(
                f"Received merged=True for layer '{self.name}' with 4-bit storage: an NF4 base "
                "cannot hold a merged LoRA update. Use QLoRAConfig(fake_quant=True) or tf_lora.merge()."
            )
        self.kernel_shape = None

    @property
    def fake_quant(self) -> bool:
        return self.quantization.fake_quant

    @property
    def base_compute_dtype(self) -> str:
        """The dtype the base kernel is dequantized to and multiplied in."""
        return self.quantization.compute_dtype or self.compute_dtype

    def _build_kernel(self, kernel_shape) -> None:
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        # autocast=False: the scales (and the fake-quant kernel) are read in float32
        # under mixed precision; the result is cast to the compute dtype once.
        if self.fake_quant:
            self.kernel = self.add_weight(
                name="kernel", shape=self.kernel_shape, initializer=self.kernel_initializer,
                constraint=self.kernel_constraint, trainable=False, autocast=False,
            )
            return
        n, cfg = math.prod(self.kernel_shape), self.quantization
        groups = -(-n // cfg.group_size)
        add = lambda name, shape, dtype: self.add_weight(  # noqa: E731
            name=name, shape=shape, dtype=dtype, initializer="zeros", trainable=False, autocast=False
        )
        self.nf4_codes = add("nf4_codes", ((n + 1) // 2,), "uint8")
        self.nf4_absmax = add("nf4_absmax", (groups,), "uint8" if cfg.double_quant else "float32")
        if cfg.double_quant:
            nested = -(-groups // nf4.NESTED_GROUP_SIZE)
            self.nf4_nested_scale = add("nf4_nested_scale", (nested,), "float32")
            self.nf4_offset = add("nf4_offset", (), "float32")

    # -- the base kernel -------------------------------------------------
    def storage_variables(self) -> List[keras.Variable]:
        """The variables holding the frozen base kernel (4-bit codes and scales)."""
        if self.fake_quant:
            return [self.kernel]
        names = ("codes", "absmax") + (("nested_scale", "offset") if self.quantization.double_quant else ())
        return [getattr(self, f"nf4_{name}") for name in names]

    def base_parameter_count(self) -> int:
        """Number of base kernel parameters `storage_variables` represent."""
        return math.prod(self.kernel_shape)

    def nf4_tensor(self) -> nf4.NF4Tensor:
        """The stored 4-bit kernel as an `nf4.NF4Tensor` of NumPy arrays."""
        if self.fake_quant:
            raise NotImplementedError(f"Layer '{self.name}' uses fake_quant: it stores a float kernel, not NF4 codes.")
        arrays = {v.name[len("nf4_"):]: ops.convert_to_numpy(v) for v in self.storage_variables()}
        cfg = self.quantization
        return nf4.NF4Tensor.from_dict(
            {**arrays, "shape": self.kernel_shape, "group_size": cfg.group_size, "double_quant": cfg.double_quant}
        )

    def _dequantize(self) -> tf.Tensor:
        """float32 kernel in torch layout (out, ...): the kernel's last axis first (made once
        per graph inside `dequantize_once()`)."""
        return _reused(self, "float32", self._dequantize_now)

    def _dequantize_now(self) -> tf.Tensor:
        cfg, n = self.quantization, math.prod(self.kernel_shape)
        values = tf.reshape(tf.gather(tf.constant(_PAIR_TABLE), tf.cast(self.nf4_codes, tf.int32)), [-1])
        if cfg.double_quant:
            groups = self.nf4_absmax.shape[0]
            centered = tf.gather(tf.constant(_DYNAMIC_MAP), tf.cast(self.nf4_absmax, tf.int32))
            nested = tf.convert_to_tensor(self.nf4_nested_scale)
            offset = tf.convert_to_tensor(self.nf4_offset)
            scales = _scale_groups(centered, nested, nf4.NESTED_GROUP_SIZE, groups) + offset
        else:
            scales = tf.convert_to_tensor(self.nf4_absmax)
        kernel = _scale_groups(values, scales, cfg.group_size, n)
        return tf.reshape(kernel, [self.kernel_shape[-1], *self.kernel_shape[:-1]])

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
                kernel = nf4.fake_quant(kernel, self.quantization.group_size, self.quantization.double_quant)
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
                kernel = nf4.fake_quant(kernel, self.quantization.group_size, self.quantization.double_quant)
            return kernel
        torch_layout = self._dequantize()
        return tf.transpose(torch_layout, [*range(1, len(self.kernel_shape)), 0])

    def _norm_kernel(self):
        """DoRA's norm reads the kernel the layer computes with (dequantized, Keras layout)."""
        return self._regularized_kernel()

    def _store_base(self, kernel: np.ndarray) -> None:
        self._set_base_kernel(kernel, self.name)

    def _quant_dequant(self, kernel: np.ndarray) -> np.ndarray:
        """``dequantize(quantize(kernel))`` with this layer's NF4 settings (LoftQ alternates with it)."""
        cfg = self.quantization
        return ops.convert_to_numpy(nf4.dequantize(nf4.quantize(kernel, cfg.group_size, cfg.double_quant, name=self.name)))

    def _cast_in(self, inputs):
        return tf.cast(inputs, self.base_compute_dtype)

    def _cast_out(self, outputs):
        return tf.cast(outputs, self.compute_dtype)

    def base_kernel_value(self) -> np.ndarray:
        """The base kernel the layer computes with, float32 NumPy in Keras layout."""
        if not self.fake_quant:
            return ops.convert_to_numpy(nf4.dequantize(self.nf4_tensor()))
        kernel = ops.convert_to_numpy(self.kernel).astype(np.float32)
        if self.merged:
            return kernel
        cfg = self.quantization
        return ops.convert_to_numpy(nf4.fake_quant(kernel, cfg.group_size, cfg.double_quant))

    def _set_base_kernel(self, kernel: Any, source_name: str) -> None:
        """`kernel`: an array, tensor or variable (`nf4.quantize` reads it a slice at a time)."""
        if not self.fake_quant:
            cfg = self.quantization
            q = nf4.quantize(kernel, cfg.group_size, cfg.double_quant, name=source_name)
            for var in self.storage_variables():
                var.assign(q.arrays[var.name[len("nf4_"):]])
            return
        kernel = np.asarray(kernel)
        if kernel.dtype.kind == "f" and not np.isfinite(kernel).all():
            raise ValueError(
                f"Cannot quantize the kernel of layer '{source_name}': it contains "
                f"{int(kernel.size - np.isfinite(kernel).sum())} NaN or Inf values."
            )
        self.kernel.assign(kernel)

    def _copy_base_weights(self, layer) -> None:
        # The variable itself, not a NumPy copy: quantizing reads it a slice at a time.
        self._set_base_kernel(layer.kernel, layer.name)
        if self.bias is not None:
            self.bias.assign(ops.convert_to_numpy(layer.bias))

    # -- merge -----------------------------------------------------------
    def _no_merge(self, what: str) -> None:
        if not self.fake_quant:
            raise NotImplementedError(
                f"Cannot {what} layer '{self.name}': its base kernel is stored in NF4 (4 bits), "
                "which cannot hold the LoRA update exactly. Use `tf_lora.merge(model)` for a plain "
                "float model with the dequantized kernel plus the LoRA update (or "
                "QLoRAConfig(fake_quant=True), whose float kernel can be merged in place)."
            )

    def merge(self) -> None:
        """Folds the LoRA update into the kernel: only in `fake_quant` mode.

        The merged kernel is ``fake_quant(kernel) + scaling * lora_a @ lora_b`` and is used
        as is (not quantized again); `unmerge` leaves the fake-quantized kernel, which with
        double quantization does not give the pre-merge outputs exactly (see `unmerge`).

        Raises:
            NotImplementedError: with 4-bit storage; use `tf_lora.merge(model)` instead.
        """
        self._no_merge("merge")
        super().merge()

    def unmerge(self) -> None:
        """Takes the LoRA update out of a merged `fake_quant` kernel; exact only without double quantization.

        The float kernel afterwards is ``fake_quant(W)`` (up to float32 rounding), not
        the original `W`, and the forward pass fake-quantizes it again. Without double
        quantization NF4 is idempotent, so the outputs are restored up to float32
        rounding. With it (the default) they are not: the group scales are quantized
        to 8 bits a second time, around a new mean, so each element of the kernel the
        layer computes with moves by at most half a step of the 8-bit scale code,
        ``0.5 * max(diff(nf4.DYNAMIC_MAP)) * nested_scale`` (about 0.007 times the
        nested scale of its block of 256 groups), per merge/unmerge cycle. That is a
        worst case; typically the move is ~1e-4 of the group's scale, but it repeats
        in the same direction, so cycles accumulate. To switch adapters without this
        drift, do not merge in place; use `tf_lora.merge(model)` for a merged copy.

        Raises:
            NotImplementedError: with 4-bit storage (nothing to unmerge).
        """
        self._no_merge("unmerge")
        super().unmerge()

    def get_config(self) -> dict:
        config = super().get_config()
        config["quantization"] = self.quantization.to_dict()
        return config


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
class QLoRAEinsumDense(_NF4Base, LoRAEinsumDense):
    """`LoRAEinsumDense` whose frozen kernel is stored in NF4 (see `QLoRADense`).

    Groups follow bitsandbytes' order over the kernel with its last axis moved first.

    Example:
        >>> layer = QLoRAEinsumDense("abc,cde->abde", (None, 2, 3), rank=2)
        >>> layer(np.ones((1, 4, 5), "float32")).shape
        (1, 4, 2, 3)
    """

    def __init__(self, equation: str, output_shape: Any, *args, **kwargs):
        super().__init__(equation, output_shape, *args, **kwargs)
        lhs, out = equation.replace(" ", "").split("->")
        x_sub, k_sub = lhs.split(",")
        k_torch = f"{k_sub[-1]}{k_sub[:-1]}"
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
