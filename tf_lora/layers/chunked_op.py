"""Exact chunked softmax attention (FlashAttention-2 style) for TensorFlow.

`chunked_attention` computes ``softmax(scale * q k^T, masked) v`` without the
(T_q, T_k) score matrix: queries and keys are split into chunks and visited by
`tf.while_loop`s that run one iteration at a time (unrolled chunks would run
concurrently and lose the memory bound). Per query row a shift `m`, a sum `l`
and an output accumulator are kept in float32 (online softmax). The forward
pass keeps only the output and the per-row log-sum-exp; the backward pass
(`tf.custom_gradient`) recomputes each score tile from them, so no pass stores
per-tile scores. Key chunks entirely outside a causal or sliding-window band
are never visited.

Masking follows `keras.layers.MultiHeadAttention` / `keras.ops.dot_product_attention`
(DESIGN.md, "Chunked attention"): `True` means attend, the causal mask is aligned
top-left (query ``i`` sees keys ``0..i`` also when T_q != T_k), and a row with no
visible key averages all values uniformly; that output does not depend on query
or key, so their gradients from such a row are zero.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Tuple, Union

import keras
import tensorflow as tf

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

_NEG = -1e30  # score of a masked entry: finite, far below any real score
_LIMIT = math.exp(40.0)  # largest tile row sum the forward fast path accepts
_Int = Union[int, tf.Tensor]  # a length known at trace time, or a scalar tensor


def _invalid(name: str, expected: str, value: Any) -> str:
    return f"Received an invalid value for `{name}`, expected {expected}. Received: {name}={value!r}"


def _check_positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_invalid(name, "a positive integer or None", value))
    if value <= 0:
        raise ValueError(_invalid(name, "a positive integer", value))


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


def _normalize_mask(mask: Any, shape: Tuple[Any, ...]) -> tf.Tensor:
    """`mask` as a 4D bool tensor broadcastable to (B, H, T_q, T_k); `shape` is (B, T_q, H, T_k)."""
    batch, q_len, heads, k_len = shape
    mask = tf.convert_to_tensor(mask)
    full = {2: (batch, k_len), 3: (batch, q_len, k_len), 4: (batch, heads, q_len, k_len)}.get(mask.shape.rank)
    if full is None or any(g is not None and w is not None and g not in (1, w) for g, w in zip(mask.shape, full)):
        expected = (
            f"a boolean mask of shape (batch, T_k) = {(batch, k_len)}, (batch, T_q, T_k) = "
            f"{(batch, q_len, k_len)} or (batch, heads, T_q, T_k) = {(batch, heads, q_len, k_len)} "
            "(any dimension may be 1 to broadcast)"
        )
        raise ValueError(_invalid("attention_mask", expected, f"<tensor of shape {tuple(mask.shape)}>"))
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    return {2: lambda m: m[:, None, None, :], 3: lambda m: m[:, None], 4: lambda m: m}[mask.shape.rank](mask)


def _validate_qkv(query, key, value) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    q, k, v = tensors = [tf.convert_to_tensor(x) for x in (query, key, value)]
    for name, x in zip(("query", "key", "value"), tensors):
        if not x.dtype.is_floating:
            raise TypeError(_invalid(name, "a floating-point tensor", f"<tensor of dtype {x.dtype.name}>"))
        if x.shape.rank != 4:
            raise ValueError(_invalid(name, "a 4D tensor (batch, seq, heads, head_dim)", f"<shape {tuple(x.shape)}>"))
    checks = [
        ("key", k, 0, "batch size", q), ("value", v, 0, "batch size", q), ("key", k, 2, "number of heads", q),
        ("value", v, 2, "number of heads", q), ("key", k, 3, "head_dim", q), ("value", v, 1, "sequence length", k),
    ]
    for name, x, axis, what, ref in checks:
        ref_name = "query" if ref is q else "key"
        if x.shape[axis] is not None and ref.shape[axis] is not None and x.shape[axis] != ref.shape[axis]:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected the same {what} (axis {axis}) as "
                f"`{ref_name}`. Received: {ref_name}.shape={tuple(ref.shape)}, {name}.shape={tuple(x.shape)}"
            )
    return q, k, v


def _seed_tensor(seed: Any) -> tf.Tensor:
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    if isinstance(seed, keras.random.SeedGenerator):
        seed = seed.next()
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = [int(seed), 0]
    return tf.cast(tf.reshape(tf.convert_to_tensor(seed), [2]), tf.int64)


@tf.autograph.experimental.do_not_convert  # plain TensorFlow control flow throughout
def chunked_attention(
    query,
    key,
    value,
    *,
    attention_mask=None,
    causal: bool = False,
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
        key: (batch, T_k, heads, head_dim) tensor.
        value: (batch, T_k, heads, value_dim) tensor.
        attention_mask: Optional mask, `True` (non-zero) = attend, of shape
            (batch, T_k), (batch, T_q, T_k) or (batch, heads, T_q, T_k); any
            dimension may be 1 to broadcast.
        causal: Query ``i`` attends to keys ``0..i`` (top-left aligned, as in
            Keras). Key chunks above the diagonal are skipped.
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
            mismatched batch/heads/head_dim/lengths, a mask that does not
            broadcast, a dropout rate outside [0, 1).
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
        query, key, value, masks, causal=causal, query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size, max_memory_bytes=max_memory_bytes, dropout=dropout,
        training=training, seed=seed, scale=scale,
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
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
    dropout: float = 0.0,
    training: Optional[bool] = False,
    seed: Any = None,
    scale: Optional[float] = None,
) -> tf.Tensor:
    """`chunked_attention` on validated inputs, with several 4D bool `masks` (ANDed,
    each broadcastable to (B, H, T_q, T_k)) and `sliding_window` ``w`` (query ``i``
    sees keys ``j`` with ``|i - j| < w``, as `MultiHeadAttention(sliding_window=w)`)."""
    _check_positive_int("query_chunk_size", query_chunk_size)
    _check_positive_int("key_chunk_size", key_chunk_size)
    _check_positive_int("max_memory_bytes", max_memory_bytes)
    if not isinstance(causal, bool):
        raise TypeError(_invalid("causal", "a bool", causal))
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(_invalid("dropout", "a float in [0, 1)", dropout))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(_invalid("scale", "a float or None", scale))
    batch, q_len, heads, depth = (_dim(query, axis) for axis in range(4))
    k_len, v_depth = _dim(key, 1), _dim(value, 3)
    if isinstance(k_len, int) and k_len == 0:
        raise ValueError(_invalid("key", "at least one key position (T_k >= 1)", f"<shape {tuple(key.shape)}>"))
    if isinstance(q_len, int) and q_len == 0:
        return tf.zeros([batch, 0, heads, v_depth], keras.backend.result_type(query.dtype, key.dtype, value.dtype))
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
    out_dtype = keras.backend.result_type(query.dtype, key.dtype, value.dtype)
    if scale is None:
        scale = 1 / math.sqrt(depth) if isinstance(depth, int) else tf.math.rsqrt(tf.cast(depth, tf.float32))
    rate = float(dropout) if training and dropout > 0 else 0.0
    n_q, n_k = _cdiv(q_len, cq), _cdiv(k_len, ck)

    def to_chunks(x, length, chunk, n):  # (B, T, H, D) -> (n, B, H, chunk, D), float32, zero-padded
        x = tf.pad(tf.cast(x, tf.float32), [[0, 0], [0, n * chunk - length], [0, 0], [0, 0]])
        return tf.transpose(tf.reshape(x, [batch, n, chunk, heads, -1]), [1, 0, 3, 2, 4])

    def pad_mask(m):  # to whole chunks along T_q / T_k (unless broadcast)
        q_pad = 0 if m.shape[2] == 1 else n_q * cq - q_len
        k_pad = 0 if m.shape[3] == 1 else n_k * ck - k_len
        pads = [[0, 0], [0, 0], [0, q_pad], [0, k_pad]]
        return tf.pad(m, pads, constant_values=False)

    static = _static(batch, q_len, k_len)
    fits = static and ((cq >= q_len and ck >= k_len)
                       or (max_memory_bytes is None and 4 * batch * heads * q_len * k_len <= FUSED_MAX_BYTES))
    if fits and query_chunk_size is None and key_chunk_size is None:
        # The whole score matrix fits the budget (default: FUSED_MAX_BYTES): one fused pass
        # (plain ops, autodiff) is as exact and avoids the loops' overhead.
        plan = _Plan(masks, causal, sliding_window, q_len, k_len, q_len, k_len, rate,
                     _seed_tensor(seed) if rate > 0 else None)
        return tf.cast(_fused(query, key, value, scale, plan), out_dtype)
    plan = _Plan([pad_mask(m) for m in masks], causal, sliding_window, q_len, k_len, cq, ck,
                 rate, _seed_tensor(seed) if rate > 0 else None)
    out = _flash(to_chunks(query, q_len, cq, n_q) * scale, to_chunks(key, k_len, ck, n_k),
                 to_chunks(value, k_len, ck, n_k), plan)
    out = tf.reshape(tf.transpose(out, [1, 0, 3, 2, 4]), [batch, n_q * cq, heads, v_depth])
    return tf.cast(out[:, :q_len], out_dtype)


class _Plan:
    """What one call needs inside the loops: masks, band, chunking, dropout."""

    def __init__(self, masks, causal, window, q_len, k_len, cq, ck, rate, seed):
        self.masks, self.q_len, self.k_len, self.cq, self.ck, self.rate, self.seed = (
            masks, q_len, k_len, cq, ck, rate, seed)
        self.n_q, self.n_k = _cdiv(q_len, cq), _cdiv(k_len, ck)
        self.may_empty = bool(masks) or window is not None  # can a row see no key?
        self.lo = None if window is None else 1 - window  # visible iff lo <= k - q <= hi
        self.hi = 0 if causal else (None if window is None else window - 1)
        self.positions = causal or window is not None or not _static(k_len, ck) or k_len % ck != 0

    def key_range(self, i):
        """Key chunks [first, end) that query chunk `i` may see."""
        last_q = tf.minimum((i + 1) * self.cq, self.q_len) - 1
        first = 0 if self.lo is None else tf.maximum(i * self.cq + self.lo, 0) // self.ck
        end = self.n_k if self.hi is None else tf.minimum((last_q + self.hi) // self.ck + 1, self.n_k)
        return first, tf.maximum(end, first)

    def query_range(self, j):
        """Query chunks [first, end) that may see key chunk `j`."""
        last_k = tf.minimum((j + 1) * self.ck, self.k_len) - 1
        first = 0 if self.hi is None else tf.maximum(j * self.ck - self.hi, 0) // self.cq
        end = self.n_q if self.lo is None else tf.minimum((last_k - self.lo) // self.cq + 1, self.n_q)
        return first, tf.maximum(end, first)

    def visible(self, i, j) -> Optional[tf.Tensor]:
        """Bool tile broadcastable to (B, H, cq, ck), or None when all is visible."""
        valid = None
        for m in self.masks:
            q_all, k_all = m.shape[2] == 1, m.shape[3] == 1
            tile = tf.slice(m, [0, 0, 0 if q_all else i * self.cq, 0 if k_all else j * self.ck],
                            [-1, -1, 1 if q_all else self.cq, 1 if k_all else self.ck])
            valid = tile if valid is None else valid & tile
        if self.positions:
            q_pos = (i * self.cq + tf.range(self.cq))[:, None]
            k_pos = (j * self.ck + tf.range(self.ck))[None, :]
            pos = k_pos < self.k_len
            if self.hi is not None:
                pos &= k_pos - q_pos <= self.hi
            if self.lo is not None:
                pos &= k_pos - q_pos >= self.lo
            valid = pos if valid is None else valid & pos
        return valid

    def interior(self, i, j) -> tf.Tensor:
        """Whether all of tile (i, j) is real keys inside the band."""
        inside = (j + 1) * self.ck <= self.k_len
        if self.hi is not None:  # the tile's largest k - q
            inside &= (j + 1) * self.ck - 1 - i * self.cq <= self.hi
        if self.lo is not None:  # the tile's smallest k - q
            inside &= j * self.ck - (i + 1) * self.cq + 1 >= self.lo
        return inside

    def scores(self, q_i, k_j, i, j) -> tf.Tensor:
        """Masked q_i k_j^T; with only band/padding masks, edge tiles alone pay for masking."""
        s = tf.matmul(q_i, k_j, transpose_b=True)
        if not self.masks and self.positions:
            return tf.cond(self.interior(i, j), lambda: s, lambda: tf.where(self.visible(i, j), s, _NEG))
        valid = self.visible(i, j)
        return s if valid is None else tf.where(valid, s, _NEG)

    def keep(self, p, i, j) -> tf.Tensor:
        """Dropout multiplier of tile (i, j), 0 or 1 / (1 - rate); the same in both passes."""
        seed = tf.random.experimental.stateless_fold_in(self.seed, i * self.n_k + j)
        u = tf.random.stateless_uniform(tf.shape(p), seed, dtype=tf.float32)
        return tf.cast(u >= self.rate, tf.float32) * (1 / (1 - self.rate))


def _fused(query, key, value, scale, plan: "_Plan") -> tf.Tensor:
    """Attention with the whole (B, H, T_q, T_k) score matrix at once, float32, with the
    chunked path's conventions: masked scores `_NEG`, a row that sees no key averages
    the values, dropout on the probabilities."""
    # einsums in the (B, T, H, D) layout, as Keras' attention: no explicit transposes.
    q = tf.cast(query, tf.float32) * scale
    s = tf.einsum("bqhd,bkhd->bhqk", q, tf.cast(key, tf.float32), optimize="optimal")
    valid = plan.visible(0, 0)
    if valid is not None:
        s = tf.where(valid, s, _NEG)  # an all-masked row: uniform weights, mean(v)
    p = tf.nn.softmax(s, axis=-1)
    if plan.rate:
        p = p * plan.keep(p, 0, 0)
    return tf.einsum("bhqk,bkhd->bqhd", p, tf.cast(value, tf.float32), optimize="optimal")


def _append(x: tf.Tensor, column) -> tf.Tensor:
    """``[x, column]`` along the last axis (`column`: a scalar or x.shape[:-1])."""
    column = tf.broadcast_to(tf.cast(column, x.dtype), tf.shape(x)[:-1])
    return tf.concat([x, column[..., None]], axis=-1)


def _flash(q_c: tf.Tensor, k_c: tf.Tensor, v_c: tf.Tensor, plan: _Plan) -> tf.Tensor:
    """Attention on chunk-major (n, B, H, chunk, D) tensors, with a recomputing gradient."""

    @tf.custom_gradient
    def run(q_c, k_c, v_c):
        k_aug = _append(k_c, 1.0)  # [k, 1] . [q, -c] = q.k - c: shifts cost no extra pass
        out, lse, empty = _forward(q_c, k_aug, v_c, plan)
        return out, lambda d_out: _backward(q_c, k_aug, v_c, out, lse, empty, d_out, plan)

    return run(q_c, k_c, v_c)


def _forward(q_c, k_aug, v_c, plan: _Plan):
    """Online softmax. Per row: shift `m`, sum `l` = sum exp(s - m), accumulator `acc`.

    After a query chunk's first tile the fast path computes exp(s - m) with the
    current shift (subtracted inside the matmul) and is accepted when no row sum
    of the tile reaches `_LIMIT`, so nothing can overflow; otherwise (the first
    tile, or scores far above the shift) the exact path moves the shift to the
    running max and rescales.
    """
    v_mean = tf.reduce_sum(v_c, [0, 3])[:, :, None] / tf.cast(plan.k_len, tf.float32) if plan.may_empty else None
    _, b, h, cq, _ = q_c.shape
    arrays = [tf.TensorArray(dtype, size=plan.n_q, element_shape=shape) for dtype, shape in
              ((tf.float32, [b, h, cq, v_c.shape[-1]]), (tf.float32, [b, h, cq]), (tf.bool, [b, h, cq]))]

    def query_chunk(i, out_ta, lse_ta, empty_ta):
        q_i = q_c[i]
        rows = tf.shape(q_i)[:-1]
        first, end = plan.key_range(i)

        def key_chunk(j, m, l, acc):
            v_j = v_c[j]

            def exact():
                s = plan.scores(_append(q_i, 0.0), k_aug[j], i, j)
                m_new = tf.maximum(m, tf.reduce_max(s, axis=-1))
                p = tf.exp(s - m_new[..., None])
                alpha = tf.exp(m - m_new)
                p_drop = p * plan.keep(p, i, j) if plan.rate else p
                return m_new, l * alpha + tf.reduce_sum(p, -1), acc * alpha[..., None] + tf.matmul(p_drop, v_j)

            def attempt():
                p = tf.exp(plan.scores(_append(q_i, -m), k_aug[j], i, j))
                l_tile = tf.reduce_sum(p, -1)
                p_drop = (lambda: p * plan.keep(p, i, j)) if plan.rate else (lambda: p)
                fast = lambda: (m, l + l_tile, acc + tf.matmul(p_drop(), v_j))  # noqa: E731
                return tf.cond(tf.reduce_all(l_tile < _LIMIT), fast, exact)

            return (j + 1, *tf.cond(j > first, attempt, exact))

        init = (first, tf.fill(rows, _NEG), tf.zeros(rows), tf.zeros(tf.concat([rows, tf.shape(v_c)[-1:]], 0)))
        _, m, l, acc = tf.while_loop(lambda j, *_: j < end, key_chunk, init, parallel_iterations=1)
        empty = m < 0.5 * _NEG
        l = tf.where(empty, 1.0, l)
        out = acc / l[..., None]
        if v_mean is not None:
            out = tf.where(empty[..., None], v_mean, out)
        lse = tf.where(empty, -_NEG, m + tf.math.log(l))  # +1e30: exp(s - lse) = 0 in the backward
        return i + 1, out_ta.write(i, out), lse_ta.write(i, lse), empty_ta.write(i, empty)

    _, *arrays = tf.while_loop(lambda i, *_: i < plan.n_q, query_chunk, (0, *arrays), parallel_iterations=1)
    return [a.stack() for a in arrays]


def _backward(q_c, k_aug, v_c, out, lse, empty, d_out, plan: _Plan):
    """FlashAttention-2 backward: key chunks outside, query chunks inside. Per tile:
    p = exp([q, -lse] . [k, 1]) <= 1, dV += p^T dO, dS = p * ([dO, -delta] . [v, 1])
    with delta = rowsum(dO * O), dK += dS^T q, dQ_i += dS k (dQ chunks in a TensorArray)."""
    d_out = tf.cast(d_out, tf.float32)
    delta = tf.reduce_sum(d_out * out, -1)
    q_lse, do_delta = _append(q_c, -lse), _append(d_out, -delta)
    dq_ta = tf.TensorArray(tf.float32, size=plan.n_q, element_shape=q_c.shape[1:]).unstack(tf.zeros_like(q_c))
    dk_ta = tf.TensorArray(tf.float32, size=plan.n_k, element_shape=k_aug.shape[1:-1] + q_c.shape[-1:])
    dv_ta = tf.TensorArray(tf.float32, size=plan.n_k, element_shape=v_c.shape[1:])

    def key_chunk(j, dq_ta, dk_ta, dv_ta):
        k_a, v_j = k_aug[j], v_c[j]
        k_j, v_a = k_a[..., :-1], _append(v_j, 1.0)

        def query_chunk(i, dq_ta, dk, dv):
            q_i, do_i = q_c[i], d_out[i]
            p = tf.exp(plan.scores(q_lse[i], k_a, i, j))
            if plan.rate:
                keep = plan.keep(p, i, j)
                dv += tf.matmul(p * keep, do_i, transpose_a=True)
                dp = tf.matmul(do_i, v_j, transpose_b=True) * keep - delta[i][..., None]
            else:
                dv += tf.matmul(p, do_i, transpose_a=True)
                dp = tf.matmul(do_delta[i], v_a, transpose_b=True)
            ds = p * dp
            dk += tf.matmul(ds, q_i, transpose_a=True)
            return i + 1, dq_ta.write(i, dq_ta.read(i) + tf.matmul(ds, k_j)), dk, dv

        first, end = plan.query_range(j)
        init = (first, dq_ta, tf.zeros_like(k_j), tf.zeros_like(v_j))
        _, dq_ta, dk, dv = tf.while_loop(lambda i, *_: i < end, query_chunk, init, parallel_iterations=1)
        return j + 1, dq_ta, dk_ta.write(j, dk), dv_ta.write(j, dv)

    init = (0, dq_ta, dk_ta, dv_ta)
    _, dq_ta, dk_ta, dv_ta = tf.while_loop(lambda j, *_: j < plan.n_k, key_chunk, init, parallel_iterations=1)
    dv = dv_ta.stack()
    if plan.may_empty:  # rows that see no key output mean(v): d out / d v_j = 1 / T_k
        d_mean = tf.reduce_sum(tf.where(empty[..., None], d_out, 0.0), [0, 3])[:, :, None]
        dv += d_mean / tf.cast(plan.k_len, tf.float32)
    return dq_ta.stack(), dk_ta.stack(), dv
