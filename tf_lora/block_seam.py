"""How each KerasHub decoder block reads a packed batch: one table row per block class.

`tf_lora.packing` takes ``segment_ids`` and ``positions`` out of a model's inputs and keeps
them on Keras' call context for the duration of the call (`use`, read back with `current`):
Keras' own way of passing `training` to nested layers, which gradient checkpointing
restores for the recomputation. Two kinds of layers read them, by class switch (only the
layer object's class changes; sublayers, weights and paths stay):

- **Positions.** KerasHub's rotary embeddings (inside the attention layers) and GPT-2's
  learned position embedding already take per-token ``positions``; `packed_position_class`
  passes the packed ones when the layer would number the tokens 0, 1, ... itself (never in
  cached decoding, which passes a start index).
- **Mask.** `packed_block_class` overrides the block's `call` and its mask method (named in
  its `Block` row): the block's own mask ANDed with "same segment, not padding", so an
  example attends only to earlier tokens of its own. When the block's attention is chunked
  (`tf_lora.use_chunked_attention`), the block hands it a `Deferred` mask (segment ids,
  causal flag, sliding window) and passes a (batch, T, 1) placeholder of ones: the dense
  (batch, T, T) mask is never built, packed or not, and the op skips the tiles of other
  segments. A call with a KV cache (`generate`) runs the block's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Dict, Optional

import keras
from keras import ops

from tf_lora import _compat
from tf_lora.attention_seam import ChunkedSeam, Deferred, deferred_mask

__all__ = ["ARCHITECTURES", "BLOCKS", "Architecture", "Block", "Packed", "current", "packed_block_class",
           "packed_position_class", "use"]

_CONTEXT_ATTRIBUTE = "_tf_lora_packed"


@dataclasses.dataclass(frozen=True)
class Packed:
    """The packed keys of the call in progress ((batch, T) int32 tensors or `None`)."""

    segment_ids: Any = None
    positions: Any = None


def current() -> Optional[Packed]:
    """The packed keys of the model call in progress, if any."""
    context = _compat.current_call_state()[0]
    return getattr(context, _CONTEXT_ATTRIBUTE, None) if context is not None else None


@contextlib.contextmanager
def use(packed: Packed):
    """Keeps `packed` on the Keras call context in progress while the body runs."""
    context = _compat.current_call_state()[0]
    previous = getattr(context, _CONTEXT_ATTRIBUTE, None)
    setattr(context, _CONTEXT_ATTRIBUTE, packed)
    try:
        yield
    finally:
        setattr(context, _CONTEXT_ATTRIBUTE, previous)


# -- the table ------------------------------------------------------------------------------


def _attention_window(attention) -> Optional[int]:
    return int(attention.sliding_window_size) if attention.use_sliding_window_attention else None


@dataclasses.dataclass(frozen=True)
class Block:
    """How one decoder block class masks its self-attention, read off its `call`.

    Attributes:
        models: The KerasHub models that use the class (for messages).
        mask: The method computing the block's (batch, T_q, T_k) self-attention mask.
        padding: Its `call` argument holding the padding mask.
        cache: Its `call` argument holding the KV cache (cached decoding runs unchanged).
        attention: Attribute holding the self-attention layer.
        positions: Attribute path (from the block) of the rotary embedding, or `None`.
        extra_mask: `call` argument with a caller's own attention mask (then the dense
            mask is kept), or `None`.
        causal: `call` argument switching the causal mask (default on), or `None`.
        window: The sliding window the block's mask or its attention applies, or `None`.
    """

    models: str
    mask: str
    padding: str
    cache: str
    attention: str
    positions: Optional[str] = None
    extra_mask: Optional[str] = None
    causal: Optional[str] = None
    window: Callable[[Any], Optional[int]] = lambda block: None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One backbone class: its decoder block class and where positions enter outside it."""

    models: str
    block: str
    position_embedding: Optional[str] = None


