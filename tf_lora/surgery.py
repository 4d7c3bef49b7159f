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
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import keras
import numpy as np

from tf_lora import _compat
from tf_lora.config import BASE_REWRITING_INITS, LoRAConfig, QLoRAConfig

__all__ = ["Probe", "children", "copy_model", "is_graph_model", "probe", "probe_inputs", "verify_adapted",
           "verify_copy", "walk"]


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


# The hooks through which an object controls its own copying; `_attribute_proxy` copies only
# objects that define none of them (so copying their `__dict__` is what deepcopy would do).
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__",
               "__getnewargs_ex__", "__getnewargs__")


def _attribute_proxy(obj) -> bool:
    """An object whose class answers unknown attributes through `__getattr__` and
    copies through the default pickling path, e.g. Keras' `DynamicBackend` (held by
    `Rescaling`, `Normalization` and every other data layer).

    `copy.deepcopy` builds such an object with `__new__`, without `__init__`, then
    asks it for `__setstate__`: its `__getattr__` reads instance state that is not
    there yet and recurses forever. Copied attribute by attribute instead (the
    copy of a `DynamicBackend` gets its own backend name, so switching one model's
    data layers to tf.data's backend never switches the other's).
    """
    cls = type(obj)
    return (hasattr(cls, "__getattr__") and getattr(cls, "__dictoffset__", 0) != 0
            and all(getattr(cls, hook, None) is getattr(object, hook, None) for hook in _COPY_HOOKS))


def _needs_shell(obj) -> bool:
    """Keras objects, Keras' tracked list/dict/set wrappers (whose default
    deepcopy would re-add items through a locked tracker), and attribute proxies
    (`_attribute_proxy`)."""
    if isinstance(obj, _compat.KerasSaveable) or _attribute_proxy(obj):
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
        if "string" in dtype:
            return np.full(shape, "probe", dtype=object)
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


class Probe(NamedTuple):
    """A probe batch and a model's outputs on it (flattened, as NumPy arrays)."""

    inputs: object
    outputs: List[np.ndarray]


def _outputs(model, x) -> List[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(model(x, training=False))]


def probe(model, strict: bool = True) -> Optional[Probe]:
    """`model`'s outputs on its probe batch (`probe_inputs`), to check a copy or an
    adapted model against. None when no probe batch can be made, or, with
    ``strict=False``, when `model` does not accept the one made from its input specs."""
    x = probe_inputs(model)
    if x is None:
        return None
    if strict:
        return Probe(x, _outputs(model, x))
    try:
        return Probe(x, _outputs(model, x))
    except Exception:  # the probe is a guess from input specs (e.g. a string input); nothing to check
        return None


def _difference(expected: List[np.ndarray], got: List[np.ndarray]) -> float:
    """Max abs difference over all outputs (inf when the structures differ)."""
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        return float("inf")
    worst = 0.0
    for e, g in zip(expected, got):
        # NaN where both give NaN is agreement (e.g. a masked average over an all-padding probe row).
        e, g = e.astype(np.float64), g.astype(np.float64)
        both_nan = np.isnan(e) & np.isnan(g)
        if e.size:
            worst = max(worst, float(np.max(np.where(both_nan, 0.0, np.abs(e - g)))))
    return worst


def verify_copy(original, copied, atol: float = 1e-6, reference: Optional[Probe] = None) -> Optional[float]:
    """Checks that `copied` computes what `original` computes on a probe batch.

    Args:
        original: The model that was copied.
        copied: Its copy.
        atol: Largest accepted max abs difference.
        reference: ``probe(original)`` if already computed.

    Returns:
        The max abs difference (None when no probe input can be made).

    Raises:
        RuntimeError: the outputs differ.
    """
    reference = probe(original) if reference is None else reference
    if reference is None:
        return None
    worst = _difference(reference.outputs, _outputs(copied, reference.inputs))
    if not worst <= atol:
        raise RuntimeError(
            f"Copying model {original.name!r} ({type(original).__name__}) gave a model that computes "
            f"something else (max abs difference {worst:.3g} on a probe batch); tf_lora will not adapt "
            "a silently different model. Adapt it in place instead: tf_lora.adapt(model, config, inplace=True)."
        )
    return worst


