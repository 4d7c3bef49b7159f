"""Packed rows in KerasHub decoders: `segment_ids` and `positions` beside `token_ids`.

A packed batch (`tf_lora.data` with ``packing=True``) is a dict with ``token_ids``,
``padding_mask``, ``segment_ids`` (int32; 0 = padding, 1..k = the example within its
row) and ``positions`` (int32, restarting at 0 for each example). A KerasHub backbone is
a Functional model whose inputs are ``token_ids`` and ``padding_mask`` alone (Keras drops
other keys with a warning, and the examples of a row would attend to each other).

The entry: the model's `call` (`packed_call`) takes the two keys out of the inputs,
checks them and keeps them on Keras' call context while the model's own graph runs on
the rest; the decoder blocks and position layers read them there (`tf_lora.block_seam`,
one table row per architecture). An adapted model's class does this (`tf_lora.adapt`
returns it); `enable_packing` gives any other supported model, and the backbone of a
task, an instance `call` that does it. Without the two keys the model computes what it
did before.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import keras
from keras import ops

from tf_lora import _compat, surgery
from tf_lora.block_seam import (ARCHITECTURES, BLOCKS, Packed, attribute_at, original_class, packed_block_class,
                                packed_position_class, qualname, use)

__all__ = ["KEYS", "enable_packing", "packed_call", "supports_packing"]

KEYS = ("segment_ids", "positions")
_ENABLED = "_tf_lora_packing"


# -- the entry ------------------------------------------------------------------------------


def _input_names(model) -> set:
    try:
        inputs = model.input
    except (AttributeError, ValueError):
        return set()
    return set(inputs) if isinstance(inputs, dict) else set()


def _int_ids(name: str, value, like) -> Any:
    value = ops.convert_to_tensor(value)
    shape = tuple(like.shape) if like is not None else (None, None)
    fits = len(value.shape) == 2 and len(shape) == 2 and all(
        a is None or b is None or a == b for a, b in zip(value.shape, shape))
    if not fits or "int" not in keras.backend.standardize_dtype(value.dtype):
        raise ValueError(f"Received an invalid value for `{name}`, expected integers of the shape of `token_ids` "
                         f"(batch, sequence_length) = {shape}. Received: {name}=<tensor of shape "
                         f"{tuple(value.shape)} and dtype {value.dtype}>")
    return ops.cast(value, "int32")


def _packed(inputs: dict, given: List[str]) -> Packed:
    if "segment_ids" in given and "positions" not in given:
        raise ValueError("Received `segment_ids` without `positions`: a packed batch needs both (positions restart "
                         "at 0 for each example, as tf_lora.data writes them). Received keys: " + str(sorted(inputs)))
    like = inputs.get("token_ids")
    like = ops.convert_to_tensor(like) if like is not None else None
    return Packed(**{name: _int_ids(name, inputs[name], like) for name in given})


def supported_models() -> str:
    return ", ".join(row.models for row in ARCHITECTURES.values()) + " (KerasHub backbones and their CausalLMs)"


def packed_call(model, call, *args, **kwargs):
    """Runs ``call(*args, **kwargs)`` (`model`'s own call), with a packed batch's
    ``segment_ids``/``positions`` taken out of the input dict and kept for its layers."""
    inputs = args[0] if args else kwargs.get("inputs")
    if not isinstance(inputs, dict) or not any(key in inputs for key in KEYS):
        return call(*args, **kwargs)
    own = _input_names(model)
    given = [key for key in KEYS if key in inputs and key not in own]
    if not given:
        return call(*args, **kwargs)
    if not model.__dict__.get(_ENABLED):
        raise NotImplementedError(
            f"Model {model.name!r} ({type(model).__name__}) received packed inputs {given}, which its layers do not "
            f"read (its examples would attend to each other). Packing is supported for: {supported_models()}; "
            "call tf_lora.enable_packing(model) on one of those, or train on unpacked rows.")
    context = _compat.current_call_state()[0]
    if context is None:  # `model.call(...)` called directly: go through __call__, which opens the call context
        return model(*args, **kwargs)
    packed = _packed(inputs, given)
    rest = {key: value for key, value in inputs.items() if key not in given}
    if args:
        args = (rest, *args[1:])
    else:
        kwargs = {**kwargs, "inputs": rest}
    with use(packed):
        return call(*args, **kwargs)


class _Entry:
    """The instance `call` of a packing-enabled model whose class does not route packed inputs
    (the backbone of a task; a model that is not adapted). An object, so that copying the
    model rebinds it; it wraps an instance `call` the model already had (the chunked loss's)."""

    def __init__(self, model, inner=None):
        self.model, self.inner = model, inner

    def __call__(self, *args, **kwargs):
        call = self.inner if self.inner is not None else type(self.model).call.__get__(self.model)
        return packed_call(self.model, call, *args, **kwargs)


# -- switching a model ----------------------------------------------------------------------


def _backbone(model):
    try:
        from keras_hub.models import Backbone, CausalLM
    except ImportError:  # pragma: no cover - keras_hub is optional
        return None
    if isinstance(model, Backbone):
        return model
    return getattr(model, "backbone", None) if isinstance(model, CausalLM) else None


def supports_packing(model) -> bool:
    """Whether `enable_packing` supports `model`: a built backbone or CausalLM of an architecture
    in `ARCHITECTURES` whose layers take what the table describes."""
    backbone = _backbone(model)
    if backbone is None or qualname(type(backbone)) not in ARCHITECTURES:
        return False
    try:
        plan_packing(model)
    except (NotImplementedError, ValueError):  # another KerasHub version's layers; not built
        return False
    return True


def plan_packing(model) -> List[Tuple[Any, type]]:
    """The ``[(layer, packed class)]`` `enable_packing` would switch; raises its errors
    without changing anything."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a keras.Model. Received: model={model!r}")
    backbone = _backbone(model)
    arch = ARCHITECTURES.get(qualname(type(backbone))) if backbone is not None else None
    if arch is None:
        raise NotImplementedError(f"Packing (segment_ids, positions) does not support {type(model).__name__} "
                                  f"{model.name!r}. Supported: {supported_models()}.")
    row, switches = BLOCKS[arch.block], []
    blocks = [layer for _, layer, _ in surgery.walk(backbone) if qualname(original_class(type(layer))) == arch.block]
    if not blocks:
        raise ValueError(f"Received an invalid value for `model`: {model.name!r} has no {arch.block.rsplit('.', 1)[1]} "
                         "decoder block.")
    places = [(block, row.positions) for block in blocks] + [(backbone, arch.position_embedding)]
    for block in blocks:
        switches.append((block, packed_block_class(original_class(type(block)))))
    for owner, path in places:
        if path is None:
            continue
        layer = attribute_at(owner, path)
        if layer is None:
            raise ValueError(f"Received an invalid value for `model`: {owner.name!r} has no built {path!r}; call the "
                             "model on data first.")
        switches.append((layer, packed_position_class(original_class(type(layer)))))
    return [(layer, cls) for layer, cls in switches if type(layer) is not cls]


def switch_layers(model) -> bool:
    """Switches the blocks and position layers of a supported `model` (so that chunked attention
    gets `Deferred` masks); `False`, changing nothing, for other models."""
    if not supports_packing(model):
        return False
    for layer, cls in plan_packing(model):
        layer.__class__ = cls
    return True


def enable_packing(model: keras.Model) -> keras.Model:
    """Makes a KerasHub decoder read packed batches, in place, and returns it.

    After it, `fit`, `evaluate`, `predict` and calling the model take dicts with
    ``segment_ids`` (0 = padding, 1..k = the example within the row) and ``positions``
    (restarting at 0 for each example) beside ``token_ids`` and ``padding_mask``, as
    `tf_lora.data` writes them with ``packing=True``: each example attends only to
    earlier tokens of its own segment, and rotary / learned position embeddings see the
    positions it would have alone, so per-example losses and gradients equal those of
    the examples run unpacked (float32, relative 1e-5). Without the two keys the model
    computes what it did before; `generate` is unchanged. With chunked attention
    (`tf_lora.use_chunked_attention`) no (batch, T, T) mask is built, and tiles of
    other examples are skipped.

    Models returned by `tf_lora.adapt` do this themselves (also after a `.keras` load);
    call it on a model that is not adapted. Call it after `tf_lora.use_chunked_loss` on
    such a model (the loss replaces the model's instance `call`).

    Args:
        model: A KerasHub backbone or CausalLM of GPT-2, Llama, Llama 3, Mistral, Qwen,
            Gemma or Gemma 2.

    Returns:
        `model`.

    Raises:
        TypeError: `model` is not a Keras model.
        NotImplementedError: another architecture (the message lists the supported ones).
        On any error the model is left unchanged. Calling a model that does not read
        them with ``segment_ids``/``positions`` raises `NotImplementedError` if it was
        adapted (instead of Keras' warning that drops them).

    Example:
        >>> lm = tf_lora.enable_packing(keras_hub.models.GPT2CausalLM(backbone))  # doctest: +SKIP
        >>> lm.fit(tf_lora.data.causal_lm_dataset(rows, lm, 512, 8, packing=True))  # doctest: +SKIP
    """
    from tf_lora.train import AdaptedModel

    for layer, cls in plan_packing(model):
        layer.__class__ = cls
    backbone = _backbone(model)
    for target in {id(m): m for m in (model, backbone)}.values():
        object.__setattr__(target, _ENABLED, True)
        own = target.__dict__.get("call")
        if isinstance(own, _Entry):
            own.model = target
        elif not isinstance(target, AdaptedModel):  # an adapted class routes packed inputs itself
            object.__setattr__(target, "call", _Entry(target, own))
        _compat.reset_traced_functions(target)
    return model
