"""Switch a model to chunked attention: a clone with every
`keras.layers.MultiHeadAttention` replaced by a `ChunkedAttention` with the same
configuration and weights."""

from __future__ import annotations

from typing import List, Optional, Tuple

import keras

from tf_lora.layers.attention import ChunkedAttention
from tf_lora.layers.chunked_op import _check_positive_int

from keras.src.models.functional import Functional  # the class of functional models

__all__ = ["use_chunked_attention"]


def use_chunked_attention(
    model: keras.Model,
    *,
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
) -> keras.Model:
    """Returns a clone of `model` that uses `ChunkedAttention`.

    Every layer of type `keras.layers.MultiHeadAttention` (exactly that class:
    subclasses may change `call` and are left as they are, as are layers that
    are already `ChunkedAttention`) becomes a `ChunkedAttention` with the same
    configuration and weights, plus the chunking arguments given here. Nested
    Functional and Sequential models are cloned recursively. All weights are
    copied, so the clone gives the same predictions (up to float32 rounding);
    `model` itself is not changed. The clone is not compiled.

    Attention layers held as attributes of custom (subclassed) layers are not
    reachable by `keras.models.clone_model` and stay as they are.

    Args:
        model: A Functional or Sequential model.
        query_chunk_size: See `ChunkedAttention`.
        key_chunk_size: See `ChunkedAttention`.
        max_memory_bytes: See `ChunkedAttention`.

    Returns:
        The converted clone.

    Raises:
        TypeError: `model` is not a Functional or Sequential model.
        ValueError: invalid chunking arguments.

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
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            "Received an invalid value for `model`, expected a Functional or Sequential "
            f"keras.Model (subclassed models cannot be cloned). Received: model={model!r}"
        )
    chunking = dict(
        query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, max_memory_bytes=max_memory_bytes
    )
    pairs: List[Tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        if type(layer) is keras.layers.MultiHeadAttention:
            new = ChunkedAttention.from_config({**layer.get_config(), **chunking})
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        weights = old.get_weights() if isinstance(old, keras.layers.Layer) else None  # ops have none
        if weights:
            if not new.built:  # e.g. a layer of an unbuilt Sequential
                new.build_from_config(old.get_build_config())
            new.set_weights(weights)
    return clone
