"""Every use of a private Keras API, in one place, one function per need.

Keras offers no public way to do these few things (list a layer's own
variables or sublayers, edit tracked state after `build`, analyse an
EinsumDense equation, find a model's nested input structure). Each function
below wraps one of them, so that a Keras upgrade is a change to this file
only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
from typing import Iterator, List

import keras

try:  # the class of Functional models (Keras >= 3.0)
    from keras.src.models.functional import Functional
except ImportError:  # pragma: no cover
    Functional = keras.Model

def functional_signature(init):
    """Gives a Functional subclass's ``__init__`` the ``(*args, **kwargs)`` argspec, so that
    Keras saves and revives it as a Functional model (layers and graph in its config).

    Keras decides that by the constructor's argspec: 3.5 requires it to equal that of
    `Functional.__init__`, which is ``(*args, **kwargs)`` there (a tracking wrapper);
    3.15 accepts Functional's own arguments or ``(*args, **kwargs)``.
    """

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        return init(self, *args, **kwargs)

    return __init__


try:  # the base of every Keras object that pickles itself through a `.keras` file
    from keras.src.saving.keras_saveable import KerasSaveable
except ImportError:  # pragma: no cover
    KerasSaveable = keras.layers.Layer

try:
    from keras.src.layers.core.einsum_dense import _analyze_einsum_string as _keras_analyze_einsum
except ImportError:  # pragma: no cover
    _keras_analyze_einsum = None


try:  # Keras >= 3.6 keeps masks behind these helpers.
    from keras.src.backend.common.masking import get_keras_mask, set_keras_mask
except ImportError:  # pragma: no cover - older Keras 3

    def get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x, mask):
        try:
            x._keras_mask = mask
        except AttributeError:  # e.g. a tf.Tensor that takes no attributes: no mask to carry
            pass


def analyze_einsum(equation: str, bias_axes, input_shape, output_shape):
    """``(kernel_shape, bias_shape, full_output_shape)`` as EinsumDense computes them.

    Keras 3.5-3.7 return those three values; newer versions add two more.
    """
    result = _keras_analyze_einsum(equation, bias_axes, input_shape, output_shape)
    return tuple(result[:3])


def own_variables(layer) -> List["keras.Variable"]:
    """The variables a layer created itself (not those of its sublayers)."""
    return list(getattr(layer, "_trainable_variables", [])) + list(getattr(layer, "_non_trainable_variables", []))


def created_trainable(layer) -> List["keras.Variable"]:
    """The variables of `layer` and its sublayers that were created trainable
    (what full training of the layer updates by gradient; not e.g. BatchNorm's
    moving statistics), whatever their `trainable` flag says now."""
    found = []
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        found.extend(getattr(sub, "_trainable_variables", []))
    return found


def child_layers(layer) -> List["keras.layers.Layer"]:
    """The sublayers Keras tracks on a (non-graph) layer, in tracking order."""
    return [child for child in getattr(layer, "_layers", []) if isinstance(child, keras.layers.Layer)]


@contextlib.contextmanager
def unlocked(layer) -> Iterator[None]:
    """Lets a built layer create or drop variables (Keras locks tracking after build)."""
    tracker = getattr(layer, "_tracker", None)
    locked = tracker is not None and tracker.locked
    if locked:
        tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def untrack_variable(layer, variable) -> None:
    layer._untrack_variable(variable)


def adopt_variable(layer, variable, *, shape, dtype, trainable=True, autocast=True, regularizer=None,
                   constraint=None) -> bool:
    """Makes `variable` (another layer's) one of `layer`'s own weights, as if
    ``layer.add_weight(shape=, dtype=, trainable=, autocast=, regularizer=, constraint=)``
    had created it, but without a new variable: the same object keeps its value, memory
    and path. Its `trainable`, `regularizer` and `constraint` are set to those arguments
    (the caller records the old ones to undo it) and `layer` tracks it (`_track_variable`,
    during `build`). Returns False, changing nothing, when it cannot stand for that weight:
    not a Keras variable, another shape, dtype or autocast, or `overwrite_with_gradient` set.
    """
    if (not isinstance(variable, keras.Variable) or tuple(variable.shape) != tuple(shape)
            or keras.backend.standardize_dtype(variable.dtype) != keras.backend.standardize_dtype(dtype)
            or bool(getattr(variable, "_autocast", True)) != bool(autocast)
            or getattr(variable, "overwrite_with_gradient", False)):
        return False
    variable.trainable = trainable
    variable.regularizer = keras.regularizers.get(regularizer)
    variable.constraint = keras.constraints.get(constraint)
    layer._track_variable(variable)
    return True


def model_io(model):
    """A Functional model's inputs and outputs with their nested (dict) structure."""
    inputs = getattr(model, "_inputs_struct", None)
    outputs = getattr(model, "_outputs_struct", None)
    if inputs is None or outputs is None:
        return model.inputs, model.outputs
    return inputs, outputs


def built_input_shapes(model):
    """The input shapes a subclassed model was built with (``None`` if unknown)."""
    shapes = getattr(model, "_build_shapes_dict", None)
    return dict(shapes) if shapes else None


# Attributes of a layer that are not its own state but its place in a model graph:
# they stay with the object when `become` replaces everything else.
_GRAPH_STATE = ("_inbound_nodes", "_outbound_nodes", "_build_shapes_dict")


def become(old, new) -> None:
    """Turns the object `old` into `new` in place: same identity, `new`'s class and state.

    Every reference to `old` anywhere (parent attributes, tracked sublayer lists,
    TensorFlow checkpoint dependencies, Functional graph nodes) now sees the new
    layer, without finding or editing any of them. `old`'s own state (its
    variables included) is dropped, so memory held only by it is freed; its place
    in the model graph (inbound/outbound nodes, build shapes) is kept. The
    functions Keras' `Layer.__new__` put on `new` (`build` and `quantize`, closures
    over the instance) are rebound to `old`. `new` must not be used afterwards.
    Build `new` inside `scope_of(old)` so that its variables get `old`'s paths.
    """
    graph_state = {k: old.__dict__[k] for k in _GRAPH_STATE if k in old.__dict__}
    old_tracker = old.__dict__.get("_tracker")
    state = {k: _rebound(v, new, old) for k, v in new.__dict__.items()}
    new.__dict__.clear()
    old.__dict__.clear()
    old.__dict__.update(state)
    old.__dict__.update(graph_state)
    old.__class__ = type(new)
    # The kept containers are Keras TrackedList/TrackedDicts that point at `old`'s tracker,
    # which holds `old`'s variable lists: left there, they would keep the replaced weights alive.
    _retrack(list(graph_state.values()), old_tracker, state.get("_tracker"))


def snapshot(layer) -> tuple:
    """What `restore` needs to undo a later `become(layer, ...)`: the class and state
    (it keeps the state, variables included, alive until dropped)."""
    return type(layer), dict(layer.__dict__)


def restore(layer, saved: tuple) -> None:
    """Undoes `become(layer, ...)`: `layer` gets back the class and state `snapshot`
    saved (the same variables and sublayers), and its graph containers its tracker."""
    cls, state = saved
    current_tracker = layer.__dict__.get("_tracker")
    graph_state = [layer.__dict__[k] for k in _GRAPH_STATE if k in layer.__dict__]
    layer.__dict__.clear()
    layer.__dict__.update(state)
    layer.__class__ = cls
    _retrack(graph_state, current_tracker, state.get("_tracker"))


def _rebound(value, new, old, _active=frozenset()):
    """`value` with every reference to `new` in its closure (and in `functools.wraps`'
    `__wrapped__`) pointed at `old`: Keras' `Layer.__new__` stores per-instance
    `build`/`quantize` wrappers that close over the instance and its bound methods.
    A value that does not refer to `new` is returned as it is."""
    if isinstance(value, types.MethodType):
        return types.MethodType(value.__func__, old) if value.__self__ is new else value
    if not isinstance(value, types.FunctionType) or id(value) in _active:  # (a recursive closure)
        return value
    _active = _active | {id(value)}
    cells = []
    for cell in value.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(cell)
            continue
        rebound = old if content is new else _rebound(content, new, old, _active)
        cells.append(cell if rebound is content else types.CellType(rebound))
    wrapped = value.__dict__.get("__wrapped__")
    rewrapped = _rebound(wrapped, new, old, _active) if wrapped is not None else None
    if rewrapped is wrapped and all(c is o for c, o in zip(cells, value.__closure__ or ())):
        return value
    fn = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, tuple(cells) or None)
    fn.__kwdefaults__, fn.__qualname__, fn.__doc__ = value.__kwdefaults__, value.__qualname__, value.__doc__
    fn.__dict__.update(value.__dict__)
    if wrapped is not None:
        fn.__wrapped__ = rewrapped
    return fn


