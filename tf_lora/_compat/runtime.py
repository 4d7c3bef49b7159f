"""Distribution strategies, deferred variable initialization, `generate` functions, per-call graph options. (Part of `tf_lora._compat`: private Keras / TensorFlow APIs.)"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import keras


try:
    from keras.src.backend.tensorflow.trainer import (
        _collective_all_reduce_multi_worker as _keras_reduces_across_workers,
    )
except ImportError:  # pragma: no cover - a Keras without the multi-worker branch

    def _keras_reduces_across_workers(strategy) -> bool:
        return False


def reduces_across_workers(strategy) -> bool:
    """Whether Keras's TF trainer takes its multi-worker branch, i.e. reduces each
    step output `v` with ``strategy.reduce("MEAN", v, axis=0)``."""
    return strategy is not None and bool(_keras_reduces_across_workers(strategy))


def replica_outputs(model, outputs):
    """A train/test step's outputs, shaped for Keras's cross-replica reduction.

    Under the multi-worker branch each value gets a leading axis of length 1, so
    Keras's ``reduce("MEAN", v, axis=0)`` is the mean over replicas of `v` itself
    (``axis=None``: the single-worker semantics) and keeps `v`'s shape. Elsewhere
    the outputs are returned unchanged.
    """
    if not reduces_across_workers(model.distribute_strategy):
        return outputs
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), outputs)


def local_replica_batch(strategy, batch):
    """This worker's first replica's part of a (distributed) data batch: what the
    symbolic build needs (shapes and dtypes), with no cross-replica communication."""
    import tensorflow as tf

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


class MultiWorkerTrainer:
    """Overrides of Keras's TF trainer internals for data-parallel training under any
    `tf.distribute` strategy, MultiWorkerMirroredStrategy included (see above).
    Inherited by `tf_lora.AdaptedModel`; Keras's own classes are not touched."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras reads the first batch and reduces it across replicas ("MEAN"): under
        # MultiWorkerMirroredStrategy that raises. The build only needs shapes and
        # dtypes, so read the local replica's part instead.
        if iterator is not None and data_batch is None and getattr(self, "_distribute_strategy", None) is not None:
            # Keras 3.15 iterates the epoch iterator itself; Keras 3.5 through enumerate_epoch().
            batches = iterator.enumerate_epoch() if hasattr(iterator, "enumerate_epoch") else iterator
            for item in batches:
                data_batch = local_replica_batch(self.distribute_strategy, next(item[-1]))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def test_step(self, data):
        return replica_outputs(self, super().test_step(data))


def set_model_strategy(model, strategy) -> None:
    """Records `strategy` as the one `model` trains under (Keras's TF trainer keeps
    it from the model's construction; a model rebuilt by class swap or copy needs it set)."""
    object.__setattr__(model, "_distribute_strategy", strategy)


def model_strategy(model):
    """The strategy `model` was created under (None: none, so the ambient one)."""
    return model.__dict__.get("_distribute_strategy")


def redirect_backup(callback, folder: str) -> None:
    """Points a `keras.callbacks.BackupAndRestore` at `folder` for its writes: its
    file paths are private attributes derived from `backup_dir` in `__init__`, so
    they are taken from a callback made for `folder` (whatever this Keras names them)."""
    fresh = keras.callbacks.BackupAndRestore(folder)
    for name, value in vars(fresh).items():
        if isinstance(value, str) and (value == folder or value.startswith(folder.rstrip("/\\"))):
            setattr(callback, name, value)


def reduced_precision_float32() -> bool:
    """Whether float32 matmuls and convolutions may run in reduced precision here
    (TensorFlow's TF32 execution, on by default, on a visible GPU)."""
    import tensorflow as tf

    try:
        return bool(tf.config.experimental.is_tensor_float_32_execution_enabled()
                    and tf.config.list_logical_devices("GPU"))
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def set_initial_epoch(model, epoch) -> None:
    """Makes the `fit` in progress start at `epoch`, as Keras' own `BackupAndRestore`
    does from `on_train_begin` (the trainer reads ``_initial_epoch`` after that hook);
    None gives later `fit` calls their own `initial_epoch` back."""
    model._initial_epoch = None if epoch is None else int(epoch)


