"""Switch a model to chunked attention: a copy with every
`keras.layers.MultiHeadAttention` replaced by a `ChunkedAttention` with the same
configuration and weights."""

from __future__ import annotations

from typing import Optional

import keras

from tf_lora import _compat, surgery
from tf_lora.layers.attention import ChunkedAttention
from tf_lora.layers.base import LoRALayer
from tf_lora.layers.chunked_op import _check_positive_int

__all__ = ["use_chunked_attention"]


def use_chunked_attention(
    model: keras.Model,
    *,
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
) -> keras.Model:
    """Returns a copy of `model` that uses `ChunkedAttention`.

    Every layer of type `keras.layers.MultiHeadAttention` (exactly that class:
    subclasses such as KerasHub's ``CachedMultiHeadAttention`` change `call` and
    are left as they are, as are layers that are already `ChunkedAttention`)
    becomes a `ChunkedAttention` with the same configuration and weights, plus
    the chunking arguments given here, wherever it sits: in the model graph, in
    nested models, inside custom blocks (e.g. a KerasHub ``BertBackbone``'s
    encoder layers). The copy has `model`'s class and gives the same predictions
    (up to float32 rounding); `model` itself is not changed. Convert before
    adapting: projections that already hold adapters are refused.

    Args:
        model: A built Keras model.
        query_chunk_size: See `ChunkedAttention`.
        key_chunk_size: See `ChunkedAttention`.
        max_memory_bytes: See `ChunkedAttention`.

    Returns:
        The converted copy.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: invalid chunking arguments; no MultiHeadAttention in the
            model (the message names the attention layer classes it has);
            attention projections that already hold adapters.

    Example:
        >>> x = keras.Input((128, 32))
        >>> y = keras.layers.MultiHeadAttention(4, 8)(x, x)
        >>> model = keras.Model(x, y)
        >>> chunked = use_chunked_attention(model, query_chunk_size=32)
        >>> type(chunked.layers[1]).__name__
        'ChunkedAttention'
    """
    _check_positive_int("query_chunk_size", query_chunk_size)
    _check_positive_int("key_chunk_size", key_chunk_size)
    _check_positive_int("max_memory_bytes", max_memory_bytes)
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a keras.Model. Received: model={model!r}")
    chunking = dict(query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, max_memory_bytes=max_memory_bytes)
    found, seen, kinds = {}, set(), set()
    for path, layer, _ in surgery.walk(model):
        if type(layer) is keras.layers.MultiHeadAttention and id(layer) not in seen:
            seen.add(id(layer))
            found[path] = layer
        elif "attention" in type(layer).__name__.lower():
            kinds.add(type(layer).__name__)
    if not found and not any(k == "ChunkedAttention" for k in kinds):
        raise ValueError(
            f"Received an invalid value for `model`: {model.name!r} has no keras.layers.MultiHeadAttention "
            f"to replace (its attention layers: {sorted(kinds) or 'none'}). Classes with their own call "
            "(a KV cache, rotary embeddings) cannot be swapped for ChunkedAttention."
        )
    adapted = [p for p, layer in found.items() if any(isinstance(s, LoRALayer) for s in surgery.children(layer))]
    if adapted:
        raise ValueError(f"Attention layers {adapted} already hold tf_lora adapters; call use_chunked_attention "
                         "on the base model, then adapt (or use LoRAConfig(attention='chunked')).")
    copied = surgery.copy_model(model, share=found.values())
    in_copy = {path: layer for path, layer, _ in surgery.walk(copied)}
    for path, layer in found.items():
        new = ChunkedAttention.from_config({**layer.get_config(), **chunking})
        new.build_from_config(layer.get_build_config())
        new.set_weights(layer.get_weights())
        _compat.become(in_copy[path], new)
    _compat.reset_traced_functions(copied)
    return copied
