"""The adapter-layer base class: rank, scaling, several named adapters, merge.

`LoRALayer` holds what every adapter layer shares; `layers/lora.py` (float
base) and `layers/qlora.py` (NF4 base) build on it. Subclasses create the
frozen base weights in `build`, call `_build_lora` with the kernel's
input-side and output-side shapes, and implement `_base_call`, `_lora_apply`
and `base_kernel_value`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import keras
import numpy as np
from keras import ops

from tf_lora import _compat

_INITS = ("he_uniform", "gaussian")
DEFAULT_ADAPTER = "default"
# Constructor arguments copied from the adapted layer and handed back by to_base_layer.
_WEIGHT_OPTIONS = ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                   "kernel_constraint", "bias_constraint")


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

    Regularizers and constraints are those of the adapted layer (`from_layer`
    copies them, `to_base_layer` gives them back). The activity regularizer
    sees the layer's output, LoRA update included. `kernel_regularizer` and
    `bias_regularizer` apply to the stored base weights (for NF4 storage the
    dequantized kernel): frozen, they add a constant to `losses` (once per
    layer, like Keras' weight regularizers), so an adapted model's loss equals
    the base model's at init; the LoRA update is not regularized by them (use
    the optimizer's weight decay for the adapters). After `merge()` the stored
    kernel holds the update and is what the regularizer sees. Constraints are
    attached to the float base variables; the optimizer only applies them to
    trainable variables, so they act again once the base is unfrozen or merged
    into a plain layer.
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
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        **kwargs,
    ):
        super().__init__(**kwargs)  # activity_regularizer is Keras' own Layer argument
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
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
            with _compat.unlocked(self):
                self._extra_vars[name] = self._make_lora_pair(f"_{name}", spec["rank"], spec["lora_init"])
        self._set_trainable_flags()

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` and its variables (not the default, not the active one)."""
        if name == DEFAULT_ADAPTER or name not in self._extra_specs:
            raise ValueError(_invalid("adapter_name", f"one of the added adapters {list(self._extra_specs)}", name))
        if name == self.active_adapter:
            raise ValueError(f"Adapter {name!r} of layer '{self.name}' is active; activate another one first.")
        for var in self._extra_vars.pop(name, ()):
            _compat.untrack_variable(self, var)
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
            outputs = self._add_bias(outputs)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _add_bias(self, outputs):
        """``outputs + bias``; a layer whose bias is not on the last axis (channels_first conv) overrides it."""
        return outputs + self.bias

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
        """Takes the LoRA update out of the kernel again: ``kernel - scaling * lora_a @ lora_b``.

        For a float kernel this restores it, and the outputs, up to float32
        rounding (the subtraction is not bit-exact). A layer whose forward pass
        transforms its stored kernel states its own bound: for fake-quant
        `QLoRADense` / `QLoRAEinsumDense` with double quantization merge ->
        unmerge is not exact (see their `unmerge`).
        """
        if not self.merged:
            raise ValueError(f"Layer '{self.name}' is not merged; nothing to unmerge.")
        self.kernel.assign(self.base_kernel_value() - self.lora_delta())
        self.merged = False

    # -- regularizers and constraints ------------------------------------------
    def _get_own_losses(self):
        # Keras' Model.losses collects this per layer; its weight regularizers only cover
        # trainable variables (Layer._get_regularization_losses), and the base weights are
        # frozen, so theirs are added here. Pinned by tests/test_lora.py (regularizers test).
        losses = super()._get_own_losses()
        return losses + self.base_regularization_losses() if self.built else losses

    def base_regularization_losses(self) -> list:
        """``[kernel_regularizer(kernel), bias_regularizer(bias)]`` of the stored base
        weights (those set), part of `losses`; constant while the base is frozen."""
        out = []
        if self.kernel_regularizer is not None:
            out.append(self.kernel_regularizer(self._regularized_kernel()))
        if self.bias_regularizer is not None and getattr(self, "bias", None) is not None:
            out.append(self.bias_regularizer(self.bias))
        return out

    def _regularized_kernel(self):
        """The base kernel `kernel_regularizer` sees (Keras layout, float32)."""
        return self.kernel

    @staticmethod
    def _weight_options_of(layer, overrides: dict) -> dict:
        """`layer`'s regularizers and constraints, except those `overrides` gives."""
        return {**{k: getattr(layer, k, None) for k in _WEIGHT_OPTIONS}, **overrides}

    def _weight_options(self) -> dict:
        """This layer's regularizers and constraints, as plain-layer arguments."""
        return {k: getattr(self, k) for k in _WEIGHT_OPTIONS}

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
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
            kernel_constraint=keras.constraints.serialize(self.kernel_constraint),
            bias_constraint=keras.constraints.serialize(self.bias_constraint),
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
