"""LoRAEmbedding / LoRAReversibleEmbedding (and their NF4 versions) against NumPy.

Tolerances: float32 results within rtol=atol=1e-5 of float64 NumPy (lookups of
random factors of order 1); merged vs unmerged within 1e-5; NF4 lookups equal
the fully dequantized table exactly (same float32 products).
"""

import math
import os

import keras
import keras_hub
import numpy as np
import pytest

import tf_lora
from harness import run_layer_test
from hub_models import VOCAB, gemma, inputs
from tf_lora.adapt import walk

RTOL = ATOL = 1e-5
IDS = np.array([[1, 2, 0, 7], [9, 3, 3, 0]], "int32")


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _embedding(vocab=10, dim=6, mask_zero=False, cls=keras.layers.Embedding, **kwargs):
    layer = cls(vocab, dim, mask_zero=mask_zero, **kwargs)
    layer.build()
    layer.embeddings.assign(_rand(vocab, dim, seed=3))
    return layer


def _randomize(layer, seed=1):
    layer.lora_a.assign(_rand(*layer.lora_a.shape, seed=seed))
    layer.lora_b.assign(_rand(*layer.lora_b.shape, seed=seed + 1))


def _reference_table(base, layer, scaling):
    t = base.embeddings.numpy().astype(np.float64)
    return t + scaling * layer.lora_a.numpy().astype(np.float64) @ layer.lora_b.numpy().astype(np.float64)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_lookup_matches_numpy(use_rslora):
    base = _embedding()
    layer = tf_lora.LoRAEmbedding.from_layer(base, rank=3, alpha=6, use_rslora=use_rslora)
    assert layer.lora_a.shape == (10, 3) and layer.lora_b.shape == (3, 6)
    _randomize(layer)
    scaling = 6 / (math.sqrt(3) if use_rslora else 3)
    expected = _reference_table(base, layer, scaling)[IDS]
    np.testing.assert_allclose(np.asarray(layer(IDS)), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lora_init", ["he_uniform", "gaussian"])
def test_equals_base_at_init_peft_init(lora_init):
    base = _embedding(vocab=2000, dim=8)
    layer = tf_lora.LoRAEmbedding.from_layer(base, rank=4, lora_init=lora_init)
    np.testing.assert_array_equal(np.asarray(layer(IDS)), np.asarray(base(IDS)))
    # PEFT's Embedding init: the id-side factor zero, the other N(0, 1).
    assert not np.any(layer.lora_a.numpy())
    assert layer.lora_b.numpy().std() == pytest.approx(1.0, rel=0.35)


def test_never_forms_the_full_table():
    """The gradient of lora_a is sparse (IndexedSlices): only the looked-up rows."""
    import tensorflow as tf

    layer = tf_lora.LoRAEmbedding.from_layer(_embedding(vocab=50), rank=2)
    with tf.GradientTape() as tape:
        loss = keras.ops.sum(layer(IDS))
    grad_a, grad_b = tape.gradient(loss, [layer.lora_a.value, layer.lora_b.value])
    assert isinstance(grad_a, tf.IndexedSlices)
    assert grad_b.shape == (2, 6)


def test_mask_zero_respected():
    base = _embedding(mask_zero=True)
    inputs_ = keras.Input((4,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(base(inputs_))  # averages unmasked steps only
    model = keras.Model(inputs_, keras.layers.Dense(2, name="head")(pooled))
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=[base.name]))
    layer = adapted.get_layer(base.name)
    assert isinstance(layer, tf_lora.LoRAEmbedding) and layer.mask_zero
    np.testing.assert_array_equal(np.asarray(layer.compute_mask(IDS)), IDS != 0)
    np.testing.assert_allclose(np.asarray(adapted(IDS)), np.asarray(model(IDS)), rtol=0, atol=1e-6)
    _randomize(layer)
    rows = _reference_table(base, layer, layer.scaling)[IDS]
    mask = (IDS != 0)[..., None]
    pooled_ref = (rows * mask).sum(1) / mask.sum(1)
    head = model.get_layer("head")
    expected = pooled_ref @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(np.asarray(adapted(IDS)), expected, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_to_base_layer():
    base = _embedding()
    layer = tf_lora.LoRAEmbedding.from_layer(base, rank=3, alpha=5)
    _randomize(layer)
    before = np.asarray(layer(IDS))
    table = layer.embeddings.numpy().copy()
    layer.merge()
    np.testing.assert_allclose(layer.embeddings.numpy(), _reference_table(base, layer, 5 / 3), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(IDS)), before, rtol=RTOL, atol=ATOL)
    layer.unmerge()
    np.testing.assert_allclose(layer.embeddings.numpy(), table, rtol=1e-6, atol=1e-6)
    plain = layer.to_base_layer()
    assert type(plain) is keras.layers.Embedding and plain.name == base.name
    np.testing.assert_allclose(np.asarray(plain(IDS)), before, rtol=RTOL, atol=ATOL)


def test_layer_harness_embedding():
    run_layer_test(
        lambda: tf_lora.LoRAEmbedding(12, 5, rank=2, alpha=4, dropout=0.1, mask_zero=True),
        input_shape=(6, 4), expected_output_shape=(6, 4, 5),
        expected_num_trainable_weights=2, expected_num_non_trainable_weights=1,  # the table
        input_data=np.random.default_rng(0).integers(0, 12, (6, 4)).astype("int32"),
    )


def test_layer_harness_qlora_embedding():
    run_layer_test(
        lambda: tf_lora.QLoRAEmbedding.from_layer(_embedding(vocab=12, dim=5), quantization=tf_lora.QLoRAConfig(group_size=4),
                                                  rank=2, alpha=4),
        input_shape=(6, 4), expected_output_shape=(6, 4, 5),
        expected_num_trainable_weights=2, expected_num_non_trainable_weights=4,  # codes, absmax codes, nested_scale, offset
        input_data=np.random.default_rng(0).integers(0, 12, (6, 4)).astype("int32"),
    )


# -- ReversibleEmbedding ---------------------------------------------------------------
@pytest.mark.parametrize("soft_cap", [None, 3.0], ids=["plain", "soft_cap"])
@pytest.mark.parametrize("cls", [keras.layers.ReversibleEmbedding, keras_hub.layers.ReversibleEmbedding],
                         ids=["keras", "keras_hub"])
def test_reversible_tied_reverse_uses_adapted_table(cls, soft_cap):
    base = _embedding(cls=cls, logit_soft_cap=soft_cap)
    layer = tf_lora.LoRAReversibleEmbedding.from_layer(base, rank=3, alpha=6)
    x = _rand(2, 4, 6, seed=9)
    np.testing.assert_allclose(np.asarray(layer(x, reverse=True)), np.asarray(base(x, reverse=True)), rtol=RTOL, atol=ATOL)
    _randomize(layer)
    table = _reference_table(base, layer, 2.0)
    logits = x.astype(np.float64) @ table.T
    if soft_cap:
        logits = np.tanh(logits / soft_cap) * soft_cap
    np.testing.assert_allclose(np.asarray(layer(x, reverse=True)), logits, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer(IDS)), table[IDS], rtol=RTOL, atol=ATOL)
    plain = layer.to_base_layer()
    assert type(plain) is cls
    np.testing.assert_allclose(np.asarray(plain(x, reverse=True)), np.asarray(layer(x, reverse=True)), rtol=RTOL, atol=1e-4)


