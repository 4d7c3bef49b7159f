"""Long context on real decoders: the chunked op's grouped-query, soft-cap and segment
masks against a float64 NumPy reference, and `use_chunked_attention` on KerasHub's GPT-2,
Llama 3, Mistral, Qwen, Gemma and Gemma 2 against the models' own attention.

Tolerances: op outputs and gradients within 2e-5 absolute (values of order one); model
loss and LoRA gradients within a relative 1e-5 (max |chunked - plain| / max |plain| per
variable, float32); greedy tokens identical. Decoders run at T=64 with 16 x 16 tiles
(4 x 4 tiles, several of them skipped or masked).
"""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora import attention_seam
from tf_lora.attention_seam import ChunkedSeam
from tf_lora.layers.chunked_op import chunked_attention, masked_chunked_attention

M = keras_hub.models
ATOL = 2e-5
REL = 1e-5
VOCAB, T, CHUNK = 64, 64, 16


# --- the op against NumPy ------------------------------------------------------------


def reference(q, k, v, d_out, mask=None, causal=False, window=None, segments=None, cap=None, empty="mean"):
    """Float64 attention (K/V repeated per query head) and gradients of sum(out * d_out)."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    groups = q.shape[2] // k.shape[2]
    k_rep, v_rep = np.repeat(k, groups, 2), np.repeat(v, groups, 2)
    scale = 1 / np.sqrt(q.shape[-1])
    raw = np.einsum("bqhd,bkhd->bhqk", q, k_rep) * scale
    s = raw if cap is None else cap * np.tanh(raw / cap)
    tq, tk = s.shape[-2:]
    valid = np.ones(s.shape, bool)
    if mask is not None:
        valid &= mask[:, None]
    if causal:
        valid &= np.tril(np.ones((tq, tk), bool))
    if window is not None:
        valid &= np.abs(np.arange(tq)[:, None] - np.arange(tk)[None]) < window
    if segments is not None:
        valid &= ((segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0))[:, None]
    empty_row = ~valid.any(-1, keepdims=True)
    s = np.where(valid, s, -np.inf)
    s = np.where(empty_row, 0.0, s - np.where(empty_row, 0.0, s.max(-1, keepdims=True)))
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)  # an empty row: uniform
    if empty == "zero":
        p = np.where(empty_row, 0.0, p)
    out = np.einsum("bhqk,bkhd->bqhd", p, v_rep)
    dv = np.einsum("bhqk,bqhd->bkhd", p, d_out)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, v_rep)
    ds = np.where(empty_row, 0.0, p * (dp - (p * dp).sum(-1, keepdims=True)))
    if cap is not None:
        ds *= 1 - np.tanh(raw / cap) ** 2
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k_rep) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    per_kv = lambda x: x.reshape(*x.shape[:2], -1, groups, x.shape[3]).sum(3)  # noqa: E731
    return out, (dq, per_kv(dk), per_kv(dv))


def _grads(fn, q, k, v, d_out):
    q, k, v = (tf.constant(x) for x in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = fn(q, k, v)
        loss = tf.reduce_sum(out * d_out)
    return out, tape.gradient(loss, [q, k, v])


B, TQ, HEADS, KV_HEADS, DIM = 2, 37, 6, 2, 8
_rng = np.random.default_rng(0)
Q = (_rng.standard_normal((B, TQ, HEADS, DIM)) * 2).astype("float32")
K = (_rng.standard_normal((B, TQ, KV_HEADS, DIM)) * 2).astype("float32")
V = _rng.standard_normal((B, TQ, KV_HEADS, DIM)).astype("float32")
D_OUT = _rng.standard_normal((B, TQ, HEADS, DIM)).astype("float32")
PAD = np.arange(TQ)[None] < np.array([[TQ], [30]])  # row 1 padded from 30
DENSE = np.tril(np.ones((TQ, TQ), bool))[None] & PAD[:, None, :]
DENSE[0, 0, 0] = False  # one row that sees no key
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [0] * 7, [1] * 5 + [2] * 5 + [3] * 27])
OP_CASES = {
    "gqa_causal": dict(causal=True),
    "gqa_dense_mask": dict(mask=DENSE),
    "soft_cap": dict(causal=True, cap=5.0),
    "soft_cap_mask_zero_rows": dict(mask=DENSE, cap=3.0, empty="zero"),
    "segments": dict(causal=True, segments=SEGMENTS),
    "segments_zero_rows": dict(causal=True, segments=SEGMENTS, empty="zero"),
    "window_and_mask": dict(causal=True, window=6, mask=DENSE),
}


@pytest.mark.parametrize("chunks", [(8, 5), (None, None)], ids=["tiles", "fused"])
@pytest.mark.parametrize("case", OP_CASES.values(), ids=OP_CASES.keys())
def test_op_matches_numpy(case, chunks):
    def fn(q, k, v):
        masks = [] if case.get("mask") is None else [tf.constant(case["mask"])[:, None]]
        return masked_chunked_attention(
            q, k, v, masks, causal=case.get("causal", False), sliding_window=case.get("window"),
            segment_ids=case.get("segments"), soft_cap=case.get("cap"), empty_rows=case.get("empty", "mean"),
            query_chunk_size=chunks[0], key_chunk_size=chunks[1])

    out, grads = _grads(fn, Q, K, V, D_OUT)
    ref_out, ref_grads = reference(Q, K, V, D_OUT, mask=case.get("mask"), causal=case.get("causal", False),
                                   window=case.get("window"), segments=case.get("segments"), cap=case.get("cap"),
                                   empty=case.get("empty", "mean"))
    for got, want in zip([out, *grads], [ref_out, *ref_grads]):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=ATOL)


def test_public_op_takes_segment_ids_soft_cap_and_kv_heads():
    out, grads = _grads(lambda q, k, v: chunked_attention(q, k, v, causal=True, segment_ids=SEGMENTS, soft_cap=4.0,
                                                          query_chunk_size=16, key_chunk_size=8), Q, K, V, D_OUT)
    ref_out, ref_grads = reference(Q, K, V, D_OUT, causal=True, segments=SEGMENTS, cap=4.0)
    for got, want in zip([out, *grads], [ref_out, *ref_grads]):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=ATOL)


def test_tiles_hidden_by_segments_are_never_computed():
    """Keys 16..23 (one whole key chunk) are padding (segment 0) and hold NaN: only a
    skipped tile keeps NaN out of the outputs and of dQ."""
    segments = np.array([[1] * 6 + [2] * 10 + [0] * 8 + [3] * 8])
    q, k, v = Q[:1, :32], K[:1, :32].copy(), V[:1, :32].copy()
    k[:, 16:24], v[:, 16:24] = np.nan, np.nan
    out, (dq, _, _) = _grads(lambda q, k, v: chunked_attention(
        q, k, v, causal=True, segment_ids=segments, query_chunk_size=8, key_chunk_size=8), q, k, v, D_OUT[:1, :32])
    rows = segments[0] != 0
    assert np.isfinite(np.asarray(out)[:, rows]).all() and np.isfinite(np.asarray(dq)[:, rows]).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(soft_cap=0.0), ValueError, "soft_cap"),
        (dict(segment_ids=np.zeros((B, 5), "int32")), ValueError, "segment_ids"),
        (dict(key_segment_ids=SEGMENTS), ValueError, "segment_ids"),
    ],
    ids=["soft_cap_zero", "segment_shape", "keys_without_queries"],
)
def test_op_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        chunked_attention(Q, K, V, **kwargs)
    with pytest.raises(ValueError, match="divides"):
        chunked_attention(Q[:, :, :5], K, V)


# --- KerasHub decoders ---------------------------------------------------------------

_GQA = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
            intermediate_dim=32)
_GEMMA = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
              intermediate_dim=32, head_dim=8)
DECODERS = {
    "gpt2": lambda: M.GPT2CausalLM(M.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                                  intermediate_dim=32, max_sequence_length=T, dropout=0.0),
                                   preprocessor=None),
    "llama3": lambda: M.Llama3CausalLM(M.Llama3Backbone(**_GQA), preprocessor=None),
    "mistral_window": lambda: M.MistralCausalLM(M.MistralBackbone(**_GQA, sliding_window=10), preprocessor=None),
    "qwen": lambda: M.QwenCausalLM(M.QwenBackbone(**_GQA), preprocessor=None),
    "qwen_window": lambda: M.QwenCausalLM(M.QwenBackbone(**_GQA, use_sliding_window_attention=True,
                                                         sliding_window_size=12), preprocessor=None),
    "gemma": lambda: M.GemmaCausalLM(M.GemmaBackbone(**_GEMMA), preprocessor=None),
    # Gemma 2: soft-capped logits, sliding window on every other block, query scaled by hidden/heads.
    "gemma2_softcap_window": lambda: M.GemmaCausalLM(M.GemmaBackbone(
        **{**_GEMMA, "head_dim": 16}, query_head_dim_normalize=False, use_post_ffw_norm=True,
        use_post_attention_norm=True, attention_logit_soft_cap=2.0, final_logit_soft_cap=30.0,
        use_sliding_window_attention=True, sliding_window_size=10), preprocessor=None),
}
TARGETS = ("query", "key", "value", "attention_output")


def _decoder(arch, seed=0):
    keras.utils.set_random_seed(seed)
    return DECODERS[arch]()


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(1, VOCAB, (2, T)), "padding_mask": np.ones((2, T), "int32")}
    x["padding_mask"][1, 40:] = 0  # a padded row
    return x, rng.integers(0, VOCAB, (2, T))


def _adapted(arch, **config):
    model = tf_lora.adapt(_decoder(arch), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=TARGETS, **config))
    rng = np.random.default_rng(3)
    for v in model.lora_variables:  # non-zero B so that every adapter gets a gradient
        v.assign(0.1 * rng.standard_normal(v.shape).astype("float32"))
    return model


def _loss_and_grads(model, x, y):
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
                y, logits, sample_weight=x["padding_mask"])
        return loss, tape.gradient(loss, model.lora_variables)

    loss, grads = step(x, y)
    return float(loss), [g.numpy() for g in grads]


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))


def _chunked_kinds(model):
    return {type(layer).__name__ for layer in model._flatten_layers() if isinstance(layer, ChunkedSeam)}


@pytest.mark.parametrize("arch", list(DECODERS), ids=list(DECODERS))
def test_decoder_loss_gradients_and_greedy_tokens_equal(arch):
    model = _adapted(arch)
    x, y = _batch()
    loss, grads = _loss_and_grads(model, x, y)
    prompt = {"token_ids": np.zeros((1, 40), "int32"), "padding_mask": np.zeros((1, 40), "int32")}
    prompt["token_ids"][0, :5], prompt["padding_mask"][0, :5] = [5, 6, 7, 8, 9], 1
    model.compile(sampler="greedy")
    # keras-hub 0.32's own QwenAttention cannot generate with its sliding window (it tests
    # `if cache_update_index` on a tensor); the chunked one can, but there is nothing to compare.
    generates = arch != "qwen_window"
    tokens = model.generate(prompt, stop_token_ids=None)["token_ids"] if generates else None

    same = tf_lora.use_chunked_attention(model, query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    assert same is model and type(model).__name__ == type(_decoder(arch)).__name__
    assert _chunked_kinds(model), "no attention layer was switched"
    loss_c, grads_c = _loss_and_grads(model, x, y)
    assert abs(loss_c - loss) <= REL * abs(loss)
    assert len(grads) == len(grads_c) > 0
    worst = max(_rel(g_c, g) for g_c, g in zip(grads_c, grads))
    assert worst <= REL, worst
    if generates:
        np.testing.assert_array_equal(model.generate(prompt, stop_token_ids=None)["token_ids"], tokens)


def test_adapt_with_chunked_attention_round_trips_through_keras_file(tmp_path):
    base = _decoder("gemma2_softcap_window")
    x, _ = _batch()
    plain = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=TARGETS))
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=TARGETS, attention="chunked",
                                                   max_attention_memory=4 * 4 * 2 * CHUNK * CHUNK))
    assert not _chunked_kinds(base) and not _chunked_kinds(plain)  # adapt never changes its input
    assert _chunked_kinds(model) == {"ChunkedCachedGemmaAttention"}
    expected = np.asarray(plain(x))
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    path = str(tmp_path / "chunked.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded).__name__ == "GemmaCausalLM" and _chunked_kinds(loaded) == {"ChunkedCachedGemmaAttention"}
    assert all(layer.max_memory_bytes == 4 * 4 * 2 * CHUNK * CHUNK
               for layer in loaded._flatten_layers() if isinstance(layer, ChunkedSeam))
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # Adapter files: variable paths are the plain model's, both ways and in PEFT's format.
    rng = np.random.default_rng(5)
    for v in model.lora_variables:
        v.assign(0.1 * rng.standard_normal(v.shape).astype("float32"))
    for fmt, name in (("tf_lora", "a.adapter"), ("peft", "peft_dir")):
        tf_lora.save_adapter(model, str(tmp_path / name), format=fmt)
    tf_lora.load_adapter(plain, str(tmp_path / "a.adapter"))
    expected = np.asarray(model(x))
    np.testing.assert_allclose(np.asarray(plain(x)), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_adapt_inplace_with_chunked_attention_switches_the_model():
    model = _decoder("llama3")
    same = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, attention="chunked"), inplace=True)
    assert same is model and _chunked_kinds(model) == {"ChunkedLlamaAttention"}


@pytest.mark.parametrize("arch,rate_attr", [("gpt2", "_dropout"), ("gemma", "dropout")], ids=["gpt2", "gemma"])
def test_dropout_keeps_the_models_rate_and_training_flag(arch, rate_attr, monkeypatch):
    model = _decoder(arch)
    layers = [layer for layer in model._flatten_layers() if attention_seam.seam_for(type(layer))]
    for layer in layers:
        setattr(layer, rate_attr, 0.25)
    tf_lora.use_chunked_attention(model, query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    seen = []
    op = attention_seam.masked_chunked_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["dropout"], kwargs["training"]))
        return op(*args, **kwargs)

    monkeypatch.setattr(attention_seam, "masked_chunked_attention", spy)
    x, _ = _batch()
    eval_out = np.asarray(model(x, training=False))
    assert seen and all(s == (0.0, False) for s in seen)
    seen.clear()
    train_out = np.asarray(model(x, training=True))
    assert seen and all(s == (0.25, True) for s in seen)
    assert np.max(np.abs(train_out - eval_out)) > 1e-3  # dropout acted


def test_mixed_precision_computes_in_float32_and_returns_the_compute_dtype():
    keras.utils.set_random_seed(0)
    model = M.Llama3Backbone(**_GQA, dtype="mixed_bfloat16")
    x, _ = _batch()
    expected = np.asarray(model(x), np.float32)
    tf_lora.use_chunked_attention(model, query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    out = model(x)
    assert out.dtype == tf.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0, atol=5e-2 * np.abs(expected).max())


def test_unsupported_attention_and_small_budget_leave_the_model_unchanged():
    x = keras.Input((8, 16))
    gqa = keras.Model(x, keras.layers.GroupQueryAttention(16, 4, 2, name="gqa")(x, x))
    with pytest.raises(NotImplementedError, match=r"GroupedQueryAttention \(at 'gqa'\).*Supported:.*LlamaAttention"):
        tf_lora.use_chunked_attention(gqa)
    model = _decoder("llama3")
    with pytest.raises(ValueError, match=r"`max_memory_bytes`, expected at least 16 bytes.*max_memory_bytes=15"):
        tf_lora.use_chunked_attention(model, max_memory_bytes=15)  # 4 query heads x 4 bytes
    with pytest.raises(ValueError, match="max_memory_bytes"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(attention="chunked", max_attention_memory=15), inplace=True)
    assert not _chunked_kinds(model) and not isinstance(model, tf_lora.AdaptedModel)


# --- the chunked LM loss ------------------------------------------------------------

LM_VOCAB = 100  # differs from T, so a (batch, T, vocab) tensor is recognisable by its shape
_LM = dict(vocabulary_size=LM_VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
           intermediate_dim=32)
LOSS_MODELS = {
    "gpt2_tied": lambda: M.GPT2CausalLM(M.GPT2Backbone(
        vocabulary_size=LM_VOCAB, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=T, dropout=0.0), preprocessor=None),
    "llama3_separate_head": lambda: M.Llama3CausalLM(M.Llama3Backbone(**_LM, tie_word_embeddings=False),
                                                     preprocessor=None),
    "gemma2_soft_capped": lambda: M.GemmaCausalLM(M.GemmaBackbone(
        **_LM, head_dim=8, final_logit_soft_cap=3.0, attention_logit_soft_cap=5.0), preprocessor=None),
}
LOSS_BUDGET = 4 * LM_VOCAB * 24  # 24 tokens per chunk: 6 chunks for 2 x 64 tokens


def _lm(arch, targets=("query", "value"), dropout=0.0, **config):
    keras.utils.set_random_seed(0)
    model = tf_lora.adapt(LOSS_MODELS[arch](), tf_lora.LoRAConfig(rank=2, dropout=dropout, target_modules=targets,
                                                                   **config))
    rng = np.random.default_rng(3)
    for v in model.lora_variables:
        v.assign(0.1 * rng.standard_normal(v.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # KerasHub's loss and weighted accuracy
    return model


def _lm_batch(seed=0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(1, LM_VOCAB, (2, T)), "padding_mask": np.ones((2, T), "int32")}
    x["padding_mask"][1, 40:] = 0
    return x, rng.integers(0, LM_VOCAB, (2, T)), x["padding_mask"].astype("float32")


def _train_loss_and_grads(model, x, y, sw):
    """compute_loss and LoRA gradients as in the model's train step (chunked while it is active)."""
    from tf_lora.loss import _active

    @tf.function
    def step(x, y, sw):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw)
        return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.lora_variables)]

    if "_tf_lora_chunked_loss" in model.__dict__:
        with _active(model):
            loss, grads = step(x, y, sw)
    else:
        loss, grads = step(x, y, sw)
    return float(loss), [g.numpy() for g in grads], step


