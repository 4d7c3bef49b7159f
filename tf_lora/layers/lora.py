"""LoRA layers: a frozen base kernel plus a trainable low-rank update.

``y = activation(x @ W + b + scaling * (dropout(x) @ lora_a) @ lora_b)`` with
``scaling = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA). The update is
computed unmerged: ``W + scaling * lora_a @ lora_b`` is never formed during
training, so no full-size weight gradient is computed. `merge()` folds the
update into the kernel on request (zero-latency inference), `unmerge()` takes
it out again.
"""

from __future__ import annotations

import math
import string
from typing import Any, Optional, Sequence, Tuple

import keras
import numpy as np
from keras import ops

try:  # Keras' own shape analysis, so kernel/bias shapes match EinsumDense's.
    from keras.src.layers.core.einsum_dense import _analyze_einsum_string
except ImportError:  # pragma: no cover - guarded by the keras pin in setup.cfg
    _analyze_einsum_string = None

_INITS = ("he_uniform", "gaussian")
DEFAULT_ADAPTER = "default"


def _invalid(name: str, expected: str, value: Any) -> str:
    return (
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _adapter_spec(rank=8, alpha=32.0, dropout=0.0, use_rslora=False, lora_init="he_uniform") -> dict:
    """Validated hyper-parameters of one adapter."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(_invalid("rank", "a positive integer", rank))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(_invalid("alpha", "a positive number", alpha))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(_invalid("dropout", "a float in [0, 1)", dropout))
    if lora_init not in _INITS:
        raise ValueError(_invalid("lora_init", f"one of {_INITS}", lora_init))
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout),
            "use_rslora": bool(use_rslora), "lora_init": lora_init}


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


class LoRALayer(keras.layers.Layer):
    """Common part of every adapter layer: rank, scaling, lora_a/lora_b, merge.

    Subclasses create the frozen base weights in `build`, call `_build_lora`
    with the kernel's input-side and output-side shapes, and implement
    `_base_call`, `_lora_apply` and `base_kernel_value`.

    A layer holds one adapter named ``"default"`` (variables `lora_a`,
    `lora_b`) and optionally more (`add_adapter`; variables
    ``lora_a_<name>``, ``lora_b_<name>``); `active_adapter` picks which one
    the forward pass uses (`None`: the base layer alone). Switching never
    touches the base weights.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 32.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        lora_init: str = "he_uniform",
        merged: bool = False,
        activation: Any = None,
        adapters: Optional[dict] = None,
        active_adapter: Optional[str] = DEFAULT_ADAPTER,
        **kwargs,
    ):
        super().__init__(**kwargs)
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, lora_init)
        self.rank = spec["rank"]
        self.alpha = spec["alpha"]
        self.dropout = spec["dropout"]
        self.use_rslora = spec["use_rslora"]
        self.lora_init = spec["lora_init"]
        self.merged = bool(merged)
        self.activation = keras.activations.get(activation)
        self.seed_generator = keras.random.SeedGenerator(name="lora_seed")
        # Extra adapters: plain dicts (not Keras-tracked), variables tracked by add_weight.
        extra = {name: _adapter_spec(**cfg) for name, cfg in (adapters or {}).items()}
        object.__setattr__(self, "_extra_specs", extra)
        object.__setattr__(self, "_extra_vars", {})
        if active_adapter is not None and active_adapter != DEFAULT_ADAPTER and active_adapter not in extra:
            raise ValueError(_invalid("active_adapter", f"one of {[DEFAULT_ADAPTER, *extra]} or None", active_adapter))
        self.active_adapter = active_adapter

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA) of the default adapter."""
        return _scaling(self.rank, self.alpha, self.use_rslora)

    @property
    def adapter_names(self) -> list:
        return [DEFAULT_ADAPTER, *self._extra_specs]

    def _make_lora_pair(self, suffix: str, rank: int, lora_init: str):
        in_shape, out_shape = self._lora_shapes
        if lora_init == "gaussian":
            init_a = keras.initializers.RandomNormal(stddev=1.0 / rank)
        else:
            init_a = keras.initializers.HeUniform()
        # Adapter variables stay float32 (the variable dtype) under mixed precision.
        a = self.add_weight(name="lora_a" + suffix, shape=tuple(in_shape) + (rank,), initializer=init_a, trainable=True)
        b = self.add_weight(name="lora_b" + suffix, shape=(rank,) + tuple(out_shape), initializer="zeros", trainable=True)
        return a, b

    def _build_lora(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        self._lora_shapes = (tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape))
        self.lora_a, self.lora_b = self._make_lora_pair("", self.rank, self.lora_init)
        for name, spec in self._extra_specs.items():
            self._extra_vars[name] = self._make_lora_pair(f"_{name}", spec["rank"], spec["lora_init"])
        self._set_trainable_flags()

    # -- several adapters --------------------------------------------------
    def adapter_variables(self, name: Optional[str] = None) -> tuple:
        """``(lora_a, lora_b)`` of adapter `name` (default: the active one)."""
        name = self.active_adapter if name is None else name
        if name == DEFAULT_ADAPTER:
            return self.lora_a, self.lora_b
        if name not in self._extra_vars:
            raise ValueError(_invalid("adapter_name", f"one of {self.adapter_names}", name))
        return self._extra_vars[name]

    def _spec(self, name: str) -> dict:
        if name == DEFAULT_ADAPTER:
            return _adapter_spec(self.rank, self.alpha, self.dropout, self.use_rslora, self.lora_init)
        return self._extra_specs[name]

    def active_variables(self) -> list:
        """The adapter variables the forward pass uses now (trained by `fit`)."""
        if self.active_adapter is None or getattr(self, "lora_a", None) is None:
            return []
        return list(self.adapter_variables(self.active_adapter))

    def _set_trainable_flags(self) -> None:
        active = {id(v) for v in self.active_variables()}
        for name in self.adapter_names:
            if name == DEFAULT_ADAPTER or name in self._extra_vars:
                for v in self.adapter_variables(name):
                    v.trainable = id(v) in active

    def add_adapter(self, name: str, rank: int = 8, alpha: float = 32.0, dropout: float = 0.0,
                    use_rslora: bool = False, lora_init: str = "he_uniform") -> None:
        """Adds an inactive adapter `name` (zero `lora_b`: no effect until trained)."""
        if not isinstance(name, str) or not name.isidentifier() or name in self.adapter_names:
            raise ValueError(_invalid("adapter_name", f"a new identifier (existing: {self.adapter_names})", name))
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, lora_init)
        self._extra_specs[name] = spec
        if self.built:
            self._tracker.unlock()
            try:
                self._extra_vars[name] = self._make_lora_pair(f"_{name}", spec["rank"], spec["lora_init"])
            finally:
                self._tracker.lock()
        self._set_trainable_flags()

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` and its variables (not the default, not the active one)."""
        if name == DEFAULT_ADAPTER or name not in self._extra_specs:
            raise ValueError(_invalid("adapter_name", f"one of the added adapters {list(self._extra_specs)}", name))
        if name == self.active_adapter:
            raise ValueError(f"Adapter {name!r} of layer '{self.name}' is active; activate another one first.")
        for var in self._extra_vars.pop(name, ()):
            self._untrack_variable(var)
        del self._extra_specs[name]

    def set_active_adapter(self, name: Optional[str]) -> None:
        """Selects the adapter used by the forward pass (`None`: base layer only)."""
        if name is not None and name not in self.adapter_names:
            raise ValueError(_invalid("adapter_name", f"one of {self.adapter_names} or None", name))
        if self.merged and name != self.active_adapter:
            raise ValueError(f"Layer '{self.name}' is merged; call unmerge() before switching adapters.")
        self.active_adapter = name
        self._set_trainable_flags()

    # -- forward -------------------------------------------------------------
    def call(self, inputs, training=None):
        outputs = self._base_call(inputs)
        if not self.merged and self.active_adapter is not None:
            spec = self._spec(self.active_adapter)
            a, b = self.adapter_variables(self.active_adapter)
            lora_in = inputs
            if spec["dropout"] > 0 and training:
                lora_in = keras.random.dropout(inputs, spec["dropout"], seed=self.seed_generator)
            outputs = outputs + self._lora_apply(lora_in, a, b, _scaling(spec["rank"], spec["alpha"], spec["use_rslora"]))
        if self.bias is not None:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _lora_call(self, inputs):
        """The default adapter's update for `inputs` (no dropout)."""
        return self._lora_apply(inputs, self.lora_a, self.lora_b, self.scaling)

    # -- merge / unmerge -------------------------------------------------
    def lora_delta(self, name: Optional[str] = None) -> np.ndarray:
        """``scaling * lora_a @ lora_b`` of adapter `name` (default: the active
        one; zero when none is active) in the kernel's layout, NumPy float32."""
        name = self.active_adapter if name is None else name
        if name is None:
            return np.zeros_like(self.base_kernel_value())
        spec = self._spec(name)
        a, b = (ops.convert_to_numpy(v).astype(np.float32) for v in self.adapter_variables(name))
        delta = np.tensordot(a, b, axes=([a.ndim - 1], [0])) * np.float32(_scaling(spec["rank"], spec["alpha"], spec["use_rslora"]))
        return self._delta_to_kernel_layout(delta)

    def _delta_to_kernel_layout(self, delta: np.ndarray) -> np.ndarray:
        return delta

    def merged_kernel(self) -> np.ndarray:
        """The kernel a plain layer needs to give this layer's outputs."""
        kernel = self.base_kernel_value()
        return kernel if self.merged or self.active_adapter is None else kernel + self.lora_delta()

    def merge(self) -> None:
        """Folds the active adapter's ``scaling * lora_a @ lora_b`` into the frozen kernel."""
        if self.merged:
            raise ValueError(f"Layer '{self.name}' is already merged; call unmerge() first.")
        if self.active_adapter is None:
            raise ValueError(f"Layer '{self.name}' has no active adapter to merge.")
        self.kernel.assign(self.base_kernel_value() + self.lora_delta())
        self.merged = True

    def unmerge(self) -> None:
        """Takes the LoRA update out of the kernel again (exact up to rounding)."""
        if not self.merged:
            raise ValueError(f"Layer '{self.name}' is not merged; nothing to unmerge.")
        self.kernel.assign(self.base_kernel_value() - self.lora_delta())
        self.merged = False

    @classmethod
    def source_input_shape(cls, layer) -> tuple:
        """An input shape that builds this layer like the built `layer`."""
        raise NotImplementedError

    def build_like(self, layer) -> None:
        """Builds this (deserialized) adapter with the shapes of built `layer`."""
        self.build(self.source_input_shape(layer))

    def base_kernel_value(self) -> np.ndarray:
        return ops.convert_to_numpy(self.kernel).astype(np.float32)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            use_rslora=self.use_rslora,
            lora_init=self.lora_init,
            merged=self.merged,
            activation=keras.activations.serialize(self.activation),
            adapters={name: dict(spec) for name, spec in self._extra_specs.items()},
            active_adapter=self.active_adapter,
        )
        return config

    @staticmethod
    def _check_source(layer, expected_type, what: str) -> None:
        if not isinstance(layer, expected_type):
            raise TypeError(_invalid("layer", f"a built keras.layers.{what}", type(layer).__name__))
        if not layer.built:
            raise ValueError(
                f"Received an unbuilt layer for `layer`, expected a built keras.layers.{what} "
                f"(call the model on data or build it first). Received: layer={layer.name!r}"
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' already has Keras' built-in LoRA enabled (enable_lora); "
                "tf_lora cannot adapt it again."
            )
        if getattr(layer, "quantization_mode", None) is not None:
            raise NotImplementedError(
                f"Layer '{layer.name}' is quantized by Keras (mode {layer.quantization_mode!r}); "
                "tf_lora adapts float layers only. Use LoRAConfig(quantization=QLoRAConfig()) for NF4."
            )


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRADense(LoRALayer):
    """`keras.layers.Dense` with a frozen kernel and a trainable LoRA update.

    Args:
        units: Output size.
        activation: Applied after the LoRA update is added.
        use_bias: Whether the (frozen) bias exists.
        rank, alpha, dropout, use_rslora, lora_init: see `tf_lora.LoRAConfig`.
        merged: Whether the kernel already contains the LoRA update.

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

    def build(self, input_shape):
        in_dim = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(in_dim, self.units), initializer=self.kernel_initializer, trainable=False
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer, trainable=False
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
        """A built `LoRADense` carrying `layer`'s name, dtype policy and weights.

        `layer` itself is not modified.
        """
        cls._check_source(layer, keras.layers.Dense, "Dense")
        new = cls(
            units=layer.units, activation=layer.activation, use_bias=layer.use_bias,
            rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_init=lora_init,
            name=layer.name, dtype=layer.dtype_policy, **kwargs,
        )
        new.build(cls.source_input_shape(layer))
        new._copy_base_weights(layer)
        return new

    @classmethod
    def source_input_shape(cls, layer) -> tuple:
        return (None, int(layer.kernel.shape[0]))

    def _copy_base_weights(self, layer) -> None:
        self.kernel.assign(ops.convert_to_numpy(layer.kernel))
        if self.use_bias:
            self.bias.assign(ops.convert_to_numpy(layer.bias))

    def to_base_layer(self) -> keras.layers.Dense:
        """A plain built `keras.layers.Dense` with the merged kernel."""
        dense = keras.layers.Dense(
            self.units, activation=self.activation, use_bias=self.use_bias,
            name=self.name, dtype=self.dtype_policy,
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
        self.bias = None
        self.full_output_shape = None

    def build(self, input_shape):
        kernel_shape, bias_shape, full_output_shape, _, _ = _analyze_einsum_string(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        self.full_output_shape = tuple(full_output_shape)
        self.input_spec = keras.InputSpec(ndim=len(input_shape))
        self.kernel = self.add_weight(
            name="kernel", shape=tuple(kernel_shape), initializer=self.kernel_initializer, trainable=False
        )
        if bias_shape is not None:
            self.bias = self.add_weight(
                name="bias", shape=tuple(bias_shape), initializer=self.bias_initializer, trainable=False
            )
        k_sub = self.equation.replace(" ", "").split("->")[0].split(",")[1]
        dims = dict(zip(k_sub, kernel_shape))
        self._build_lora([dims[c] for c in self._in_axes], [dims[c] for c in self._out_axes])

    def _base_call(self, inputs):
        return ops.einsum(self.equation, inputs, self.kernel)

    def _lora_apply(self, inputs, lora_a, lora_b, scaling):
        hidden = ops.einsum(self._eq_a, inputs, lora_a) * scaling
        return ops.einsum(self._eq_b, hidden, lora_b)

    def _delta_to_kernel_layout(self, delta: np.ndarray) -> np.ndarray:
        k_sub = self.equation.replace(" ", "").split("->")[0].split(",")[1]
        order = self._in_axes + self._out_axes
        return np.transpose(delta, [order.index(c) for c in k_sub])

    def compute_output_shape(self, input_shape):
        _, _, full_output_shape, _, _ = _analyze_einsum_string(
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
        """A built `LoRAEinsumDense` carrying `layer`'s name, dtype policy and weights."""
        cls._check_source(layer, keras.layers.EinsumDense, "EinsumDense")
        new = cls(
            equation=layer.equation, output_shape=layer.partial_output_shape,
            activation=layer.activation, bias_axes=layer.bias_axes,
            rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_init=lora_init,
            name=layer.name, dtype=layer.dtype_policy, **kwargs,
        )
        new.build(cls._input_shape_of(layer))
        new._copy_base_weights(layer)
        return new

    def _copy_base_weights(self, layer) -> None:
        self.kernel.assign(ops.convert_to_numpy(layer.kernel))
        if self.bias is not None:
            self.bias.assign(ops.convert_to_numpy(layer.bias))

    def to_base_layer(self) -> keras.layers.EinsumDense:
        """A plain built `keras.layers.EinsumDense` with the merged kernel."""
        dense = keras.layers.EinsumDense(
            self.equation, self.partial_output_shape, activation=self.activation,
            bias_axes=self.bias_axes, name=self.name, dtype=self.dtype_policy,
        )
        dense.build(self._built_input_shape())
        dense.kernel.assign(self.merged_kernel())
        if self.bias is not None:
            dense.bias.assign(ops.convert_to_numpy(self.bias))
        return dense

    def _built_input_shape(self) -> tuple:
        return self._input_shape_of(self)
