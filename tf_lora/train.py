"""The adapted-model classes and their trainer: training touches only adapters.

`tf_lora.adapt` returns a model of the input's own class:

- a plain Functional or Sequential model comes back as `LoRAModel`, a
  Functional model with the base model's layers, names and inputs/outputs;
- any other model (a KerasHub Backbone or Task such as `GPT2CausalLM`, any
  subclassed model) comes back as an instance of ``adapted_class(type(model))``,
  a subclass of its own class that adds the adapter bookkeeping below, so
  `generate`, `backbone`, `preprocessor` and `summary` keep working and
  ``isinstance(adapted, type(model))`` holds.

Both share `AdaptedModel`: its `train_step` differentiates exactly the
active adapter's ``lora_*`` variables plus the variables of `modules_to_save`.
Every other layer is frozen the Keras way (``layer.trainable = False``, so a
frozen BatchNormalization runs in inference mode), so the optimizer builds
state for the adapters alone and `summary()` reports the true trainable count.
Both record their adapters in their config, so a `.keras` file restores them.
"""

from __future__ import annotations

from typing import Dict, List

import keras
import tensorflow as tf

from tf_lora import _compat, distribute, surgery
from tf_lora.config import LoRAConfig, matches
from tf_lora.train_support import _graph_rewrites, _IdSet, _Originals


