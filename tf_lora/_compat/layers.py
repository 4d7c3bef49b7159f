"""Layers and models: Functional signatures, einsum analysis, own variables and sublayers, tracked state, masks. (Part of `tf_lora._compat`: private Keras / TensorFlow APIs.)"""

from __future__ import annotations

import contextlib
import functools
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
