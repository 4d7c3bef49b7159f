"""Regression tests for issue 21, items 2, 6, 11 and 14: gradient checkpointing carries the
implicit inputs of a block call (Keras masks, autocast scope) into the recomputation; an
adapter added on a base that PiSSA rewrote is saved marked as relative to that base, and a
fresh base refuses it; ``add_adapter(use_dora=True)`` refuses merged layers; ``add_adapter``
honours ``gradient_checkpointing=True``."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora import _compat
from models import mha_classifier

# The heads of the masked test models are Dense layers, which drop the mask (by design here).
pytestmark = pytest.mark.filterwarnings("ignore:.*does not support masking:UserWarning")


def _rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype("float32")


def _randomize(model, scale=0.5):
    for i, v in enumerate(model.lora_variables):
        v.assign(_rand(*v.shape, seed=i, scale=scale))


# --------------------------------------------- item 2: masks through the recomputation ---
def _masked_encoder():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, 16, mask_zero=True, name="embedding")(tokens)
    x = keras_hub.layers.TransformerEncoder(32, 2, name="encoder_0")(x)
    x = keras_hub.layers.TransformerEncoder(32, 2, name="encoder_1")(x)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(x))


_PADDED = np.array([[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12]], "int32")


def _loss_and_gradients(model, x, compiled):
    def step(x):
        with tf.GradientTape() as tape:
            out = tf.nest.flatten(model(x, training=True))[0]
            loss = tf.reduce_mean(tf.square(tf.cast(out, "float32")))
        return loss, tape.gradient(loss, [v.value for v in model.lora_variables])

    loss, grads = (tf.function(step) if compiled else step)(x)
    return float(loss), [g.numpy() for g in grads]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf_function"])
def test_checkpointing_keeps_the_keras_mask_of_a_padded_batch(compiled):
    results = {}
    for checkpointing in (False, True):
        model = tf_lora.adapt(_masked_encoder(), tf_lora.LoRAConfig(
            rank=2, dropout=0.0, target_modules="all-linear", gradient_checkpointing=checkpointing))
        assert tf_lora.checkpointed_blocks(model) == (["encoder_0", "encoder_1"] if checkpointing else [])
        _randomize(model, scale=0.1)
        results[checkpointing] = _loss_and_gradients(model, _PADDED, compiled)
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    largest = max(float(np.abs(g).max()) for g in grads0)
    assert largest > 10.0  # ~22.8; before the fix (the masks lost in the recomputation) they differed by 16.1
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for g0, g1 in zip(grads0, grads1):
        np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5)


@keras.saving.register_keras_serializable(package="tf_lora_tests")
class PairBlock(keras.layers.Layer):
    """A block called on a list of two masked sequences that reads both masks from its
    inputs and one of its own variables directly (under mixed precision, in the
    compute dtype only inside the autocast scope of its call)."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.query = keras.layers.Dense(units, name="query", dtype=self.dtype_policy)
        self.supports_masking = True

    def build(self, input_shape):
        self.query.build(input_shape[0])
        self.scale = self.add_weight(name="scale", shape=(self.units,), initializer="ones")

    def call(self, inputs):
        x, y = inputs
        mx, my = (keras.ops.cast(m if m is not None else keras.ops.ones(keras.ops.shape(t)[:2], "bool"),
                                 self.compute_dtype)[..., None]
                  for t, m in ((x, _compat.get_keras_mask(x)), (y, _compat.get_keras_mask(y))))
        pooled = keras.ops.sum(y * my, axis=1, keepdims=True)[..., :1]
        return self.query(x) * self.scale * mx * pooled

    def compute_mask(self, inputs, mask=None):
        return None if mask is None else mask[0]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _pair_model(dtype):
    keras.utils.set_random_seed(1)
    init = keras.initializers.RandomNormal(stddev=1.0)
    a = keras.Input((None,), dtype="int32", name="a")
    b = keras.Input((None,), dtype="int32", name="b")
    ea = keras.layers.Embedding(20, 8, embeddings_initializer=init, mask_zero=True, name="embed_a")(a)
    eb = keras.layers.Embedding(20, 8, embeddings_initializer=init, mask_zero=True, name="embed_b")(b)
    h = PairBlock(name="pair", dtype=dtype)([ea, eb])
    return keras.Model([a, b], keras.layers.Dense(2, name="head")(h))


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_checkpointing_keeps_nested_masks_and_the_autocast_scope(dtype):
    x = [_PADDED[:, :5], np.array([[3, 0, 0, 0, 0], [4, 5, 6, 0, 0], [7, 8, 0, 0, 0]], "int32")]
    results = {}
    for checkpointing in (False, True):
        model = tf_lora.adapt(_pair_model(dtype), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query",)))
        if checkpointing:
            assert tf_lora.enable_gradient_checkpointing(model, blocks=["pair"]) == ["pair"]
        _randomize(model)
        results[checkpointing] = _loss_and_gradients(model, x, compiled=True)
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    largest = max(float(np.abs(g).max()) for g in grads0)
    assert largest > 100.0  # ~130; before the fix they differed by 158 (float32) or the backward raised (bf16)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for g0, g1 in zip(grads0, grads1):  # the same ops recomputed
        np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5)


