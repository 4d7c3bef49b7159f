"""Exact chunked softmax attention (FlashAttention-2 style) for TensorFlow.

`chunked_attention` computes ``softmax(scale * q @ k^T + mask) @ v`` without
ever holding the (T_q, T_k) score matrix: queries are split into chunks, and
for each query chunk the key chunks are visited one at a time in a
`tf.while_loop` (one iteration at a time, so TensorFlow cannot run them
concurrently and lose the memory bound), keeping a running max, a running sum
and an output accumulator in float32 (online softmax). The forward pass keeps
only the output and the per-row log-sum-exp; the backward pass (a
`tf.custom_gradient`) recomputes each score tile from them, so neither pass
stores per-tile scores. Key chunks that a causal or sliding-window band
excludes entirely are never visited.

Masking follows `keras.layers.MultiHeadAttention` / `keras.ops.dot_product_attention`
(see DESIGN.md, "Chunked attention"): `True` means attend, the causal mask is
aligned top-left (query ``i`` sees keys ``0..i`` also when T_q != T_k), and a
row with no visible key averages all values uniformly; its output then does not
depend on query or key, so their gradients from that row are zero.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Tuple, Union

import keras
import tensorflow as tf

DEFAULT_MAX_MEMORY_BYTES = 8 * 2**20
"""Budget for one float32 score tile (all batch elements and heads) when
neither chunk sizes nor `max_memory_bytes` are given: 16 MiB, 1024 x 512 keys
for 8 heads."""

_NEG = -1e30  # score of a masked entry; far below any real score, finite.
_LIMIT = math.exp(40.0)  # largest tile row sum the fast path accepts
_Int = Union[int, tf.Tensor]


def _invalid(name: str, expected: str, value: Any) -> str:
    return (
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _check_positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_invalid(name, "a positive integer or None", value))
    if value <= 0:
        raise ValueError(_invalid(name, "a positive integer", value))


def _static_or_dynamic(x: tf.Tensor, axis: int) -> _Int:
    dim = x.shape[axis]
    return int(dim) if dim is not None else tf.shape(x)[axis]


def _is_static(*values: _Int) -> bool:
    return all(isinstance(v, int) for v in values)


def _min(a: _Int, b: _Int) -> _Int:
    return min(a, b) if _is_static(a, b) else tf.minimum(a, b)


def _max(a: _Int, b: _Int) -> _Int:
    return max(a, b) if _is_static(a, b) else tf.maximum(a, b)


def _cdiv(a: _Int, b: _Int) -> _Int:
    return -(-a // b)


def _isqrt(a: _Int) -> _Int:
    if isinstance(a, int):
        return math.isqrt(a)
    return tf.cast(tf.math.floor(tf.sqrt(tf.cast(a, tf.float64))), a.dtype)


def _pow2_floor(a: _Int) -> _Int:
    if isinstance(a, int):
        return 1 << (a.bit_length() - 1) if a > 0 else 0
    return tf.cast(2.0 ** tf.floor(tf.math.log(tf.cast(tf.maximum(a, 1), tf.float64)) / math.log(2.0)), a.dtype)


def _balance(length: _Int, chunk: _Int) -> _Int:
    """Smallest chunk that needs as few chunks as `chunk` does (less padding)."""
    return _cdiv(length, _cdiv(length, chunk))


def chunk_sizes(
    batch_heads: _Int,
    query_length: _Int,
    key_length: _Int,
    query_chunk_size: Optional[int] = None,
    key_chunk_size: Optional[int] = None,
    max_memory_bytes: Optional[int] = None,
) -> Tuple[_Int, _Int]:
    """Chunk sizes whose float32 score tile ``batch_heads * cq * ck * 4`` fits.

    Given sizes are used as they are (clipped to the sequence lengths); missing
    ones come from `max_memory_bytes` (default `DEFAULT_MAX_MEMORY_BYTES`),
    preferring square tiles, then shrunk so the chunks split the sequence as
    evenly as possible. Works on Python ints or, for shapes only known at run
    time, on scalar int32 tensors.
    """
    budget = DEFAULT_MAX_MEMORY_BYTES if max_memory_bytes is None else max_memory_bytes
    elements = _max(budget // (4 * batch_heads), 1)
    if query_chunk_size is not None and key_chunk_size is not None:
        return _min(query_chunk_size, query_length), _min(key_chunk_size, key_length)
    if key_chunk_size is not None:
        ck = _min(key_chunk_size, key_length)
        return _balance(query_length, _min(query_length, _max(elements // ck, 1))), ck
    if query_chunk_size is not None:
        cq = _min(query_chunk_size, query_length)
        return cq, _balance(key_length, _min(key_length, _max(elements // cq, 1)))
    ck = _min(key_length, _max(_pow2_floor(_isqrt(elements)), 1))
    cq = _min(query_length, _max(elements // ck, 1))
    return _balance(query_length, cq), _balance(key_length, ck)


def _normalize_mask(mask: Any, shape: Tuple[Any, ...]) -> tf.Tensor:
    """Returns `mask` as a 4D bool tensor broadcastable to (B, H, T_q, T_k)."""
    batch, q_len, heads, k_len = shape
    mask = tf.convert_to_tensor(mask)
    expected = (
        f"a boolean mask of shape (batch, T_k) = {(batch, k_len)}, "
        f"(batch, T_q, T_k) = {(batch, q_len, k_len)} or "
        f"(batch, heads, T_q, T_k) = {(batch, heads, q_len, k_len)} "
        "(any dimension may be 1 to broadcast)"
    )
    rank = mask.shape.rank
    if rank not in (2, 3, 4):
        raise ValueError(_invalid("attention_mask", expected, f"<tensor of shape {tuple(mask.shape)}>"))
    full = {2: (batch, k_len), 3: (batch, q_len, k_len), 4: (batch, heads, q_len, k_len)}[rank]
    for got, want in zip(mask.shape, full):
        if got is not None and want is not None and got not in (1, want):
            raise ValueError(_invalid("attention_mask", expected, f"<tensor of shape {tuple(mask.shape)}>"))
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    if rank == 2:
        return mask[:, None, None, :]
    if rank == 3:
        return mask[:, None, :, :]
    return mask


def _validate_qkv(query, key, value) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    tensors = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(_invalid(name, "a floating-point tensor", f"<tensor of dtype {x.dtype.name}>"))
        if x.shape.rank != 4:
            raise ValueError(
                _invalid(name, "a 4D tensor (batch, seq, heads, head_dim)", f"<tensor of shape {tuple(x.shape)}>")
            )
        tensors.append(x)
    q, k, v = tensors
    checks = (
        ("batch size", 0, (k, v)),
        ("number of heads", 2, (k, v)),
        ("head_dim", 3, (k,)),
    )
    for what, axis, others in checks:
        for other_name, other in zip(("key", "value"), others):
            a, b = q.shape[axis], other.shape[axis]
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"Received an invalid value for `{other_name}`, expected the same {what} "
                    f"(axis {axis}) as `query`. Received: query.shape={tuple(q.shape)}, "
                    f"{other_name}.shape={tuple(other.shape)}"
                )
    if k.shape[1] is not None and v.shape[1] is not None and k.shape[1] != v.shape[1]:
        raise ValueError(
            "Received an invalid value for `value`, expected the same sequence length "
            f"(axis 1) as `key`. Received: key.shape={tuple(k.shape)}, value.shape={tuple(v.shape)}"
        )
    return q, k, v


def _seed_tensor(seed: Any) -> tf.Tensor:
    if isinstance(seed, keras.random.SeedGenerator):
        seed = seed.next()
    elif seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return tf.constant([int(seed), 0], tf.int64)
    return tf.cast(tf.reshape(tf.convert_to_tensor(seed), [2]), tf.int64)


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

    Same result as ``keras.ops.dot_product_attention(query, key, value,
    mask=attention_mask, is_causal=causal, scale=scale)`` (up to float32
    rounding), and the same gradients, but only one (query chunk x key chunk)
    score tile exists at a time, in the forward and in the backward pass.

    Args:
        query: (batch, T_q, heads, head_dim) floating tensor.
        key: (batch, T_k, heads, head_dim) tensor.
        value: (batch, T_k, heads, value_dim) tensor.
        attention_mask: Optional mask, `True` (non-zero) = attend, of shape
            (batch, T_k), (batch, T_q, T_k) or (batch, heads, T_q, T_k); any
            dimension may be 1 to broadcast.
        causal: Query ``i`` attends to keys ``0..i`` (top-left aligned, as
            Keras). Key chunks above the diagonal are skipped.
        query_chunk_size: Queries per chunk; derived from `max_memory_bytes`
            when `None`. Need not divide T_q.
        key_chunk_size: Keys per chunk; same rules as `query_chunk_size`.
        max_memory_bytes: Budget for one float32 score tile of all batch
            elements and heads (``batch * heads * cq * ck * 4`` bytes), used for
            the chunk sizes not given. Defaults to 16 MiB.
        dropout: Attention dropout rate in [0, 1), applied to the probabilities.
        training: Dropout is applied only when `True`.
        seed: Dropout seed: an int, a `keras.random.SeedGenerator` or a (2,)
            integer tensor; `None` draws a random one.
        scale: Score scale; defaults to ``1 / sqrt(head_dim)``.

    Returns:
        (batch, T_q, heads, value_dim) tensor in the result dtype of the inputs;
        the softmax and all accumulation run in float32.

    Raises:
        ValueError: non-positive chunk sizes, a budget below one score per
            batch element and head, mismatched batch/heads/head_dim, a mask
            that does not broadcast, a dropout rate outside [0, 1).
        TypeError: non-integer chunk sizes or budget, non-floating inputs.

    Example:
        >>> q = tf.random.normal([2, 300, 4, 16])
        >>> out = chunked_attention(q, q, q, causal=True, query_chunk_size=128)
        >>> out.shape
        TensorShape([2, 300, 4, 16])
    """
    query, key, value = _validate_qkv(query, key, value)
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[1])
    masks = [] if attention_mask is None else [_normalize_mask(attention_mask, shape)]
    return attention(
        query, key, value, masks, causal=causal, sliding_window=None,
        query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
        max_memory_bytes=max_memory_bytes, dropout=dropout, training=training,
        seed=seed, scale=scale,
    )


