"""Switch a model to exact chunked attention, in place.

Every attention layer of a supported class gets a subclass that computes attention with
`masked_chunked_attention` and keeps everything else: `keras.layers.MultiHeadAttention`
becomes `ChunkedAttention`; the attention of KerasHub decoders (GPT-2, Llama, Llama 3,
Mistral, Qwen, Gemma, Gemma 2) becomes its `attention_seam.chunked_class`. Only the class
of each layer object changes, so sublayers (projections, LoRA adapters), weights, variable
paths and the model's own class stay as they are.
"""

from __future__ import annotations

from typing import Optional

import keras

from tf_lora import _compat, packing, surgery
from tf_lora.attention_seam import SEAMS, ChunkedSeam, chunked_class, seam_for
from tf_lora.layers.attention import ChunkedAttention
from tf_lora.layers.chunked_op import _check_positive_int

__all__ = ["use_chunked_attention"]


def supported_classes() -> str:
    hub = ", ".join(f"{name.rsplit('.', 1)[1]} ({seam.models})" for name, seam in SEAMS.items())
    return f"keras.layers.MultiHeadAttention, {hub}"


def _target(layer) -> Optional[type]:
    """The chunked class for `layer`, `None` if it is not an attention layer, or the layer's
    own class if it is already chunked."""
    cls = type(layer)
    if isinstance(layer, (ChunkedAttention, ChunkedSeam)):
        return cls
    if cls is keras.layers.MultiHeadAttention:
        return ChunkedAttention
    if seam_for(cls) is not None:
        return chunked_class(cls)
    return None


def _looks_like_attention(layer) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention) or type(layer).__name__.endswith("Attention")


def _heads(layer) -> int:
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return int(layer.num_heads)
    return int(getattr(layer, seam_for(type(layer)).heads))


def _check_layer(path: str, layer) -> None:
    """Shapes the chunked classes handle: attention over axis 1 of (batch, seq, features)."""
    if not layer.built:
        raise ValueError(f"Received an invalid value for `model`: its attention layer {path!r} is not built; "
                         "call the model on data first.")
    if isinstance(layer, keras.layers.MultiHeadAttention):
        query_shape = (layer.get_build_config() or {}).get("shapes_dict", {}).get("query_shape")
        if tuple(layer._attention_axes) != (1,) or (query_shape is not None and len(query_shape) != 3):
            raise NotImplementedError(
                f"Chunked attention attends over the sequence axis of (batch, seq, features) inputs only. "
                f"Received: attention layer {path!r} with attention_axes={layer._attention_axes}, "
                f"query_shape={query_shape}")