@contextlib.contextmanager
def deferred_variables() -> Iterator[None]:
    """Variables created inside stay uninitialized (no memory, no random draws) until
    `initialize_variable` gives each its first value: Keras' `StatelessScope` defers them
    (`initialize_variables=False` leaves them pending on exit)."""
    with keras.StatelessScope(initialize_variables=False):
        yield


def initialize_variable(variable, value) -> None:
    """Gives a variable created under `deferred_variables` its first value (``Variable._initialize``)."""
    variable._initialize(keras.ops.cast(value, variable.dtype))


def forget_deferred(variables) -> None:
    """Drops `variables` from Keras' list of variables pending initialization, so that no later
    `StatelessScope` initializes them (again) with their initializers."""
    from keras.src.backend.common import global_state

    ids = {id(v) for v in variables}
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    global_state.set_global_attribute("uninitialized_variables", [v for v in pending if id(v) not in ids])


def defer_value(variable, compute) -> None:
    """Makes a variable still uninitialized under `deferred_variables` read as ``compute()`` without
    storing it: Keras reads an uninitialized variable through its initializer."""
    variable._initializer = lambda shape=None, dtype=None: compute()


def is_initialized(variable) -> bool:
    """Whether a Keras variable holds a value (False while deferred)."""
    return getattr(variable, "_value", None) is not None


def wrap_generate_functions(scope) -> None:
    """Makes every KerasHub `CausalLM`'s generate function run (and trace) inside ``scope()``.

    KerasHub 0.32 builds ``self.generate_function`` (one batch: prefill, then the sampler's
    loop) in `CausalLM.make_generate_function`; the patch wraps what it returns. Idempotent;
    a no-op where KerasHub is absent or has no such method.
    """
    try:
        from keras_hub.src.models.causal_lm import CausalLM
    except ImportError:  # pragma: no cover
        return
    original = getattr(CausalLM, "make_generate_function", None)
    if original is None or getattr(original, "_tf_lora_scope", None) is not None:
        return

    @functools.wraps(original)
    def make_generate_function(self):
        function = original(self)
        if getattr(function, "_tf_lora_scope", None) is not None:
            return function

        def generate_function(*args, **kwargs):
            with scope():
                return function(*args, **kwargs)

        generate_function._tf_lora_scope = scope
        self.generate_function = generate_function
        return generate_function

    make_generate_function._tf_lora_scope = scope
    CausalLM.make_generate_function = make_generate_function


@contextlib.contextmanager
def graph_rewrites(rewrites: dict):
    """Within this context, the `tf.function`s this thread calls are optimized (grappler) with
    `rewrites` (fields of TF's ``RewriterConfig``) over the context's config; fields the user
    set away from their default keep the user's value. TF's global config is not changed: the
    config travels in the thread's function call options, as the call's ``config_proto``.
    Entered on every train-step call, so the merged options are built once per (context
    options, rewrites) and reused."""
    from tensorflow.python.eager import context as tf_context

    ctx = tf_context.context()
    previous = ctx.function_call_options
    ctx.function_call_options = _rewritten_call_options(previous.executor_type, previous.config_proto_serialized,
                                                        tuple(sorted(rewrites.items())))
    try:
        yield
    finally:
        ctx.function_call_options = previous


@functools.lru_cache(maxsize=16)
def _rewritten_call_options(executor_type, config_serialized: bytes, rewrites: tuple):
    """The function call options of `graph_rewrites` (cached: parsing and building them per step is waste)."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context as tf_context

    config = config_pb2.ConfigProto()
    config.ParseFromString(config_serialized)
    options = config.graph_options.rewrite_options
    for key, value in rewrites:
        if not getattr(options, key):  # 0 / False: TF's default, not set by the user
            setattr(options, key, value)
    return tf_context.FunctionCallOptions(executor_type=executor_type, config_proto=config)
