"""Packed rows in KerasHub decoders: examples packed in one row (segment_ids, positions
restarting at 0) give the losses and LoRA gradients they give alone.

Tolerances (float32): per-example losses, logits and LoRA gradients within a relative
1e-5 of the unpacked run (max |packed - unpacked| / max |unpacked|, per example or per
variable); `evaluate` totals within 1e-5; greedy tokens identical.
"""

import warnings

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora import block_seam, data
from tf_lora.attention_seam import ChunkedSeam

M = keras_hub.models
REL = 1e-5
VOCAB, T, CHUNK = 64, 20, 4
ROWS = [[5, 3, 7, 2], [9, 6, 5]]  # example lengths per packed row: the first row ends in 3 padding positions

_GQA = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
            intermediate_dim=32)
_GEMMA = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
              intermediate_dim=32, head_dim=8)
DECODERS = {
    "gpt2": lambda: M.GPT2CausalLM(M.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                                  intermediate_dim=32, max_sequence_length=32, dropout=0.0),
                                   preprocessor=None),
    "llama3": lambda: M.Llama3CausalLM(M.Llama3Backbone(**_GQA, rope_position_scaling_factor=2.0),
                                       preprocessor=None),
    "gemma": lambda: M.GemmaCausalLM(M.GemmaBackbone(**_GEMMA), preprocessor=None),
    # Gemma 2: soft-capped logits, a sliding window on every other block.
    "gemma2_window": lambda: M.GemmaCausalLM(M.GemmaBackbone(
        **_GEMMA, query_head_dim_normalize=False, use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=2.0, final_logit_soft_cap=30.0, use_sliding_window_attention=True,
        sliding_window_size=4), preprocessor=None),
    "qwen_window": lambda: M.QwenCausalLM(M.QwenBackbone(**_GQA, use_sliding_window_attention=True,
                                                         sliding_window_size=4), preprocessor=None),
    "mistral_window": lambda: M.MistralCausalLM(M.MistralBackbone(**_GQA, sliding_window=3), preprocessor=None),
}
TARGETS = ("query", "key", "value", "attention_output")


def _adapted(arch, **config):
    keras.utils.set_random_seed(0)
    model = tf_lora.adapt(DECODERS[arch](), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=TARGETS,
                                                                   **config))
    rng = np.random.default_rng(3)
    for v in model.lora_variables:  # non-zero B so that every adapter gets a gradient
        v.assign(0.1 * rng.standard_normal(v.shape).astype("float32"))
    return model


def _examples(seed=0):
    """The packed batch, the same examples unpacked (one per row, right-padded), and per
    example (packed row, start, unpacked row, length, labels)."""
    rng = np.random.default_rng(seed)
    packed = {k: np.zeros((len(ROWS), T), "int32") for k in ("token_ids", "padding_mask", "segment_ids", "positions")}
    spans, width = [], max(max(r) for r in ROWS)
    unpacked = {k: np.zeros((sum(map(len, ROWS)), width), "int32") for k in ("token_ids", "padding_mask")}
    for r, lengths in enumerate(ROWS):
        start = 0
        for s, n in enumerate(lengths):
            ids, u = rng.integers(1, VOCAB, n), len(spans)
            packed["token_ids"][r, start:start + n], packed["segment_ids"][r, start:start + n] = ids, s + 1
            packed["positions"][r, start:start + n] = np.arange(n)
            unpacked["token_ids"][u, :n], unpacked["padding_mask"][u, :n] = ids, 1
            spans.append((r, start, u, n, rng.integers(0, VOCAB, n)))
            start += n
    packed["padding_mask"] = (packed["segment_ids"] > 0).astype("int32")
    return packed, unpacked, spans


def _losses_and_grads(model, x, spans, packed):
    """Each example's mean token cross-entropy, and the LoRA gradients of their sum."""
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        losses = []
        for r, start, u, n, labels in spans:
            rows = logits[r, start:start + n] if packed else logits[u, :n]
            losses.append(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, rows, from_logits=True)))
        total = tf.add_n(losses)
    return np.array([float(v) for v in losses]), [g.numpy() for g in tape.gradient(total, model.lora_variables)]


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))


def _assert_equal(got, expected):
    (losses, grads), (losses_ref, grads_ref) = got, expected
    assert np.max(np.abs(losses - losses_ref) / losses_ref) <= REL, (losses, losses_ref)
    assert len(grads) == len(grads_ref) > 0
    worst = max(_rel(g, r) for g, r in zip(grads, grads_ref))
    assert worst <= REL, worst