# ---------------------------------- item 6: an adapter added on a PiSSA-rewritten base ---
def _pissa_with_added(how, base):
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, alpha=4, dropout=0.0, init="pissa",
                                                   target_modules=("query", "value")))
    if how == "add_weighted_adapter":
        tf_lora.add_weighted_adapter(model, ["default"], [0.7], "b", combination="svd")
    else:
        targets = ("value",) if how == "add_adapter_other_layers" else ("query", "value")
        tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=3, alpha=6, dropout=0.0, target_modules=targets))
    tf_lora.set_adapter(model, "b")
    for i, v in enumerate(model.lora_variables):
        v.assign(v.numpy() + _rand(*v.shape, seed=10 + i, scale=0.2))
    return model


@pytest.mark.parametrize("how", ["add_adapter", "add_adapter_other_layers", "add_weighted_adapter"])
def test_adapter_added_on_a_rewritten_base_is_marked_and_refused_on_a_fresh_base(tmp_path, how):
    base = mha_classifier()
    model = _pissa_with_added(how, base)
    x = _rand(4, 6, 8, seed=1)
    trained = np.asarray(model(x))
    path = str(tmp_path / "b.adapter")
    # No conversion to the original base for an adapter without the initial factors.
    with pytest.raises(NotImplementedError, match="to_original_base"):
        tf_lora.save_adapter(model, path, adapter_name="b")
    assert not (tmp_path / "b.adapter").exists()
    tf_lora.save_adapter(model, path, adapter_name="b", to_original_base=False)

    fresh = tf_lora.adapt(base, tf_lora.read_adapter_config(path))  # the unmodified base
    before = [v.numpy() for v in fresh.weights]
    with pytest.raises(ValueError, match="rewritten by init='pissa'"):
        tf_lora.load_adapter(fresh, path)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, fresh.weights))  # unchanged

    # The same rewritten base loads it and computes what was trained.
    again = tf_lora.adapt(base, model.lora_config)
    tf_lora.add_adapter(again, "b", model.adapter_config("b"))
    tf_lora.set_adapter(again, "b")
    tf_lora.load_adapter(again, path, adapter_name="b")
    np.testing.assert_allclose(np.asarray(again(x)), trained, rtol=1e-5, atol=1e-5)


def test_plain_file_is_refused_by_an_added_adapter_on_a_rewritten_base(tmp_path):
    base = mha_classifier()
    config = tf_lora.LoRAConfig(rank=3, alpha=6, dropout=0.0, target_modules=("query", "value"))
    plain = tf_lora.adapt(base, config)
    path = str(tmp_path / "plain.adapter")
    tf_lora.save_adapter(plain, path)
    model = _pissa_with_added("add_adapter", base)
    with pytest.raises(ValueError, match="original base"):
        tf_lora.load_adapter(model, path, adapter_name="b")


# ------------------------------------------------ item 11: DoRA added to merged layers ---
def test_add_dora_adapter_to_merged_layers_is_refused():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query", "value")))
    _randomize(model, scale=0.3)
    x = _rand(4, 6, 8, seed=2)
    for _, layer in model.adapter_layers():
        layer.merge()
    merged = np.asarray(model(x))
    with pytest.raises(ValueError, match="use_dora=True.*merged.*unmerge"):
        tf_lora.add_adapter(model, "d", tf_lora.LoRAConfig(rank=2, dropout=0.0, use_dora=True, target_modules=("query",)))
    assert model.adapter_names == ["default"]
    assert all(layer.adapter_names == ["default"] for _, layer in model.adapter_layers())
    np.testing.assert_array_equal(np.asarray(model(x)), merged)
    # Unmerged, the same call works and the new, untrained adapter changes nothing.
    for _, layer in model.adapter_layers():
        layer.unmerge()
    tf_lora.set_adapter(model, "default")
    with tf_lora.disable_adapter(model):
        base_out = np.asarray(model(x))
    tf_lora.add_adapter(model, "d", tf_lora.LoRAConfig(rank=2, dropout=0.0, use_dora=True, target_modules=("query",)))
    tf_lora.set_adapter(model, "d")
    np.testing.assert_allclose(np.asarray(model(x)), base_out, rtol=1e-5, atol=1e-5)


