"""chunked_attention / ChunkedAttention / use_chunked_attention against full attention.

References: a float64 NumPy softmax attention with its analytic gradients
(Keras conventions: True = attend, causal top-left, a row with no visible key
averages all values and passes no gradient to query/key), and
`keras.ops.dot_product_attention` / `keras.layers.MultiHeadAttention`.

Tolerances: float32 outputs and gradients within 2e-5 (relative to values of
order one); float16 within 5e-3 and bfloat16 within 3e-2 (their input rounding,
the op accumulates in float32).
"""

import inspect
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_lora.convert import use_chunked_attention
from tf_lora.layers.attention import ChunkedAttention, chunked_attention
from tf_lora.layers.chunked_op import chunk_sizes

ATOL = 2e-5
MIXED_ATOL = {"float16": 5e-3, "bfloat16": 3e-2}
# Keras 3.5 (the floor) has no ops.dot_product_attention; there the NumPy reference alone decides.
HAS_KERAS_SDPA = hasattr(keras.ops, "dot_product_attention")


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _full_mask(mask, shape):
    """Any accepted mask -> (B, H, Tq, Tk) bool."""
    b, h, tq, tk = shape
    if mask is None:
        return np.ones(shape, bool)
    mask = np.asarray(mask, bool)
    mask = {2: lambda m: m[:, None, None, :], 3: lambda m: m[:, None], 4: lambda m: m}[mask.ndim](mask)
    return np.broadcast_to(mask, shape)


