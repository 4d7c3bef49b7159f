"""Traced functions, optimizers, loss scaling, variable copies, Keras' call context. (Part of `tf_lora._compat`: private Keras / TensorFlow APIs.)"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Iterator, List

import keras


TRACED_FUNCTIONS = ("train_function", "test_function", "predict_function", "generate_function")


def reset_traced_functions(model) -> None:
    for name in TRACED_FUNCTIONS:
        if getattr(model, name, None) is not None:
            object.__setattr__(model, name, None)


def optimizer_variables(optimizer) -> List["keras.Variable"]:
    """The model variables a built optimizer holds state for."""
    return list(getattr(optimizer, "_trainable_variables", []))


def averages_replica_gradients() -> bool:
    """Whether this Keras's TF trainer scales the loss by 1/replicas under tf.distribute
    (Keras >= 3.8), so that the all-reduced (summed) gradients are the global batch's mean.
    Keras 3.5-3.7 do not: every multi-replica `fit` there steps with replicas x the gradient."""
    try:
        from keras.src.losses import loss as loss_module
    except ImportError:  # pragma: no cover
        return False
    return hasattr(loss_module, "scale_loss_for_distribution")


def unscale_loss(loss):
    """The loss as reported (Keras scales it by 1/replicas for distribution)."""
    try:
        from keras.src.losses import loss as loss_module

        return loss_module.unscale_loss_for_distribution(loss)
    except (ImportError, AttributeError):  # pragma: no cover
        return loss


def is_framework_tensor(obj) -> bool:
    """A TensorFlow tensor or variable (copied by its own deepcopy, not traversed)."""
    import tensorflow as tf

    return isinstance(obj, (tf.Tensor, tf.Variable))


def is_distribution_strategy(obj) -> bool:
    """A `tf.distribute.Strategy` (shared by a copied model, never copied)."""
    import tensorflow as tf

    return isinstance(obj, tf.distribute.Strategy)


def is_traced_function(obj) -> bool:
    """A `tf.function` (or one of its concrete functions / graphs): a cache that
    captures the variables it was traced with, never copied."""
    import tensorflow as tf

    kinds = (tf.types.experimental.PolymorphicFunction, tf.types.experimental.ConcreteFunction)
    return isinstance(obj, kinds) or type(obj).__name__ == "FuncGraph"


def remap_tracked_ids(obj, memo) -> None:
    """A copied layer's tracker remembers the ids of the objects it tracks; point
    them at the copies (`memo` maps an original's id to its copy)."""
    tracker = obj.__dict__.get("_tracker")
    stored = getattr(tracker, "stored_ids", None)
    if isinstance(stored, dict):
        for key, ids in stored.items():
            stored[key] = {id(memo[i]) if i in memo else i for i in ids}


def copy_variable(variable) -> "keras.Variable":
    """A new variable with `variable`'s value and settings, created the normal way
    (so inside a `tf.distribute` strategy scope it is a distributed variable)."""
    kwargs = dict(dtype=variable.dtype, trainable=variable.trainable, autocast=getattr(variable, "_autocast", True),
                  aggregation=variable.aggregation, name=variable.name)
    if "synchronization" in inspect.signature(keras.Variable.__init__).parameters:  # Keras >= 3.6
        kwargs["synchronization"] = getattr(variable, "synchronization", "auto")
    new = keras.Variable(initializer=keras.ops.convert_to_tensor(variable), **kwargs)
    new._path = variable.path  # keep the layer-scoped path ("query/kernel")
    for attr in ("_regularizer", "_constraint", "_overwrite_with_gradient"):
        if attr in variable.__dict__:
            setattr(new, attr, variable.__dict__[attr])
    return new


def optimizer_variable_index(optimizer, variable) -> int:
    """The slot index a built Keras optimizer gives `variable` (a Keras or backend variable)."""
    return optimizer._get_variable_index(variable)


def optimizer_uses_weight_decay(optimizer, variable) -> bool:
    """Whether `optimizer`'s decoupled weight decay applies to `variable` (exclusions honoured)."""
    return optimizer.weight_decay is not None and optimizer._use_weight_decay(variable)


def copy_weight_decay_exclusions(source, target) -> None:
    """Gives `target` the `exclude_from_weight_decay` settings of `source` (not part of an
    optimizer's config; Keras keeps them in private attributes whose names vary by version)."""
    for key, value in list(vars(source).items()):
        if key.startswith("_exclude_from_weight_decay"):
            setattr(target, key, copy.copy(value))


def unscaled_value(value):
    """A Keras variable's value in its own dtype, also inside a mixed-precision layer call
    (where Keras reads float variables in the compute dtype); anything else as is."""
    if not isinstance(value, keras.Variable):
        return value
    from keras.src.backend.common import global_state

    scope = global_state.get_global_attribute("autocast_scope")
    if scope is None:
        return value.value
    global_state.set_global_attribute("autocast_scope", None)
    try:
        return value.value
    finally:
        global_state.set_global_attribute("autocast_scope", scope)


def gradient_tape_recording() -> bool:
    """Whether a gradient tape may record operations now (in a train step, eager or traced)."""
    try:
        from tensorflow.python.eager import tape as tape_lib

        return bool(tape_lib.could_possibly_record())
    except (ImportError, AttributeError):  # pragma: no cover - assume training
        return True


_CALL_STATE = ("current_call_ctx", "autocast_scope")


def current_call_state() -> tuple:
    """What a layer call in progress passes to nested layers implicitly, through Keras'
    global state: its call context (`training` and other propagated arguments; None
    outside a call) and its autocast scope (mixed precision: variables read in the
    compute dtype)."""
    from keras.src.backend.common import global_state

    return tuple(global_state.get_global_attribute(key) for key in _CALL_STATE)


@contextlib.contextmanager
def call_state(state: tuple) -> Iterator[None]:
    """Runs the body with the state `current_call_state` returned (restored afterwards)."""
    from keras.src.backend.common import global_state

    previous = current_call_state()
    for key, value in zip(_CALL_STATE, state):
        global_state.set_global_attribute(key, value)
    try:
        yield
    finally:
        for key, value in zip(_CALL_STATE, previous):
            global_state.set_global_attribute(key, value)


# -- Keras's TF trainer under tf.distribute (keras-team/keras#20585) ------------------------
# Keras 3.0-3.15's TF trainer fails under MultiWorkerMirroredStrategy for every model:
# (a) `_maybe_symbolic_build` reduces the first (distributed) data batch across replicas,
#     which raises "Attempt to convert a value (PerReplica ...)";
# (b) its train/test functions reduce the step's outputs across workers with
#     `strategy.reduce("MEAN", v, axis=0)`, which raises on 0-d metric results (and would
#     average a vector metric's entries). The single-worker path averages over replicas only.
# `MultiWorkerTrainer` fixes both for the classes that inherit it (every adapted model) and
# leaves Keras itself, and so every other model in the process, as it is.