class AdaptedModel(_compat.MultiWorkerTrainer):
    """What every adapted model has on top of its own class (``isinstance(m,
    tf_lora.AdaptedModel)`` tells whether `m` came from `tf_lora.adapt`).

    State (set by `_init_adapted`, not tracked by Keras): the `LoRAConfig` of
    the "default" adapter, the configs of added adapters and the active name.
    """

    #: Grappler options (fields of TensorFlow's ``RewriterConfig``) for this model's train step
    #: only, set per call (TensorFlow's global config is not touched; options the user set
    #: globally win). ``"auto"`` (the default), on machines without an accelerator: one
    #: meta-optimizer iteration instead of two and no memory optimizer, elsewhere TensorFlow's
    #: defaults. On a 2-core CPU, SmolLM2-135M with QLoRA on all linear layers, batch 4 x 256
    #: (~60,000-op step, load ~4, interleaved in one process): first call after tracing 22.8 s
    #: vs 31.7 s with TF's defaults, steady step 7.1 s vs 7.0 s (grappler off: first call
    #: ~8 s, steady 7.9 s). Set ``{}`` on a model (or the class) for TensorFlow's defaults,
    #: ``{"disable_meta_optimizer": True}`` for no graph optimization of the step.
    train_graph_rewrites = "auto"

    # -- state ---------------------------------------------------------------
    def _init_adapted(self, lora_config=None, adapter_configs=None, active_adapter="default") -> None:
        if lora_config is None:
            lora_config = LoRAConfig()
        elif not isinstance(lora_config, LoRAConfig):
            lora_config = LoRAConfig.from_dict(lora_config)
        configs = {n: c if isinstance(c, LoRAConfig) else LoRAConfig.from_dict(c) for n, c in (adapter_configs or {}).items()}
        object.__setattr__(self, "_lora_config", lora_config)
        object.__setattr__(self, "_adapter_configs", configs)
        object.__setattr__(self, "_active_adapter", active_adapter)
        object.__setattr__(self, "_saved_cache", None)
        object.__setattr__(self, "_saved_originals", _Originals(self.modules_to_save_layers()))
        self._freeze()
        if lora_config.gradient_checkpointing:
            from tf_lora.checkpointing import enable_gradient_checkpointing

            enable_gradient_checkpointing(self)
        if lora_config.attention == "chunked":
            from tf_lora.convert import use_chunked_attention

            use_chunked_attention(self, lora_config.max_attention_memory)
        if lora_config.loss == "chunked":
            from tf_lora.loss import use_chunked_loss

            use_chunked_loss(self, lora_config.max_loss_memory)
        from tf_lora.packing import enable_packing, supports_packing

        if supports_packing(self):  # packed batches (segment_ids, positions) reach its decoder blocks
            enable_packing(self)
        self.reset_compiled_functions()

    @property
    def lora_config(self) -> LoRAConfig:
        return self._lora_config

    @property
    def active_adapter(self):
        """Name of the adapter the model uses now (`None` inside `disable_adapter`)."""
        return self._active_adapter

    @property
    def adapter_names(self) -> List[str]:
        return ["default", *self._adapter_configs]

    def adapter_config(self, name: str) -> LoRAConfig:
        """The `LoRAConfig` adapter `name` was created with."""
        if name == "default":
            return self._lora_config
        if name not in self._adapter_configs:
            raise ValueError(f"Received an invalid value for `adapter_name`, expected one of "
                             f"{self.adapter_names}. Received: adapter_name={name!r}")
        return self._adapter_configs[name]

    def adapter_layers(self):
        """``[(path, layer)]`` of every tf_lora adapter layer in the model (each once)."""
        from tf_lora.layers.base import LoRALayer

        seen, found = set(), []
        for path, layer, _ in surgery.walk(self):
            if isinstance(layer, LoRALayer) and id(layer) not in seen:
                seen.add(id(layer))
                found.append((path, layer))
        return found

    def modules_to_save_layers(self) -> List[keras.layers.Layer]:
        """The layers trained fully (matched by `modules_to_save`)."""
        selector = self._lora_config.modules_to_save
        if not selector:
            return []
        return [layer for path, layer, _ in surgery.walk(self) if matches(selector, layer.name, path)]

    def _trained_saved_layers(self) -> List[keras.layers.Layer]:
        # Inside `disable_adapter` (no active adapter) the saved modules hold their frozen originals.
        return self.modules_to_save_layers() if self._active_adapter is not None else []

    def _train_ids(self) -> set:
        ids = {id(v) for layer in self._trained_saved_layers() for v in _compat.created_trainable(layer)}
        for _, layer in self.adapter_layers():
            ids.update(id(v) for v in layer.active_variables())
        return ids

    @property
    def lora_variables(self) -> List[keras.Variable]:
        """The variables `fit` updates: the active adapter's `lora_*` variables
        and those of `modules_to_save`."""
        train = self._train_ids()
        return [v for v in self.weights if id(v) in train]

    def _freeze(self) -> None:
        """Only adapters and `modules_to_save` train; every other layer is frozen
        (``trainable = False``: inference mode, e.g. BatchNorm statistics stay).
        A `modules_to_save` module trains as when trained fully: it and all its
        sublayers are trainable (a BatchNorm in it runs in training mode)."""
        saved = {id(layer) for layer in self._trained_saved_layers()}
        keep = {id(layer) for _, layer in self.adapter_layers()} | saved
        ancestors, inside, stack = set(), set(), []
        for path, layer, _ in surgery.walk(self):
            depth = path.count("/")
            del stack[depth:]
            stack.append(layer)
            if id(layer) in keep:
                ancestors.update(id(a) for a in stack)
            if any(id(a) in saved for a in stack):
                inside.add(id(layer))
        self.trainable = True
        for _, layer, _ in surgery.walk(self):  # parents before children
            layer.trainable = id(layer) in ancestors or id(layer) in inside
        train = self._train_ids()
        for v in self.weights:
            v.trainable = id(v) in train
        object.__setattr__(self, "_saved_cache", None)

    def _use_original_modules(self, original: bool) -> None:
        """Switches the `modules_to_save` to the frozen originals `adapt` found (True) or
        back to the trained modules (False), as PEFT's ModulesToSaveWrapper does when
        adapters are disabled. Raises, changing nothing, where the originals are unknown."""
        self._saved_originals.switch(original, self.name)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for key, value in self._saved_originals.to_save().items():
            store[key] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        super().load_own_variables({k: store[k] for k in keys if not k.startswith(_Originals.PREFIX)})
        self._saved_originals.load({k: store[k] for k in keys if k.startswith(_Originals.PREFIX)}, self.name)

    def reset_compiled_functions(self) -> None:
        """Forgets traced train/test/predict/generate functions (the active adapter
        is a Python-level choice baked into them)."""
        _compat.reset_traced_functions(self)
        object.__setattr__(self, "_saved_cache", None)

    # -- training --------------------------------------------------------------
    def fit(self, *args, **kwargs):
        distribute.check_fit_strategy(self)
        if not self.lora_variables:
            raise ValueError(
                f"Model {self.name!r} has nothing to train: the active adapter "
                f"{self.active_adapter!r} has no variables and no modules_to_save matched. "
                "Call tf_lora.set_adapter(model, name) or adapt with other target_modules."
            )
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and optimizer.built:
            known = {id(v) for v in _compat.optimizer_variables(optimizer)}
            unknown = [v.path for v in self.lora_variables if id(v) not in known]
            if unknown:
                raise ValueError(
                    f"The optimizer was built for other variables than the active adapter's "
                    f"(e.g. {unknown[:3]}); call model.compile(...) again after add_adapter/set_adapter."
                )
        return super().fit(*args, **kwargs)

    def make_train_function(self, force=False):
        # Build the optimizer's state (moments, iterations) now, eagerly, for exactly the variables
        # `train_step` updates. Left to `apply_gradients`, it is created inside the first trace,
        # and a `tf.function` that creates variables on its first call is traced a second time:
        # for SmolLM2-135M with QLoRA on all 210 linear layers, twice ~60,000 ops (issue 23).
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built and not self.run_eagerly:
            with self.distribute_strategy.scope():
                optimizer.build(self.lora_variables)
        super().make_train_function(force=force)
        function, rewrites = self.train_function, _graph_rewrites(self.train_graph_rewrites)
        if rewrites and function is not None and getattr(function, "_tf_lora_rewrites", None) != rewrites:
            def train_function(*args, **kwargs):
                with _compat.graph_rewrites(rewrites):
                    return function(*args, **kwargs)

            train_function._tf_lora_rewrites = rewrites
            object.__setattr__(self, "train_function", train_function)
        return self.train_function

    def _train_set(self):
        cached = getattr(self, "_saved_cache", None)
        if cached is None:
            cached = _IdSet(self.lora_variables)
            object.__setattr__(self, "_saved_cache", cached)
        return cached

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = [v for v in self.trainable_variables if v in self._train_set()]
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                _compat.unscale_loss(loss),
                sample_weight=tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0],
            )
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return _compat.replica_outputs(self, self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    # -- layers by path, serialization -------------------------------------
    def get_layer(self, name=None, index=None):
        """Like `keras.Model.get_layer`, and also finds nested layers by path
        (``model.get_layer("mha/query")``)."""
        if name is not None and "/" in name:
            layer = surgery.find(self, name)
            if layer is not None:
                return layer
        return super().get_layer(name=name, index=index)

    def _adapter_layer_configs(self, nested_only: bool) -> Dict[str, dict]:
        from tf_lora.layers.base import LoRALayer

        return {
            path: keras.saving.serialize_keras_object(layer)
            for path, layer, parent in surgery.walk(self)
            if isinstance(layer, LoRALayer) and not (nested_only and surgery.is_graph_model(parent))
        }

    def _restore_adapters(self, configs: Dict[str, dict]) -> None:
        """Re-creates adapter layers at their paths (the model's own config only
        describes plain layers there); Keras loads their weights afterwards."""
        from tf_lora.layers.base import LoRALayer

        found = {path: layer for path, layer, _ in surgery.walk(self)}
        missing = sorted(set(configs) - set(found))
        if missing:
            raise ValueError(f"Cannot restore adapters {missing}: no such layers in model {self.name!r}.")
        for path, layer_config in configs.items():
            layer = found[path]
            if isinstance(layer, LoRALayer):
                continue
            with _compat.scope_of(layer):  # the adapter's variables get the layer's paths
                adapter = keras.saving.deserialize_keras_object(layer_config)
                if not adapter.built:
                    adapter.build_like(layer)
            _compat.become(layer, adapter)

    def _adapted_state_config(self, nested_only: bool) -> dict:
        return {
            "lora_config": self._lora_config.to_dict(),
            "nested_adapters": self._adapter_layer_configs(nested_only),
            "adapter_configs": {n: c.to_dict() for n, c in self._adapter_configs.items()},
            "active_adapter": self._active_adapter,
        }


_STATE_KEYS = ("lora_config", "nested_adapters", "adapter_configs", "active_adapter")


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAModel(AdaptedModel, _compat.Functional):
    """The model `tf_lora.adapt` returns for a Functional or Sequential model.

    Args:
        inputs, outputs: As for a Functional `keras.Model`.
        lora_config: The `LoRAConfig` (or its dict) the adapters were made with.

    Example:
        >>> model = tf_lora.adapt(base, tf_lora.LoRAConfig())  # doctest: +SKIP
        >>> model.compile("adam", "mse"); model.fit(x, y)       # doctest: +SKIP
    """

    # Keras serializes this class as a Functional model only if it takes the constructor
    # for Functional's: see _compat.functional_signature.
    @_compat.functional_signature
    def __init__(self, inputs, outputs, name=None, **kwargs):
        state = {k: kwargs.pop(k, None) for k in _STATE_KEYS}
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        if state["nested_adapters"]:
            self._restore_adapters(state["nested_adapters"])
        self._init_adapted(state["lora_config"], state["adapter_configs"], state["active_adapter"] or "default")

    def get_config(self):
        return {**super().get_config(), **self._adapted_state_config(nested_only=True)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras rebuilds the Functional graph; some versions (3.5) drop config keys it does
        # not know instead of passing them to __init__, so the adapter state is applied here.
        config = dict(config)
        state = {k: config.pop(k, None) for k in _STATE_KEYS}
        model = super().from_config(config, custom_objects=custom_objects)
        if state["nested_adapters"]:
            model._restore_adapters(state["nested_adapters"])
        model._init_adapted(state["lora_config"], state["adapter_configs"], state["active_adapter"] or "default")
        return model


class _AdaptedSubclassMixin(AdaptedModel):
    """Serialization of ``adapted_class(cls)``: the base class's own config plus
    the adapters, under one registered name, so `keras.models.load_model`
    restores the adapters in a fresh process (after ``import tf_lora``)."""

    def call(self, *args, **kwargs):
        # A packed batch's segment_ids/positions reach the decoder blocks (tf_lora.packing);
        # a model that cannot read them raises instead of dropping them.
        from tf_lora.packing import packed_call

        return packed_call(self, super().call, *args, **kwargs)

    @classmethod
    def _base_class(cls) -> type:
        return next(c for c in cls.__mro__ if not issubclass(c, (AdaptedModel, _compat.MultiWorkerTrainer)))

    def get_config(self):
        base = self._base_class()
        return {
            "base_model": {
                "module": base.__module__,
                "class_name": base.__name__,
                "registered_name": keras.saving.get_registered_name(base),
                "config": base.get_config(self),
            },
            "tf_lora": self._adapted_state_config(nested_only=False),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        model = keras.saving.deserialize_keras_object(config["base_model"], custom_objects=custom_objects)
        state = dict(config["tf_lora"])
        model.__class__ = adapted_class(type(model))
        model._restore_adapters(state.pop("nested_adapters"))
        model._init_adapted(**state)
        return model


@keras.saving.register_keras_serializable(package="tf_lora", name="AdaptedModel")
class _StandIn(_AdaptedSubclassMixin, keras.Model):
    """Holds the registered name every ``adapted_class(cls)`` serializes under; its
    `from_config` rebuilds the right class from the saved base class."""


_CLASSES: Dict[type, type] = {}


def adapted_class(base: type) -> type:
    """The subclass of `base` that `tf_lora.adapt` gives models of class `base`."""
    if issubclass(base, AdaptedModel):
        return base
    if base is _compat.Functional:
        return LoRAModel
    if base not in _CLASSES:
        cls = type(base.__name__, (_AdaptedSubclassMixin, base), {
            "__module__": __name__,
            "__qualname__": f"adapted_class({base.__qualname__})",
            "__doc__": f"{base.__name__} with tf_lora adapters (see tf_lora.adapt).",
        })
        keras.saving.register_keras_serializable(package="tf_lora", name="AdaptedModel")(cls)
        keras.saving.register_keras_serializable(package="tf_lora", name="AdaptedModel")(_StandIn)
        _CLASSES[base] = cls
    return _CLASSES[base]


def make_adapted(model, lora_config: LoRAConfig) -> None:
    """Turns `model` (whose layers already hold adapters) into its adapted class."""
    model.__class__ = adapted_class(type(model))
    if tf.distribute.has_strategy():  # its new variables belong to this scope's strategy
        _compat.set_model_strategy(model, tf.distribute.get_strategy())
    model._init_adapted(lora_config)
