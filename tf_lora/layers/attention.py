"""`ChunkedAttention`: a drop-in `keras.layers.MultiHeadAttention` with exact,
memory-efficient chunked attention (the op lives in `chunked_op`).

The layer subclasses `keras.layers.MultiHeadAttention` and keeps its weights and
projections (`EinsumDense` sublayers named ``query``, ``key``, ``value``,
``attention_output``), so ``layer.set_weights(mha.get_weights())`` reproduces
the same outputs and LoRA `target_modules` find the projections. Only the
attention in the middle changes: `chunked_attention` instead of the full
(T_q, T_k) score matrix. Padding masks (Keras masks of the inputs and
`attention_mask`), `use_causal_mask` and `sliding_window` are passed to the op
as separate, broadcastable masks, so no (T_q, T_k) mask is built either.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

from tf_lora.layers.chunked_op import (
    _check_positive_int,
    _normalize_mask,
    chunked_attention,
    masked_chunked_attention,
)

from tf_lora._compat import get_keras_mask, set_keras_mask


__all__ = ["ChunkedAttention", "chunked_attention"]

_NO_SCORES = (
    "`ChunkedAttention` does not support `return_attention_scores=True`: it never "
    "materialises the (T_q, T_k) attention scores (that is what keeps its memory "
    "linear in sequence length). Use `keras.layers.MultiHeadAttention` with the same "
    "weights (`mha.set_weights(layer.get_weights())`) to inspect them. "
    "Received: return_attention_scores=True"
)


@keras.saving.register_keras_serializable(package="tf_lora")
class ChunkedAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention computed in chunks, with memory linear in length.

    Same constructor and call signature as `keras.layers.MultiHeadAttention`
    (all its arguments are accepted and mean the same), plus the chunking
    arguments below. Outputs and gradients equal those of
    `MultiHeadAttention` with the same weights up to float32 rounding; only
    `return_attention_scores=True` is unsupported. Attention is computed over
    the sequence axis of (batch, seq, features) inputs. Dropout has the same
    distribution as `MultiHeadAttention`'s but draws its own masks, and a row
    that sees no key (it averages all values) gets no dropout.

    Args:
        *args: Positional arguments of `keras.layers.MultiHeadAttention`
            (`num_heads`, `key_dim`, ...).
        query_chunk_size: Queries per chunk, or `None` to derive it from
            `max_memory_bytes`.
        key_chunk_size: Keys per chunk, or `None` to derive it.
        max_memory_bytes: Budget for one float32 score tile of all batch
            elements and heads; see `chunked_attention`. Defaults to 16 MiB
            tiles, with a whole score matrix up to 64 MiB computed fused.
        **kwargs: Keyword arguments of `keras.layers.MultiHeadAttention`.

    Example:
        >>> layer = ChunkedAttention(num_heads=4, key_dim=16, query_chunk_size=64)
        >>> x = keras.random.normal((2, 200, 32))
        >>> tuple(layer(x, x, use_causal_mask=True).shape)
        (2, 200, 32)
    """

    def __init__(
        self,
        *args,
        query_chunk_size: Optional[int] = None,
        key_chunk_size: Optional[int] = None,
        max_memory_bytes: Optional[int] = None,
        **kwargs,
    ):
        _check_positive_int("query_chunk_size", query_chunk_size)
        _check_positive_int("key_chunk_size", key_chunk_size)
        _check_positive_int("max_memory_bytes", max_memory_bytes)
        kwargs.pop("flash_attention", None)  # this layer *is* the memory-efficient path
        super().__init__(*args, **kwargs)
        self._flash_attention = False
        self.query_chunk_size = None if query_chunk_size is None else int(query_chunk_size)
        self.key_chunk_size = None if key_chunk_size is None else int(key_chunk_size)
        self.max_memory_bytes = None if max_memory_bytes is None else int(max_memory_bytes)

    def build(self, query_shape, value_shape, key_shape=None):
        if len(query_shape) != 3 or len(value_shape) != 3:
            raise NotImplementedError(
                "`ChunkedAttention` supports (batch, seq, features) inputs only. "
                f"Received: query_shape={tuple(query_shape)}, value_shape={tuple(value_shape)}"
            )
        super().build(query_shape, value_shape, key_shape)
        if tuple(self._attention_axes) != (1,):
            raise NotImplementedError(
                "`ChunkedAttention` attends over the sequence axis only, expected "
                f"attention_axes=None or (1,). Received: attention_axes={self._attention_axes}"
            )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            query_chunk_size=self.query_chunk_size,
            key_chunk_size=self.key_chunk_size,
            max_memory_bytes=self.max_memory_bytes,
        )
        return config

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores: bool = False,
        training: Optional[bool] = None,
        use_causal_mask: bool = False,
    ):
        if return_attention_scores:
            raise NotImplementedError(_NO_SCORES)
        if key is None:
            key = value
        if query_mask is None:
            query_mask = get_keras_mask(query)
        # Masks are applied here, not by the projections.
        for x in (query, value, key):
            set_keras_mask(x, None)
        gate = self._gate_dense(query) if getattr(self, "_use_gate", False) else None
        query = self._query_dense(query)
        key = self._key_dense(key)
        value = self._value_dense(value)
        shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[1])
        masks = []
        if attention_mask is not None:
            attention_mask = ops.convert_to_tensor(attention_mask)
            if len(attention_mask.shape) == 2:  # (T_q, T_k) for all batch elements, as in MultiHeadAttention
                attention_mask = attention_mask[None]
            masks.append(_normalize_mask(attention_mask, shape))
        if query_mask is not None:
            masks.append(ops.cast(query_mask, "bool")[:, None, :, None])
        for mask in (value_mask, key_mask):
            if mask is not None:
                masks.append(ops.cast(mask, "bool")[:, None, None, :])
        dropout_rate = self._dropout if training else 0.0
        seed = getattr(self._dropout_layer, "seed_generator", None) if dropout_rate > 0 else None
        output = masked_chunked_attention(
            query, key, value, masks,
            causal=bool(use_causal_mask),
            sliding_window=getattr(self, "_sliding_window", None),
            query_chunk_size=self.query_chunk_size,
            key_chunk_size=self.key_chunk_size,
            max_memory_bytes=self.max_memory_bytes,
            dropout=dropout_rate,
            training=bool(training),
            seed=seed,
            scale=self._inverse_sqrt_key_dim,
        )
        if gate is not None:
            output = ops.multiply(output, gate)
        output = self._output_dense(output)
        if query_mask is not None:
            set_keras_mask(output, query_mask)
        return output

    def compute_output_spec(self, query, value, key=None, *args: Any, return_attention_scores=False, **kwargs):
        if return_attention_scores:
            raise NotImplementedError(_NO_SCORES)
        return super().compute_output_spec(query, value, key, *args, **kwargs)
