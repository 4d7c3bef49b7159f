"""The adapter-layer base class: rank, scaling, several named adapters.

`LoRALayer` holds what every adapter layer shares; `layers/lora.py` (float
base) and `layers/qlora.py` (NF4 base) build on it. Subclasses create the
frozen base weights in `build`, call `_build_lora` with the kernel's
input-side and output-side shapes, and implement `_base_call`, `_lora_apply`
and `base_kernel_value`. Merging and the base-rewriting inits are in
`layers/base_merge.py`, the base weights' adoption, regularizers and constraints in
`layers/base_weights.py`, the hyper-parameter checks in `layers/spec.py`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import keras
import numpy as np
from keras import ops

from tf_lora import _compat
from tf_lora.layers import dora
from tf_lora.layers.base_merge import MergeMixin
from tf_lora.layers.base_weights import _WEIGHT_OPTIONS, BaseWeightsMixin, adopting_base_weights  # noqa: F401
from tf_lora.layers.spec import (  # noqa: F401  (imported from here by the layer modules)
    _INITS,
    BASE_REWRITING_INITS,
    DEFAULT_ADAPTER,
    _adapter_spec,
    _invalid,
    _scaling,
)


class LoRALayer(MergeMixin, BaseWeightsMixin, keras.layers.Layer):
    """Common part of every adapter layer: rank, scaling, lora_a/lora_b, merge.

    Subclasses create the frozen base weights in `build`, call `_build_lora`
    with the kernel's input-side and output-side shapes, and implement
    `_base_call`, `_lora_apply` and `base_kernel_value`.

    A layer holds one adapter named ``"default"`` (variables `lora_a`,
    `lora_b`) and optionally more (`add_adapter`; variables
    ``lora_a_<name>``, ``lora_b_<name>``); `active_adapter` picks which one
    the forward pass uses (`None`: the base layer alone). Switching never
    touches the base weights.

    DoRA (``use_dora=True``, layers with ``supports_dora``) adds a trainable
    ``lora_magnitude`` (``lora_magnitude_<name>``) per adapter; see
    `tf_lora.layers.dora`. The inits ``"pissa"``, ``"olora"`` and ``"loftq"``
    (`from_layer` applies them, since they need the base weights) rewrite the
    frozen base into a residual and keep the initial factors as non-trainable
    ``lora_init_a`` / ``lora_init_b``, from which `tf_lora.save_adapter` converts
    the adapter to one that applies to the original base. They belong to the
    default adapter only (an added adapter cannot rewrite the shared base).

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
        use_dora: bool = False,
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
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, lora_init, use_dora)
        if use_dora and not self.supports_dora:
            raise NotImplementedError(_invalid("use_dora", f"False: {type(self).__name__} has no DoRA", use_dora))
        if lora_init not in self.supported_inits:
            raise NotImplementedError(_invalid("lora_init", f"one of {self.supported_inits} for {type(self).__name__}", lora_init))
        self.rank = spec["rank"]
        self.alpha = spec["alpha"]
        self.dropout = spec["dropout"]
        self.use_rslora = spec["use_rslora"]
        self.lora_init = spec["lora_init"]
        self.use_dora = spec["use_dora"]
        self.merged = bool(merged)
        self.activation = keras.activations.get(activation)
        self.seed_generator = None  # made in build, inside the layer's name scope (its state's path)
        # Extra adapters: plain dicts (not Keras-tracked), variables tracked by add_weight.
        extra = {name: _adapter_spec(**cfg) for name, cfg in (adapters or {}).items()}
        object.__setattr__(self, "_extra_specs", extra)
        object.__setattr__(self, "_extra_vars", {})
        object.__setattr__(self, "_magnitudes", {})  # adapter name -> lora_magnitude variable (DoRA)
        object.__setattr__(self, "_init_pairs", {})  # adapter name -> (lora_init_a, lora_init_b)
        object.__setattr__(self, "_dora_merge_norm", None)  # the norm an in-place DoRA merge divided by
        if active_adapter is not None and active_adapter != DEFAULT_ADAPTER and active_adapter not in extra:
            raise ValueError(_invalid("active_adapter", f"one of {[DEFAULT_ADAPTER, *extra]} or None", active_adapter))
        self.active_adapter = active_adapter

    supports_dora = False  # subclasses that implement the hooks DoRA needs set True
    supported_inits = ("he_uniform", "gaussian")

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

    def _make_adapter(self, name: str, spec: dict) -> None:
        """Creates adapter `name`'s variables: the pair, the init pair, the DoRA magnitude."""
        suffix = "" if name == DEFAULT_ADAPTER else f"_{name}"
        pair = self._make_lora_pair(suffix, spec["rank"], spec["lora_init"])
        if name == DEFAULT_ADAPTER:
            self.lora_a, self.lora_b = pair
        else:
            self._extra_vars[name] = pair
        if spec["lora_init"] in BASE_REWRITING_INITS:
            self._init_pairs[name] = tuple(
                self.add_weight(name=f"lora_init_{ab}{suffix}", shape=tuple(v.shape), initializer="zeros", trainable=False)
                for ab, v in zip("ab", pair)
            )
        if spec["use_dora"]:
            self._magnitudes[name] = self.add_weight(
                name="lora_magnitude" + suffix, shape=self._lora_shapes[1], initializer="ones", trainable=True
            )
            if name == DEFAULT_ADAPTER:
                self.lora_magnitude = self._magnitudes[name]
            self.reset_magnitude(name)

    def _build_lora(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        self._lora_shapes = (tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape))
        self.seed_generator = keras.random.SeedGenerator(name="lora_seed")
        self._make_adapter(DEFAULT_ADAPTER, self._spec(DEFAULT_ADAPTER))
        for name, spec in self._extra_specs.items():
            self._make_adapter(name, spec)
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

    def adapter_magnitude(self, name: Optional[str] = None):
        """DoRA's ``lora_magnitude`` variable of adapter `name` (None without DoRA)."""
        return self._magnitudes.get(self.active_adapter if name is None else name)

    def adapter_init_pair(self, name: Optional[str] = None):
        """``(lora_init_a, lora_init_b)``: the factors a base-rewriting init started from (else None)."""
        return self._init_pairs.get(self.active_adapter if name is None else name)

    def _spec(self, name: str) -> dict:
        if name == DEFAULT_ADAPTER:
            return _adapter_spec(self.rank, self.alpha, self.dropout, self.use_rslora, self.lora_init, self.use_dora)
        return self._extra_specs[name]

    def _trainable_of(self, name: str) -> list:
        magnitude = self._magnitudes.get(name)
        return list(self.adapter_variables(name)) + ([magnitude] if magnitude is not None else [])

    def active_variables(self) -> list:
        """The adapter variables the forward pass uses now (trained by `fit`):
        ``lora_a``, ``lora_b`` and, with DoRA, ``lora_magnitude``."""
        if self.active_adapter is None or getattr(self, "lora_a", None) is None:
            return []
        return self._trainable_of(self.active_adapter)

    def _set_trainable_flags(self) -> None:
        active = {id(v) for v in self.active_variables()}
        for name in self.adapter_names:
            if name == DEFAULT_ADAPTER or name in self._extra_vars:
                for v in self._trainable_of(name):
                    v.trainable = id(v) in active

    def add_adapter(self, name: str, rank: int = 8, alpha: float = 32.0, dropout: float = 0.0,
                    use_rslora: bool = False, lora_init: str = "he_uniform", use_dora: bool = False) -> None:
        """Adds an inactive adapter `name` (zero `lora_b`: no effect until trained; with
        DoRA its magnitude starts at the norm of the current base kernel)."""
        if not isinstance(name, str) or not name.isidentifier() or name in self.adapter_names:
            raise ValueError(_invalid("adapter_name", f"a new identifier (existing: {self.adapter_names})", name))
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, lora_init, use_dora)
        if lora_init in BASE_REWRITING_INITS:
            raise NotImplementedError(_invalid(
                "init", f"'he_uniform' or 'gaussian' for an added adapter ({lora_init!r} rewrites the frozen "
                "base, which all adapters of a layer share; use it in tf_lora.adapt)", lora_init))
        if use_dora and not self.supports_dora:
            raise NotImplementedError(_invalid("use_dora", f"False: {type(self).__name__} has no DoRA", use_dora))
        if use_dora and self.merged:  # the magnitude would be the norm of the merged kernel, not the base's
            raise ValueError(f"Received use_dora=True for layer '{self.name}', which is merged: a DoRA magnitude "
                             "starts at the norm of the base kernel. Call unmerge() first.")
        self._extra_specs[name] = spec
        if self.built:
            with _compat.unlocked(self), _compat.own_scope(self):  # paths '<layer path>/lora_a_<name>'
                self._make_adapter(name, spec)
        self._set_trainable_flags()

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` and its variables (not the default, not the active one)."""
        if name == DEFAULT_ADAPTER or name not in self._extra_specs:
            raise ValueError(_invalid("adapter_name", f"one of the added adapters {list(self._extra_specs)}", name))
        if name == self.active_adapter:
            raise ValueError(f"Adapter {name!r} of layer '{self.name}' is active; activate another one first.")
        owned = [*self._extra_vars.pop(name, ()), *self._init_pairs.pop(name, ())]
        if name in self._magnitudes:
            owned.append(self._magnitudes.pop(name))
        for var in owned:
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
            scaling = _scaling(spec["rank"], spec["alpha"], spec["use_rslora"])
            update = self._lora_apply(lora_in, a, b, scaling)
            if spec["use_dora"]:
                # PEFT's result_dora: (m/n - 1) * x W + (m/n) * s (x A) B, n held constant.
                norm = dora.weight_norm(self._to_lora_layout(self._norm_kernel()), a, b, scaling, len(self._lora_shapes[0]))
                scale = self._broadcast_out(dora.magnitude_scale(self._magnitudes[self.active_adapter], norm))
                base = outputs if lora_in is inputs else self._base_call(lora_in)  # dropout: x W again, as PEFT
                outputs = dora.add_update(outputs, base, update, scale)
            else:
                outputs = outputs + update
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
            use_dora=self.use_dora,
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