@pytest.mark.parametrize("arch", list(DECODERS), ids=list(DECODERS))
def test_packed_losses_and_gradients_equal_unpacked(arch):
    model = _adapted(arch)
    packed, unpacked, spans = _examples()
    reference = _losses_and_grads(model, unpacked, spans, packed=False)
    _assert_equal(_losses_and_grads(model, packed, spans, packed=True), reference)
    # Without the two keys the examples of a row attend to each other (the model as before).
    plain = {k: packed[k] for k in ("token_ids", "padding_mask")}
    leaked, _ = _losses_and_grads(model, plain, spans, packed=True)
    assert np.max(np.abs(leaked - reference[0]) / reference[0]) > 1e-3
    # Chunked attention (4 x 4 tiles): segment ids go to the op, other examples' tiles are skipped.
    tf_lora.use_chunked_attention(model, query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    assert any(isinstance(layer, ChunkedSeam) for layer in model._flatten_layers())
    _assert_equal(_losses_and_grads(model, packed, spans, packed=True), reference)
    _assert_equal(_losses_and_grads(model, unpacked, spans, packed=False), reference)


def test_packing_with_gradient_checkpointing_and_a_model_that_is_not_adapted():
    packed, unpacked, spans = _examples(seed=1)
    model = _adapted("llama3", gradient_checkpointing=True, attention="chunked")
    assert tf_lora.checkpointed_blocks(model)
    _assert_equal(_losses_and_grads(model, packed, spans, packed=True),
                  _losses_and_grads(model, unpacked, spans, packed=False))
    keras.utils.set_random_seed(0)
    lm = DECODERS["gpt2"]()  # not adapted: enable_packing
    before = np.asarray(lm(unpacked))
    assert tf_lora.enable_packing(lm) is lm and type(lm) is M.GPT2CausalLM
    np.testing.assert_array_equal(np.asarray(lm(unpacked)), before)  # without the keys: as before
    logits = np.asarray(lm(packed))
    for r, start, u, n, _ in spans:
        assert _rel(logits[r, start:start + n], before[u, :n]) <= REL
    backbone = np.asarray(lm.backbone(packed))  # the backbone takes the keys too
    np.testing.assert_allclose(np.asarray(lm.backbone.token_embedding(backbone, reverse=True)), logits, rtol=0,
                               atol=REL * np.abs(logits).max())


def _no_dropped_keys(caught):
    return not [w for w in caught if "segment_ids" in str(w.message) or "positions" in str(w.message)]


def test_fit_evaluate_predict_and_call_with_packed_datasets():
    """tf_lora.data's packed rows through Keras: evaluate's weighted loss sum equals the unpacked
    rows', fit's first loss equals it, predict / __call__ give each example's unpacked logits.
    The second model adds chunked attention, the chunked loss and gradient checkpointing."""
    texts = ["a", "hello world", "packing", "the quick brown fox", "tf", "jumps over", "lazy dogs sleep",
             "x y z", "keras hub decoder", "ok"]
    tokenizer = lambda s: [2 + ord(c) % 60 for c in s]  # noqa: E731
    records = [{"text": t} for t in texts]
    packed = data.prepare(records, tokenizer, 24, packing=True, eos_id=1, verbose=0)
    unpacked = data.prepare(records, tokenizer, 24, packing=False, eos_id=1, verbose=0)
    assert packed.stats.rows < unpacked.stats.rows
    ds_packed = packed.dataset(packed.stats.rows, shuffle=False)
    ds_unpacked = unpacked.dataset(unpacked.stats.rows, shuffle=False)
    for config in ({}, dict(attention="chunked", loss="chunked", gradient_checkpointing=True)):
        model = _adapted("llama3", **config)
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), weighted_metrics=["sparse_categorical_accuracy"], jit_compile=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = model.evaluate(ds_packed, verbose=0, return_dict=True)
            reference = model.evaluate(ds_unpacked, verbose=0, return_dict=True)
            # Keras' reduction: the weighted sum over all positions / their number.
            total = result["loss"] * packed.stats.rows * 24
            assert abs(total - reference["loss"] * unpacked.stats.rows * 24) <= REL * total
            logits = model.predict(ds_packed, verbose=0)
            expected = model.predict(ds_unpacked, verbose=0)
            for (row, start, _), (u, _, _), (_, ids, _) in zip(packed.placements, unpacked.placements, packed.pieces):
                n = len(ids) - 1
                assert _rel(logits[row, start:start + n], expected[u, :n]) <= REL
            x, _, _ = next(iter(ds_packed))
            np.testing.assert_allclose(np.asarray(model(x)), logits, rtol=0, atol=REL * np.abs(logits).max())
            history = model.fit(ds_packed, epochs=1, verbose=0).history
            assert abs(history["loss"][0] - result["loss"]) <= REL * result["loss"]
        assert _no_dropped_keys(caught), [str(w.message) for w in caught]