_HUB = "keras_hub.src.models."
_LLAMA_LIKE = dict(mask="_compute_self_attention_mask", padding="decoder_padding_mask", cache="self_attention_cache",
                   attention="_self_attention_layer", positions="_self_attention_layer.rotary_embedding_layer",
                   extra_mask="decoder_attention_mask")
BLOCKS: Dict[str, Block] = {
    "keras_hub.src.layers.modeling.transformer_decoder.TransformerDecoder": Block(
        models="GPT-2", mask="_compute_self_attention_mask", padding="decoder_padding_mask",
        cache="self_attention_cache", attention="_self_attention_layer", extra_mask="decoder_attention_mask",
        causal="use_causal_mask"),
    _HUB + "llama.llama_decoder.LlamaTransformerDecoder": Block(models="Llama, Llama 3", **_LLAMA_LIKE),
    _HUB + "mistral.mistral_transformer_decoder.MistralTransformerDecoder": Block(
        models="Mistral", window=lambda block: block.sliding_window, **_LLAMA_LIKE),  # in the block's mask
    _HUB + "qwen.qwen_decoder.QwenTransformerDecoder": Block(
        models="Qwen", window=lambda block: _attention_window(block._self_attention_layer), **_LLAMA_LIKE),
    _HUB + "gemma.gemma_decoder_block.GemmaDecoderBlock": Block(
        models="Gemma, Gemma 2", mask="_compute_attention_mask", padding="padding_mask", cache="cache",
        attention="attention", positions="attention.rope_layer",
        window=lambda block: _attention_window(block.attention)),
}
ARCHITECTURES: Dict[str, Architecture] = {
    _HUB + "gpt2.gpt2_backbone.GPT2Backbone": Architecture(
        "GPT-2", "keras_hub.src.layers.modeling.transformer_decoder.TransformerDecoder",
        position_embedding="position_embedding"),
    _HUB + "llama.llama_backbone.LlamaBackbone": Architecture(
        "Llama", _HUB + "llama.llama_decoder.LlamaTransformerDecoder"),
    _HUB + "llama3.llama3_backbone.Llama3Backbone": Architecture(
        "Llama 3", _HUB + "llama.llama_decoder.LlamaTransformerDecoder"),
    _HUB + "mistral.mistral_backbone.MistralBackbone": Architecture(
        "Mistral", _HUB + "mistral.mistral_transformer_decoder.MistralTransformerDecoder"),
    _HUB + "qwen.qwen_backbone.QwenBackbone": Architecture("Qwen", _HUB + "qwen.qwen_decoder.QwenTransformerDecoder"),
    _HUB + "gemma.gemma_backbone.GemmaBackbone": Architecture(
        "Gemma, Gemma 2", _HUB + "gemma.gemma_decoder_block.GemmaDecoderBlock"),
}


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def original_class(cls: type) -> type:
    return getattr(cls, "_packing_base", cls)


