"""The loops of chunked attention (`chunked_op` prepares their inputs).

Layout: chunk-major tensors. Queries are (n_q, B, H_kv, G * cq, D): the G query heads
that share one key/value head are stacked as rows (row ``g * cq + t``), so grouped-query
attention multiplies each K/V chunk once per group without repeating K/V per query head.
Keys and values are (n_k, B, H_kv, ck, D). Masks are 5D bool tensors broadcastable to
(B, H_kv, G, T_q, T_k), viewed on scores reshaped to (B, H_kv, G, cq, ck).

Per query row the forward keeps a shift `m`, a sum `l` and an accumulator in float32
(online softmax) and returns the output and the log-sum-exp; the backward
(FlashAttention-2) recomputes each score tile from them. A tile outside the causal or
sliding-window band is never visited; with masks or segment ids, a tile in which nothing
is visible is skipped after one look at its mask.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import List, Optional

import tensorflow as tf

NEG = -1e30  # score of a masked entry: finite, far below any real score
_LIMIT = math.exp(40.0)  # largest tile row sum the forward fast path accepts


def cdiv(a, b):
    return -(-a // b)


def append(x: tf.Tensor, column) -> tf.Tensor:
    """``[x, column]`` along the last axis (`column`: a scalar or x.shape[:-1])."""
    column = tf.broadcast_to(tf.cast(column, x.dtype), tf.shape(x)[:-1])
    return tf.concat([x, column[..., None]], axis=-1)


class Plan:
    """What one call needs inside the loops: masks, band, chunking, soft-cap, dropout.

    Args:
        masks: 5D bool tensors (see module docstring), padded to whole chunks.
        segments: `None` or (query ids (B, n_q * cq), key ids (B, n_k * ck)) int32,
            padded with 0: a query sees a key iff their ids are equal and not 0.
        causal, window: the band: visible iff ``1 - window <= k - q <= (0 if causal)``.
        groups: query heads per key/value head.
        soft_cap: `None` or c: scores become ``c * tanh(s / c)`` before masking.
        empty_rows: "mean" (a row that sees no key outputs mean(v)) or "zero".
        rate, seed: dropout on the probabilities, seeded per tile.
    """

    def __init__(self, masks, segments, causal, window, q_len, k_len, cq, ck, groups,
                 soft_cap=None, empty_rows="mean", rate=0.0, seed=None):
        self.masks, self.segments, self.q_len, self.k_len, self.cq, self.ck = masks, segments, q_len, k_len, cq, ck
        self.groups, self.cap, self.empty_rows, self.rate, self.seed = groups, soft_cap, empty_rows, rate, seed
        self.n_q, self.n_k = cdiv(q_len, cq), cdiv(k_len, ck)
        self.skips = bool(masks) or segments is not None  # tiles may be entirely masked
        self.may_empty = self.skips or window is not None  # can a row see no key?
        self.lo = None if window is None else 1 - window
        self.hi = 0 if causal else (None if window is None else window - 1)
        static = isinstance(k_len, int) and isinstance(ck, int)
        self.positions = causal or window is not None or not static or k_len % ck != 0

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
        """5D bool tile broadcastable to (B, H_kv, G, cq, ck), or None when all is visible."""
        valid = None
        for m in self.masks:
            q_all, k_all = m.shape[3] == 1, m.shape[4] == 1
            tile = tf.slice(m, [0, 0, 0, 0 if q_all else i * self.cq, 0 if k_all else j * self.ck],
                            [-1, -1, -1, 1 if q_all else self.cq, 1 if k_all else self.ck])
            valid = tile if valid is None else valid & tile
        if self.segments is not None:
            q_ids = tf.slice(self.segments[0], [0, i * self.cq], [-1, self.cq])[:, :, None]
            k_ids = tf.slice(self.segments[1], [0, j * self.ck], [-1, self.ck])[:, None, :]
            same = ((q_ids == k_ids) & (k_ids != 0))[:, None, None]
            valid = same if valid is None else valid & same
        if self.positions:
            q_pos = (i * self.cq + tf.range(self.cq))[:, None]
            k_pos = (j * self.ck + tf.range(self.ck))[None, :]
            pos = k_pos < self.k_len
            if self.hi is not None:
                pos &= k_pos - q_pos <= self.hi
            if self.lo is not None:
                pos &= k_pos - q_pos >= self.lo
            pos = pos[None, None, None]
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

    def masked(self, s: tf.Tensor, valid) -> tf.Tensor:
        """``where(valid, s, NEG)`` on row-stacked scores (B, H_kv, G * cq, ck)."""
        if valid is None:
            return s
        if self.groups == 1:
            return tf.where(valid[:, :, 0], s, NEG)
        shape = tf.shape(s)
        grouped = tf.reshape(s, tf.stack([shape[0], shape[1], self.groups, shape[2] // self.groups, shape[3]]))
        return tf.reshape(tf.where(valid, grouped, NEG), shape)

    def logits(self, q_i, k_a, shift):
        """(scores minus the row `shift`, tanh of the capped scores or None), before masking.

        Without a soft-cap `k_a` carries a column of ones and the shift goes into the
        matmul (``[q, -shift] . [k, 1]``); with one, ``c * tanh(q.k / c) - shift``.
        """
        if self.cap is None:  # shift None: q_i already carries its column
            return tf.matmul(q_i if shift is None else append(q_i, -shift), k_a, transpose_b=True), None
        t = tf.tanh(tf.matmul(q_i, k_a, transpose_b=True) * (1 / self.cap))
        shift = shift[..., None] if isinstance(shift, tf.Tensor) else shift
        return self.cap * t - shift, t

    def scores(self, q_i, k_a, i, j, shift, valid=None):
        """Masked, shifted scores of tile (i, j) and the soft-cap's tanh; with only band/padding
        masks, edge tiles alone pay for masking (`valid` is given whenever `skips`)."""
        s, t = self.logits(q_i, k_a, shift)
        if not self.skips and self.positions:
            return tf.cond(self.interior(i, j), lambda: s, lambda: self.masked(s, self.visible(i, j))), t
        return self.masked(s, valid if self.skips else self.visible(i, j)), t

    def keep(self, p, i, j) -> tf.Tensor:
        """Dropout multiplier of tile (i, j), 0 or 1 / (1 - rate); the same in both passes."""
        seed = tf.random.experimental.stateless_fold_in(self.seed, i * self.n_k + j)
        u = tf.random.stateless_uniform(tf.shape(p), seed, dtype=tf.float32)
        return tf.cast(u >= self.rate, tf.float32) * (1 / (1 - self.rate))

    def when_visible(self, valid, compute, unchanged):
        """`compute()` unless the tile is entirely masked (then `unchanged`)."""
        if valid is None:
            return compute()
        return tf.cond(tf.reduce_any(valid), compute, lambda: unchanged)


class Memo:
    """The forward results of the `flash` calls of one gradient-checkpointed block.

    `tf_lora.checkpointing` runs a block twice: the forward pass, then its recomputation
    in the backward pass, which only rebuilds what the backward needs. `flash`'s backward
    needs its inputs, the output and the log-sum-exp, not the forward's loops: so the first
    pass records ``(out, lse, empty)`` of each call, in call order, and the recomputation
    replays them (the same values, since it runs on the same inputs and dropout seeds)
    instead of running the forward loops again. A call that finds nothing fitting to replay
    (another shape, or a tensor its graph cannot reach) runs the loops.
    """

    def __init__(self):
        self.saved: List[tuple] = []
        self.replaying, self.cursor = False, 0

    def take(self, shapes) -> Optional[tuple]:
        if not self.replaying:
            return None
        index, self.cursor = self.cursor, self.cursor + 1
        if index >= len(self.saved):
            return None
        found = self.saved[index]
        if [t.shape.as_list() for t in found] != shapes or not all(_reachable(t) for t in found):
            return None
        return found


def _reachable(t: tf.Tensor) -> bool:
    """Whether the graph being built can use `t` (eager tensors and outer graphs' tensors)."""
    graph = getattr(t, "graph", None)
    if graph is None or tf.executing_eagerly():
        return True
    current = tf.compat.v1.get_default_graph()
    while current is not None:
        if current is graph:
            return True
        current = getattr(current, "outer_graph", None)
    return False


_MEMOS = threading.local()


@contextlib.contextmanager
def memo_scope(memo: Memo, replaying: bool):
    """While the body runs, `flash` records into `memo` (first pass) or replays it."""
    stack = _MEMOS.__dict__.setdefault("stack", [])
    memo.replaying, memo.cursor = replaying, 0
    stack.append(memo)
    try:
        yield
    finally:
        stack.pop()


def active_memo() -> Optional[Memo]:
    """The `Memo` of the checkpointed block being run, if any."""
    stack = _MEMOS.__dict__.get("stack")
    return stack[-1] if stack else None


def flash(q_c: tf.Tensor, k_c: tf.Tensor, v_c: tf.Tensor, plan: Plan) -> tf.Tensor:
    """Attention on chunk-major tensors (scaled queries), with a recomputing gradient
    (inside a checkpointed block, the recomputation reuses the forward's results: `Memo`)."""
    memo = active_memo()

    @tf.custom_gradient
    def run(q_c, k_c, v_c):
        k_a = append(k_c, 1.0) if plan.cap is None else k_c
        rows = q_c.shape[:-1].as_list()
        found = memo.take([rows + v_c.shape[-1:].as_list(), rows, rows]) if memo is not None else None
        if found is None:
            out, lse, empty = _forward(q_c, k_a, v_c, plan)
            if memo is not None and not memo.replaying:
                memo.saved.append((out, lse, empty))
        else:
            out, lse, empty = found
        return out, lambda d_out: _backward(q_c, k_a, v_c, out, lse, empty, d_out, plan)

    return run(q_c, k_c, v_c)


def _forward(q_c, k_a, v_c, plan: Plan):
    """Online softmax. Per row: shift `m`, sum `l` = sum exp(s - m), accumulator `acc`.

    After a query chunk's first visited tile the fast path computes exp(s - m) with the
    current shift and is accepted when no row sum of the tile reaches `_LIMIT`, so nothing
    can overflow; otherwise (the first tile, a row still without a visible key, or scores
    far above the shift) the exact path moves the shift to the running max and rescales.
    """
    mean = plan.may_empty and plan.empty_rows == "mean"
    v_mean = tf.reduce_sum(v_c, [0, 3])[:, :, None] / tf.cast(plan.k_len, tf.float32) if mean else None
    _, b, h, rows, _ = q_c.shape
    arrays = [tf.TensorArray(dtype, size=plan.n_q, element_shape=shape) for dtype, shape in
              ((tf.float32, [b, h, rows, v_c.shape[-1]]), (tf.float32, [b, h, rows]), (tf.bool, [b, h, rows]))]

    def query_chunk(i, out_ta, lse_ta, empty_ta):
        q_i = q_c[i]
        row_shape = tf.shape(q_i)[:-1]
        first, end = plan.key_range(i)

        def key_chunk(j, m, l, acc):
            v_j = v_c[j]
            valid = plan.visible(i, j) if plan.skips else None

            def exact():
                s, _ = plan.scores(q_i, k_a[j], i, j, 0.0, valid)
                m_new = tf.maximum(m, tf.reduce_max(s, axis=-1))
                p = tf.exp(s - m_new[..., None])
                alpha = tf.exp(m - m_new)
                p_drop = p * plan.keep(p, i, j) if plan.rate else p
                return m_new, l * alpha + tf.reduce_sum(p, -1), acc * alpha[..., None] + tf.matmul(p_drop, v_j)

            def attempt():
                p = tf.exp(plan.scores(q_i, k_a[j], i, j, m, valid)[0])
                l_tile = tf.reduce_sum(p, -1)
                p_drop = (lambda: p * plan.keep(p, i, j)) if plan.rate else (lambda: p)
                fast = lambda: (m, l + l_tile, acc + tf.matmul(p_drop(), v_j))  # noqa: E731
                return tf.cond(tf.reduce_all(l_tile < _LIMIT), fast, exact)

            update = lambda: tf.cond(j > first, attempt, exact)  # noqa: E731
            return (j + 1, *plan.when_visible(valid, update, (m, l, acc)))

        init = (first, tf.fill(row_shape, NEG), tf.zeros(row_shape),
                tf.zeros(tf.concat([row_shape, tf.shape(v_c)[-1:]], 0)))
        _, m, l, acc = tf.while_loop(lambda j, *_: j < end, key_chunk, init, parallel_iterations=1)
        empty = m < 0.5 * NEG
        l = tf.where(empty, 1.0, l)
        out = acc / l[..., None]
        if plan.may_empty:
            out = tf.where(empty[..., None], v_mean if mean else 0.0, out)
        lse = tf.where(empty, -NEG, m + tf.math.log(l))  # +1e30: exp(s - lse) = 0 in the backward
        return i + 1, out_ta.write(i, out), lse_ta.write(i, lse), empty_ta.write(i, empty)

    _, *arrays = tf.while_loop(lambda i, *_: i < plan.n_q, query_chunk, (0, *arrays), parallel_iterations=1)
    return [a.stack() for a in arrays]


def _backward(q_c, k_a, v_c, out, lse, empty, d_out, plan: Plan):
    """FlashAttention-2 backward: key chunks outside, query chunks inside. Per tile:
    p = exp(s - lse) <= 1, dV += p^T dO, dS = p * (dO v^T - delta) with delta = rowsum(dO * O)
    (times 1 - tanh^2 under a soft-cap), dK += dS^T q, dQ_i += dS k (dQ chunks in a TensorArray)."""
    d_out = tf.cast(d_out, tf.float32)
    delta = tf.reduce_sum(d_out * out, -1)
    q_lse, do_delta = (append(q_c, -lse) if plan.cap is None else None), append(d_out, -delta)
    dq_ta = tf.TensorArray(tf.float32, size=plan.n_q, element_shape=q_c.shape[1:]).unstack(tf.zeros_like(q_c))
    k_shape = k_a.shape[1:-1] + q_c.shape[-1:]
    dk_ta = tf.TensorArray(tf.float32, size=plan.n_k, element_shape=k_shape)
    dv_ta = tf.TensorArray(tf.float32, size=plan.n_k, element_shape=v_c.shape[1:])

    def key_chunk(j, dq_ta, dk_ta, dv_ta):
        k_j_a, v_j = k_a[j], v_c[j]
        k_j, v_a = (k_j_a[..., :-1] if plan.cap is None else k_j_a), append(v_j, 1.0)

        def query_chunk(i, dq_ta, dk, dv):
            q_i, do_i, dq_i = q_c[i], d_out[i], dq_ta.read(i)
            valid = plan.visible(i, j) if plan.skips else None

            def grads():
                if plan.cap is None:
                    s, t = plan.scores(q_lse[i], k_j_a, i, j, None, valid)
                else:
                    s, t = plan.scores(q_i, k_j_a, i, j, lse[i], valid)
                p = tf.exp(s)
                if plan.rate:
                    keep = plan.keep(p, i, j)
                    dv_new = dv + tf.matmul(p * keep, do_i, transpose_a=True)
                    dp = tf.matmul(do_i, v_j, transpose_b=True) * keep - delta[i][..., None]
                else:
                    dv_new = dv + tf.matmul(p, do_i, transpose_a=True)
                    dp = tf.matmul(do_delta[i], v_a, transpose_b=True)
                ds = p * dp if t is None else p * dp * (1 - t * t)
                return dq_i + tf.matmul(ds, k_j), dk + tf.matmul(ds, q_i, transpose_a=True), dv_new

            dq_i, dk, dv = plan.when_visible(valid, grads, (dq_i, dk, dv))
            return i + 1, dq_ta.write(i, dq_i), dk, dv

        first, end = plan.query_range(j)
        init = (first, dq_ta, tf.zeros_like(k_j), tf.zeros_like(v_j))
        _, dq_ta, dk, dv = tf.while_loop(lambda i, *_: i < end, query_chunk, init, parallel_iterations=1)
        return j + 1, dq_ta, dk_ta.write(j, dk), dv_ta.write(j, dv)

    init = (0, dq_ta, dk_ta, dv_ta)
    _, dq_ta, dk_ta, dv_ta = tf.while_loop(lambda j, *_: j < plan.n_k, key_chunk, init, parallel_iterations=1)
    dv = dv_ta.stack()
    if plan.may_empty and plan.empty_rows == "mean":  # rows that see no key output mean(v)
        d_mean = tf.reduce_sum(tf.where(empty[..., None], d_out, 0.0), [0, 3])[:, :, None]
        dv += d_mean / tf.cast(plan.k_len, tf.float32)
    return dq_ta.stack(), dk_ta.stack(), dv