@pytest.mark.parametrize(
    "arch,targets",
    [("gpt2_tied", ("query", "value", "token_embedding")), ("llama3_separate_head", ("query", "value")),
     ("gemma2_soft_capped", ("query", "value", "token_embedding"))],
    ids=["gpt2_tied_lora_embedding", "llama3_separate_head", "gemma2_soft_capped_lora_embedding"],
)
def test_chunked_loss_equals_the_plain_loss_gradients_and_accuracy(arch, targets):
    model = _lm(arch, targets)
    x, y, sw = _lm_batch()
    loss, grads, _ = _train_loss_and_grads(model, x, y, sw)
    evaluated = model.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    predicted = model.predict(x, verbose=0)
    assert tf_lora.use_chunked_loss(model, max_memory_bytes=LOSS_BUDGET) is model
    loss_c, grads_c, _ = _train_loss_and_grads(model, x, y, sw)
    assert abs(loss_c - loss) <= REL * abs(loss)
    assert len(grads) == len(grads_c) > 0 and max(_rel(a, b) for a, b in zip(grads_c, grads)) <= REL
    evaluated_c = model.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    assert evaluated_c.keys() == evaluated.keys() and "sparse_categorical_accuracy" in evaluated
    for key, value in evaluated.items():
        assert abs(evaluated_c[key] - value) <= REL * max(abs(value), 1e-6), key
    np.testing.assert_array_equal(model.predict(x, verbose=0), predicted)  # predict is unchanged


