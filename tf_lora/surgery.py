"""Copying a model of any class, and swapping layers inside it in place.

A copy is made object by object (`copy.deepcopy`), never rebuilt from
`get_config`: some real layers' configs are wrong (keras-hub 0.32's
`LlamaTransformerDecoder` drops its rope scaling), and a copy must compute what
the original computes. The variables of layers about to be replaced are shared
with the original instead of copied, so a copy never materializes float
kernels that are about to be quantized; the copy then proves itself on a probe
batch before anything in it is replaced.

A layer is replaced in place by `_compat.become`: the old object takes the new
layer's class and state, so every reference to it (parents, tracked lists,
graph nodes, checkpoint dependencies) sees the new layer and the old weights
are freed.
"""

from __future__ import annotations

import copy
import types
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import keras
import numpy as np

from tf_lora import _compat
from tf_lora.config import LoRAConfig, QLoRAConfig

__all__ = ["copy_model", "probe_inputs", "verify_copy", "walk", "is_graph_model", "children"]


def is_graph_model(layer) -> bool:
    return isinstance(layer, (keras.Sequential, _compat.Functional))


def children(layer) -> List:
    if is_graph_model(layer):
        return [l for l in layer.layers if not isinstance(l, keras.layers.InputLayer)]
    return _compat.child_layers(layer)


def walk(model) -> Iterator[Tuple[str, "keras.layers.Layer", "keras.layers.Layer"]]:
    """Yields ``(path, layer, parent)`` for every layer below `model`, depth first.

    Paths join layer names with ``/`` starting below the model itself, e.g.
    ``"block_0/mha/query"``. Two sublayers of one parent that share a name get
    distinct paths: the second is ``"name#1"``, the third ``"name#2"``.
    """
    seen = set()

    def _walk(parent, prefix):
        names: Dict[str, int] = {}
        for child in children(parent):
            if (id(parent), id(child)) in seen:
                continue
            seen.add((id(parent), id(child)))
            count = names.get(child.name, 0)
            names[child.name] = count + 1
            path = f"{prefix}{child.name}" + (f"#{count}" if count else "")
            yield path, child, parent
            yield from _walk(child, path + "/")

    yield from _walk(model, "")


def find(model, path: str):
    for p, layer, _ in walk(model):
        if p == path:
            return layer
    return None


def _preprocessors(model) -> List:
    """KerasHub task preprocessors: shared by a copy, never copied (their
    vocabularies are assets and lookup tables, not weights)."""
    found = []
    for obj in [model] + [layer for _, layer, _ in walk(model)]:
        state = getattr(obj, "__dict__", {})
        for key in ("preprocessor", "_preprocessor"):
            if state.get(key) is not None:
                found.append(state[key])
    return found


def fresh_optimizer(optimizer):
    return type(optimizer).from_config(optimizer.get_config())


# Immutable (configs) or not copyable (modules, e.g. a SeedGenerator's backend): shared.
_SHARED = (types.ModuleType, LoRAConfig, QLoRAConfig)
_LEAVES = (str, bytes, int, float, complex, bool, type(None), type, np.ndarray, np.generic)


def _needs_shell(obj) -> bool:
    """Keras objects, and Keras' tracked list/dict/set wrappers (whose default
    deepcopy would re-add items through a locked tracker)."""
    if isinstance(obj, _compat.KerasSaveable):
        return True
    return (isinstance(obj, (list, dict, set)) and type(obj).__module__.startswith("keras")
            and not hasattr(type(obj), "__deepcopy__"))


