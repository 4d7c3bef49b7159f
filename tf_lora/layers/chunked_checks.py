"""Argument checks and normalisation of the chunked attention op (`chunked_op`).

Pure functions on Python values and tensors' static shapes: they raise the op's
``ValueError``/``TypeError`` messages (argument, expectation, received value) and bring
masks, segment ids and dropout seeds to the forms the loops take. `chunked_op` re-exports
the ones other modules import from it.
"""

from __future__ import annotations

import numbers
from typing import Any, Tuple

import keras
import tensorflow as tf

_EMPTY_ROWS = ("mean", "zero")


def _invalid(name: str, expected: str, value: Any) -> str:
    return f"Received an invalid value for `{name}`, expected {expected}. Received: {name}={value!r}"


def _check_positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_invalid(name, "a positive integer or None", value))
    if value <= 0:
        raise ValueError(_invalid(name, "a positive integer", value))


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
        ("key", k, 0, "batch size", q), ("value", v, 0, "batch size", q), ("value", v, 2, "number of heads", k),
        ("key", k, 3, "head_dim", q), ("value", v, 1, "sequence length", k),
    ]
    for name, x, axis, what, ref in checks:
        ref_name = "query" if ref is q else "key"
        if x.shape[axis] is not None and ref.shape[axis] is not None and x.shape[axis] != ref.shape[axis]:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected the same {what} (axis {axis}) as "
                f"`{ref_name}`. Received: {ref_name}.shape={tuple(ref.shape)}, {name}.shape={tuple(x.shape)}"
            )
    hq, hk = q.shape[2], k.shape[2]
    if hq is not None and hk is not None and hq % hk:
        raise ValueError(
            "Received an invalid value for `key`, expected a number of heads (axis 2) that divides the "
            f"query's (grouped-query attention). Received: query.shape={tuple(q.shape)}, key.shape={tuple(k.shape)}")
    return q, k, v


def _seed_tensor(seed: Any) -> tf.Tensor:
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    if isinstance(seed, keras.random.SeedGenerator):
        seed = seed.next()
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = [int(seed), 0]
    return tf.cast(tf.reshape(tf.convert_to_tensor(seed), [2]), tf.int64)


def _segments(ids, name: str, batch, length) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer or ids.shape.rank != 2 or any(
            g is not None and w is not None and g != w for g, w in zip(ids.shape, (batch, length))):
        raise ValueError(_invalid(name, f"integer ids of shape (batch, length) = {(batch, length)}",
                                  f"<tensor of shape {tuple(ids.shape)} and dtype {ids.dtype.name}>"))
    return tf.cast(ids, tf.int32)


def _check_options(causal, dropout, scale, soft_cap, empty_rows, sliding_window) -> None:
    if not isinstance(causal, bool):
        raise TypeError(_invalid("causal", "a bool", causal))
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(_invalid("dropout", "a float in [0, 1)", dropout))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(_invalid("scale", "a float or None", scale))
    if soft_cap is not None and (isinstance(soft_cap, bool) or not isinstance(soft_cap, numbers.Real) or soft_cap <= 0):
        raise ValueError(_invalid("soft_cap", "None or a positive number", soft_cap))
    if empty_rows not in _EMPTY_ROWS:
        raise ValueError(_invalid("empty_rows", f"one of {_EMPTY_ROWS}", empty_rows))
    _check_positive_int("sliding_window", sliding_window)