def _top_level_shapes(fn, *args):
    return [tuple(t.shape) for op in fn.get_concrete_function(*args).graph.get_operations() for t in op.outputs]


def test_chunked_loss_never_builds_the_full_logits():
    """The train step's graph holds no (batch, T, vocab) logits or gradient: the
    (chunk, vocab) ones live inside the loops' bodies only. The plain step does."""
    x, y, sw = _lm_batch()
    full = [(2, T, LM_VOCAB), (2 * T, LM_VOCAB)]
    plain = _lm("llama3_separate_head")
    _, _, step = _train_loss_and_grads(plain, x, y, sw)
    assert any(s in full for s in _top_level_shapes(step, x, y, sw))
    model = tf_lora.use_chunked_loss(_lm("llama3_separate_head"), max_memory_bytes=LOSS_BUDGET)
    _, _, step = _train_loss_and_grads(model, x, y, sw)
    from tf_lora.loss import _active

    with _active(model):
        shapes = _top_level_shapes(step, x, y, sw)
    rows = [int(np.prod(s[:-1])) for s in shapes if s and None not in s and s[-1] == LM_VOCAB]
    assert max(rows) == 32  # the separate head's (hidden_dim, vocab) kernel; no (tokens, vocab) tensor


def test_fit_with_chunked_loss_chunked_attention_and_checkpointing_and_a_keras_round_trip(tmp_path):
    x, y, sw = _lm_batch()
    plain = _lm("gemma2_soft_capped")
    both = _lm("gemma2_soft_capped", attention="chunked", loss="chunked", max_loss_memory=LOSS_BUDGET,
               gradient_checkpointing=True)
    assert "_tf_lora_chunked_loss" in both.__dict__ and _chunked_kinds(both)
    loss, grads, _ = _train_loss_and_grads(plain, x, y, sw)
    loss_c, grads_c, _ = _train_loss_and_grads(both, x, y, sw)
    assert abs(loss_c - loss) <= REL * abs(loss) and max(_rel(a, b) for a, b in zip(grads_c, grads)) <= REL
    fitted = {name: m.fit(x, y, sample_weight=sw, epochs=1, verbose=0).history for name, m in
              (("plain", plain), ("chunked", both))}
    assert abs(fitted["chunked"]["loss"][0] - fitted["plain"]["loss"][0]) <= REL * fitted["plain"]["loss"][0]
    path = str(tmp_path / "lm.keras")
    both.save(path)
    loaded = keras.models.load_model(path)
    assert "_tf_lora_chunked_loss" in loaded.__dict__ and _chunked_kinds(loaded)
    assert loaded.__dict__["_tf_lora_chunked_loss"].chunk_size == 24