def _retrack(values, old_tracker, new_tracker) -> None:
    """Points the Keras tracked containers in `values` (nested) from `old_tracker` to `new_tracker`."""
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        if id(value) in seen or not isinstance(value, (list, tuple, dict, set)):
            continue
        seen.add(id(value))
        if old_tracker is not None and getattr(value, "tracker", None) is old_tracker:
            value.tracker = new_tracker
        stack.extend(value.values() if isinstance(value, dict) else value)


def parent_path(layer) -> str:
    """The variable-path prefix `layer` was built under (``"block/attention"`` for a
    layer whose kernel's path is ``"block/attention/query/kernel"``; "" at the top)."""
    parent = layer.__dict__.get("_parent_path")  # Keras records it on the first build or call
    if parent is not None:
        return parent
    path = layer.__dict__.get("_path")
    if not path:  # older Keras: read it off the layer's own variables ('<parent>/<name>/<variable>')
        path = next((v.path[: -len(v.name) - 1] for v in own_variables(layer)
                     if v.path.endswith("/" + v.name)), layer.name)
    return path[: -len(layer.name) - 1] if path.endswith("/" + layer.name) else ""


@contextlib.contextmanager
def scope_of(layer) -> Iterator[None]:
    """Opens the name scope `layer` was built in: a layer created and built inside
    (e.g. `layer`'s replacement) gets the variable paths `layer`'s variables have."""
    with name_scope_at(parent_path(layer)):
        yield