def use_chunked_attention(
    model: keras.Model,
    max_memory_bytes: Optional[int] = None,
    *,
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
) -> keras.Model:
    """Switches `model` to exact chunked attention in place and returns it.

    Every attention layer becomes a subclass of its own class whose attention runs
    through `tf_lora.chunked_attention`'s op: online softmax in (query chunk x key chunk)
    tiles, a recomputing backward, so training memory grows linearly with the sequence
    length instead of quadratically. Outputs and gradients equal the model's own up to
    float32 rounding: the op gets the mask, query scale, soft-cap, sliding window and
    grouped-query layout the layer itself uses, rotary embeddings and the KV cache of
    `generate` stay the layer's, and dropout keeps its rate and `training` flag (with
    masks of its own). Supported: `keras.layers.MultiHeadAttention` (anywhere, e.g. in a
    KerasHub `BertBackbone`), and KerasHub's GPT-2, Llama, Llama 3, Mistral, Qwen,
    Gemma and Gemma 2 backbones and tasks. Layers already switched keep their settings.
    The decoder blocks of those KerasHub models then hand the op the padding (and, for
    packed batches, segment) ids instead of building their (batch, T, T) mask (see
    `tf_lora.enable_packing`).

    Only each layer's class changes (its sublayers, weights and variable paths stay),
    so this works before or after `tf_lora.adapt`, and the model keeps its class.
    A Functional model saved to `.keras` reloads with `ChunkedAttention`; a KerasHub
    model rebuilds its own attention layers on loading: call this again, or adapt
    with ``LoRAConfig(attention="chunked")``, which adapted models re-apply on loading.

    Args:
        model: A built Keras model.
        max_memory_bytes: Budget for one float32 score tile (batch x heads x query
            chunk x key chunk x 4 bytes); see `tf_lora.chunked_attention`. By default
            16 MiB tiles, and a whole score matrix of up to 64 MiB runs in one pass.
        query_chunk_size: Queries per tile (overrides the budget for that side).
        key_chunk_size: Keys per tile.

    Returns:
        `model`, switched.

    Raises:
        TypeError: `model` is not a Keras model; non-integer chunking arguments.
        ValueError: non-positive chunking arguments; `max_memory_bytes` below one
            float32 score per head (the smallest tile); no attention layer in `model`.
        NotImplementedError: an attention layer of a class that is not supported
            (the message names it and the supported classes).
        On any error the model is left unchanged.

    Example:
        >>> x = keras.Input((128, 32))
        >>> model = keras.Model(x, keras.layers.MultiHeadAttention(4, 8)(x, x))
        >>> model = use_chunked_attention(model, query_chunk_size=32)
        >>> type(model.layers[1]).__name__
        'ChunkedAttention'
    """
    switch = plan_chunked_attention(model, max_memory_bytes, query_chunk_size, key_chunk_size)
    for layer, target in switch:
        layer.__class__ = target
        if target is ChunkedAttention:
            layer._flash_attention = False
            layer.query_chunk_size, layer.key_chunk_size, layer.max_memory_bytes = (
                query_chunk_size, key_chunk_size, max_memory_bytes)
        else:
            layer.set_chunking(query_chunk_size, key_chunk_size, max_memory_bytes)
    if packing.switch_layers(model):  # the decoder blocks hand the op segment ids instead of a (B, T, T) mask
        switch = True
    if switch:
        _compat.reset_traced_functions(model)
    return model


def plan_chunked_attention(model, max_memory_bytes=None, query_chunk_size=None, key_chunk_size=None):
    """The ``[(layer, chunked class)]`` `use_chunked_attention` would switch; raises its
    errors without changing anything (`tf_lora.adapt` checks with it before adapting)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a keras.Model. Received: model={model!r}")
    _check_positive_int("max_memory_bytes", max_memory_bytes)
    _check_positive_int("query_chunk_size", query_chunk_size)
    _check_positive_int("key_chunk_size", key_chunk_size)
    switch, kept, unsupported, seen = [], 0, {}, set()
    for path, layer, _ in surgery.walk(model):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        target = _target(layer)
        if target is type(layer):
            kept += 1
        elif target is not None:
            switch.append((path, layer, target))
        elif _looks_like_attention(layer):
            unsupported.setdefault(type(layer).__name__, path)
    if unsupported:
        found = ", ".join(f"{name} (at {path!r})" for name, path in unsupported.items())
        raise NotImplementedError(f"Chunked attention does not support the attention class(es) {found} of model "
                                  f"{model.name!r}. Supported: {supported_classes()}.")
    if not switch and not kept:
        raise ValueError(f"Received an invalid value for `model`: {model.name!r} has no attention layer to switch "
                         f"to chunked attention. Supported: {supported_classes()}.")
    for path, layer, _ in switch:
        _check_layer(path, layer)
    if max_memory_bytes is not None and switch:
        path, layer = max(((p, la) for p, la, _ in switch), key=lambda item: _heads(item[1]))
        minimum = 4 * _heads(layer)
        if max_memory_bytes < minimum:
            raise ValueError(
                f"Received an invalid value for `max_memory_bytes`, expected at least {minimum} bytes: one float32 "
                f"score per head ({_heads(layer)} heads in {path!r}) for batch 1, the smallest tile. "
                f"Received: max_memory_bytes={max_memory_bytes}")
    return [(layer, target) for _, layer, target in switch]
