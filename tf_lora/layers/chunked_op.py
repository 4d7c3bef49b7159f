"""Exact chunked softmax attention (FlashAttention-2 style) for TensorFlow.

`chunked_attention` computes ``softmax(scale * q k^T, masked) v`` without the
(T_q, T_k) score matrix: queries and keys are split into chunks and visited by
`tf.while_loop`s that run one iteration at a time (unrolled chunks would run
concurrently and lose the memory bound); the loops live in `chunked_kernel`. The
forward pass keeps only the output and the per-row log-sum-exp; the backward pass
(`tf.custom_gradient`) recomputes each score tile from them. Key chunks entirely
outside a causal or sliding-window band are never visited; a tile that a mask or
segment ids hide entirely is skipped.

One op for every variant the models need: padding and arbitrary boolean masks,
causal and sliding-window bands, segment ids (packed sequences), logit soft-capping
(Gemma 2) and grouped-query attention (fewer key/value heads than query heads, never
repeated per query head).

Masking follows `keras.layers.MultiHeadAttention` / `keras.ops.dot_product_attention`
(DESIGN.md, "Chunked attention"): `True` means attend, the causal mask is aligned
top-left (query ``i`` sees keys ``0..i`` also when T_q != T_k), and a row with no
visible key averages all values uniformly (or, with ``empty_rows="zero"``, outputs
zeros, as KerasHub's decoders do); that output does not depend on query or key, so
their gradients from such a row are zero.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple, Union

import keras
import tensorflow as tf

from tf_lora.layers import chunked_kernel
from tf_lora.layers.chunked_checks import (
    _check_options,
    _check_positive_int,
    _invalid,
    _normalize_mask,
    _segments,
    _seed_tensor,
    _validate_qkv,
)
from tf_lora.layers.chunked_kernel import NEG as _NEG
from tf_lora.layers.chunked_kernel import Plan

DEFAULT_MAX_MEMORY_BYTES = 16 * 2**20
"""Score-tile budget when neither chunk sizes nor `max_memory_bytes` are given:
16 MiB, i.e. 1024 x 512 tiles for 8 heads (fastest forward + backward measured
on CPU: larger tiles amortise the per-tile work, smaller ones the cache)."""

FUSED_MAX_BYTES = 64 * 2**20
"""With neither chunk sizes nor `max_memory_bytes` given, a whole float32 score matrix of
at most this size (N = 1,448 for 8 heads, batch 1) runs as one fused pass of plain ops,
the same einsums as Keras' attention: below it the chunked loop's tile overhead and its
recomputing backward (one more score matmul) cost more than they save. bench_attention.py
measured the fused pass at 0.79-1.05x full attention for N = 512 ... 1,448 (noise on this
machine is about +-30% between runs) and the chunked path at 0.85-1.36x for N = 1,536-2,048."""

_Int = Union[int, tf.Tensor]  # a length known at trace time, or a scalar tensor


def _dim(x: tf.Tensor, axis: int) -> _Int:
    return int(x.shape[axis]) if x.shape[axis] is not None else tf.shape(x)[axis]


def _static(*values: _Int) -> bool:
    return all(isinstance(v, int) for v in values)


def _min(a: _Int, b: _Int) -> _Int:
    return min(a, b) if _static(a, b) else tf.minimum(a, b)


def _max(a: _Int, b: _Int) -> _Int:
    return max(a, b) if _static(a, b) else tf.maximum(a, b)


def _cdiv(a: _Int, b: _Int) -> _Int:
    return -(-a // b)


def _pow2_sqrt(a: _Int) -> _Int:
    """Largest power of two <= sqrt(a) (a >= 1)."""
    if isinstance(a, int):
        return 1 << (math.isqrt(a).bit_length() - 1)
    log2 = tf.math.log(tf.cast(a, tf.float64)) / (2 * math.log(2.0))
    return tf.cast(2.0 ** tf.floor(log2 + 1e-9), a.dtype)


def chunk_sizes(
    batch_heads: _Int,
    query_length: _Int,
    key_length: _Int,
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
) -> Tuple[_Int, _Int]:
    """Chunk sizes ``(cq, ck)`` whose float32 score tile ``batch_heads*cq*ck*4`` fits.

    Given sizes are used as they are (clipped to the lengths). Missing ones come
    from `max_memory_bytes` (default `DEFAULT_MAX_MEMORY_BYTES`): square
    power-of-two tiles first, then shrunk so the chunks split the sequence as
    evenly as possible (less padding). Works on ints or scalar int32 tensors.
    """
    budget = DEFAULT_MAX_MEMORY_BYTES if max_memory_bytes is None else max_memory_bytes
    elements = _max(budget // (4 * batch_heads), 1)
    balance = lambda length, chunk: _cdiv(length, _cdiv(length, chunk))  # noqa: E731
    if query_chunk_size is not None and key_chunk_size is not None:
        return _min(query_chunk_size, query_length), _min(key_chunk_size, key_length)
    if key_chunk_size is not None:
        ck = _min(key_chunk_size, key_length)
        return balance(query_length, _min(query_length, _max(elements // ck, 1))), ck
    if query_chunk_size is not None:
        cq = _min(query_chunk_size, query_length)
        return cq, balance(key_length, _min(key_length, _max(elements // cq, 1)))
    ck = _min(key_length, _pow2_sqrt(elements))
    cq = _min(query_length, _max(elements // ck, 1))
    return balance(query_length, cq), balance(key_length, ck)


@tf.autograph.experimental.do_not_convert  # plain TensorFlow control flow throughout
def chunked_attention(
    query,
    key,
    value,
    *,
    attention_mask=None,
    causal: bool = False,
    segment_ids=None,
    key_segment_ids=None,
    soft_cap: Optional[float] = None,
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
    dropout: float = 0.0,
    training: bool = False,
    seed: Any = None,
    scale: Optional[float] = None,
) -> tf.Tensor:
    """Exact softmax attention in chunks, with memory linear in sequence length.

    Equals ``keras.ops.dot_product_attention(query, key, value, mask=attention_mask,
    is_causal=causal, scale=scale)`` up to float32 rounding, gradients included,
    but only one (query chunk x key chunk) score tile exists at a time.

    Args:
        query: (batch, T_q, heads, head_dim) floating tensor.
        key: (batch, T_k, kv_heads, head_dim) tensor; `kv_heads` divides `heads`
            (grouped-query attention: query head ``h`` uses key/value head
            ``h // (heads // kv_heads)``, as ``repeat(key, heads // kv_heads, axis=2)``).
        value: (batch, T_k, kv_heads, value_dim) tensor.
        attention_mask: Optional mask, `True` (non-zero) = attend, of shape
            (batch, T_k), (batch, T_q, T_k) or (batch, heads, T_q, T_k); any
            dimension may be 1 to broadcast.
        causal: Query ``i`` attends to keys ``0..i`` (top-left aligned, as in
            Keras). Key chunks above the diagonal are skipped.
        segment_ids: Optional (batch, T_q) integer ids of packed examples: a query
            attends only to keys with its own id, and id 0 is padding (sees and is
            seen by nothing).
        key_segment_ids: (batch, T_k) ids of the keys; defaults to `segment_ids`.
        soft_cap: Logit soft-capping ``c``: scores become ``c * tanh(s / c)``
            (Gemma 2), gradients included.
        query_chunk_size: Queries per chunk (need not divide T_q), or `None` to
            derive it from `max_memory_bytes`.
        key_chunk_size: Keys per chunk, same rules.
        max_memory_bytes: Budget for one float32 score tile of all batch
            elements and heads, ``batch * heads * cq * ck * 4`` bytes; sets the
            chunk sizes not given. Defaults to 16 MiB tiles; by default a
            whole score matrix of at most `FUSED_MAX_BYTES` (64 MiB) is computed
            in one fused pass instead (faster at such lengths, equally exact).
            A given budget is a hard limit: fused only if the matrix fits it.
        dropout: Attention dropout rate in [0, 1), on the probabilities.
        training: Dropout is applied only when `True`.
        seed: Dropout seed: an int, a `keras.random.SeedGenerator` or a (2,)
            integer tensor; `None` draws one at random.
        scale: Score scale; defaults to ``1 / sqrt(head_dim)``.

    Returns:
        (batch, T_q, heads, value_dim) tensor in the inputs' result dtype; the
        softmax and all accumulation run in float32.

    Raises:
        ValueError: non-positive chunk sizes or budget, a budget below one score
            per batch element and head (or below the given chunks' tile),
            mismatched batch/heads/head_dim/lengths, a mask or segment ids that do
            not fit, a dropout rate outside [0, 1), a non-positive soft-cap.
        TypeError: non-integer chunk sizes or budget, non-floating inputs.

    Example:
        >>> q = tf.random.normal([2, 300, 4, 16])
        >>> chunked_attention(q, q, q, causal=True, query_chunk_size=128).shape
        TensorShape([2, 300, 4, 16])
    """
    query, key, value = _validate_qkv(query, key, value)
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[1])
    masks = [] if attention_mask is None else [_normalize_mask(attention_mask, shape)]
    return masked_chunked_attention(
        query, key, value, masks, causal=causal, segment_ids=segment_ids, key_segment_ids=key_segment_ids,
        soft_cap=soft_cap, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
        max_memory_bytes=max_memory_bytes, dropout=dropout, training=training, seed=seed, scale=scale,
    )


@tf.autograph.experimental.do_not_convert
def masked_chunked_attention(
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    masks: List[tf.Tensor],
    *,
    causal: bool = False,
    sliding_window: Optional[int] = None,
    segment_ids=None,
    key_segment_ids=None,
    soft_cap: Optional[float] = None,
    empty_rows: str = "mean",
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
    dropout: float = 0.0,
    training: Optional[bool] = False,
    seed: Any = None,
    scale: Optional[float] = None,
) -> tf.Tensor:
    """`chunked_attention` on validated inputs, with several 4D bool `masks` (ANDed,
    each broadcastable to (B, heads, T_q, T_k)), `sliding_window` ``w`` (query ``i``
    sees keys ``j`` with ``|i - j| < w``, as `MultiHeadAttention(sliding_window=w)`)
    and `empty_rows`: what a row that sees no key outputs, "mean" (of the values, as
    Keras' attention) or "zero" (as Keras' masked `Softmax`)."""
    _check_positive_int("query_chunk_size", query_chunk_size)
    _check_positive_int("key_chunk_size", key_chunk_size)
    _check_positive_int("max_memory_bytes", max_memory_bytes)
    _check_options(causal, dropout, scale, soft_cap, empty_rows, sliding_window)
    batch, q_len, heads, depth = (_dim(query, axis) for axis in range(4))
    k_len, kv_heads, v_depth = _dim(key, 1), _dim(key, 2), _dim(value, 3)
    groups = heads // kv_heads
    if isinstance(k_len, int) and k_len == 0:
        raise ValueError(_invalid("key", "at least one key position (T_k >= 1)", f"<shape {tuple(key.shape)}>"))
    out_dtype = keras.backend.result_type(query.dtype, key.dtype, value.dtype)
    if isinstance(q_len, int) and q_len == 0:
        return tf.zeros([batch, 0, heads, v_depth], out_dtype)
    if max_memory_bytes is not None:
        needed = 4 * heads * (batch if isinstance(batch, int) else 1)
        if max_memory_bytes < needed:
            raise ValueError(_invalid(
                "max_memory_bytes", f"at least {needed} bytes: one float32 score per batch element and head "
                f"(batch={query.shape[0]}, heads={heads}), the smallest tile", max_memory_bytes))
    cq, ck = chunk_sizes(batch * heads, q_len, k_len, query_chunk_size, key_chunk_size, max_memory_bytes)
    if max_memory_bytes is not None and _static(batch, cq, ck) and 4 * batch * heads * cq * ck > max_memory_bytes:
        raise ValueError(_invalid(
            "max_memory_bytes", f"room for the score tile of the given chunk sizes ({batch * heads} batch "
            f"elements x heads x {cq} x {ck} x 4 = {4 * batch * heads * cq * ck} bytes)", max_memory_bytes))
    segments = None
    if segment_ids is not None or key_segment_ids is not None:
        if segment_ids is None:
            raise ValueError(_invalid("segment_ids", "the queries' ids when `key_segment_ids` is given", None))
        key_ids = segment_ids if key_segment_ids is None else key_segment_ids
        segments = (_segments(segment_ids, "segment_ids", query.shape[0], query.shape[1]),
                    _segments(key_ids, "key_segment_ids", key.shape[0], key.shape[1]))
    if scale is None:
        scale = 1 / math.sqrt(depth) if isinstance(depth, int) else tf.math.rsqrt(tf.cast(depth, tf.float32))
    rate = float(dropout) if training and dropout > 0 else 0.0
    seed = _seed_tensor(seed) if rate > 0 else None
    masks = [_grouped_mask(m, kv_heads, groups) for m in masks]
    n_q, n_k = _cdiv(q_len, cq), _cdiv(k_len, ck)
    options = dict(groups=groups, soft_cap=None if soft_cap is None else float(soft_cap),
                   empty_rows=empty_rows, rate=rate, seed=seed)

    static = _static(batch, q_len, k_len)
    fits = static and ((cq >= q_len and ck >= k_len)
                       or (max_memory_bytes is None and 4 * batch * heads * q_len * k_len <= FUSED_MAX_BYTES))
    loops = chunked_kernel.active_memo() is not None and not rate  # (dropout masks are per tile)
    if fits and query_chunk_size is None and key_chunk_size is None and not loops:
        # (In a gradient-checkpointed block the loops run instead: their recomputation replays
        # the forward's output and log-sum-exp, chunked_kernel.Memo, where the fused pass reruns.)
        # The whole score matrix fits the budget (default: FUSED_MAX_BYTES): one fused pass
        # (plain ops, autodiff) is as exact and avoids the loops' overhead.
        plan = Plan(masks, segments, causal, sliding_window, q_len, k_len, q_len, k_len, **options)
        return tf.cast(_fused(query, key, value, scale, plan), out_dtype)

    def pad(x, axis, length, chunk, n):  # zero/False-pad axis `axis` to whole chunks
        if x.shape[axis] == 1:  # broadcast
            return x
        pads = [[0, 0]] * x.shape.rank
        pads[axis] = [0, n * chunk - length]
        return tf.pad(x, pads)

    if segments is not None:
        segments = (pad(segments[0], 1, q_len, cq, n_q), pad(segments[1], 1, k_len, ck, n_k))
    masks = [pad(pad(m, 3, q_len, cq, n_q), 4, k_len, ck, n_k) for m in masks]
    plan = Plan(masks, segments, causal, sliding_window, q_len, k_len, cq, ck, **options)

    def kv_chunks(x):  # (B, T_k, H_kv, D) -> (n_k, B, H_kv, ck, D), float32
        x = pad(tf.cast(x, tf.float32), 1, k_len, ck, n_k)
        return tf.transpose(tf.reshape(x, [batch, n_k, ck, kv_heads, -1]), [1, 0, 3, 2, 4])

    # (B, T_q, H, D) -> (n_q, B, H_kv, G * cq, D): the G heads of one K/V head stacked as rows.
    q = pad(tf.cast(query, tf.float32) * scale, 1, q_len, cq, n_q)
    q = tf.transpose(tf.reshape(q, [batch, n_q, cq, kv_heads, groups, depth]), [1, 0, 3, 4, 2, 5])
    out = chunked_kernel.flash(tf.reshape(q, [n_q, batch, kv_heads, groups * cq, depth]),
                               kv_chunks(key), kv_chunks(value), plan)
    out = tf.reshape(out, [n_q, batch, kv_heads, groups, cq, v_depth])
    out = tf.reshape(tf.transpose(out, [1, 0, 4, 2, 3, 5]), [batch, n_q * cq, heads, v_depth])
    return tf.cast(out[:, :q_len], out_dtype)


def _grouped_mask(mask: tf.Tensor, kv_heads: _Int, groups: _Int) -> tf.Tensor:
    """(B|1, H|1, T_q|1, T_k|1) -> (B|1, H_kv|1, G|1, T_q|1, T_k|1)."""
    if mask.shape[1] == 1:
        return mask[:, :, None]
    shape = tf.shape(mask)
    return tf.reshape(mask, tf.stack([shape[0], kv_heads, groups, shape[2], shape[3]]))


def _fused(query, key, value, scale, plan: Plan) -> tf.Tensor:
    """Attention with the whole (B, H_kv, G, T_q, T_k) score matrix at once, float32, with the
    chunked path's conventions: masked scores `_NEG`, a row that sees no key averages the
    values (or outputs zeros), dropout on the probabilities."""
    batch, q_len, heads, depth = query.shape
    kv_heads = key.shape[2]
    # einsums in the (B, T, H, D) layout, as Keras' attention: no explicit transposes.
    q = tf.reshape(tf.cast(query, tf.float32) * scale, [batch, q_len, kv_heads, heads // kv_heads, depth])
    s = tf.einsum("bqkgd,bskd->bkgqs", q, tf.cast(key, tf.float32), optimize="optimal")
    if plan.cap is not None:
        s = plan.cap * tf.tanh(s * (1 / plan.cap))
    valid = plan.visible(0, 0)
    if valid is not None:
        s = tf.where(valid, s, _NEG)  # an all-masked row: uniform weights, mean(v)
    p = tf.nn.softmax(s, axis=-1)
    if plan.rate:
        p = p * plan.keep(p, 0, 0)
    out = tf.einsum("bkgqs,bskd->bqkgd", p, tf.cast(value, tf.float32), optimize="optimal")
    if valid is not None and plan.empty_rows == "zero":
        seen = tf.transpose(tf.reduce_any(valid, axis=-1), [0, 3, 1, 2])[..., None]  # (B|1, T_q, H_kv|1, G|1, 1)
        out = tf.where(seen, out, 0.0)
    return tf.reshape(out, [batch, q_len, heads, value.shape[-1]])