def attention(
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    masks: List[tf.Tensor],
    *,
    causal: bool,
    sliding_window: Optional[int],
    query_chunk_size: Optional[int],
    key_chunk_size: Optional[int],
    max_memory_bytes: Optional[int],
    dropout: float,
    training: Optional[bool],
    seed: Any,
    scale: Optional[float],
) -> tf.Tensor:
    """`chunked_attention` on validated inputs with 4D bool `masks` (ANDed).

    `sliding_window` ``w`` restricts query ``i`` to keys ``j`` with
    ``|i - j| < w`` (`keras.layers.MultiHeadAttention(sliding_window=w)`).
    """
    _check_positive_int("query_chunk_size", query_chunk_size)
    _check_positive_int("key_chunk_size", key_chunk_size)
    _check_positive_int("max_memory_bytes", max_memory_bytes)
    if not isinstance(causal, bool):
        raise TypeError(_invalid("causal", "a bool", causal))
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(_invalid("dropout", "a float in [0, 1)", dropout))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(_invalid("scale", "a float or None", scale))
    batch, q_len, heads, depth = (_static_or_dynamic(query, a) for a in range(4))
    k_len = _static_or_dynamic(key, 1)
    v_depth = _static_or_dynamic(value, 3)
    if max_memory_bytes is not None:
        needed = 4 * heads * (batch if isinstance(batch, int) else 1)
        if max_memory_bytes < needed:
            raise ValueError(
                _invalid(
                    "max_memory_bytes",
                    f"at least {needed} bytes, one float32 score for each batch element and "
                    f"head (batch={query.shape[0]}, heads={heads}), the smallest chunk pair",
                    max_memory_bytes,
                )
            )
    cq, ck = chunk_sizes(batch * heads, q_len, k_len, query_chunk_size, key_chunk_size, max_memory_bytes)
    if max_memory_bytes is not None and _is_static(batch, cq, ck):
        if 4 * batch * heads * cq * ck > max_memory_bytes:
            raise ValueError(
                _invalid(
                    "max_memory_bytes",
                    f"room for the score tile of the given chunk sizes ({cq} x {ck} for "
                    f"{batch * heads} batch elements x heads: {4 * batch * heads * cq * ck} bytes)",
                    max_memory_bytes,
                )
            )
    out_dtype = keras.backend.result_type(query.dtype, key.dtype, value.dtype)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    rate = float(dropout) if (training and dropout > 0) else 0.0
    seed = _seed_tensor(seed) if rate > 0 else None
    n_q, n_k = _cdiv(q_len, cq), _cdiv(k_len, ck)

    def to_chunks(x, length, chunk, n):  # (B, T, H, D) -> (n, B, H, chunk, D) float32
        x = tf.cast(x, tf.float32)
        x = tf.pad(x, [[0, 0], [0, n * chunk - length], [0, 0], [0, 0]])
        x = tf.reshape(x, [batch, n, chunk, heads, -1])
        return tf.transpose(x, [1, 0, 3, 2, 4])

    def pad_mask(m):  # pad the T_q / T_k axes of a 4D mask to whole chunks
        pads = [[0, 0], [0, 0], [0, 0], [0, 0]]
        if m.shape[2] != 1:
            pads[2][1] = n_q * cq - q_len
        if m.shape[3] != 1:
            pads[3][1] = n_k * ck - k_len
        return tf.pad(m, pads, constant_values=False)

    config = _Plan(
        masks=[pad_mask(m) for m in masks], causal=causal, window=sliding_window,
        q_len=q_len, k_len=k_len, cq=cq, ck=ck, n_q=n_q, n_k=n_k, rate=rate, seed=seed,
    )
    q_c = to_chunks(query, q_len, cq, n_q) * scale
    k_c = to_chunks(key, k_len, ck, n_k)
    v_c = to_chunks(value, k_len, ck, n_k)
    out = _flash(q_c, k_c, v_c, config)  # (n_q, B, H, cq, Dv)
    out = tf.reshape(tf.transpose(out, [1, 0, 3, 2, 4]), [batch, n_q * cq, heads, v_depth])
    return tf.cast(out[:, :q_len], out_dtype)


