"""LoRA layers: a frozen base kernel plus a trainable low-rank update.

``y = activation(x @ W + b + scaling * (dropout(x) @ lora_a) @ lora_b)`` with
``scaling = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA). The update is
computed unmerged: ``W + scaling * lora_a @ lora_b`` is never formed during
training, so no full-size weight gradient is computed. `merge()` folds the
update into the kernel on request (zero-latency inference), `unmerge()` takes
it out again.
"""

from __future__ import annotations

import string
from typing import Any, Optional, Tuple

import keras
import numpy as np
from keras import ops

from tf_lora.layers.base import _INITS, DEFAULT_ADAPTER, LoRALayer, _adapter_spec, _invalid, _scaling  # noqa: F401

from tf_lora._compat import analyze_einsum  # Keras' own shape analysis, so shapes match EinsumDense's


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRADense(LoRALayer):
    """`keras.layers.Dense` with a frozen kernel and a trainable LoRA update.

    Args:
        units: Output size.
        activation: Applied after the LoRA update is added.
        use_bias: Whether the (frozen) bias exists.
        rank, alpha, dropout, use_rslora, lora_init, use_dora: see `tf_lora.LoRAConfig`
            (`lora_init` is its `init`; `from_layer` applies ``"pissa"``/``"olora"``,
            and ``"loftq"`` on `QLoRADense`, with ``loftq_iter=``).
        merged: Whether the kernel already contains the LoRA update.
        kernel_regularizer, bias_regularizer, activity_regularizer,
        kernel_constraint, bias_constraint: as for `keras.layers.Dense`; see
            `LoRALayer` for how they act on a frozen base.

    Example:
        >>> layer = LoRADense(4, rank=2, alpha=4)
        >>> layer(np.ones((3, 5), "float32")).shape
        (3, 4)
    """

    def __init__(
        self,
        units: int,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        **kwargs,
    ):
        super().__init__(activation=activation, **kwargs)
        if not isinstance(units, int) or isinstance(units, bool) or units <= 0:
            raise ValueError(_invalid("units", "a positive integer", units))
        self.units = units
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.bias = None

    supports_dora = True
    supported_inits = _INITS

    def _build_kernel(self, kernel_shape) -> None:
        """Creates the frozen base kernel (QLoRA layers store it in NF4 instead)."""
        self.kernel = self.add_weight(
            name="kernel", shape=tuple(kernel_shape), initializer=self.kernel_initializer,
            constraint=self.kernel_constraint, trainable=False,
        )

    def build(self, input_shape):
        in_dim = int(input_shape[-1])
        self._build_kernel((in_dim, self.units))
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer,
                constraint=self.bias_constraint, trainable=False,
            )
        self._build_lora((in_dim,), (self.units,))
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: in_dim})

    def _base_call(self, inputs):
        return ops.matmul(inputs, self.kernel)

    def _lora_apply(self, inputs, lora_a, lora_b, scaling):
        # Scale the rank-r intermediate, the cheapest place to do it.
        return ops.matmul(ops.matmul(inputs, lora_a) * scaling, lora_b)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            units=self.units,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config

    @classmethod
    def from_layer(cls, layer: keras.layers.Dense, rank: int = 8, alpha: float = 32.0,
                   dropout: float = 0.0, use_rslora: bool = False, lora_init: str = "he_uniform",
                   **kwargs) -> "LoRADense":
        """A built `LoRADense` carrying `layer`'s name, dtype policy, weights,
        regularizers and constraints (`kwargs` may override them).

        `layer` itself is not modified, except inside `adopting_base_weights(layer)`
        (in-place `adapt`), where the adapter adopts `layer`'s kernel and bias variables
        (frozen) instead of copying them.
        """
        cls._check_source(layer, keras.layers.Dense, "Dense")
        loftq_iter = kwargs.pop("loftq_iter", 1)
        new = cls(
            units=layer.units, activation=layer.activation, use_bias=layer.use_bias,
            rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_init=lora_init,
            name=layer.name, dtype=layer.dtype_policy, **cls._weight_options_of(layer, kwargs),
        )
        with new._adopting(layer):  # in place: `layer`'s own kernel and bias (adopting_base_weights)
            new.build(cls.source_input_shape(layer))
        new._copy_base_weights(layer)
        new._init_from_source(layer.kernel, loftq_iter)
        return new

    @classmethod
    def source_input_shape(cls, layer) -> tuple:
        return (None, int(layer.kernel.shape[0]))

    def _copy_base_weights(self, layer) -> None:
        self._copy_weight(self.kernel, layer.kernel)
        if self.use_bias:
            self._copy_weight(self.bias, layer.bias)

    def to_base_layer(self) -> keras.layers.Dense:
        """A plain built `keras.layers.Dense` with the merged kernel, regularizers and constraints."""
        dense = keras.layers.Dense(
            self.units, activation=self.activation, use_bias=self.use_bias,
            name=self.name, dtype=self.dtype_policy, **self._weight_options(),
        )
        dense.build((None, self.kernel.shape[0]))
        dense.kernel.assign(self.merged_kernel())
        if self.use_bias:
            dense.bias.assign(ops.convert_to_numpy(self.bias))
        return dense


