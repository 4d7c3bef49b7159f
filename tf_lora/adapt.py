"""`adapt()`: clone a Keras model with adapter layers in place of matched layers.

The original model is never modified. Matching walks the whole layer tree
(nested models, layers inside layers such as MultiHeadAttention's
projections); replacing uses `keras.models.clone_model` for the layers of the
model graph and attribute replacement inside the cloned container layers for
nested ones, because `clone_model`'s `clone_function` never sees those.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import keras
from keras import ops

from tf_lora.config import LoRAConfig, matches
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer

try:
    from keras.src.models.functional import Functional
except ImportError:  # pragma: no cover
    Functional = keras.Model


def _qlora_cls(name: str):
    from tf_lora.layers import qlora  # optional module (issue 3)

    return getattr(qlora, name)


# Dispatch table, first match wins: (Keras layer type, LoRA class, QLoRA class name).
# Subclasses come before their bases.
DISPATCH: List[Tuple[type, type, str]] = [
    (keras.layers.EinsumDense, LoRAEinsumDense, "QLoRAEinsumDense"),
    (keras.layers.Dense, LoRADense, "QLoRADense"),
]


def register_adapter(layer_type: type, lora_cls: type, qlora_cls_name: str = "") -> None:
    """Adds a layer type to the dispatch table (checked before the built-ins)."""
    DISPATCH.insert(0, (layer_type, lora_cls, qlora_cls_name))


def _dispatch(layer) -> Optional[Tuple[type, type, str]]:
    if isinstance(layer, LoRALayer):
        return None
    for entry in DISPATCH:
        if isinstance(layer, entry[0]):
            return entry
    return None


def is_graph_model(layer) -> bool:
    return isinstance(layer, (keras.Sequential, Functional))


def _children(layer) -> List:
    if is_graph_model(layer):
        return [l for l in layer.layers if not isinstance(l, keras.layers.InputLayer)]
    return [l for l in getattr(layer, "_layers", []) if isinstance(l, keras.layers.Layer)]


def walk(model) -> Iterator[Tuple[str, "keras.layers.Layer", "keras.layers.Layer"]]:
    """Yields ``(path, layer, parent)`` for every layer below `model`, depth first.

    Paths join layer names with ``/`` starting below the model itself, e.g.
    ``"block_0/mha/query"``.
    """
    seen = set()

    def _walk(parent, prefix):
        for child in _children(parent):
            path = f"{prefix}{child.name}"
            if (id(parent), id(child)) in seen:
                continue
            seen.add((id(parent), id(child)))
            yield path, child, parent
            yield from _walk(child, path + "/")

    yield from _walk(model, "")


def _describe(layer) -> str:
    return type(layer).__name__


def _select(model, config: LoRAConfig) -> Tuple[Dict[str, keras.layers.Layer], List[str]]:
    """Returns ({path: layer} to adapt, [paths of modules_to_save]); validates."""
    targets, adaptable, saved = {}, [], []
    explicit_regex = isinstance(config.target_modules, str) and config.target_modules != "all-linear"
    excluded: List[str] = []  # exclusion and modules_to_save cover a layer's sublayers too
    for path, layer, _ in walk(model):
        name = layer.name
        if any(path.startswith(p + "/") for p in excluded + saved):
            continue
        if config.modules_to_save and matches(config.modules_to_save, name, path):
            saved.append(path)
            continue
        if config.exclude_modules and matches(config.exclude_modules, name, path):
            excluded.append(path)
            if _dispatch(layer) is not None:
                adaptable.append(path)
            continue
        if isinstance(layer, LoRALayer):
            if matches(config.target_modules, name, path):
                raise ValueError(
                    f"Layer '{path}' is already a tf_lora adapter layer ({_describe(layer)}); "
                    "a model cannot be adapted twice on the same layer. Adapt the base model "
                    "or use tf_lora.merge(model) first."
                )
            continue
        entry = _dispatch(layer)
        if entry is None:
            leaf = not _children(layer)
            if explicit_regex and leaf and layer.weights and matches(config.target_modules, name, path):
                supported = ", ".join(t.__name__ for t, _, _ in DISPATCH)
                raise ValueError(
                    f"Received an invalid value for `target_modules`: the regex "
                    f"{config.target_modules!r} names layer '{path}' of type {_describe(layer)}, "
                    f"which tf_lora cannot adapt. Supported layer types: {supported}."
                )
            continue
        adaptable.append(path)
        if matches(config.target_modules, name, path):
            targets[path] = layer
    if not targets:
        raise ValueError(
            f"Received an invalid value for `target_modules`: it matches no adaptable layer. "
            f"Received: target_modules={config.target_modules!r}. "
            f"Adaptable layer paths in this model: {adaptable}"
        )
    if config.modules_to_save and not saved:
        raise ValueError(
            f"Received an invalid value for `modules_to_save`: it matches no layer. "
            f"Received: modules_to_save={config.modules_to_save!r}"
        )
    return targets, saved


def make_adapter(layer, config: LoRAConfig, path: str) -> LoRALayer:
    """Builds the adapter layer for `layer` (through the dispatch table)."""
    entry = _dispatch(layer)
    if entry is None:
        supported = ", ".join(t.__name__ for t, _, _ in DISPATCH)
        raise ValueError(
            f"Layer '{path}' of type {_describe(layer)} cannot be adapted. "
            f"Supported layer types: {supported}."
        )
    _, lora_cls, qlora_name = entry
    kwargs = dict(
        rank=config.rank_for(layer.name, path),
        alpha=config.alpha_for(layer.name, path),
        dropout=float(config.dropout),
        use_rslora=config.use_rslora,
        lora_init=config.init,
    )
    if config.quantization is not None:
        if not qlora_name:
            raise NotImplementedError(f"No QLoRA layer is registered for {_describe(layer)} ('{path}').")
        return _qlora_cls(qlora_name).from_layer(layer, quantization=config.quantization, **kwargs)
    return lora_cls.from_layer(layer, **kwargs)


def replace_sublayer(parent, old, new) -> None:
    """Points every reference `parent` holds to `old` at `new` instead.

    Keras tracks sublayers in `parent._layers`; attribute assignment on a built
    layer would append instead of replace, so the tracked list is edited too.
    """
    found = False
    for attr, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, attr, new)
            found = True
        elif isinstance(value, list) and not attr.startswith("_tracker"):
            for i, item in enumerate(value):
                if item is old:
                    list.__setitem__(value, i, new)  # bypass Keras' locked tracking
                    found = found or attr != "_layers"
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                if item is old:
                    dict.__setitem__(value, key, new)
                    found = True
    if not found:
        raise ValueError(
            f"Cannot replace layer '{old.name}' inside '{parent.name}' ({_describe(parent)}): "
            "it is not held in an attribute, a list or a dict of its parent."
        )
    tracker = getattr(parent, "_tracker", None)
    stored = getattr(tracker, "stored_ids", {}).get("layers") if tracker is not None else None
    if stored is not None:
        stored.discard(id(old))
        stored.add(id(new))


def _own_variables(layer) -> Dict[str, "keras.Variable"]:
    own = getattr(layer, "_trainable_variables", None)
    if own is None:  # pragma: no cover - Keras always has these lists
        return {}
    return {v.name: v for v in list(own) + list(layer._non_trainable_variables)}


def copy_weights(old, new) -> None:
    """Copies `old`'s weights into the structurally equal (fresh) `new`,
    pairing sublayers by position (auto-generated names may differ) and
    variables by name. Where `old` holds an adapter and `new` a plain layer,
    the plain kernel gets the merged kernel."""
    source_vars = _own_variables(old)
    for name, var in _own_variables(new).items():
        if name == "kernel" and isinstance(old, LoRALayer) and not isinstance(new, LoRALayer):
            var.assign(old.merged_kernel())
        elif name in source_vars and tuple(source_vars[name].shape) == tuple(var.shape):
            var.assign(source_vars[name])
        else:
            raise RuntimeError(f"Cloning '{old.name}': cannot copy variable '{new.name}/{name}'.")
    if isinstance(old, LoRALayer):
        return  # an adapter's only sublayer is its (stateless) dropout
    old_children, new_children = _children(old), _children(new)
    if len(old_children) != len(new_children):
        raise RuntimeError(f"Cloning '{old.name}' did not reproduce its sublayers.")
    for o, n in zip(old_children, new_children):
        copy_weights(o, n)


def clone_with(model, swap: Callable, nested: Dict[str, Callable]) -> keras.Model:
    """Clones `model`, copying weights; `swap(layer)` may return a replacement
    for a graph layer (or None), `nested[path](layer)` builds the replacement
    for a nested layer of the clone."""
    pairs = []

    def clone_function(layer):
        new = swap(layer)
        if new is not None:
            return new
        new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        copy_weights(old, new)
    for path, layer, parent in list(walk(clone)):
        if path in nested and not is_graph_model(parent):
            replace_sublayer(parent, layer, nested[path](layer))
    return clone


def _model_io(model):
    inputs = getattr(model, "_inputs_struct", None)
    outputs = getattr(model, "_outputs_struct", None)
    if inputs is None or outputs is None:
        return model.inputs, model.outputs
    return inputs, outputs


def adapt(model: keras.Model, config: Optional[LoRAConfig] = None) -> "keras.Model":
    """Returns a `tf_lora.LoRAModel` copy of `model` with adapters on matched layers.

    Args:
        model: A built Functional or Sequential Keras model. It is not modified.
        config: A `tf_lora.LoRAConfig` (default: ``LoRAConfig()``).

    Returns:
        A `LoRAModel` with the base model's layer names, inputs and outputs, in
        which only `lora_` variables and `modules_to_save` are trainable.

    Raises:
        TypeError: `model` is not a Functional/Sequential model, or `config` is
            not a `LoRAConfig`.
        ValueError: the model is unbuilt, nothing matches, a matched layer is
            already adapted or of an unsupported type.

    Example:
        >>> inputs = keras.Input((8,))
        >>> base = keras.Model(inputs, keras.layers.Dense(4, name="query")(inputs))
        >>> model = adapt(base, LoRAConfig(rank=2))
        >>> [v.name for v in model.trainable_variables]
        ['lora_a', 'lora_b']
    """
    from tf_lora.train import LoRAModel

    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"Received an invalid value for `config`, expected a tf_lora.LoRAConfig. Received: config={config!r}")
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a keras.Model. Received: model={type(model).__name__}")
    if not is_graph_model(model):
        raise TypeError(
            f"Received an invalid value for `model`, expected a Functional or Sequential model "
            f"(clone_model cannot rebuild a subclassed model's call). Received: model of type "
            f"{type(model).__name__}. Wrap it: `x = keras.Input(...); keras.Model(x, sub(x))`, "
            "or adapt layers one by one with LoRADense.from_layer."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"Received an unbuilt model for `model`, expected a built model (give the first layer "
            f"an input shape or call the model on data). Received: model={model.name!r}"
        )
    if config.attention == "chunked":
        from tf_lora.convert import use_chunked_attention

        model = use_chunked_attention(model, max_memory_bytes=config.max_attention_memory)
    targets, _ = _select(model, config)
    graph_ids = {}
    nested = {}
    for path, layer, parent in walk(model):
        if path in targets:
            if is_graph_model(parent):
                graph_ids[id(layer)] = path
            else:
                nested[path] = (lambda p: (lambda new_layer: make_adapter(new_layer, config, p)))(path)

    def swap(layer):
        path = graph_ids.get(id(layer))
        return None if path is None else make_adapter(layer, config, path)

    clone = clone_with(model, swap, nested)
    inputs, outputs = _model_io(clone)
    return LoRAModel(inputs=inputs, outputs=outputs, name=model.name, lora_config=config)
