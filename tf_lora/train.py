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
        adapter_configs = kwargs.pop("adapter_configs", None) or {}
        active_adapter = kwargs.pop("active_adapter", "default")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        if nested_adapters:
            self._restore_nested_adapters(nested_adapters)
        if lora_config is None:
            lora_config = LoRAConfig()
        elif not isinstance(lora_config, LoRAConfig):
            lora_config = LoRAConfig.from_dict(lora_config)
        self._lora_config = lora_config
        # Configs of adapters added with tf_lora.add_adapter (plain dict, not tracked).
        object.__setattr__(self, "_adapter_configs", {
            name: c if isinstance(c, LoRAConfig) else LoRAConfig.from_dict(c) for name, c in adapter_configs.items()
        })
        object.__setattr__(self, "_active_adapter", active_adapter)
        self._freeze()

    @property
    def active_adapter(self):
        """Name of the adapter the model uses now (`None` inside `disable_adapter`)."""
        return self._active_adapter

    def adapter_config(self, name: str) -> LoRAConfig:
        """The `LoRAConfig` adapter `name` was created with."""
        if name == "default":
            return self._lora_config
        if name not in self._adapter_configs:
            raise ValueError(f"Received an invalid value for `adapter_name`, expected one of "
                             f"{['default', *self._adapter_configs]}. Received: adapter_name={name!r}")
        return self._adapter_configs[name]

    @property
    def adapter_names(self) -> List[str]:
        return ["default", *self._adapter_configs]

    def adapter_layers(self):
        """``[(path, layer)]`` of every tf_lora adapter layer in the model."""
        from tf_lora.layers.lora import LoRALayer

        return [(p, l) for p, l, _ in _walk(self) if isinstance(l, LoRALayer)]

    def _train_ids(self) -> set:
        ids = {id(v) for layer in self.modules_to_save_layers() for v in layer.weights}
        for _, layer in self.adapter_layers():
            ids.update(id(v) for v in layer.active_variables())
        return ids

    def reset_compiled_functions(self) -> None:
        """Forgets traced train/test/predict functions (the active adapter is a
        Python-level choice baked into them)."""
        self.train_function = self.test_function = self.predict_function = None
        object.__setattr__(self, "_saved_cache", None)

    def fit(self, *args, **kwargs):
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and optimizer.built:
            known = {id(v) for v in optimizer._trainable_variables}
            unknown = [v.path for v in self.lora_variables if id(v) not in known]
            if unknown:
                raise ValueError(
                    f"The optimizer was built for other variables than the active adapter's "
                    f"(e.g. {unknown[:3]}); call model.compile(...) again after add_adapter/set_adapter."
                )
        return super().fit(*args, **kwargs)

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
        train = self._train_ids()
        for v in self.weights:
            v.trainable = id(v) in train

    @property
    def lora_variables(self) -> List[keras.Variable]:
        """The variables `fit` updates: the active adapter's `lora_*` variables
        and those of `modules_to_save`."""
        train = self._train_ids()
        return [v for v in self.weights if id(v) in train]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = [v for v in self.trainable_variables if v in self._train_set()]
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

    def _train_set(self):
        cached = getattr(self, "_saved_cache", None)
        if cached is None:
            cached = _IdSet(v for v in self.lora_variables)
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
        config["adapter_configs"] = {n: c.to_dict() for n, c in self._adapter_configs.items()}
        config["active_adapter"] = self._active_adapter
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