# ----------------------------------------- item 14: gradient_checkpointing in add_adapter ---
def test_add_adapter_honours_gradient_checkpointing(tmp_path):
    model = tf_lora.adapt(_masked_encoder(), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules="all-linear"))
    assert tf_lora.checkpointed_blocks(model) == []
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules="all-linear", gradient_checkpointing=True)
    tf_lora.add_adapter(model, "b", config)
    assert tf_lora.checkpointed_blocks(model) == ["encoder_0", "encoder_1"]  # what the config says was done
    path = str(tmp_path / "b.adapter")
    tf_lora.save_adapter(model, path, adapter_name="b")
    assert tf_lora.read_adapter_config(path).gradient_checkpointing is True
    # A model that already checkpoints keeps its blocks (here: all but the last).
    model = tf_lora.adapt(_masked_encoder(), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules="all-linear"))
    tf_lora.enable_gradient_checkpointing(model, recompute_last=False)
    tf_lora.add_adapter(model, "b", config)
    assert tf_lora.checkpointed_blocks(model) == ["encoder_0"]


def test_add_adapter_with_gradient_checkpointing_and_no_block_changes_nothing():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0))
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="no block"):
        tf_lora.add_adapter(model, "b", config)
    assert model.adapter_names == ["default"]
    assert all(layer.adapter_names == ["default"] for _, layer in model.adapter_layers())
    assert tf_lora.checkpointed_blocks(model) == []


def test_peft_export_and_import_refuse_an_added_adapter_on_a_rewritten_base(tmp_path):
    import hub_models as H

    model = tf_lora.adapt(H.llama3(), tf_lora.LoRAConfig(rank=2, dropout=0.0, init="pissa",
                                                         target_modules=("query", "value")))
    plain = tf_lora.adapt(H.llama3(), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("value",)))
    tf_lora.save_adapter(plain, str(tmp_path / "plain"), format="peft")
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("value",)))
    # PEFT's adapter applies to the original base; "b" was trained on the rewritten one.
    with pytest.raises(NotImplementedError, match="rewrote"):
        tf_lora.save_adapter(model, str(tmp_path / "b"), adapter_name="b", format="peft")
    assert not (tmp_path / "b").exists()
    with pytest.raises(NotImplementedError, match="rewrote"):
        tf_lora.load_adapter(model, str(tmp_path / "plain"), adapter_name="b")


def test_layer_level_dora_adapter_on_a_merged_layer_is_refused():
    """The layer API guards it too (LoRALayer.add_adapter), not only tf_lora.add_adapter."""
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query",)))
    _randomize(model, scale=0.3)
    (_, layer), = model.adapter_layers()
    layer.merge()
    with pytest.raises(ValueError, match="use_dora=True.*merged.*unmerge"):
        layer.add_adapter("d", rank=2, use_dora=True)
    assert layer.adapter_names == ["default"]


def test_adapter_file_loads_on_a_model_whose_backbone_got_another_automatic_name(tmp_path):
    """A process that builds a second model of a class names its backbone ``qwen_backbone_1``; the
    file of a model whose backbone was ``qwen_backbone`` must still load (and give the same outputs)."""
    import hub_models

    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query", "value"))
    first = tf_lora.adapt(hub_models.qwen(), config)
    _randomize(first, scale=0.3)
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(first, path)
    second = tf_lora.adapt(hub_models.qwen(), config)
    assert first.backbone.name != second.backbone.name
    for src, dst in zip(first.backbone.weights, second.backbone.weights):
        if "lora_" not in src.path:
            dst.assign(src)
    tf_lora.load_adapter(second, path)
    x = hub_models.inputs(first, batch=2)
    np.testing.assert_allclose(np.asarray(second(x)), np.asarray(first(x)), rtol=1e-6, atol=1e-6)