def attribute_at(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


# -- the switched classes -------------------------------------------------------------------

_SCOPE = threading.local()


@dataclasses.dataclass(frozen=True)
class _BlockScope:
    block: Any
    segment_ids: Any
    deferred: Optional[Deferred]


def _scope_of(block) -> Optional[_BlockScope]:
    stack = _SCOPE.__dict__.get("stack")
    return stack[-1] if stack and stack[-1].block is block else None


class PackedBlock:
    """Mixin of every `packed_block_class`: the block's mask honours the packed segments, or
    is handed to its chunked attention as a `Deferred` mask (see the module docstring)."""

    _packing: Block
    _packing_base: type

    def call(self, *args, **kwargs):
        row, base_call = self._packing, super().call
        arguments = _signature(self._packing_base).bind(self, *args, **kwargs)
        arguments.apply_defaults()
        named = arguments.arguments
        if named.get(row.cache) is not None:
            return base_call(*args, **kwargs)
        packed = current()
        segments = packed.segment_ids if packed is not None else None
        attention = attribute_at(self, row.attention)
        defer = (isinstance(attention, ChunkedSeam) and (row.extra_mask is None or named.get(row.extra_mask) is None)
                 and (row.causal is None or named.get(row.causal) is True))
        if segments is None and not defer:
            return base_call(*args, **kwargs)
        deferred = None
        if defer:
            sequence = list(named.values())[1]  # after self: the block's input sequence
            queries = segments if segments is not None else ops.ones(ops.shape(sequence)[:2], "int32")
            padding = named.get(row.padding)
            if padding is None:
                padding = _compat.get_keras_mask(sequence)
            keys = queries if padding is None else queries * ops.cast(ops.not_equal(padding, 0), "int32")
            deferred = Deferred(queries, keys, causal=True, window=row.window(self))
        stack = _SCOPE.__dict__.setdefault("stack", [])
        stack.append(_BlockScope(self, segments, deferred))
        try:
            with deferred_mask(attention, deferred):
                return base_call(*args, **kwargs)
        finally:
            stack.pop()


def _packed_mask(self, *args, **kwargs):
    """The block's mask method: its own mask, restricted to the packed segments; or, when its
    attention takes a `Deferred` mask, a (batch, T, 1) placeholder of ones."""
    own = getattr(super(PackedBlock, self), self._packing.mask)
    scope = _scope_of(self)
    if scope is None:
        return own(*args, **kwargs)
    if scope.deferred is not None:
        return ops.ones_like(scope.deferred.segment_ids)[:, :, None]
    mask = own(*args, **kwargs)
    segments = ops.cast(scope.segment_ids, "int32")
    keys = segments[:, None, :]
    same = ops.logical_and(ops.equal(segments[:, :, None], keys), ops.not_equal(keys, 0))
    return ops.cast(ops.logical_and(ops.cast(mask, "bool"), same), mask.dtype)


class PackedPositions:
    """Mixin of every `packed_position_class`: a layer that numbers the tokens 0, 1, ...
    (``start_index=0``, no ``positions``) takes the packed positions of the call instead."""

    _packing_base: type

    def call(self, inputs, start_index=0, positions=None):
        if positions is None and isinstance(start_index, int) and start_index == 0:
            packed = current()
            if packed is not None and packed.positions is not None:
                positions = packed.positions
        return super().call(inputs, start_index=start_index, positions=positions)


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.call)


_CLASSES: Dict[type, type] = {}


def _subclass(base: type, mixin: type, extra: dict) -> type:
    if base not in _CLASSES:
        name = f"Packed{base.__name__}"  # keeps the *TransformerDecoder/*DecoderBlock suffix checkpointing finds
        cls = type(name, (mixin, base), {
            "__module__": __name__, "__qualname__": name, "_packing_base": base, **extra,
            "__doc__": f"{base.__name__} that reads packed segment_ids/positions (see tf_lora.block_seam).",
        })
        _CLASSES[base] = keras.saving.register_keras_serializable(package="tf_lora", name=name)(cls)
    return _CLASSES[base]


def packed_block_class(base: type) -> type:
    """The registered subclass of `base` (a class in `BLOCKS`) that honours packed segments."""
    row = BLOCKS.get(qualname(base))
    arguments = [name for name in (row.padding, row.cache, row.extra_mask, row.causal) if name] if row else []
    if row is None or not callable(getattr(base, row.mask, None)) or not set(arguments) <= set(
            _signature(base).parameters):  # another KerasHub version: its call is not the one the row describes
        raise NotImplementedError(f"No packing support for the decoder block {base.__name__}.")
    return _subclass(base, PackedBlock, {"_packing": row, row.mask: _packed_mask})


def packed_position_class(base: type) -> type:
    """The registered subclass of `base` (a layer whose `call` takes ``(inputs, start_index,
    positions)``: KerasHub's rotary and position embeddings) that reads packed positions."""
    if list(_signature(base).parameters)[1:4] != ["inputs", "start_index", "positions"]:
        raise NotImplementedError(f"No packing support for the position layer {base.__name__}: its call does not "
                                  "take (inputs, start_index, positions).")
    return _subclass(base, PackedPositions, {})