def test_reversible_untied_reverse_kernel_is_not_adapted():
    base = _embedding(cls=keras.layers.ReversibleEmbedding, tie_weights=False)
    base.reverse_embeddings.assign(_rand(6, 10, seed=5))
    layer = tf_lora.LoRAReversibleEmbedding.from_layer(base, rank=2)
    _randomize(layer)
    x = _rand(2, 3, 6, seed=2)
    np.testing.assert_allclose(np.asarray(layer(x, reverse=True)), x @ base.reverse_embeddings.numpy(), rtol=RTOL, atol=ATOL)
    assert not layer.reverse_embeddings.trainable
    np.testing.assert_allclose(np.asarray(layer(IDS)), _reference_table(base, layer, layer.scaling)[IDS], rtol=RTOL, atol=ATOL)
    plain = layer.to_base_layer()
    np.testing.assert_array_equal(plain.reverse_embeddings.numpy(), base.reverse_embeddings.numpy())


def test_qlora_reversible_matches_dequantized_table():
    base = _embedding(vocab=40, dim=16, cls=keras.layers.ReversibleEmbedding)
    layer = tf_lora.QLoRAReversibleEmbedding.from_layer(base, rank=2, alpha=4)
    dequantized = layer.base_kernel_value()
    assert dequantized.shape == (40, 16)
    np.testing.assert_array_equal(np.asarray(layer(IDS)), dequantized[IDS])  # rows gathered = full dequantization
    _randomize(layer)
    table = dequantized.astype(np.float64) + 2.0 * layer.lora_a.numpy().astype(np.float64) @ layer.lora_b.numpy()
    x = _rand(2, 16, seed=4)
    np.testing.assert_allclose(np.asarray(layer(x, reverse=True)), x @ table.T, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer(IDS)), table[IDS], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.merged_kernel(), table, rtol=RTOL, atol=ATOL)
    with pytest.raises(NotImplementedError, match="NF4"):
        layer.merge()


