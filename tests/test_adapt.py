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
    assert isinstance(model, tf_lora.LoRAModel)
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


def test_subclassed_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.query = keras.layers.Dense(3)

        def call(self, x):
            return self.query(x)

    sub = Sub()
    sub(np.ones((1, 4), "float32"))
    with pytest.raises(TypeError, match="Functional or Sequential"):
        tf_lora.adapt(sub, tf_lora.LoRAConfig())


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