def _reachable(root, memo: Dict[int, object]) -> List[object]:
    """The objects reachable from `root` (attributes and containers, not inside
    `memo`) that `_deep_copy` must copy itself. Variables are copied here (into
    `memo`), through Keras, so that a strategy scope applies to the copies."""
    found, seen, stack = [], set(memo), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in memo or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, keras.Variable):
            memo[id(obj)] = _compat.copy_variable(obj)
            continue
        if isinstance(obj, _SHARED) or _compat.is_distribution_strategy(obj):
            memo[id(obj)] = obj
            continue
        if _compat.is_traced_function(obj):
            memo[id(obj)] = None  # a cache: the copy traces its own
            continue
        if _compat.is_framework_tensor(obj):
            continue
        if _needs_shell(obj):
            found.append(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            stack.extend(state.values())
    return found


def _deep_copy(root, memo: Dict[int, object]):
    """`copy.deepcopy` of `root`, except that Keras objects are copied attribute
    by attribute instead of through their pickling hook (which serializes them
    to a `.keras` file, i.e. rebuilds them from `get_config`).

    The functions `__new__` puts on each new object are kept: Keras' `Layer.__new__`
    wraps `build` and `quantize` in closures over the instance, and the original's
    (which deepcopy shares, not copies) would act on the original and keep it alive."""
    objects = _reachable(root, memo)
    for obj in objects:
        memo[id(obj)] = type(obj).__new__(type(obj))
    for obj in objects:
        new = memo[id(obj)]
        if isinstance(obj, list):
            list.extend(new, copy.deepcopy(list(obj), memo))
        elif isinstance(obj, dict):
            dict.update(new, copy.deepcopy(dict(obj), memo))
        elif isinstance(obj, set):
            set.update(new, copy.deepcopy(set(obj), memo))
        if hasattr(obj, "__dict__"):
            own = {k: v for k, v in new.__dict__.items() if isinstance(v, types.FunctionType)}
            state = {k: v for k, v in obj.__dict__.items() if k not in own}
            new.__dict__.update(copy.deepcopy(state, memo))
    for obj in objects:
        _compat.remap_tracked_ids(memo[id(obj)], memo)
    return memo[id(root)]


def copy_model(model, share: Iterable[keras.layers.Layer] = ()):
    """A copy of `model` (same class, names, structure and Python state) that
    shares the variables of the layers in `share` and the model's preprocessors.

    Made object by object, never from `get_config`. Traced functions are not
    copied; a compiled model's optimizer is replaced by a fresh one with the
    same configuration (its state belonged to the original's trainable variables).
    """
    memo: Dict[int, object] = {}
    for layer in share:
        for variable in layer.weights:
            memo[id(variable)] = variable
    for pre in _preprocessors(model):
        memo[id(pre)] = pre
    for name in _compat.TRACED_FUNCTIONS + ("_saved_cache",):
        value = getattr(model, name, None)
        if value is not None:
            memo[id(value)] = None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        memo[id(optimizer)] = fresh_optimizer(optimizer)
    return _deep_copy(model, memo)


def probe_inputs(model, batch: int = 2, length: int = 8, seed: int = 0):
    """A small batch `model` accepts, from its input specs (None if unknown)."""
    rng = np.random.default_rng(seed)

    def make(spec, name=""):
        shape = [batch] + [length if d is None else int(d) for d in tuple(spec.shape)[1:]]
        dtype = str(getattr(spec, "dtype", "float32"))
        if "int" in dtype:
            if "mask" in name:
                return np.ones(shape, dtype)
            return rng.integers(0, 2, shape).astype(dtype)
        if "bool" in dtype:
            return np.ones(shape, bool)
        return rng.standard_normal(shape).astype("float32")

    if is_graph_model(model) and getattr(model, "inputs", None):
        inputs, _ = _compat.model_io(model)
        if isinstance(inputs, dict):
            return {k: make(v, k) for k, v in inputs.items()}
        flat = keras.tree.flatten(inputs)
        values = [make(t, getattr(t, "name", "")) for t in flat]
        return values[0] if len(values) == 1 else keras.tree.pack_sequence_as(inputs, values)
    shapes = _compat.built_input_shapes(model)
    if shapes and len(shapes) == 1:
        (shape,) = shapes.values()
        if isinstance(shape, (list, tuple)) and all(isinstance(d, (int, type(None))) for d in shape):
            return make(keras.KerasTensor(tuple(shape)))
    return None


def _outputs(model, x) -> List[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(model(x, training=False))]


def verify_copy(original, copied, atol: float = 1e-6) -> Optional[float]:
    """Checks that `copied` computes what `original` computes on a probe batch.

    Returns the max abs difference (None when no probe input can be made).

    Raises:
        RuntimeError: the outputs differ.
    """
    x = probe_inputs(original)
    if x is None:
        return None
    expected, got = _outputs(original, x), _outputs(copied, x)

    def difference(e, g) -> float:
        # NaN where both give NaN is agreement (e.g. a masked average over an all-padding probe row).
        e, g = e.astype(np.float64), g.astype(np.float64)
        both_nan = np.isnan(e) & np.isnan(g)
        return float(np.max(np.where(both_nan, 0.0, np.abs(e - g)))) if e.size else 0.0

    worst = max(difference(e, g) for e, g in zip(expected, got)) if expected else 0.0
    if len(expected) != len(got) or not worst <= atol:
        raise RuntimeError(
            f"Copying model {original.name!r} ({type(original).__name__}) gave a model that computes "
            f"something else (max abs difference {worst:.3g} on a probe batch); tf_lora will not adapt "
            "a silently different model. Adapt it in place instead: tf_lora.adapt(model, config, inplace=True)."
        )
    return worst