def _einsum_lora_equations(equation: str, rank_letter: Optional[str] = None) -> Tuple[str, str, str, str, str]:
    """Splits an EinsumDense equation into two low-rank einsums.

    Returns ``(eq_a, eq_b, eq_delta, in_axes, out_axes)``: ``eq_a`` contracts
    the input with `lora_a` (kernel axes that come from the input, then r),
    ``eq_b`` expands with `lora_b` (r, then kernel axes that go to the
    output), ``eq_delta`` forms the full kernel-shaped update.
    """
    try:
        lhs, out = equation.replace(" ", "").split("->")
        x_sub, k_sub = lhs.split(",")
    except ValueError:
        raise ValueError(_invalid("equation", "an einsum equation 'x,kernel->out'", equation)) from None
    used = set(equation)
    r = rank_letter or next(c for c in string.ascii_letters if c not in used)
    in_axes = "".join(c for c in k_sub if c in x_sub and c not in out)
    out_axes = "".join(c for c in k_sub if c in out and c not in x_sub)
    if len(in_axes) + len(out_axes) != len(k_sub) or not in_axes or not out_axes:
        raise NotImplementedError(
            f"LoRA needs every kernel axis to be either contracted with the input or "
            f"passed to the output; the kernel of equation {equation!r} has axes that are "
            "neither (or both), which tf_lora does not support."
        )
    x_rest = "".join(c for c in x_sub if c not in in_axes)
    eq_a = f"{x_sub},{in_axes}{r}->{x_rest}{r}"
    eq_b = f"{x_rest}{r},{r}{out_axes}->{out}"
    eq_delta = f"{in_axes}{r},{r}{out_axes}->{k_sub}"
    return eq_a, eq_b, eq_delta, in_axes, out_axes


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAEinsumDense(LoRALayer):
    """`keras.layers.EinsumDense` with a frozen kernel and a trainable LoRA update.

    `lora_a` has the kernel's input-side axes plus r, `lora_b` has r plus the
    kernel's output-side axes, so ``einsum(lora_a, lora_b)`` has the kernel's
    full shape (for MultiHeadAttention's query kernel (hidden, heads, head_dim):
    lora_a (hidden, r), lora_b (r, heads, head_dim)).

    Example:
        >>> layer = LoRAEinsumDense("abc,cde->abde", (None, 2, 3), rank=2)
        >>> layer(np.ones((1, 4, 5), "float32")).shape
        (1, 4, 2, 3)
    """

    def __init__(
        self,
        equation: str,
        output_shape: Any,
        activation: Any = None,
        bias_axes: Optional[str] = None,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        **kwargs,
    ):
        super().__init__(activation=activation, **kwargs)
        self.equation = equation
        if isinstance(output_shape, int):
            output_shape = (output_shape,)
        self.partial_output_shape = tuple(output_shape)
        self.bias_axes = bias_axes
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._eq_a, self._eq_b, self._eq_delta, self._in_axes, self._out_axes = _einsum_lora_equations(equation)
        self._k_sub = equation.replace(" ", "").split("->")[0].split(",")[1]
        self.bias = None
        self.full_output_shape = None
        self._built_shape = None

    supports_dora = True
    supported_inits = _INITS

    def build(self, input_shape):
        kernel_shape, bias_shape, full_output_shape = analyze_einsum(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        self._built_shape = tuple(input_shape)
        self.full_output_shape = tuple(full_output_shape)
        self.input_spec = keras.InputSpec(ndim=len(input_shape))
        self._build_kernel(tuple(kernel_shape))
        if bias_shape is not None:
            self.bias = self.add_weight(
                name="bias", shape=tuple(bias_shape), initializer=self.bias_initializer,
                constraint=self.bias_constraint, trainable=False,
            )
        dims = dict(zip(self._k_sub, kernel_shape))
        self._build_lora([dims[c] for c in self._in_axes], [dims[c] for c in self._out_axes])

    def _build_kernel(self, kernel_shape) -> None:
        """Creates the frozen base kernel (QLoRA layers store it in NF4 instead)."""
        self.kernel = self.add_weight(
            name="kernel", shape=tuple(kernel_shape), initializer=self.kernel_initializer,
            constraint=self.kernel_constraint, trainable=False,
        )

    def _base_call(self, inputs):
        return ops.einsum(self.equation, inputs, self.kernel)

    def _lora_apply(self, inputs, lora_a, lora_b, scaling):
        hidden = ops.einsum(self._eq_a, inputs, lora_a) * scaling
        return ops.einsum(self._eq_b, hidden, lora_b)

    def _delta_to_kernel_layout(self, delta: np.ndarray) -> np.ndarray:
        order = self._in_axes + self._out_axes
        return np.transpose(delta, [order.index(c) for c in self._k_sub])

    def _to_lora_layout(self, kernel):
        perm = [self._k_sub.index(c) for c in self._in_axes + self._out_axes]
        return np.transpose(kernel, perm) if isinstance(kernel, np.ndarray) else ops.transpose(kernel, perm)

    def _broadcast_out(self, values):
        # values: (output-side axes, kernel order) -> the output's order, size 1 elsewhere.
        out = self.equation.replace(" ", "").split("->")[1]
        ndim = len(self.full_output_shape)
        letters = out.replace("...", "." * (ndim - len(out.replace("...", ""))))
        present = [c for c in letters if c in self._out_axes]
        values = ops.transpose(values, [self._out_axes.index(c) for c in present])
        dims = dict(zip(self._out_axes, self._lora_shapes[1]))
        return ops.reshape(values, [dims[c] if c in self._out_axes else 1 for c in letters])

    def compute_output_shape(self, input_shape):
        _, _, full_output_shape = analyze_einsum(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        return tuple(full_output_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            equation=self.equation,
            output_shape=list(self.partial_output_shape),
            bias_axes=self.bias_axes,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config

    @classmethod
    def source_input_shape(cls, layer) -> tuple:
        return cls._input_shape_of(layer)

    @staticmethod
    def _input_shape_of(layer) -> tuple:
        spec = getattr(layer, "input_spec", None)
        ndim = spec.ndim if spec is not None and spec.ndim is not None else None
        x_sub = layer.equation.replace(" ", "").split("->")[0].split(",")[0]
        k_sub = layer.equation.replace(" ", "").split("->")[0].split(",")[1]
        dims = dict(zip(k_sub, layer.kernel.shape))
        letters = x_sub.replace("...", "")
        if ndim is None:
            ndim = len(letters) + (1 if "..." in x_sub else 0)
        # Only kernel axes matter for the shapes; other axes may stay unknown.
        shape = [dims.get(c) for c in letters]
        if "..." in x_sub:
            pad = [None] * (ndim - len(letters))
            pos = x_sub.index("...")
            before = len(x_sub[:pos])
            shape = shape[:before] + pad + shape[before:]
        return tuple(shape)

    @classmethod
    def from_layer(cls, layer: keras.layers.EinsumDense, rank: int = 8, alpha: float = 32.0,
                   dropout: float = 0.0, use_rslora: bool = False, lora_init: str = "he_uniform",
                   **kwargs) -> "LoRAEinsumDense":
        """A built `LoRAEinsumDense` carrying `layer`'s name, dtype policy, weights,
        regularizers and constraints (`kwargs` may override them)."""
        cls._check_source(layer, keras.layers.EinsumDense, "EinsumDense")
        loftq_iter = kwargs.pop("loftq_iter", 1)
        new = cls(
            equation=layer.equation, output_shape=layer.partial_output_shape,
            activation=layer.activation, bias_axes=layer.bias_axes,
            rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_init=lora_init,
            name=layer.name, dtype=layer.dtype_policy, **cls._weight_options_of(layer, kwargs),
        )
        with new._adopting(layer):  # in place: `layer`'s own kernel and bias (adopting_base_weights)
            new.build(cls._input_shape_of(layer))
        new._copy_base_weights(layer)
        new._init_from_source(layer.kernel, loftq_iter)
        return new

    def _copy_base_weights(self, layer) -> None:
        self._copy_weight(self.kernel, layer.kernel)
        if self.bias is not None:
            self._copy_weight(self.bias, layer.bias)

    def to_base_layer(self) -> keras.layers.EinsumDense:
        """A plain built `keras.layers.EinsumDense` with the merged kernel, regularizers and constraints."""
        dense = keras.layers.EinsumDense(
            self.equation, self.partial_output_shape, activation=self.activation,
            bias_axes=self.bias_axes, name=self.name, dtype=self.dtype_policy, **self._weight_options(),
        )
        dense.build(self._built_input_shape())
        dense.kernel.assign(self.merged_kernel())
        if self.bias is not None:
            dense.bias.assign(ops.convert_to_numpy(self.bias))
        return dense

    def _built_input_shape(self) -> tuple:
        return self._built_shape