def _dense_masks(model, x):
    """Shapes of the (B, [H,] T, T) tensors in the traced forward + backward pass's outer graph."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
        return tape.gradient(tf.reduce_sum(out), model.lora_variables)

    graph = step.get_concrete_function(x).graph
    shapes = [tuple(t.shape) for op in graph.get_operations() for t in op.outputs]
    return [s for s in shapes if len(s) >= 3 and s[-2:] == (48, 48)]


def test_chunked_attention_builds_no_dense_mask():
    """With chunked attention the blocks hand the op ids: no (B, T, T) mask exists, packed or
    not (KerasHub's own blocks build one per layer)."""
    model = tf_lora.use_chunked_attention(_adapted("llama3"), query_chunk_size=16, key_chunk_size=16)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, VOCAB, (2, 48)), "padding_mask": np.ones((2, 48), "int32")}
    assert _dense_masks(model, x) == []
    assert _dense_masks(model, {**x, "segment_ids": np.repeat([[1] * 30 + [2] * 18], 2, 0),
                                "positions": np.repeat([list(range(30)) + list(range(18))], 2, 0)}) == []
    for layer in model._flatten_layers():  # KerasHub's own blocks, for comparison
        if isinstance(layer, block_seam.PackedBlock):
            layer.__class__ = layer._packing_base
    assert len(_dense_masks(model, x)) >= 2


@pytest.mark.parametrize("arch", ["gpt2", "gemma2_window"])
def test_generate_is_unchanged(arch):
    keras.utils.set_random_seed(0)
    base = DECODERS[arch]()
    prompt = {"token_ids": np.zeros((1, 16), "int32"), "padding_mask": np.zeros((1, 16), "int32")}
    prompt["token_ids"][0, :4], prompt["padding_mask"][0, :4] = [5, 6, 7, 8], 1
    base.compile(sampler="greedy")
    expected = base.generate(prompt, stop_token_ids=None)["token_ids"]
    for config in ({}, dict(attention="chunked")):
        model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=TARGETS, **config))  # B = 0: the base
        assert any(isinstance(layer, block_seam.PackedBlock) for layer in model._flatten_layers())
        assert not any(isinstance(layer, block_seam.PackedBlock) for layer in base._flatten_layers())  # untouched
        model.compile(sampler="greedy")
        np.testing.assert_array_equal(model.generate(prompt, stop_token_ids=None)["token_ids"], expected)


def test_packed_model_round_trips_through_a_keras_file(tmp_path):
    model = _adapted("gemma2_window", attention="chunked")
    packed, _, _ = _examples()
    expected = np.asarray(model(packed))
    path = str(tmp_path / "packed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded).__name__ == "GemmaCausalLM"
    blocks = {type(layer).__name__ for layer in loaded._flatten_layers() if isinstance(layer, block_seam.PackedBlock)}
    assert blocks == {"PackedGemmaDecoderBlock"}
    np.testing.assert_allclose(np.asarray(loaded(packed)), expected, rtol=0, atol=REL * np.abs(expected).max())


def test_bad_packed_inputs_and_unsupported_models():
    model = _adapted("gpt2")
    packed, _, _ = _examples()
    with pytest.raises(ValueError, match="positions"):
        model({k: packed[k] for k in ("token_ids", "padding_mask", "segment_ids")})
    with pytest.raises(ValueError, match="segment_ids"):
        model({**packed, "segment_ids": packed["segment_ids"][:, :5]})
    with pytest.raises(ValueError, match="positions"):
        model({**packed, "positions": packed["positions"].astype("float32")})
    keras.utils.set_random_seed(0)
    bert = M.BertTextClassifier(M.BertBackbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16,
                                               intermediate_dim=32, max_sequence_length=32), num_classes=2,
                                preprocessor=None)
    classes = [type(layer) for layer in bert._flatten_layers()]
    with pytest.raises(NotImplementedError, match="BertTextClassifier.*Supported: GPT-2"):
        tf_lora.enable_packing(bert)
    assert [type(layer) for layer in bert._flatten_layers()] == classes
    with pytest.raises(TypeError, match="model"):
        tf_lora.enable_packing("gpt2")
    adapted = tf_lora.adapt(bert, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")))
    x = {"token_ids": packed["token_ids"], "padding_mask": packed["padding_mask"],
         "segment_ids": np.zeros_like(packed["token_ids"])}  # BERT's own segment_ids input
    adapted(x)
    with pytest.raises(NotImplementedError, match="positions"):  # instead of Keras dropping the key
        adapted({**x, "positions": packed["positions"]})