def test_chunked_loss_bad_input_leaves_the_model_unchanged():
    model = _lm("gpt2_tied")
    with pytest.raises(TypeError, match="CausalLM"):
        tf_lora.use_chunked_loss(model.backbone)
    with pytest.raises(ValueError, match=r"`max_memory_bytes`, expected at least 400 bytes.*max_memory_bytes=399"):
        tf_lora.use_chunked_loss(model, max_memory_bytes=399)
    assert "_tf_lora_chunked_loss" not in model.__dict__ and "train_step" not in model.__dict__
    with pytest.raises(TypeError, match="CausalLM"):
        tf_lora.adapt(_decoder("gpt2").backbone, tf_lora.LoRAConfig(loss="chunked"))
    with pytest.raises(ValueError, match="max_loss_memory"):
        tf_lora.LoRAConfig(max_loss_memory=1024)
    with pytest.raises(ValueError, match="loss"):
        tf_lora.LoRAConfig(loss="full")
    x, y, sw = _lm_batch()
    tf_lora.use_chunked_loss(model, max_memory_bytes=LOSS_BUDGET)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=5)])
    with pytest.raises(NotImplementedError, match="sparse_top_k_categorical_accuracy"):
        model.evaluate(x, y, sample_weight=sw, verbose=0)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    with pytest.raises(NotImplementedError, match="from_logits=True"):
        model.fit(x, y, verbose=0)


