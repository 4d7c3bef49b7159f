"""How each KerasHub decoder's attention reaches the chunked op: one table row per class.

KerasHub's attention layers project the inputs, apply rotary embeddings, read and write
the KV cache, and then call ``self._compute_attention(query, key, value, attention_mask,
...)``, which builds the (heads, T_q, T_k) scores, masks them with the (batch, T_q, T_k)
mask the decoder block computed, and applies the softmax. That method is the seam:
`chunked_class(cls)` is a subclass of `cls` that overrides `_compute_attention` alone and
sends its inputs to `masked_chunked_attention`. The projections (``query``, ``key``,
``value``, ``attention_output`` and the LoRA adapters in them), the rotary embedding and
the KV cache stay the model's own; `use_chunked_attention` switches a layer by setting its
class, so its sublayers, weights and paths are kept.

What differs between the architectures is data, one `Seam` row per class in `SEAMS`: the
query scale, soft-cap, sliding window, dropout and grouped-query layout. Masks come
from the model: the op gets the mask the layer itself would use (causal and padding,
sliding window, and the offset of cached decoding in `generate`), so both paths attend to
exactly the same keys; tiles the mask hides entirely are skipped, so a causal or
sliding-window mask costs no more than the band.

A decoder block may instead hand its chunked attention a `Deferred` mask (see
`tf_lora.packing`): segment ids of the queries and keys, the causal flag and the sliding
window, from which the op builds each tile itself and skips the tiles of other segments;
no (batch, T, T) mask is built or kept for the backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lora.layers.chunked_op import _normalize_mask, masked_chunked_attention

__all__ = ["SEAMS", "Deferred", "Seam", "chunked_class", "deferred_mask", "seam_for"]


@functools.lru_cache(maxsize=None)
def softmax_empty_rows() -> str:
    """What Keras' masked `Softmax` gives a row with every entry masked: "zero" (Keras >= 3.9
    zeroes it) or "mean" (older versions: uniform weights, the mean of the values)."""
    with tf.init_scope():  # eager, also when first asked inside a traced function
        out = keras.layers.Softmax()(ops.zeros((1, 2)), mask=ops.zeros((1, 2), "bool"))
        return "zero" if float(ops.sum(out)) == 0.0 else "mean"


@dataclasses.dataclass(frozen=True)
class Seam:
    """How one attention class computes attention, read off its `_compute_attention`.

    Attributes:
        models: The KerasHub models that use the class (for messages).
        heads: Attribute holding the number of query heads.
        kv_heads: Attribute holding the number of key/value heads (grouped-query
            attention), or `None` when each query head has its own.
        kv_repeated: `call` repeats key/value per query head before
            `_compute_attention`; the seam takes every `groups`-th head back so the op
            never works on the copies.
        scale: The layer's query/score scale.
        soft_cap: The layer's attention logit soft-cap, or `None`.
        window: ``(flag, method)``: when attribute `flag` is true the layer masks a
            sliding window with its own ``method(mask, cache_update_index=...)``.
        dropout: ``(rate, layer)`` attributes when dropout acts on the probabilities
            inside `_compute_attention` (otherwise the model drops the output itself).
        empty_rows: What the layer outputs for a row that sees no key ("zero"/"mean").
        returns_scores: `_compute_attention` returns ``(output, scores)`` (Keras MHA).
    """

    models: str
    heads: str
    scale: Callable[[Any], float]
    kv_heads: Optional[str] = None
    kv_repeated: bool = False
    soft_cap: Callable[[Any], Optional[float]] = lambda layer: None
    window: Optional[tuple] = None
    dropout: Optional[tuple] = None
    empty_rows: Callable[[Any], str] = lambda layer: softmax_empty_rows()
    returns_scores: bool = False


def _gemma_scale(layer) -> float:
    if layer.query_head_dim_normalize:
        return 1 / np.sqrt(layer.head_dim)
    return 1 / np.sqrt(layer.hidden_dim // layer.num_query_heads)


def _mha_empty_rows(layer) -> str:
    # Keras' MHA runs dot_product_attention (a masked row: uniform weights) unless dropout is
    # on; then its masked Softmax (a masked row: see softmax_empty_rows).
    return softmax_empty_rows() if layer._dropout > 0 else "mean"


_MODELS = "keras_hub.src.models."
SEAMS: Dict[str, Seam] = {
    "keras_hub.src.layers.modeling.cached_multi_head_attention.CachedMultiHeadAttention": Seam(
        models="GPT-2 and other KerasHub TransformerDecoders", heads="num_heads",
        scale=lambda layer: layer._inverse_sqrt_key_dim, dropout=("_dropout", "_dropout_layer"),
        empty_rows=_mha_empty_rows, returns_scores=True),
    _MODELS + "llama.llama_attention.LlamaAttention": Seam(
        models="Llama, Llama 3", heads="num_query_heads", kv_heads="num_key_value_heads", kv_repeated=True,
        scale=lambda layer: layer._inv_norm_factor),
    _MODELS + "mistral.mistral_attention.CachedMistralAttention": Seam(
        # The sliding window is in the decoder block's mask.
        models="Mistral", heads="_num_query_heads", kv_heads="_num_key_value_heads", kv_repeated=True,
        scale=lambda layer: layer._inv_norm_factor),
    _MODELS + "qwen.qwen_attention.QwenAttention": Seam(
        models="Qwen", heads="num_query_heads", kv_heads="num_key_value_heads", kv_repeated=True,
        scale=lambda layer: layer._inv_norm_factor,
        window=("use_sliding_window_attention", "_mask_sliding_window")),
    _MODELS + "gemma.gemma_attention.CachedGemmaAttention": Seam(
        # `call` zeroes the output of rows that see no key after _compute_attention.
        models="Gemma, Gemma 2", heads="num_query_heads", scale=_gemma_scale,
        soft_cap=lambda layer: layer.logit_soft_cap, window=("use_sliding_window_attention", "_mask_sliding_window"),
        dropout=("dropout", "dropout_layer"), empty_rows=lambda layer: "zero"),
}


@dataclasses.dataclass(frozen=True)
class Deferred:
    """The mask a decoder block hands its chunked attention instead of a (batch, T, T) one.

    Query ``i`` sees key ``j`` iff ``segment_ids[i] == key_segment_ids[j] != 0``, ``j <= i``
    (when `causal`) and ``i - j < window`` (when a window is set): KerasHub's causal +
    padding mask when the ids are ones and the padding mask, and a packed row's
    segment-aware one when they are its segment ids.

    Attributes:
        segment_ids: (batch, T) int32 ids of the queries.
        key_segment_ids: (batch, T) int32 ids of the keys (0 on padding).
        causal: Whether the mask is causal.
        window: Sliding window (keys ``i - window < j``), or `None`.
    """

    segment_ids: Any
    key_segment_ids: Any
    causal: bool = True
    window: Optional[int] = None

    def dense(self) -> tf.Tensor:
        """The (batch, T, T) bool mask this stands for (for the layer's own computation)."""
        q, k = self.segment_ids[:, :, None], self.key_segment_ids[:, None, :]
        mask = (q == k) & (k != 0)
        i, j = tf.range(tf.shape(q)[1])[:, None], tf.range(tf.shape(k)[2])[None, :]
        if self.causal:
            mask &= (j <= i)[None]
        if self.window is not None:
            mask &= (i - j < self.window)[None]
        return mask


_DEFERRED = threading.local()


@contextlib.contextmanager
def deferred_mask(layer, deferred: Optional[Deferred]):
    """While the body runs, chunked attention `layer` uses `deferred` (if not None) instead of
    the mask its caller passes (a placeholder)."""
    stack = _DEFERRED.__dict__.setdefault("stack", [])
    stack.append((layer, deferred))
    try:
        yield
    finally:
        stack.pop()


def _deferred_for(layer) -> Optional[Deferred]:
    stack = _DEFERRED.__dict__.get("stack")
    return stack[-1][1] if stack and stack[-1][0] is layer else None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def seam_for(cls: type) -> Optional[Seam]:
    """The table row of exactly `cls` (a subclass may compute attention differently)."""
    return SEAMS.get(_qualname(cls))


class ChunkedSeam:
    """Mixin of every `chunked_class`: `_compute_attention` through `masked_chunked_attention`.

    Chunking settings (`query_chunk_size`, `key_chunk_size`, `max_memory_bytes`) are
    constructor arguments and part of the config, as in `ChunkedAttention`.
    """

    _seam: Seam
    _base: type

    def __init__(self, *args, query_chunk_size=None, key_chunk_size=None, max_memory_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_chunking(query_chunk_size, key_chunk_size, max_memory_bytes)

    def set_chunking(self, query_chunk_size=None, key_chunk_size=None, max_memory_bytes=None) -> None:
        for name, value in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size),
                            ("max_memory_bytes", max_memory_bytes)):
            object.__setattr__(self, name, None if value is None else int(value))

    def get_config(self) -> dict:
        return {**super().get_config(), "query_chunk_size": self.query_chunk_size,
                "key_chunk_size": self.key_chunk_size, "max_memory_bytes": self.max_memory_bytes}

    def _compute_attention(self, *args, **kwargs):
        base = super()._compute_attention
        bound = inspect.signature(base).bind(*args, **kwargs)
        bound.apply_defaults()
        named = bound.arguments
        query, key, value = list(named.values())[:3]
        seam = self._seam
        deferred = _deferred_for(self)
        if named.get("return_attention_scores") or len(query.shape) != 4:
            if deferred is not None:  # the placeholder stands for this mask
                named["attention_mask"] = deferred.dense()
            return base(*bound.args, **bound.kwargs)  # scores are asked for: the layer's own computation
        mask = None if deferred is not None else named.get("attention_mask")
        if seam.window is not None and mask is not None and getattr(self, seam.window[0]):
            index = named.get("cache_update_index")
            mask = getattr(self, seam.window[1])(mask, cache_update_index=0 if index is None else index)
        if seam.kv_repeated:
            groups = getattr(self, seam.heads) // getattr(self, seam.kv_heads)
            if groups > 1:  # undo call's ops.repeat(key, groups, axis=2): the op groups the heads itself
                key, value = key[:, :, ::groups], value[:, :, ::groups]
        masks = []
        if mask is not None:
            shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[1])
            masks.append(_normalize_mask(mask, shape))
        rate, seed, training = 0.0, None, bool(named.get("training"))
        if seam.dropout is not None and training:
            rate = float(getattr(self, seam.dropout[0]) or 0.0)
            seed = getattr(getattr(self, seam.dropout[1]), "seed_generator", None) if rate > 0 else None
        segments = {}
        if deferred is not None:
            segments = dict(segment_ids=deferred.segment_ids, key_segment_ids=deferred.key_segment_ids,
                            sliding_window=deferred.window)
        output = masked_chunked_attention(
            query, key, value, masks,
            causal=deferred.causal if deferred is not None else bool(named.get("use_causal_mask", False)),
            **segments,
            soft_cap=seam.soft_cap(self),
            empty_rows=seam.empty_rows(self),
            query_chunk_size=self.query_chunk_size,
            key_chunk_size=self.key_chunk_size,
            max_memory_bytes=self.max_memory_bytes,
            dropout=rate,
            training=training,
            seed=seed,
            scale=float(seam.scale(self)),
        )
        return (output, None) if seam.returns_scores else output


_CLASSES: Dict[type, type] = {}


def chunked_class(base: type) -> type:
    """The registered subclass of `base` (a class in `SEAMS`) with chunked attention."""
    if base not in _CLASSES:
        seam = seam_for(base)
        if seam is None:
            raise NotImplementedError(f"No chunked attention for {base.__name__}.")
        name = f"Chunked{base.__name__}"
        cls = type(name, (ChunkedSeam, base), {
            "__module__": __name__, "__qualname__": name, "_seam": seam, "_base": base,
            "__doc__": f"{base.__name__} whose attention runs through tf_lora's exact chunked op "
                       "(see tf_lora.use_chunked_attention).",
        })
        _CLASSES[base] = keras.saving.register_keras_serializable(package="tf_lora", name=name)(cls)
    return _CLASSES[base]
