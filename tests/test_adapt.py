"""adapt(): matching, cloning, nested layers, and its error cases."""

import keras
import numpy as np
import pytest

import tf_lora
from models import Backbone, data, mha_classifier, nested_model, sequential_mlp
from tf_lora.adapt import walk
from tf_lora.layers.lora import LoRALayer


def _adapted_paths(model):
    return sorted(p for p, layer, _ in walk(model) if isinstance(layer, LoRALayer))


def _snapshot(model):
    return [(w.path, w.numpy().copy()) for w in model.weights], [type(l) for _, l, _ in walk(model)]


@pytest.mark.parametrize(
    "factory", [mha_classifier, sequential_mlp, nested_model, Backbone], ids=["functional_mha", "sequential", "nested", "backbone_dict_io"]
)
def test_adapted_equals_base_and_base_untouched(factory):
    base = factory()
    x = data(base)
    expected = base(x)
    weights, types = _snapshot(base)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    # Plain Functional/Sequential models come back as LoRAModel, other classes as themselves.
    assert isinstance(model, tf_lora.LoRAModel if factory is not Backbone else Backbone)
    assert isinstance(model, tf_lora.AdaptedModel)
    got = model(x)
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(g))
    # The original is untouched: same layer types, same weights, no tf_lora layers.
    after_weights, after_types = _snapshot(base)
    assert after_types == types
    for (p0, w0), (p1, w1) in zip(weights, after_weights):
        assert p0 == p1
        np.testing.assert_array_equal(w0, w1)
    assert not any(isinstance(l, LoRALayer) for _, l, _ in walk(base))
    assert _adapted_paths(model)


def test_mha_projections_are_adapted():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))
    assert _adapted_paths(model) == ["mha/key", "mha/query", "mha/value"]
    query = model.get_layer("mha/query")
    assert isinstance(query, tf_lora.LoRAEinsumDense)
    assert query.lora_a.shape == (8, 2) and query.lora_b.shape == (2, 2, 4)
    assert model.get_layer("mha")._query_dense is query
    # Layer names of the base model are kept.
    assert [l.name for l in model.layers] == [l.name for l in mha_classifier().layers]


def test_backbone_nested_custom_block_and_dict_io():
    base = Backbone()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")))
    assert _adapted_paths(model) == ["block_0/query", "block_0/value", "block_1/query", "block_1/value"]
    q = model.get_layer("block_0/query")
    assert q.lora_a.shape == (8, 2) and q.lora_b.shape == (2, 2, 4)  # kernel (heads, hidden, head_dim)
    out = model(data(base))
    assert set(out) == {"sequence_output", "pooled_output"}


@pytest.mark.parametrize(
    "config,expected",
    [
        (tf_lora.LoRAConfig(target_modules="all-linear"), ["classifier", "ffn", "mha/attention_output", "mha/key", "mha/query", "mha/value"]),
        (tf_lora.LoRAConfig(target_modules="all-linear", modules_to_save=("classifier",)), ["ffn", "mha/attention_output", "mha/key", "mha/query", "mha/value"]),
        (tf_lora.LoRAConfig(target_modules=r"mha/(query|value)"), ["mha/query", "mha/value"]),
        (tf_lora.LoRAConfig(target_modules="all-linear", exclude_modules=("mha",)), ["classifier", "ffn"]),
        (tf_lora.LoRAConfig(target_modules=("query", "ffn"), exclude_modules=r".*/query"), ["ffn"]),
    ],
    ids=["all_linear", "all_linear_minus_saved", "regex", "exclude_names", "exclude_regex"],
)
def test_target_selection(config, expected):
    assert _adapted_paths(tf_lora.adapt(mha_classifier(), config)) == expected


def test_query_norm_is_not_a_candidate():
    # LayerNormalization "query_norm" contains "query" but is not adaptable: silently skipped.
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(target_modules=("query",)))
    assert _adapted_paths(model) == ["mha/query"]


def test_rank_and_alpha_patterns():
    cfg = tf_lora.LoRAConfig(rank=4, alpha=8, rank_pattern={"value": 2}, alpha_pattern={"value": 4})
    model = tf_lora.adapt(mha_classifier(), cfg)
    assert model.get_layer("mha/query").rank == 4 and model.get_layer("mha/value").rank == 2
    assert model.get_layer("mha/value").scaling == 2.0 and model.get_layer("mha/query").scaling == 2.0


def test_no_match_lists_adaptable_paths():
    with pytest.raises(ValueError, match="target_modules") as info:
        tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(target_modules=("nothing",)))
    assert "mha/query" in str(info.value) and "classifier" in str(info.value)


def test_regex_naming_unsupported_layer():
    with pytest.raises(ValueError, match="LayerNormalization"):
        tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(target_modules="query_norm"))


