"""Which layers `adapt()` wraps, and with which adapter class: the dispatch table (Keras
layer type -> LoRA class, QLoRA class), `target_modules` / `exclude_modules` matching,
and every check `adapt()` runs on the targets before any layer changes (`_precheck`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import keras
from keras import ops

from tf_lora import surgery
from tf_lora.config import BASE_REWRITING_INITS, LoRAConfig, matches
from tf_lora.layers.conv import LoRAConv, LoRAConv1D, LoRAConv2D, LoRAConv3D
from tf_lora.layers.embedding import LoRAEmbedding, LoRAReversibleEmbedding, _reversible_type
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer, _einsum_lora_equations
from tf_lora.surgery import walk


def _qlora_cls(name: str):
    from tf_lora.layers import qlora, qlora_conv_embedding  # optional modules (issue 3, issue 11)

    return getattr(qlora, name, None) or getattr(qlora_conv_embedding, name)


# Dispatch table, first match wins: (Keras layer type, LoRA class, QLoRA class name).
# Subclasses come before their bases.
DISPATCH: List[Tuple[type, type, str]] = [
    (keras.layers.EinsumDense, LoRAEinsumDense, "QLoRAEinsumDense"),
    (keras.layers.Dense, LoRADense, "QLoRADense"),
    *([(_reversible_type(), LoRAReversibleEmbedding, "QLoRAReversibleEmbedding")] if _reversible_type() else []),
    (keras.layers.Embedding, LoRAEmbedding, "QLoRAEmbedding"),
    (keras.layers.Conv1D, LoRAConv1D, "QLoRAConv1D"),
    (keras.layers.Conv2D, LoRAConv2D, "QLoRAConv2D"),
    (keras.layers.Conv3D, LoRAConv3D, "QLoRAConv3D"),
]

# What target_modules="all-linear" selects (PEFT's meaning): Dense and EinsumDense layers only,
# never embeddings or convolutions.
LINEAR_TYPES: Tuple[type, ...] = (keras.layers.Dense, keras.layers.EinsumDense, LoRADense, LoRAEinsumDense)


def all_linear_skips(config: LoRAConfig, layer) -> bool:
    """Whether ``target_modules="all-linear"`` leaves `layer` out (it is not Dense/EinsumDense)."""
    return config.target_modules == "all-linear" and not isinstance(layer, LINEAR_TYPES)


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


# The methods through which a layer computes its outputs (and mask). An adapter class computes
# its dispatch type's versions of them; a subclass of that type that overrides one computes
# something else.
FORWARD_METHODS = ("__call__", "call", "compute_mask", "convolution_op")


def _own_forward(layer, layer_type: type) -> List[str]:
    """The `FORWARD_METHODS` that `layer`'s class defines above `layer_type` (the dispatch
    type it matched) in its method resolution order, i.e. that differ from `layer_type`'s."""
    mro = type(layer).__mro__
    above = mro[:mro.index(layer_type)] if layer_type in mro else mro
    return [name for name in FORWARD_METHODS if any(name in vars(cls) for cls in above)]


def _check_forward(layer, path: str, layer_type: type, lora_cls: type) -> None:
    """Refuses a subclass of a dispatch type that computes its own outputs (`_own_forward`):
    its adapter would compute `layer_type`'s function instead."""
    own = _own_forward(layer, layer_type)
    if own:
        cls = type(layer)
        base = (f"keras.layers.{layer_type.__name__}" if getattr(keras.layers, layer_type.__name__, None) is layer_type
                else f"{layer_type.__module__}.{layer_type.__qualname__}")
        raise NotImplementedError(
            f"Layer '{path}' is a {cls.__module__}.{cls.__qualname__}, a subclass of "
            f"{base} that overrides {', '.join(own)}; tf_lora's {lora_cls.__name__} "
            f"computes {layer_type.__name__}'s `call`, so the adapted model would compute something else. "
            f"Leave the layer out (exclude_modules=({layer.name!r},)), or register an adapter class that "
            f"computes {cls.__name__}'s `call`: tf_lora.register_adapter({cls.__name__}, YourLoRAClass)."
        )


def _describe(layer) -> str:
    return type(layer).__name__