class _Plan:
    """Static description of one call: masks, band, chunking, dropout."""

    def __init__(self, *, masks, causal, window, q_len, k_len, cq, ck, n_q, n_k, rate, seed):
        self.masks, self.causal, self.window = masks, causal, window
        self.q_len, self.k_len, self.cq, self.ck, self.n_q, self.n_k = q_len, k_len, cq, ck, n_q, n_k
        self.rate, self.seed = rate, seed
        # A row can see no key only through a padding mask or a window.
        self.may_empty = bool(masks) or window is not None
        # Visible iff lo <= k - q <= hi (None: unbounded).
        self.lo = None if window is None else -(window - 1)
        self.hi = 0 if causal else (None if window is None else window - 1)
        pad_k = not _is_static(k_len, ck) or k_len % ck != 0
        self.need_positions = causal or window is not None or pad_k

    def key_range(self, i):
        """Key chunks [first, end) that query chunk `i` may see."""
        first_q = i * self.cq
        last_q = tf.minimum((i + 1) * self.cq, self.q_len) - 1
        first = 0 if self.lo is None else tf.maximum(first_q + self.lo, 0) // self.ck
        end = self.n_k if self.hi is None else tf.minimum((last_q + self.hi) // self.ck + 1, self.n_k)
        return first, tf.maximum(end, first)

    def query_range(self, j):
        """Query chunks [first, end) that may see key chunk `j`."""
        first_k = j * self.ck
        last_k = tf.minimum((j + 1) * self.ck, self.k_len) - 1
        first = 0 if self.hi is None else tf.maximum(first_k - self.hi, 0) // self.cq
        end = self.n_q if self.lo is None else tf.minimum((last_k - self.lo) // self.cq + 1, self.n_q)
        return first, tf.maximum(end, first)

    def visible(self, i, j) -> Optional[tf.Tensor]:
        """Bool tile broadcastable to (B, H, cq, ck), or None if all visible."""
        valid = None
        for m in self.masks:
            begin = [0, 0, 0 if m.shape[2] == 1 else i * self.cq, 0 if m.shape[3] == 1 else j * self.ck]
            size = [-1, -1, 1 if m.shape[2] == 1 else self.cq, 1 if m.shape[3] == 1 else self.ck]
            tile = tf.slice(m, begin, size)
            valid = tile if valid is None else tf.logical_and(valid, tile)
        if self.need_positions:
            q_pos = (i * self.cq + tf.range(self.cq))[:, None]
            k_pos = (j * self.ck + tf.range(self.ck))[None, :]
            pos = k_pos < self.k_len
            if self.hi is not None:
                pos = tf.logical_and(pos, k_pos - q_pos <= self.hi)
            if self.lo is not None:
                pos = tf.logical_and(pos, k_pos - q_pos >= self.lo)
            valid = pos if valid is None else tf.logical_and(valid, pos)
        return valid

    def interior(self, i, j) -> tf.Tensor:
        """Whether every (query, key) pair of tile (i, j) is inside the band and real."""
        inside = (j + 1) * self.ck <= self.k_len
        if self.hi is not None:  # largest k - q of the tile
            inside = tf.logical_and(inside, (j + 1) * self.ck - 1 - i * self.cq <= self.hi)
        if self.lo is not None:  # smallest k - q of the tile
            inside = tf.logical_and(inside, j * self.ck - (i + 1) * self.cq + 1 >= self.lo)
        return inside

    def scores(self, q_i, k_j, i, j) -> tf.Tensor:
        s = tf.matmul(q_i, k_j, transpose_b=True)
        if not self.masks and self.need_positions:  # only band edges / padding need a mask
            return tf.cond(self.interior(i, j), lambda: s, lambda: tf.where(self.visible(i, j), s, _NEG))
        valid = self.visible(i, j)
        return s if valid is None else tf.where(valid, s, _NEG)

    def keep(self, shape, i, j) -> tf.Tensor:
        """Dropout multiplier of tile (i, j): 0 or 1 / (1 - rate), reproducible."""
        seed = tf.random.experimental.stateless_fold_in(self.seed, i * self.n_k + j)
        u = tf.random.stateless_uniform(shape, seed, dtype=tf.float32)
        return tf.cast(u >= self.rate, tf.float32) * (1.0 / (1.0 - self.rate))


def _flash(q_c: tf.Tensor, k_c: tf.Tensor, v_c: tf.Tensor, plan: _Plan) -> tf.Tensor:
    """Chunk-major attention with a recomputing custom gradient."""

    @tf.custom_gradient
    def run(q_c, k_c, v_c):
        k_aug = _append(k_c, 1.0)  # [k, 1]: a matmul with [q, -c] gives q.k - c
        out, lse, empty = _forward(q_c, k_aug, v_c, plan)

        def grad(d_out):
            return _backward(q_c, k_aug, v_c, out, lse, empty, d_out, plan)

        return out, grad

    return run(q_c, k_c, v_c)


def _append(x: tf.Tensor, column) -> tf.Tensor:
    """Appends `column` (a scalar or x.shape[:-1]) as a last feature."""
    column = tf.broadcast_to(tf.cast(column, x.dtype), tf.shape(x)[:-1])
    return tf.concat([x, column[..., None]], axis=-1)


def _forward(q_c, k_aug, v_c, plan: _Plan):
    """Online softmax. Per row: shift `m`, sum `l` = sum exp(s - m), `acc`.

    Fast path: exp(s - m) with the current shift (subtracted inside the matmul),
    accepted when no row sum of the tile exceeds `_LIMIT` (so nothing can
    overflow). Otherwise (first tile, a much larger score) the exact rescaling
    path raises the shift to the running max.
    """
    v_mean = _value_mean(v_c, plan) if plan.may_empty else None
    n, b, h, cq, _ = q_c.shape
    out_ta = tf.TensorArray(tf.float32, size=plan.n_q, element_shape=[b, h, cq, v_c.shape[-1]])
    lse_ta = tf.TensorArray(tf.float32, size=plan.n_q, element_shape=[b, h, cq])
    empty_ta = tf.TensorArray(tf.bool, size=plan.n_q, element_shape=[b, h, cq])

    def query_chunk(i, out_ta, lse_ta, empty_ta):
        q_i = q_c[i]
        row_shape = tf.shape(q_i)[:-1]
        q_0 = _append(q_i, 0.0)

        def key_chunk(j, m, l, acc):
            v_j = v_c[j]

            def attempt():
                p = tf.exp(plan.scores(_append(q_i, -m), k_aug[j], i, j))
                l_t = tf.reduce_sum(p, axis=-1)

                def fast():
                    p_d = p * plan.keep(tf.shape(p), i, j) if plan.rate > 0 else p
                    return m, l + l_t, acc + tf.matmul(p_d, v_j)

                return tf.cond(tf.reduce_all(l_t < _LIMIT), fast, exact)

            def exact():
                s = plan.scores(q_0, k_aug[j], i, j)
                m_new = tf.maximum(m, tf.reduce_max(s, axis=-1))
                p = tf.exp(s - m_new[..., None])
                alpha = tf.exp(m - m_new)
                if plan.rate > 0:
                    p_d = p * plan.keep(tf.shape(p), i, j)
                else:
                    p_d = p
                return m_new, l * alpha + tf.reduce_sum(p, axis=-1), acc * alpha[..., None] + tf.matmul(p_d, v_j)

            m, l, acc = tf.cond(j > first, attempt, exact)  # the first tile sets the shift
            return j + 1, m, l, acc

        first, end = plan.key_range(i)
        acc0 = tf.zeros(tf.concat([row_shape, tf.shape(v_c)[-1:]], 0))
        _, m, l, acc = tf.while_loop(
            lambda j, *_: j < end, key_chunk,
            (first, tf.fill(row_shape, _NEG), tf.zeros(row_shape), acc0),
            parallel_iterations=1,
        )
        empty = m < 0.5 * _NEG
        l = tf.where(empty, 1.0, l)
        out = acc / l[..., None]
        if v_mean is not None:
            out = tf.where(empty[..., None], v_mean, out)
        lse = tf.where(empty, -_NEG, m + tf.math.log(l))
        return i + 1, out_ta.write(i, out), lse_ta.write(i, lse), empty_ta.write(i, empty)

    _, out_ta, lse_ta, empty_ta = tf.while_loop(
        lambda i, *_: i < plan.n_q, query_chunk, (0, out_ta, lse_ta, empty_ta), parallel_iterations=1
    )
    return out_ta.stack(), lse_ta.stack(), empty_ta.stack()


def _value_mean(v_c: tf.Tensor, plan: _Plan) -> tf.Tensor:
    """Mean of the real values, (B, H, 1, Dv): the output of a row that sees no key."""
    return tf.reduce_sum(v_c, axis=[0, 3])[:, :, None, :] / tf.cast(plan.k_len, tf.float32)


def _backward(q_c, k_aug, v_c, out, lse, empty, d_out, plan: _Plan):
    """FlashAttention-2 backward: key chunks outside, query chunks inside.

    Per tile: p = exp([q, -lse] . [k, 1]) (exact, <= 1), dV += p^T dO,
    dS = p * ([dO, -delta] . [v, 1]) with delta = rowsum(dO * O),
    dK += dS^T q, dQ[i] += dS k (dQ chunks in a TensorArray).
    """
    d_out = tf.cast(d_out, tf.float32)
    delta = tf.reduce_sum(d_out * out, axis=-1)
    q_lse = _append(q_c, -lse)
    do_delta = _append(d_out, -delta)
    dq_ta = tf.TensorArray(tf.float32, size=plan.n_q, element_shape=q_c.shape[1:]).unstack(tf.zeros_like(q_c))
    dk_ta = tf.TensorArray(tf.float32, size=plan.n_k, element_shape=q_c.shape[1:3].concatenate(k_aug.shape[3:4]).concatenate(q_c.shape[4:]))
    dv_ta = tf.TensorArray(tf.float32, size=plan.n_k, element_shape=v_c.shape[1:])

    def key_chunk(j, dq_ta, dk_ta, dv_ta):
        k_a, v_j = k_aug[j], v_c[j]
        k_j, v_a = k_a[..., :-1], _append(v_j, 1.0)

        def query_chunk(i, dq_ta, dk, dv):
            q_i, do_i = q_c[i], d_out[i]
            p = tf.exp(plan.scores(q_lse[i], k_a, i, j))
            if plan.rate > 0:
                keep = plan.keep(tf.shape(p), i, j)
                dv += tf.matmul(p * keep, do_i, transpose_a=True)
                dp = tf.matmul(do_i, v_j, transpose_b=True) * keep - delta[i][..., None]
            else:
                dv += tf.matmul(p, do_i, transpose_a=True)
                dp = tf.matmul(do_delta[i], v_a, transpose_b=True)
            ds = p * dp
            dk += tf.matmul(ds, q_i, transpose_a=True)
            return i + 1, dq_ta.write(i, dq_ta.read(i) + tf.matmul(ds, k_j)), dk, dv

        first, end = plan.query_range(j)
        _, dq_ta, dk, dv = tf.while_loop(
            lambda i, *_: i < end, query_chunk, (first, dq_ta, tf.zeros_like(k_j), tf.zeros_like(v_j)),
            parallel_iterations=1,
        )
        return j + 1, dq_ta, dk_ta.write(j, dk), dv_ta.write(j, dv)

    _, dq_ta, dk_ta, dv_ta = tf.while_loop(
        lambda j, *_: j < plan.n_k, key_chunk, (0, dq_ta, dk_ta, dv_ta), parallel_iterations=1
    )
    dv = dv_ta.stack()
    if plan.may_empty:  # rows that see no key output mean(v): d/dv_j = dO / T_k
        d_mean = tf.reduce_sum(tf.where(empty[..., None], d_out, 0.0), axis=[0, 3])
        dv += (d_mean / tf.cast(plan.k_len, tf.float32))[:, :, None, :]
    return dq_ta.stack(), dk_ta.stack(), dv