# How far an adapted model may be from its base on the probe batch before training, relative to
# the largest base output (at least 1). A fresh adapter adds exactly zero (lora_b = 0), so only the
# order of float operations could differ ("exact": measured 0 in float32 and bfloat16; "half": a
# few units in the last place of a 16-bit compute dtype). DoRA rescales the kernel by m / ||W|| = 1
# (rounded) and PiSSA / OLoRA split W into a residual plus A @ B (float32 SVD / QR): measured at
# most 1e-5 x the largest output in float32 (24-block encoder, Gemma, MiniLM), so "rewritten" is
# 1e-3. With a 16-bit compute dtype (or TF32 matmuls on a GPU) a rewritten base moves the outputs
# by its own rounding, compounding over the layers (0.25 on a 2-layer bfloat16 Gemma with OLoRA):
# no tolerance separates that from an error, so that case is not checked.
ADAPTED_RTOL = {"exact": 1e-5, "half": 2e-2, "rewritten": 1e-3}


def adapted_tolerance(config: LoRAConfig, compute_dtype: str = "float32") -> Optional[float]:
    """The relative tolerance `verify_adapted` applies for `config` and a model computing in
    `compute_dtype` (see `ADAPTED_RTOL`); None: not checked (under quantization, where NF4
    moves the base by design, and a rewritten base in reduced precision)."""
    if config.quantization is not None:
        return None
    half = compute_dtype in ("float16", "bfloat16") or _compat.reduced_precision_float32()
    if config.use_dora or config.init in BASE_REWRITING_INITS:
        return None if half else ADAPTED_RTOL["rewritten"]
    return ADAPTED_RTOL["half"] if half else ADAPTED_RTOL["exact"]


def verify_adapted(reference: Optional[Probe], adapted, config: LoRAConfig) -> Optional[float]:
    """Checks that `adapted`, just out of `adapt`, computes what its base computed.

    A fresh adapter must not change the model's function: a replaced layer whose
    adapter class computes something else (a subclass's own `call`, an adapter
    registered for the wrong type) would otherwise train and serve a different
    model, silently. Not checked under quantization (NF4 changes the outputs by
    design) or when no probe batch could be made.

    Args:
        reference: ``probe(base)``, computed before any layer was replaced (None: no check).
        adapted: The adapted model.
        config: The `LoRAConfig` it was adapted with (sets the tolerance, `adapted_tolerance`).

    Returns:
        The max abs difference, or None when nothing was checked.

    Raises:
        RuntimeError: the outputs differ by more than the tolerance.
    """
    if reference is None:
        return None
    half = any(str(getattr(layer, "compute_dtype", "float32")) in ("float16", "bfloat16")
               for layer in [adapted] + [layer for _, layer, _ in walk(adapted)])
    rtol = adapted_tolerance(config, "bfloat16" if half else "float32")
    if rtol is None:
        return None
    finite = [np.abs(e.astype(np.float64)) for e in reference.outputs]
    scale = max([1.0] + [float(np.max(a[np.isfinite(a)])) for a in finite if np.isfinite(a).any()])
    worst = _difference(reference.outputs, _outputs(adapted, reference.inputs))
    if not worst <= rtol * scale:
        raise RuntimeError(
            f"The adapted model {adapted.name!r} ({type(adapted).__name__}) computes something else than its "
            f"base before any training: max abs difference {worst:.3g} on a probe batch, where at most "
            f"{rtol * scale:.3g} ({rtol:g} x the largest output) is float rounding. One of the replaced layers' "
            "adapter classes does not compute what the layer computed (e.g. an adapter registered with "
            "tf_lora.register_adapter for a layer type whose `call` it does not reproduce). Leave that layer "
            "out (exclude_modules) or register an adapter class that computes its `call`."
        )
    return worst