def _select(model, config: LoRAConfig) -> Tuple[Dict[str, keras.layers.Layer], List[str]]:
    """Returns ({path: layer} to adapt, [paths of modules_to_save]); validates."""
    targets, adaptable, saved, seen = {}, [], [], set()
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
            leaf = not surgery.children(layer)
            if explicit_regex and leaf and layer.weights and matches(config.target_modules, name, path):
                supported = ", ".join(t.__name__ for t, _, _ in DISPATCH)
                raise ValueError(
                    f"Received an invalid value for `target_modules`: the regex "
                    f"{config.target_modules!r} names layer '{path}' of type {_describe(layer)}, "
                    f"which tf_lora cannot adapt. Supported layer types: {supported}."
                )
            continue
        adaptable.append(path)
        if all_linear_skips(config, layer):
            continue
        if matches(config.target_modules, name, path) and id(layer) not in seen:
            seen.add(id(layer))  # a layer reached by two paths is adapted once
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
    if config.use_dora:  # only when asked: adapter classes without DoRA never see the argument
        kwargs["use_dora"] = True
    if config.init == "loftq":
        kwargs["loftq_iter"] = config.loftq_iter
    if config.quantization is not None:
        if not qlora_name:
            raise NotImplementedError(f"No QLoRA layer is registered for {_describe(layer)} ('{path}').")
        return _qlora_cls(qlora_name).from_layer(layer, quantization=config.quantization, **kwargs)
    return lora_cls.from_layer(layer, **kwargs)


def _precheck(layer, path: str, config: LoRAConfig) -> None:
    """Everything `make_adapter` could refuse, checked before any layer changes."""
    entry = _dispatch(layer)
    if entry is None:  # pragma: no cover - _select only returns dispatchable layers
        raise ValueError(f"Layer '{path}' of type {_describe(layer)} cannot be adapted.")
    layer_type, lora_cls, qlora_name = entry
    LoRALayer._check_source(layer, layer_type, layer_type.__name__)
    _check_forward(layer, path, layer_type, lora_cls)
    if isinstance(layer, keras.layers.EinsumDense):
        _einsum_lora_equations(layer.equation)
    if issubclass(lora_cls, LoRAConv):
        LoRAConv.check_groups(layer)
    if config.quantization is not None and not qlora_name:
        raise NotImplementedError(f"No QLoRA layer is registered for {_describe(layer)} ('{path}').")
    _check_variants(layer, path, config, _qlora_cls(qlora_name) if config.quantization is not None else lora_cls)
    _check_values(layer, path, config)


def _check_values(layer, path: str, config: LoRAConfig) -> None:
    """What `make_adapter` would refuse in the weights: a rank that a base-rewriting init
    cannot split the kernel into, NaN/Inf in a kernel that is quantized or decomposed."""
    rewriting = config.init in BASE_REWRITING_INITS
    if rewriting and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        shape = [int(d) for d in layer.kernel.shape]
        n_in = shape[0]
        if isinstance(layer, keras.layers.EinsumDense):  # the kernel's input-side axes
            in_axes = _einsum_lora_equations(layer.equation)[3]
            k_sub = layer.equation.replace(" ", "").split("->")[0].split(",")[1]
            n_in = math.prod(d for c, d in zip(k_sub, shape) if c in in_axes)
        LoRALayer.check_rewrite_rank(config.rank_for(layer.name, path), n_in, math.prod(shape) // n_in,
                                     config.init, path)
    if rewriting or config.quantization is not None:
        name = "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel"
        source = getattr(layer, name, None)
        if source is not None and not bool(ops.all(ops.isfinite(source))):
            bad = int(ops.sum(ops.cast(ops.logical_not(ops.isfinite(source)), "int32")))
            how = "quantization (NF4)" if config.quantization is not None else f"init={config.init!r}"
            raise ValueError(
                f"Received a model whose layer '{path}' cannot be adapted with {how}: its `{name}` contains "
                f"{bad} NaN or Inf values. Fix the weights or leave the layer out (exclude_modules)."
            )


def _check_variants(layer, path: str, config: LoRAConfig, cls: type) -> None:
    """`use_dora` and `init` need the adapter class to implement them."""
    if config.use_dora and not getattr(cls, "supports_dora", False):
        raise NotImplementedError(
            f"Received use_dora=True, but layer '{path}' of type {_describe(layer)} has no DoRA in tf_lora "
            f"({cls.__name__}); DoRA is implemented for Dense and EinsumDense. Exclude the layer "
            "(exclude_modules) or use use_dora=False."
        )
    inits = getattr(cls, "supported_inits", ("he_uniform", "gaussian"))
    if config.init not in inits:
        raise NotImplementedError(
            f"Received init={config.init!r}, but layer '{path}' of type {_describe(layer)} ({cls.__name__}) "
            f"supports only init in {tuple(inits)}."
        )