def test_qlora_embedding_fake_quant_raises():
    with pytest.raises(NotImplementedError, match="fake_quant"):
        tf_lora.QLoRAEmbedding.from_layer(_embedding(), quantization=tf_lora.QLoRAConfig(fake_quant=True))


# -- a real KerasHub model: Gemma's tied token embedding --------------------------------------
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_gemma_token_embedding_end_to_end(tmp_path, quantized):
    lm = gemma()
    x = inputs(lm, batch=2)
    base_logits = np.asarray(lm(x))
    base_type = type(lm.backbone.token_embedding)  # keras-hub 0.32 builds Keras's own ReversibleEmbedding
    config = tf_lora.LoRAConfig(rank=2, alpha=4, target_modules=["token_embedding"],
                                quantization=tf_lora.QLoRAConfig() if quantized else None)
    model = tf_lora.adapt(lm, config)
    layer = model.backbone.token_embedding
    assert isinstance(layer, tf_lora.QLoRAReversibleEmbedding if quantized else tf_lora.LoRAReversibleEmbedding)
    assert layer.base_class.endswith("layers.ReversibleEmbedding")
    if not quantized:
        np.testing.assert_allclose(np.asarray(model(x)), base_logits, rtol=0, atol=1e-6)
    assert sorted(v.name for v in model.lora_variables) == ["lora_a", "lora_b"]
    if not quantized:  # one fit step trains only the adapter (the NF4 case: tests/test_qlora.py's trainer tests)
        frozen = {id(v): v.numpy().copy() for v in model.weights if not v.name.startswith("lora_")}
        a_before = layer.lora_a.numpy().copy()
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, np.random.default_rng(1).integers(0, VOCAB, (2, 8)), verbose=0)
        assert not np.array_equal(a_before, layer.lora_a.numpy())
        for v in model.weights:
            if id(v) in frozen:
                np.testing.assert_array_equal(frozen[id(v)], v.numpy(), err_msg=v.path)
    _randomize(layer)
    layer.lora_b.assign(layer.lora_b.numpy() * 0.05)
    out = np.asarray(model(x))
    merged = tf_lora.merge(model)
    assert isinstance(merged, keras_hub.models.GemmaCausalLM)
    assert type(merged.backbone.token_embedding) is base_type
    np.testing.assert_allclose(np.asarray(merged(x)), out, rtol=1e-4, atol=1e-4)
    # The adapter file round trip.
    path = os.path.join(tmp_path, "emb.adapter")
    tf_lora.save_adapter(model, path)
    saved_a = layer.lora_a.numpy().copy()
    layer.lora_a.assign(np.zeros_like(saved_a))
    tf_lora.load_adapter(model, path)
    np.testing.assert_array_equal(layer.lora_a.numpy(), saved_a)
    np.testing.assert_allclose(np.asarray(model(x)), out, rtol=0, atol=1e-6)


def test_all_linear_leaves_embeddings_and_convs_out():
    lm = gemma()
    model = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    kinds = {type(layer).__name__ for _, layer, _ in walk(model) if isinstance(layer, tf_lora.LoRALayer)}
    assert kinds == {"LoRAEinsumDense"} or kinds <= {"LoRADense", "LoRAEinsumDense"}
    assert not isinstance(model.backbone.token_embedding, tf_lora.LoRALayer)


def test_multiple_adapters_on_embedding():
    base = _embedding()
    inputs_ = keras.Input((4,), dtype="int32")
    model = keras.Model(inputs_, base(inputs_))
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=[base.name]))
    tf_lora.add_adapter(adapted, "other", tf_lora.LoRAConfig(rank=3, target_modules=[base.name]))
    layer = adapted.get_layer(base.name)
    a, b = layer.adapter_variables("other")
    assert a.shape == (10, 3) and b.shape == (3, 6)
    a.assign(_rand(10, 3, seed=8))
    tf_lora.set_adapter(adapted, "other")
    expected = base.embeddings.numpy() + (32 / 3) * a.numpy() @ b.numpy()
    np.testing.assert_allclose(np.asarray(adapted(IDS)), expected[IDS], rtol=RTOL, atol=1e-4)
    assert sorted(v.name for v in adapted.lora_variables) == ["lora_a_other", "lora_b_other"]
    with tf_lora.disable_adapter(adapted):
        np.testing.assert_array_equal(np.asarray(adapted(IDS)), np.asarray(base(IDS)))