def test_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(3, name="query")])
    with pytest.raises(ValueError, match="unbuilt"):
        tf_lora.adapt(model, tf_lora.LoRAConfig())


class _Sub(keras.Model):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.proj = keras.layers.Dense(units, name="query")

    def call(self, x):
        return self.proj(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_subclassed_model_keeps_its_class():
    sub = _Sub()
    x = np.ones((2, 4), "float32")
    expected = sub(x)
    model = tf_lora.adapt(sub, tf_lora.LoRAConfig(rank=2))
    assert isinstance(model, _Sub) and isinstance(model, tf_lora.AdaptedModel) and model is not sub
    assert isinstance(model.proj, tf_lora.LoRADense) and not isinstance(sub.proj, LoRALayer)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(expected))
    assert [v.name for v in model.trainable_variables] == ["lora_a", "lora_b"]


def test_class_that_cannot_be_rebuilt_says_use_inplace():
    class Opaque(keras.Model):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn
            self.query = keras.layers.Dense(3)

        def call(self, x):
            return self.fn(self.query(x))

    model = Opaque(lambda t: t * 2.0)
    model(np.ones((1, 4), "float32"))
    with pytest.raises(TypeError, match="inplace=True"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(target_modules=("dense",)))
    assert not isinstance(model.query, LoRALayer)
    # In place it works, and returns the same object.
    assert tf_lora.adapt(model, tf_lora.LoRAConfig(target_modules=("dense",)), inplace=True) is model
    assert isinstance(model.query, tf_lora.LoRADense)


def test_adapting_twice_raises_and_changes_nothing():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))
    before = _adapted_paths(model)
    with pytest.raises(ValueError, match="already"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2))
    assert _adapted_paths(model) == before
    # Other layers can still be adapted on top.
    again = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("ffn",)))
    assert "ffn" in _adapted_paths(again)


@pytest.mark.parametrize(
    "model,config,error,match",
    [
        ("not a model", tf_lora.LoRAConfig(), TypeError, "model"),
        (None, {"rank": 2}, TypeError, "config"),
        (None, tf_lora.LoRAConfig(modules_to_save=("nothing",)), ValueError, "modules_to_save"),
    ],
    ids=["model_str", "config_dict", "modules_to_save_no_match"],
)
def test_bad_arguments(model, config, error, match):
    model = mha_classifier() if model is None else model
    with pytest.raises(error, match=match):
        tf_lora.adapt(model, config)


def test_mixed_precision_adapt():
    keras.config.set_dtype_policy("mixed_float16")
    base = mha_classifier()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2))
    assert all(v.dtype == "float32" for v in model.lora_variables)
    y = model(data(base))
    assert str(y.dtype).endswith("float16") or "float16" in str(y.dtype)


class _AutoConfigBlock(keras.layers.Layer):
    """Relies on Keras' automatic get_config, which drops the layer name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.query = keras.layers.Dense(4, name="query")

    def call(self, x):
        return self.query(x)


def test_adapt_auto_config_block_is_not_a_silent_noop():
    """Issue 14.1: the selected target inside a block named 'blk' is adapted, names are kept."""
    inputs = keras.Input((4,))
    base = keras.Model(inputs, _AutoConfigBlock(name="blk")(inputs))
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, dropout=0.0))
    assert _adapted_paths(model) == ["blk/query"]
    assert [l.name for l in model.layers] == [l.name for l in base.layers]
    assert sorted(v.name for v in model.trainable_variables) == ["lora_a", "lora_b"]


class _TwoProj(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(4, name="proj")
        self.second = keras.layers.Dense(4, name="proj")

    def call(self, x):
        return self.second(self.first(x))


def test_same_named_sublayers_get_distinct_adapter_keys(tmp_path):
    """Issue 14.5: two sublayers named 'proj' give four distinct keys and an exact round trip."""
    inputs = keras.Input((4,))
    base = keras.Model(inputs, _TwoProj(name="pair")(inputs))
    config = tf_lora.LoRAConfig(rank=2, target_modules=("proj",))
    model = tf_lora.adapt(base, config)
    assert _adapted_paths(model) == ["pair/proj", "pair/proj#1"]
    for _, layer in model.adapter_layers():
        layer.lora_b.assign(np.random.default_rng(0).standard_normal(layer.lora_b.shape).astype("float32"))
    state = tf_lora.adapters.adapter_state(model)
    assert len(state) == 4 == len(model.lora_variables)
    tf_lora.save_adapter(model, str(tmp_path / "pair.adapter"))
    fresh = tf_lora.adapt(base, config)
    tf_lora.load_adapter(fresh, str(tmp_path / "pair.adapter"))
    x = np.random.default_rng(1).standard_normal((3, 4)).astype("float32")
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