def test_chunked_loss_dropout_of_an_adapter_on_the_output_projection():
    """LoRA dropout on the tied embedding's reverse projection: active in training only,
    drawn from the layer's seed state (which advances), and the recomputing gradient is the
    gradient of the loss with those masks (central finite difference, relative 1e-2)."""
    from tf_lora.loss import chunked_token_losses

    model = _lm("gpt2_tied", ("token_embedding",), dropout=0.5)
    layer = model.backbone.token_embedding
    _, y, sw = _lm_batch()
    hidden = tf.constant(np.random.default_rng(4).standard_normal((2, T, 16)).astype("float32"))
    state = layer.seed_generator.state
    start = state.numpy().copy()
    lora_b = next(v for v in model.lora_variables if v.name.startswith("lora_b"))

    def loss_and_grad(training=True):
        state.assign(start)
        with tf.GradientTape() as tape:
            losses, _ = chunked_token_losses(hidden, y, layer, model.lora_variables, 24, training)
            loss = tf.reduce_sum(losses * sw)
        return float(loss), tape.gradient(loss, lora_b).numpy()

    loss, grad = loss_and_grad()
    assert not np.array_equal(state.numpy(), start)  # the state advanced
    assert loss_and_grad()[0] == loss  # the same state draws the same masks
    assert abs(loss_and_grad(training=False)[0] - loss) > 1e-3 * abs(loss)  # dropout acted
    direction = np.random.default_rng(7).standard_normal(lora_b.shape).astype("float32")
    base, eps = lora_b.numpy(), 1e-2
    sides = []
    for sign in (1, -1):
        lora_b.assign(base + sign * eps * direction)
        sides.append(loss_and_grad()[0])
    lora_b.assign(base)
    numeric, analytic = (sides[0] - sides[1]) / (2 * eps), float(np.sum(grad * direction))
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic), (numeric, analytic)
