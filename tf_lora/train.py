"""`LoRAModel`: a Functional Keras model whose training touches only adapters.

Its `train_step` differentiates exactly the variables whose own name starts
with ``lora_`` plus the variables of `modules_to_save`; every other variable is
marked non-trainable, so the optimizer builds state for the adapters alone and
`model.summary()` reports the true trainable count.
"""

from __future__ import annotations

from typing import List, Optional

import keras
import tensorflow as tf

from tf_lora.config import LoRAConfig, matches


def _walk(model):
    from tf_lora.adapt import walk

    return walk(model)


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAModel(keras.Model):
    """The model `tf_lora.adapt` returns; use it like any Keras model.

    Args:
        inputs, outputs: As for a Functional `keras.Model`.
        lora_config: The `LoRAConfig` (or its dict) the adapters were made with.

    Example:
        >>> model = tf_lora.adapt(base, tf_lora.LoRAConfig())  # doctest: +SKIP
        >>> model.compile("adam", "mse"); model.fit(x, y)       # doctest: +SKIP
    """

    # The signature must stay Functional's (inputs, outputs, name, **kwargs) so
    # Keras serializes this class as a Functional model.
    def __init__(self, inputs, outputs, name=None, **kwargs):
        lora_config = kwargs.pop("lora_config", None)
        nested_adapters = kwargs.pop("nested_adapters", None)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        if nested_adapters:
            self._restore_nested_adapters(nested_adapters)
        if lora_config is None:
            lora_config = LoRAConfig()
        elif not isinstance(lora_config, LoRAConfig):
            lora_config = LoRAConfig.from_dict(lora_config)
        self._lora_config = lora_config
        self._freeze()

    @property
    def lora_config(self) -> LoRAConfig:
        return self._lora_config

    def modules_to_save_layers(self) -> List[keras.layers.Layer]:
        """The layers trained fully (matched by `modules_to_save`)."""
        selector = self._lora_config.modules_to_save
        if not selector:
            return []
        return [layer for path, layer, _ in _walk(self) if matches(selector, layer.name, path)]

    def _freeze(self) -> None:
        saved = {id(v) for layer in self.modules_to_save_layers() for v in layer.weights}
        for v in self.weights:
            v.trainable = v.name.startswith("lora_") or id(v) in saved

    @property
    def lora_variables(self) -> List[keras.Variable]:
        """The variables `fit` updates: `lora_*` and those of `modules_to_save`."""
        saved = {id(v) for layer in self.modules_to_save_layers() for v in layer.weights}
        return [v for v in self.weights if v.name.startswith("lora_") or id(v) in saved]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = [v for v in self.trainable_variables if v.name.startswith("lora_") or v in self._saved_set()]
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                _unscale(loss),
                sample_weight=tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0],
            )
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        if variables:
            grads = tape.gradient(loss, variables)
            self.optimizer.apply_gradients(zip(grads, variables))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _saved_set(self):
        cached = getattr(self, "_saved_cache", None)
        if cached is None:
            cached = _IdSet(v for layer in self.modules_to_save_layers() for v in layer.weights)
            object.__setattr__(self, "_saved_cache", cached)
        return cached

    def get_layer(self, name=None, index=None):
        """Like `keras.Model.get_layer`, and also finds nested layers by path
        (``model.get_layer("mha/query")``)."""
        if name is not None and "/" in name:
            for path, layer, _ in _walk(self):
                if path == name:
                    return layer
        return super().get_layer(name=name, index=index)

    def _nested_adapters(self) -> dict:
        from tf_lora.adapt import is_graph_model
        from tf_lora.layers.lora import LoRALayer

        return {
            path: keras.saving.serialize_keras_object(layer)
            for path, layer, parent in _walk(self)
            if isinstance(layer, LoRALayer) and not is_graph_model(parent)
        }

    def _restore_nested_adapters(self, nested: dict) -> None:
        """Re-creates adapters inside container layers (e.g. MultiHeadAttention),
        whose own configs only describe plain projections; weights are loaded
        afterwards by Keras."""
        from tf_lora.adapt import replace_sublayer
        from tf_lora.layers.lora import LoRALayer

        found = {path: (layer, parent) for path, layer, parent in _walk(self)}
        for path, layer_config in nested.items():
            if path not in found:
                raise ValueError(f"Cannot restore adapter '{path}': no such layer in the model.")
            layer, parent = found[path]
            if isinstance(layer, LoRALayer):
                continue
            adapter = keras.saving.deserialize_keras_object(layer_config)
            if not adapter.built:
                adapter.build_like(layer)
            replace_sublayer(parent, layer, adapter)

    def get_config(self):
        config = super().get_config()
        config["lora_config"] = self._lora_config.to_dict()
        config["nested_adapters"] = self._nested_adapters()
        return config


class _IdSet:
    """Membership by identity (Keras variables overload ==)."""

    def __init__(self, items):
        self._ids = {id(v) for v in items}

    def __contains__(self, item):
        return id(item) in self._ids


def _unscale(loss):
    try:
        from keras.src.losses import loss as loss_module

        return loss_module.unscale_loss_for_distribution(loss)
    except (ImportError, AttributeError):  # pragma: no cover
        return loss
