"""LoRA+ (Hayou, Ghosh and Yu, 2024): a larger learning rate for the B factors.

`loraplus_optimizer(optimizer, lr_ratio)` returns an optimizer of the same Keras class
and configuration whose update of every ``lora_b*`` variable uses learning rate
``lr * lr_ratio``; every other variable is updated exactly as `optimizer` would. It is
a per-variable learning rate inside the optimizer's own update rule, not a gradient
scale: Adam-type updates ignore the scale of the gradient, so scaling gradients is not
LoRA+.
"""

from __future__ import annotations

from typing import Dict

import keras
from keras import ops

from tf_lora import _compat

_CLASSES: Dict[type, type] = {}


def _is_lora_b(variable) -> bool:
    # Keras variables carry the layer's own name ("lora_b", "lora_b_<adapter>"); under
    # TensorFlow the backend variable's name is the path plus ":0", so use the last part.
    name = str(getattr(variable, "name", "")).split("/")[-1].split(":")[0]
    return name == "lora_b" or name.startswith("lora_b_")


class _LoraPlus:
    """Mixin over a Keras optimizer class: ``lr * lr_ratio`` for ``lora_b*`` variables."""

    def __init__(self, *args, lr_ratio: float = 16.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_ratio = float(lr_ratio)
        self._loraplus = {}  # variable index -> whether its decay is applied here

    def build(self, variables):
        plus = [v for v in variables if _is_lora_b(v)]
        # Decoupled weight decay of the B factors is applied in update_step at lr * lr_ratio
        # (as PEFT's parameter groups do with torch's AdamW), so Keras' own pass skips them.
        decayed = [_compat.optimizer_uses_weight_decay(self, v) for v in plus]
        if plus and self.weight_decay is not None:
            # Keras' exclude_from_weight_decay replaces the exclusions set before (by the user,
            # or copied from the wrapped optimizer): pass those again, resolved to variables.
            kept = [v for v in variables if not _is_lora_b(v) and not _compat.optimizer_uses_weight_decay(self, v)]
            self.exclude_from_weight_decay(var_list=kept + plus)
        super().build(variables)
        self._loraplus = {_compat.optimizer_variable_index(self, v): d for v, d in zip(plus, decayed)}

    def update_step(self, gradient, variable, learning_rate):
        index = _compat.optimizer_variable_index(self, variable)
        if index in self._loraplus:
            learning_rate = ops.multiply(ops.cast(learning_rate, variable.dtype), self.lr_ratio)
            if self._loraplus[index]:
                variable.assign(variable - variable * ops.cast(self.weight_decay, variable.dtype) * learning_rate)
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["lr_ratio"] = self.lr_ratio
        return config


def _loraplus_class(cls: type) -> type:
    if cls not in _CLASSES:
        new = type(f"LoraPlus{cls.__name__}", (_LoraPlus, cls), {
            "__doc__": f"`keras.optimizers.{cls.__name__}` with LoRA+ learning rates (tf_lora.loraplus_optimizer).",
            "__module__": __name__,
        })
        _CLASSES[cls] = keras.saving.register_keras_serializable(package="tf_lora")(new)
    return _CLASSES[cls]


for _name in ("SGD", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "Ftrl",
              "Lion", "Lamb", "Muon"):
    if hasattr(keras.optimizers, _name):  # registered at import: a saved model loads in a fresh process
        _loraplus_class(getattr(keras.optimizers, _name))


def loraplus_optimizer(optimizer: keras.optimizers.Optimizer, lr_ratio: float = 16.0) -> keras.optimizers.Optimizer:
    """A copy of `optimizer` that trains ``lora_b*`` variables at ``lr_ratio`` times its learning rate.

    LoRA+ (Hayou et al., 2024): B's learning rate is `lr_ratio` (the paper's λ, 16 by
    default as in PEFT's `create_loraplus_optimizer`) times A's. The result has
    `optimizer`'s class (as a registered subclass ``LoraPlus<Class>``) and configuration,
    learning-rate schedules and `gradient_accumulation_steps` included; decoupled weight
    decay of the B factors uses the raised rate too, as with PEFT's parameter groups.
    Weight-decay exclusions (`exclude_from_weight_decay`) set on `optimizer` are copied,
    and those set on the result before it is built are kept: an excluded variable (a
    ``lora_b`` one too) is never decayed.
    Unlike PEFT's helper, tf_lora does not raise the learning rate of 1-D parameters
    (biases, norms in `modules_to_save`) or give embeddings their own rate: only
    ``lora_b*`` variables change. Use it for `compile`:

    Args:
        optimizer: an unbuilt Keras optimizer instance (its configuration is copied).
        lr_ratio: B's learning rate divided by A's, > 0.

    Returns:
        A new, unbuilt optimizer. It serializes with the model (``.keras`` files load in a
        fresh process after ``import tf_lora``); for your own optimizer class, call
        `loraplus_optimizer` once with it before loading so its subclass is registered.

    Example:
        >>> model.compile(optimizer=loraplus_optimizer(keras.optimizers.AdamW(2e-4), lr_ratio=16), loss="mse")  # doctest: +SKIP
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(optimizer, type):
        raise TypeError(f"Received an invalid value for `optimizer`, expected a keras.optimizers.Optimizer instance. "
                        f"Received: optimizer={optimizer!r}")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise TypeError("Received a LossScaleOptimizer for `optimizer`; pass its inner optimizer (Keras wraps the "
                        "result again under a mixed_float16 policy).")
    if isinstance(optimizer, _LoraPlus):
        raise ValueError("Received an invalid value for `optimizer`: it is already a LoRA+ optimizer.")
    if optimizer.built:
        raise ValueError("Received an invalid value for `optimizer`, expected an optimizer that is not built yet "
                         "(it is copied from its configuration).")
    if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, (int, float)) or not lr_ratio > 0 or lr_ratio == float("inf"):
        raise ValueError(f"Received an invalid value for `lr_ratio`, expected a finite number > 0. Received: lr_ratio={lr_ratio!r}")
    cls = _loraplus_class(type(optimizer))
    new = cls.from_config({**optimizer.get_config(), "lr_ratio": float(lr_ratio)})
    _compat.copy_weight_decay_exclusions(optimizer, new)  # not part of an optimizer's config
    return new