@contextlib.contextmanager
def name_scope_at(path: str) -> Iterator[None]:
    """Opens Keras name scopes so that variables created inside get paths ``path/<name>``
    (whatever scope is open around; on Keras without `override_parent`, below it)."""
    parts = [p for p in path.split("/") if p]
    with contextlib.ExitStack() as stack:
        for i, part in enumerate(parts):
            try:
                scope = keras.name_scope(part, override_parent="" if i == 0 else None)
            except TypeError:  # pragma: no cover - a Keras whose name_scope takes no override_parent
                scope = keras.name_scope(part)
            stack.enter_context(scope)
        yield


@contextlib.contextmanager
def own_scope(layer) -> Iterator[None]:
    """Opens `layer`'s own name scope (as its `build` does), so that a variable it adds
    after its build gets the path ``<layer path>/<name>`` like those made in `build`."""
    with name_scope_at(f"{parent_path(layer)}/{layer.name}"):
        yield


# Traced functions a model caches; they capture variables and the Python-level
# adapter choice, so they are dropped whenever the adapters change.
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
    config travels in the thread's function call options, as the call's ``config_proto``."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context as tf_context

    ctx = tf_context.context()
    previous = ctx.function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(previous.config_proto_serialized)
    options = config.graph_options.rewrite_options
    for key, value in rewrites.items():
        if not getattr(options, key):  # 0 / False: TF's default, not set by the user
            setattr(options, key, value)
    ctx.function_call_options = tf_context.FunctionCallOptions(executor_type=previous.executor_type,
                                                              config_proto=config)
    try:
        yield
    finally:
        ctx.function_call_options = previous
