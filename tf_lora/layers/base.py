"""The adapter-layer base class: rank, scaling, several named adapters, merge.

`LoRALayer` holds what every adapter layer shares; `layers/lora.py` (float
base) and `layers/qlora.py` (NF4 base) build on it. Subclasses create the
frozen base weights in `build`, call `_build_lora` with the kernel's
input-side and output-side shapes, and implement `_base_call`, `_lora_apply`
and `base_kernel_value`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Optional, Sequence

import keras
import numpy as np
from keras import ops

from tf_lora import _compat, variants
from tf_lora.layers import dora

_INITS = ("he_uniform", "gaussian", "pissa", "olora", "loftq")
BASE_REWRITING_INITS = ("pissa", "olora", "loftq")  # the frozen base becomes a residual
DEFAULT_ADAPTER = "default"
# Constructor arguments copied from the adapted layer and handed back by to_base_layer.
_WEIGHT_OPTIONS = ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                   "kernel_constraint", "bias_constraint")
# The frozen base weights an adapter may adopt from the layer it is built from: the names
# under which both the Keras layer and the adapter hold them (and create them in `build`).
_BASE_WEIGHTS = ("kernel", "bias", "embeddings", "reverse_embeddings")
# The ids of the layers whose adapters adopt their base weights (`adopting_base_weights`).
_ADOPTING: contextvars.ContextVar = contextvars.ContextVar("tf_lora_adopting", default=frozenset())


@contextlib.contextmanager
def adopting_base_weights(layer):
    """Inside, an adapter that `from_layer` builds from `layer` adopts `layer`'s base
    weights (kernel or embeddings table, bias, an untied `reverse_embeddings`): the very
    variables become the adapter's frozen base, with no new variable and no copy of the
    values (`LoRALayer.add_weight`). A variable whose shape, dtype or autocast differs from
    what the adapter would create, and every base weight under a base-rewriting init
    (pissa/olora/loftq, which would overwrite `layer`'s values), is copied as outside.

    Adopting changes the variables' settings to the adapter's (``trainable=False``, no
    regularizer, the adapter's constraint); the caller records and restores them if the
    adapter is dropped. It is for replacing `layer` in place (`adapt(inplace=True)`); a
    copied model shares its targets' variables with the original, where adopting them
    would let an adapter's `merge()` change the original model.
    """
    token = _ADOPTING.set(_ADOPTING.get() | {id(layer)})
    try:
        yield
    finally:
        _ADOPTING.reset(token)


def _invalid(name: str, expected: str, value: Any) -> str:
    return (
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _adapter_spec(rank=8, alpha=32.0, dropout=0.0, use_rslora=False, lora_init="he_uniform",
                  use_dora=False) -> dict:
    """Validated hyper-parameters of one adapter."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(_invalid("rank", "a positive integer", rank))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(_invalid("alpha", "a positive number", alpha))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(_invalid("dropout", "a float in [0, 1)", dropout))
    if lora_init not in _INITS:
        raise ValueError(_invalid("lora_init", f"one of {_INITS}", lora_init))
    if not isinstance(use_dora, bool):
        raise TypeError(_invalid("use_dora", "a bool", use_dora))
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout),
            "use_rslora": bool(use_rslora), "lora_init": lora_init, "use_dora": use_dora}


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

    # -- DoRA magnitude and base-rewriting inits ----------------------------
    def reset_magnitude(self, name: Optional[str] = None) -> None:
        """Sets DoRA's ``lora_magnitude`` of adapter `name` (default: the active one) to
        ``||W + s A B||``, so that the layer's outputs equal those without DoRA."""
        name = self.active_adapter if name is None else name
        to_lora = lambda k: np.asarray(self._to_lora_layout(k))  # noqa: E731
        norm = dora.np_weight_norm(to_lora(self.base_kernel_value()), to_lora(self.lora_delta(name)),
                                   len(self._lora_shapes[0]))
        self._magnitudes[name].assign(norm)

    def _store_base(self, kernel: np.ndarray) -> None:
        """Replaces the frozen base kernel (QLoRA layers quantize it)."""
        self.kernel.assign(kernel)

    _quant_dequant = None  # QLoRA layers: kernel -> dequantize(quantize(kernel)), what LoftQ alternates with

    def _init_from_source(self, kernel: Any, loftq_iter: int = 1) -> None:
        """Called by `from_layer` once the base is copied: applies a base-rewriting init
        of the default adapter from the source's float `kernel`, then sets the DoRA
        magnitudes to the norm of the adapted kernel."""
        if self.lora_init in BASE_REWRITING_INITS:
            self._rewrite_base(np.asarray(ops.convert_to_numpy(kernel), np.float32), loftq_iter)
        for name in self._magnitudes:
            self.reset_magnitude(name)

    @staticmethod
    def check_rewrite_rank(rank: int, n_in: int, n_out: int, lora_init: str, where: str) -> None:
        """A base-rewriting init splits the (n_in x n_out) kernel matrix: `rank` <= min(n_in, n_out)."""
        if rank > min(n_in, n_out):
            raise ValueError(_invalid("rank", f"at most {min(n_in, n_out)} for init={lora_init!r} on layer "
                                      f"'{where}' (its kernel is a {n_in} x {n_out} matrix)", rank))

    def _rewrite_base(self, kernel: np.ndarray, loftq_iter: int) -> None:
        (in_shape, out_shape), r = self._lora_shapes, self.rank
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        self.check_rewrite_rank(r, n_in, n_out, self.lora_init, self.name)
        to_mat = lambda k: np.asarray(self._to_lora_layout(k)).reshape(n_in, n_out)  # noqa: E731
        from_mat = lambda m: self._delta_to_kernel_layout(np.reshape(m, in_shape + out_shape))  # noqa: E731
        w = to_mat(kernel)
        if self.lora_init == "loftq":
            if self._quant_dequant is None:
                raise ValueError(_invalid("lora_init", f"'loftq' only on a QLoRA (NF4) layer, not {type(self).__name__}",
                                          self.lora_init))
            residual, a, b = variants.loftq(w, r, self.scaling, lambda m: to_mat(self._quant_dequant(from_mat(m))), loftq_iter)
        else:
            residual, a, b = getattr(variants, self.lora_init)(w, r, self.scaling)
        self._store_base(from_mat(residual))
        a, b = a.reshape(in_shape + (r,)), b.reshape((r,) + out_shape)
        for var, value in zip((self.lora_a, self.lora_b, *self._init_pairs[DEFAULT_ADAPTER]), (a, b, a, b)):
            var.assign(value)

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

    # -- layout hooks (DoRA, inits): "LoRA layout" is (input-side axes..., output-side axes...)
    def _to_lora_layout(self, kernel):
        """The kernel (tensor or array) permuted to LoRA layout (a Dense kernel is already)."""
        return kernel

    def _broadcast_out(self, values):
        """`values` shaped like the output-side axes, broadcastable against the outputs."""
        return values

    def _norm_kernel(self):
        """The base kernel DoRA's norm uses, Keras layout (QLoRA: dequantized)."""
        return self.kernel

    def merged_delta(self, name: Optional[str] = None) -> np.ndarray:
        """What a merge adds to the base kernel for adapter `name` (default: the active
        one): `lora_delta`, or with DoRA ``m * (W + dW) / ||W + dW|| - W``."""
        name = self.active_adapter if name is None else name
        delta = self.lora_delta(name)
        magnitude = self._magnitudes.get(name) if name is not None else None
        if magnitude is None:
            return delta
        kernel = self.base_kernel_value()
        to_lora = lambda k: np.asarray(self._to_lora_layout(k))  # noqa: E731
        merged = dora.np_dora_kernel(to_lora(kernel), to_lora(delta), ops.convert_to_numpy(magnitude), len(self._lora_shapes[0]))
        return self._delta_to_kernel_layout(merged) - kernel

    def merged_kernel(self) -> np.ndarray:
        """The kernel a plain layer needs to give this layer's outputs."""
        kernel = self.base_kernel_value()
        return kernel if self.merged or self.active_adapter is None else kernel + self.merged_delta()

    def merge(self) -> None:
        """Folds the active adapter into the frozen kernel: ``scaling * lora_a @ lora_b``,
        or with DoRA the whole ``m * (W + s A B) / ||W + s A B||``."""
        if self.merged:
            raise ValueError(f"Layer '{self.name}' is already merged; call unmerge() first.")
        if self.active_adapter is None:
            raise ValueError(f"Layer '{self.name}' has no active adapter to merge.")
        if self.adapter_magnitude() is not None:
            kernel, delta = self.base_kernel_value(), self.lora_delta()
            norm = dora.np_weight_norm(np.asarray(self._to_lora_layout(kernel)), np.asarray(self._to_lora_layout(delta)),
                                       len(self._lora_shapes[0]))
            object.__setattr__(self, "_dora_merge_norm", norm)
        self.kernel.assign(self.base_kernel_value() + self.merged_delta())
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
        magnitude = self.adapter_magnitude()
        if magnitude is None:
            self.kernel.assign(self.base_kernel_value() - self.lora_delta())
        elif self._dora_merge_norm is None:
            raise NotImplementedError(
                f"Cannot unmerge DoRA layer '{self.name}': the norm ||W + s*A@B|| it was merged with is not "
                "known in this process (merged elsewhere, then saved); rebuild it from the unmerged model.")
        else:  # W = W' * n / m - s A B, with the norm n kept from merge()
            m = ops.convert_to_numpy(magnitude).astype(np.float64)
            ratio = np.where(m != 0, self._dora_merge_norm / np.where(m != 0, m, 1.0), 0.0)
            total = np.asarray(self._to_lora_layout(self.base_kernel_value())) * ratio
            self.kernel.assign(self._delta_to_kernel_layout(total.astype(np.float32)) - self.lora_delta())
            object.__setattr__(self, "_dora_merge_norm", None)
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

    @contextlib.contextmanager
    def _adopting(self, layer):
        """Wraps `from_layer`'s `build` of this adapter from `layer`: inside
        `adopting_base_weights(layer)`, and unless this adapter's init rewrites the base,
        `add_weight` adopts `layer`'s own base variable of each name it creates."""
        sources = {}
        if id(layer) in _ADOPTING.get() and self.lora_init not in BASE_REWRITING_INITS:
            owned = {id(v) for v in _compat.own_variables(layer)}
            sources = {name: v for name in _BASE_WEIGHTS
                       if isinstance(v := getattr(layer, name, None), keras.Variable) and id(v) in owned}
        self.__dict__["_adopt_sources"] = sources
        try:
            yield
        finally:
            self.__dict__.pop("_adopt_sources", None)

    def add_weight(self, *args, **kwargs):
        """Keras' `add_weight`, except while `from_layer` adopts a source layer's base
        weights (`_adopting`): then a weight of that name is the source's variable itself,
        when it fits (`_compat.adopt_variable`)."""
        sources = self.__dict__.get("_adopt_sources")
        source = sources.pop(kwargs.get("name"), None) if sources and not args else None
        if source is not None:
            options = {k: kwargs[k] for k in ("trainable", "autocast", "regularizer", "constraint") if k in kwargs}
            dtype = kwargs.get("dtype") or self.variable_dtype
            if _compat.adopt_variable(self, source, shape=kwargs.get("shape") or (), dtype=dtype, **options):
                return source
        return super().add_weight(*args, **kwargs)

    @staticmethod
    def _copy_weight(target, source) -> None:
        """Gives `target` the value of `source`, unless it is `source` (adopted)."""
        if target is not source:
            target.assign(ops.convert_to_numpy(source))

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
