"""`LoRALayer`'s frozen base weights: adopting the adapted layer's own variables, and its
regularizers and constraints (the part of `tf_lora.layers.base.LoRALayer` that concerns
the base weights rather than the adapters)."""

from __future__ import annotations

import contextlib
import contextvars

import keras
from keras import ops

from tf_lora import _compat
from tf_lora.layers.spec import BASE_REWRITING_INITS

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


class BaseWeightsMixin:
    """Regularizers, constraints and adoption of the base weights; mixed into `LoRALayer`."""

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