def reference(q, k, v, d_out, mask=None, causal=False, scale=None):
    """Float64 attention output and gradients of sum(out * d_out) wrt q, k, v."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    valid = _full_mask(mask, s.shape)
    if causal:
        valid = valid & np.tril(np.ones(s.shape[-2:], bool))
    empty = ~valid.any(-1, keepdims=True)
    s = np.where(valid, s, -np.inf)
    s = np.where(empty, 0.0, s - np.where(empty, 0.0, s.max(-1, keepdims=True)))
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)  # empty rows: uniform
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, d_out)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    ds = np.where(empty, 0.0, p * (dp - (p * dp).sum(-1, keepdims=True)))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    return out, (dq, dk, dv)


def _run(fn, q, k, v, d_out):
    """Output and gradients of sum(fn(q, k, v) * d_out)."""
    q, k, v = (tf.convert_to_tensor(x) for x in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = fn(q, k, v)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * d_out)
    return out, tape.gradient(loss, [q, k, v])


def _keras_mask(mask):
    if mask is None:
        return None
    mask = np.asarray(mask, bool)
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask


def _inputs(b, tq, tk, h=2, d=8, dv=6, seed=0):
    return _rand(b, tq, h, d, seed=seed), _rand(b, tk, h, d, seed=seed + 1), _rand(b, tk, h, dv, seed=seed + 2)


def _make_mask(kind, b, tq, tk, h=2, seed=5):
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "keys":
        return rng.random((b, tk)) > 0.3
    if kind == "full":
        return rng.random((b, tq, tk)) > 0.4
    return rng.random((b, h, tq, tk)) > 0.4  # "heads"


def _assert_close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=atol)


SHAPES = {
    "divides": (16, 16, 4, 4),
    "remainder": (19, 23, 5, 7),
    "tq_gt_tk": (23, 11, 6, 4),
    "chunk_gt_len": (7, 30, 16, 8),
}


@pytest.mark.parametrize("mask_kind", [None, "keys", "full", "heads"], ids=["nomask", "keys", "full", "heads"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference_and_keras(shape, causal, mask_kind):
    tq, tk, cq, ck = shape
    q, k, v = _inputs(2, tq, tk)
    mask = _make_mask(mask_kind, 2, tq, tk)
    d_out = _rand(2, tq, 2, 6, seed=9)
    out, grads = _run(
        lambda q, k, v: chunked_attention(
            q, k, v, attention_mask=mask, causal=causal, query_chunk_size=cq, key_chunk_size=ck
        ),
        q, k, v, d_out,
    )
    ref_out, ref_grads = reference(q, k, v, d_out, mask, causal)
    _assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
    if not HAS_KERAS_SDPA:
        return  # the floor Keras has no ops.dot_product_attention: the NumPy reference above decides
    k_out, k_grads = _run(
        lambda q, k, v: keras.ops.dot_product_attention(q, k, v, mask=_keras_mask(mask), is_causal=causal),
        q, k, v, d_out,
    )
    _assert_close(out, np.asarray(k_out))
    for g, r in zip(grads, k_grads):
        _assert_close(g, np.asarray(r))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fully_masked_rows_average_values(causal):
    tq, tk = 9, 13
    q, k, v = _inputs(2, tq, tk)
    mask = _make_mask("full", 2, tq, tk)
    mask[0, 2] = False  # one query row sees nothing
    mask[1, :, :4] = False  # causal: the first 4 queries of batch 1 see nothing
    d_out = _rand(2, tq, 2, 6, seed=3)
    out, grads = _run(
        lambda q, k, v: chunked_attention(
            q, k, v, attention_mask=mask, causal=causal, query_chunk_size=4, key_chunk_size=5
        ),
        q, k, v, d_out,
    )
    assert all(np.all(np.isfinite(x)) for x in [out, *grads])
    _assert_close(out[0, 2], v[0].mean(axis=0))  # uniform average of all values
    ref_out, ref_grads = reference(q, k, v, d_out, mask, causal)
    _assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
    if HAS_KERAS_SDPA:
        k_out = keras.ops.dot_product_attention(q, k, v, mask=_keras_mask(mask), is_causal=causal)
        _assert_close(out, np.asarray(k_out))


def test_empty_query_sequence():
    q, k, v = _inputs(2, 0, 7)
    out = chunked_attention(q, k, v, causal=True)
    assert out.shape == (2, 0, 2, 6)


def test_all_keys_masked_batch_element():
    q, k, v = _inputs(2, 6, 7)
    mask = np.ones((2, 7), bool)
    mask[1] = False
    out = chunked_attention(q, k, v, attention_mask=mask, query_chunk_size=4, key_chunk_size=3)
    _assert_close(out[1], np.broadcast_to(v[1].mean(axis=0), (6, 2, 6)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision(dtype):
    q, k, v = _inputs(2, 21, 17)
    mask = _make_mask("keys", 2, 21, 17)
    d_out = _rand(2, 21, 2, 6, seed=4)
    cast = [tf.cast(x, dtype) for x in (q, k, v)]
    out, grads = _run(
        lambda q, k, v: chunked_attention(
            q, k, v, attention_mask=mask, causal=True, query_chunk_size=8, key_chunk_size=6
        ),
        *cast, d_out,
    )
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    rounded = [np.asarray(tf.cast(x, tf.float32)) for x in cast]  # reference on the rounded inputs
    ref_out, ref_grads = reference(*rounded, d_out, mask, causal=True)
    _assert_close(tf.cast(out, tf.float32), ref_out, MIXED_ATOL[dtype])
    for g, r in zip(grads, ref_grads):
        _assert_close(tf.cast(g, tf.float32), r, MIXED_ATOL[dtype] * 4)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_shapes"])
def test_jit_compile(dynamic):
    q, k, v = _inputs(2, 19, 23)
    mask = _make_mask("keys", 2, 19, 23)
    d_out = _rand(2, 19, 2, 6, seed=2)
    signature = None
    if dynamic:
        spec = lambda *s: tf.TensorSpec([None, None, *s])  # noqa: E731
        signature = [spec(2, 8), spec(2, 8), spec(2, 6), tf.TensorSpec([None, None], tf.bool)]

    @tf.function(jit_compile=True, input_signature=signature)
    def step(q, k, v, mask):
        return _run(
            lambda q, k, v: chunked_attention(
                q, k, v, attention_mask=mask, causal=True, max_memory_bytes=2 * 2 * 4 * 40
            ),
            q, k, v, d_out,
        )

    out, grads = step(q, k, v, mask)
    ref_out, ref_grads = reference(q, k, v, d_out, mask, causal=True)
    _assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)


def test_chunk_sizes_fit_the_budget():
    for budget in (4 * 8, 1000, 4 * 8 * 100, 2**20):
        cq, ck = chunk_sizes(8, 300, 500, max_memory_bytes=budget)
        assert 4 * 8 * cq * ck <= budget and cq >= 1 and ck >= 1
    assert chunk_sizes(8, 100, 100, max_memory_bytes=2**30) == (100, 100)  # whole sequences
    assert chunk_sizes(8, 300, 500, query_chunk_size=64, key_chunk_size=1000) == (64, 500)
    cq, ck = chunk_sizes(8, 4096, 4096)  # default: 16 MiB, 1024 x 512 for 8 heads
    assert (cq, ck) == (1024, 512)


def test_budget_only_matches_reference():
    q, k, v = _inputs(1, 33, 29)
    d_out = _rand(1, 33, 2, 6, seed=1)
    out, grads = _run(lambda q, k, v: chunked_attention(q, k, v, max_memory_bytes=4 * 2 * 60), q, k, v, d_out)
    ref_out, ref_grads = reference(q, k, v, d_out)
    _assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)


def test_large_scores_take_the_exact_path():
    """Scores growing by more than e^40 along the keys force the rescaling path."""
    q, k, v = _inputs(1, 8, 24, d=4)
    k = k * np.linspace(1, 40, 24)[None, :, None, None].astype("float32")
    d_out = _rand(1, 8, 2, 6, seed=1)
    out, grads = _run(lambda q, k, v: chunked_attention(q, k, v, query_chunk_size=4, key_chunk_size=4), q, k, v, d_out)
    ref_out, ref_grads = reference(q, k, v, d_out)
    _assert_close(out, ref_out, 1e-4)
    for g, r in zip(grads, ref_grads):  # scores up to ~1e3: float32 rounding is relative
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


def test_dropout():
    # q = k = 0: uniform probabilities 1/Tk; v = one-hot keys, so out = keep / ((1 - rate) * Tk).
    tq, tk, rate = 6, 8, 0.5
    q, k = np.zeros((1, tq, 1, 4), "float32"), np.zeros((1, tk, 1, 4), "float32")
    v = np.eye(tk, dtype="float32")[None, :, None, :]
    kw = dict(dropout=rate, query_chunk_size=4, key_chunk_size=3)
    eval_out = chunked_attention(q, k, v, **kw, training=False)
    _assert_close(eval_out, np.full((1, tq, 1, tk), 1 / tk))
    out = np.asarray(chunked_attention(q, k, v, **kw, training=True, seed=3))
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / ((1 - rate) * tk)][: len(np.unique(out))], rtol=1e-6)
    assert 0 < (out == 0).mean() < 1
    again = chunked_attention(q, k, v, **kw, training=True, seed=3)
    np.testing.assert_array_equal(out, again)  # same seed, same mask


def test_dropout_gradient_matches_finite_differences():
    q, k, v = _inputs(1, 7, 9, d=4, dv=3)
    d_out = _rand(1, 7, 2, 3, seed=8)
    fn = lambda q, k, v: chunked_attention(  # noqa: E731
        q, k, v, dropout=0.3, training=True, seed=11, query_chunk_size=3, key_chunk_size=4
    )
    out, grads = _run(fn, q, k, v, d_out)
    assert np.all(np.isfinite(out)) and not np.allclose(out, chunked_attention(q, k, v))
    eps = 1e-2
    for i, x in enumerate((q, k, v)):
        direction = _rand(*x.shape, seed=20 + i)
        args_p, args_m = [q, k, v], [q, k, v]
        args_p[i], args_m[i] = x + eps * direction, x - eps * direction
        numeric = (np.sum(fn(*args_p) * d_out) - np.sum(fn(*args_m) * d_out)) / (2 * eps)
        np.testing.assert_allclose(np.sum(grads[i] * direction), numeric, rtol=2e-2, atol=2e-3)


def _bad(**overrides):
    q, k, v = _inputs(2, 5, 6)
    args = dict(query=q, key=k, value=v)
    args.update({name: value for name, value in overrides.items() if name in args})
    kwargs = {name: value for name, value in overrides.items() if name not in args}
    return lambda: chunked_attention(args["query"], args["key"], args["value"], **kwargs)


BAD_INPUTS = {
    "query_chunk_zero": (dict(query_chunk_size=0), ValueError, "query_chunk_size=0"),
    "key_chunk_negative": (dict(key_chunk_size=-3), ValueError, "key_chunk_size=-3"),
    "chunk_float": (dict(query_chunk_size=2.5), TypeError, "query_chunk_size"),
    "budget_too_small": (dict(max_memory_bytes=15), ValueError, "at least 16 bytes"),
    "budget_zero": (dict(max_memory_bytes=0), ValueError, "max_memory_bytes"),
    "budget_vs_chunks": (dict(max_memory_bytes=64, query_chunk_size=4, key_chunk_size=4), ValueError, "256 bytes"),
    "batch_mismatch": (dict(key=_rand(3, 6, 2, 8)), ValueError, "batch size"),
    "heads_mismatch": (dict(value=_rand(2, 6, 3, 6)), ValueError, "number of heads"),
    "head_dim_mismatch": (dict(key=_rand(2, 6, 2, 4)), ValueError, "head_dim"),
    "seq_mismatch": (dict(value=_rand(2, 7, 2, 6)), ValueError, "sequence length"),
    "rank": (dict(query=_rand(2, 5, 16)), ValueError, "4D"),
    "int_input": (dict(query=np.ones((2, 5, 2, 8), "int32")), TypeError, "floating"),
    "mask_shape": (dict(attention_mask=np.ones((2, 4), bool)), ValueError, r"\(batch, T_k\) = \(2, 6\)"),
    "mask_rank": (dict(attention_mask=np.ones((6,), bool)), ValueError, "attention_mask"),
    "dropout": (dict(dropout=1.0), ValueError, "dropout=1.0"),
    "no_keys": (dict(key=_rand(2, 0, 2, 8), value=_rand(2, 0, 2, 6)), ValueError, "at least one key"),
}


@pytest.mark.parametrize("overrides,error,match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad(**overrides)()


# --- the layer -----------------------------------------------------------------


def _pair(tq=13, tk=11, dim=12, seed=0, **kwargs):
    """A MultiHeadAttention and a ChunkedAttention with the same weights."""
    mha = keras.layers.MultiHeadAttention(num_heads=3, key_dim=4, value_dim=5, **kwargs)
    chunked = ChunkedAttention(num_heads=3, key_dim=4, value_dim=5, query_chunk_size=4, key_chunk_size=3, **kwargs)
    q, v = _rand(2, tq, dim, seed=seed), _rand(2, tk, dim, seed=seed + 1)
    mha(q, v)
    chunked(q, v)
    chunked.set_weights(mha.get_weights())
    return mha, chunked, q, v


LAYER_CASES = {
    "self": dict(tk=13, call={}),
    "cross": dict(tk=11, call={}),
    "causal": dict(tk=11, call=dict(use_causal_mask=True)),
    "mask": dict(tk=11, call=dict(attention_mask="full")),
    "mask_causal": dict(tk=11, call=dict(attention_mask="full", use_causal_mask=True)),
}


@pytest.mark.parametrize("case", LAYER_CASES.values(), ids=LAYER_CASES.keys())
def test_layer_matches_multi_head_attention(case):
    mha, chunked, q, v = _pair(tk=case["tk"])
    if case["tk"] == 13:
        v = q
    call = dict(case["call"])
    if "attention_mask" in call:
        mask = _make_mask("full", 2, 13, case["tk"])
        mask[0, 1] = False  # a fully masked row
        call["attention_mask"] = mask
    outs, grads = [], []
    for layer in (mha, chunked):
        with tf.GradientTape() as tape:
            out = layer(q, v, **call)
            loss = tf.reduce_sum(out * _rand(*out.shape, seed=3))
        outs.append(np.asarray(out))
        grads.append(tape.gradient(loss, layer.trainable_weights))
    _assert_close(outs[1], outs[0])
    if "attention_mask" in call and not HAS_KERAS_SDPA:
        return  # Keras 3.5's MHA differentiates the fully masked row otherwise (outputs agree; the
        # NumPy-reference tests check these gradients)
    for a, b in zip(grads[1], grads[0]):
        _assert_close(a, np.asarray(b), 5e-5)


@pytest.mark.skipif("sliding_window" not in inspect.signature(keras.layers.MultiHeadAttention.__init__).parameters,
                    reason="this Keras's MultiHeadAttention has no sliding_window")
def test_layer_keras_masks_and_sliding_window():
    tokens = np.array([[3, 5, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    x = keras.Input((6,), dtype="int32")
    emb = keras.layers.Embedding(10, 12, mask_zero=True)
    outputs = {}
    for name, cls in (("mha", keras.layers.MultiHeadAttention), ("chunked", ChunkedAttention)):
        extra = dict(query_chunk_size=4, key_chunk_size=4) if name == "chunked" else {}
        layer = cls(num_heads=2, key_dim=4, sliding_window=3, name=name, **extra)
        h = emb(x)
        outputs[name] = keras.Model(x, layer(h, h, use_causal_mask=True))
    outputs["chunked"].get_layer("chunked").set_weights(outputs["mha"].get_layer("mha").get_weights())
    _assert_close(outputs["chunked"](tokens), np.asarray(outputs["mha"](tokens)))


def test_layer_mixed_precision_matches():
    keras.config.set_dtype_policy("mixed_float16")
    mha, chunked, q, v = _pair()
    out = chunked(q, v, use_causal_mask=True)
    assert out.dtype == "float16" and chunked.query_dense.kernel.dtype == "float32"
    expected = mha(q, v, use_causal_mask=True)
    _assert_close(tf.cast(out, tf.float32), np.asarray(tf.cast(expected, tf.float32)), 1e-2)


def _model(layer):
    q, v = keras.Input((13, 12)), keras.Input((11, 12))
    return keras.Model([q, v], layer(q, v, use_causal_mask=True))


def test_layer_config_fit_and_keras_round_trip():
    layer = ChunkedAttention(num_heads=2, key_dim=4, dropout=0.1, key_chunk_size=5, max_memory_bytes=4096)
    config = layer.get_config()
    assert ChunkedAttention.from_config(config).get_config() == config
    assert config["key_chunk_size"] == 5 and config["max_memory_bytes"] == 4096
    model = _model(layer)
    x = [_rand(4, 13, 12), _rand(4, 11, 12, seed=1)]
    before = [w.numpy().copy() for w in layer.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    model.fit(x, _rand(4, 13, 12, seed=2), batch_size=2, epochs=1, verbose=0)
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, layer.trainable_weights))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "chunked.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    assert type(loaded.layers[2]) is ChunkedAttention
    assert loaded.layers[2].get_config() == layer.get_config()
    _assert_close(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_layer_return_attention_scores_raises():
    layer = ChunkedAttention(num_heads=2, key_dim=4)
    x = _rand(1, 5, 8)
    with pytest.raises(NotImplementedError, match="return_attention_scores"):
        layer(x, x, return_attention_scores=True)
    with pytest.raises(NotImplementedError, match="never materialises"):
        layer(keras.Input((5, 8)), keras.Input((5, 8)), return_attention_scores=True)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(query_chunk_size=0), ValueError),
        (dict(key_chunk_size="8"), TypeError),
        (dict(max_memory_bytes=-1), ValueError),
    ],
    ids=["query_chunk_zero", "key_chunk_str", "budget_negative"],
)
def test_layer_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        ChunkedAttention(num_heads=2, key_dim=4, **kwargs)


def test_layer_rejects_other_attention_axes():
    layer = ChunkedAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    x = _rand(1, 3, 4, 8)
    with pytest.raises(NotImplementedError, match="seq"):
        layer(x, x)


# --- use_chunked_attention -------------------------------------------------------


def _encoder():
    x = keras.Input((13, 12))
    h = keras.layers.Dense(12, name="embed")(x)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 6, name="self_attn")(h, h))
    inner_in = keras.Input((13, 12))
    inner_attn = keras.layers.MultiHeadAttention(3, 4, name="inner_attn")
    inner = keras.Model(inner_in, inner_attn(inner_in, inner_in, use_causal_mask=True), name="inner")
    h = inner(h)
    head = keras.Sequential([keras.layers.Dense(5, name="head_dense")], name="head")
    return keras.Model(x, head(h))


def test_use_chunked_attention_keeps_predictions():
    model = _encoder()
    x = _rand(3, 13, 12)
    expected = model.predict(x, verbose=0)
    weights = [w.copy() for w in model.get_weights()]
    paths = [w.path for w in model.weights]
    chunked = use_chunked_attention(model, query_chunk_size=4, key_chunk_size=5)
    assert chunked is model  # in place: only the layers' classes change
    kinds = {layer.name: type(layer) for layer in chunked.layers}
    assert kinds["self_attn"] is ChunkedAttention
    inner = chunked.get_layer("inner").get_layer("inner_attn")
    assert type(inner) is ChunkedAttention and inner.query_chunk_size == 4
    _assert_close(chunked.predict(x, verbose=0), expected)
    assert [w.path for w in model.weights] == paths
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    again = use_chunked_attention(chunked, max_memory_bytes=4096)  # already chunked: kept
    assert again.get_layer("self_attn").query_chunk_size == 4


def test_use_chunked_attention_after_adapt_keeps_the_adapters():
    import tf_lora

    model = tf_lora.adapt(_encoder(), tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")))
    for v in model.lora_variables:
        v.assign(np.full(v.shape, 0.1, "float32"))
    x = _rand(2, 13, 12)
    expected = model.predict(x, verbose=0)
    use_chunked_attention(model, query_chunk_size=4)
    assert type(model.get_layer("self_attn")) is ChunkedAttention
    _assert_close(model.predict(x, verbose=0), expected)


def _unchanged(model):
    return [type(layer) for layer in model._flatten_layers()]


def test_use_chunked_attention_rejects_unsupported_and_bad_args():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="no attention layer"):
        use_chunked_attention(Sub())
    with pytest.raises(TypeError, match="keras.Model"):
        use_chunked_attention("not a model")
    model = _encoder()
    before = _unchanged(model)
    with pytest.raises(ValueError, match="max_memory_bytes=0"):
        use_chunked_attention(model, max_memory_bytes=0)
    # one float32 score per head (3 heads in inner_attn) is the smallest tile: 12 bytes
    with pytest.raises(ValueError, match=r"`max_memory_bytes`, expected at least 12 bytes.*max_memory_bytes=11"):
        use_chunked_attention(model, max_memory_bytes=11)
    assert _unchanged(model) == before

    class MyAttention(keras.layers.MultiHeadAttention):  # its own call: not swapped
        pass

    x = keras.Input((13, 12))
    h = keras.layers.MultiHeadAttention(2, 6, name="plain")(x, x)
    mixed = keras.Model(x, MyAttention(2, 6, name="mine")(h, h))
    before = _unchanged(mixed)
    with pytest.raises(NotImplementedError, match=r"MyAttention \(at 'mine'\).*Supported: keras.layers.MultiHeadAttention"):
        use_chunked_attention(mixed)
    assert _unchanged(mixed) == before


def test_lora_adapts_chunked_projections():
    import tf_lora

    base = _encoder()
    config = tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"), attention="chunked")
    model = tf_lora.adapt(base, config)
    x = _rand(2, 13, 12)
    _assert_close(model.predict(x, verbose=0), base.predict(x, verbose=0))
    attn = [layer for layer in model._flatten_layers() if isinstance(layer, ChunkedAttention)]
    assert len(attn) == 2
    names = {w.path for layer in attn for w in layer.trainable_weights if w.name.startswith("lora_")}
    assert names and all("query" in n or "value" in n for n in names)


def test_layer_two_dimensional_mask_is_query_by_key():
    mha, chunked, q, v = _pair()
    mask = _make_mask("full", 1, 13, 11)[0]  # (T_q, T_k), shared by the batch
    _assert_close(chunked(q, v, attention_mask=mask), np.asarray(mha(q, v, attention_mask=mask)))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_peak_memory_stays_far_below_the_score_matrix(causal):
    """Forward + backward at T=2048 with 4 heads: the score matrix alone is 64 MiB."""
    n, heads = 2048, 4
    q, k, v = (tf.constant(_rand(1, n, heads, 16, seed=s)) for s in range(3))

    @tf.function
    def step(q, k, v):
        return _run(lambda q, k, v: chunked_attention(q, k, v, causal=causal, max_memory_bytes=2**20), q, k, v, 1.0)

    tf.config.experimental.reset_memory_stats("CPU:0")
    [np.asarray(x) for x in tf.nest.flatten(step(q, k, v))]
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    assert peak < 24 * 2**20, peak  # measured 8 MiB (full attention: 211 MiB)


def _op_types(fn, *args):
    graph = tf.function(fn).get_concrete_function(*args).graph
    return {"While" if "While" in op.type else op.type for op in graph.get_operations()}


def test_default_runs_fused_up_to_fused_max_bytes():
    """8 heads x 1448^2 float32 scores fit FUSED_MAX_BYTES (64 MiB): by default one fused
    pass (no loop), exact; a given 16 MiB budget is a hard limit and
    takes the chunked loop; just above the threshold the default is chunked too."""
    from tf_lora.layers.chunked_op import FUSED_MAX_BYTES
    q = tf.random.stateless_normal([1, 1448, 8, 16], seed=[1, 2])
    assert 4 * 8 * 1448 * 1448 <= FUSED_MAX_BYTES < 4 * 8 * 1456 * 1456
    assert "While" not in _op_types(lambda q: chunked_attention(q, q, q, causal=True), q)
    assert "While" in _op_types(lambda q: chunked_attention(q, q, q, causal=True, max_memory_bytes=16 * 2**20), q)
    longer = tf.random.stateless_normal([1, 1456, 8, 16], seed=[1, 3])
    assert "While" in _op_types(lambda q: chunked_attention(q, q, q), longer)
    # The fused path (whole matrix, default budget) against the float64 reference.
    q, k, v = _inputs(1, 300, 300, h=8, d=16, dv=16)
    d_out = _rand(1, 300, 8, 16, seed=4)
    out, grads = _run(lambda q, k, v: chunked_attention(q, k, v, causal=True), q, k, v, d_out)
    ref_out, ref_grads = reference(q, k, v, d_out, causal=True)
    _assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
