"""Several adapters on one base: add, switch, disable, delete, save/load by name."""

import keras
import numpy as np
import pytest

import tf_lora
from models import mha_classifier


def _x():
    return np.random.default_rng(0).standard_normal((4, 6, 8)).astype("float32")


def _model():
    return tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0))


def _fill(model, value):
    for v in model.lora_variables:
        v.assign(np.full(v.shape, value, "float32"))


def test_add_switch_disable_delete():
    base = mha_classifier()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, dropout=0.0))
    x = _x()
    expected_base = np.asarray(base(x))
    _fill(model, 0.1)
    out_default = np.asarray(model(x))
    assert not np.allclose(out_default, expected_base)

    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=4, alpha=8, target_modules=("query", "value")))
    assert model.adapter_names == ["default", "task_b"]
    np.testing.assert_array_equal(np.asarray(model(x)), out_default)  # still the default adapter
    tf_lora.set_adapter(model, "task_b")
    assert model.active_adapter == "task_b"
    assert sorted(v.name for v in model.trainable_variables) == ["lora_a_task_b"] * 2 + ["lora_b_task_b"] * 2
    np.testing.assert_allclose(np.asarray(model(x)), expected_base, atol=1e-6)  # lora_b starts at zero
    _fill(model, -0.05)
    out_b = np.asarray(model(x))
    assert not np.allclose(out_b, out_default)

    with tf_lora.disable_adapter(model):
        np.testing.assert_allclose(np.asarray(model(x)), expected_base, atol=1e-6)
        assert model.trainable_variables == []
    np.testing.assert_array_equal(np.asarray(model(x)), out_b)

    tf_lora.set_adapter(model, "default")
    np.testing.assert_array_equal(np.asarray(model(x)), out_default)
    with pytest.raises(ValueError, match="active"):
        tf_lora.set_adapter(model, "task_b")
        tf_lora.delete_adapter(model, "task_b")
    tf_lora.set_adapter(model, "default")
    tf_lora.delete_adapter(model, "task_b")
    assert model.adapter_names == ["default"]
    assert not any("task_b" in v.name for v in model.weights)


def test_memory_is_one_base_plus_small_adapters():
    model = _model()
    base_vars = [v for v in model.weights if not v.name.startswith("lora_")]
    base_ids = [id(v) for v in base_vars]
    base_bytes = sum(v.numpy().nbytes for v in base_vars)
    one = sum(v.numpy().nbytes for v in model.weights if v.name.startswith("lora_"))
    for i in range(3):
        tf_lora.add_adapter(model, f"task_{i}", tf_lora.LoRAConfig(rank=2))
        tf_lora.set_adapter(model, f"task_{i}")
    assert [id(v) for v in model.weights if not v.name.startswith("lora_")] == base_ids  # no copies
    total = sum(v.numpy().nbytes for v in model.weights)
    assert total == base_bytes + 4 * one


def test_train_one_adapter_leaves_the_other(tmp_path):
    model = _model()
    x, y = _x(), np.array([0, 1, 2, 0])
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=2, dropout=0.0))
    tf_lora.set_adapter(model, "b")
    default_before = [v.numpy().copy() for v in model.get_layer("mha/query").adapter_variables("default")]
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    for before, v in zip(default_before, model.get_layer("mha/query").adapter_variables("default")):
        np.testing.assert_array_equal(before, v.numpy())
    assert np.any(model.get_layer("mha/query").adapter_variables("b")[1].numpy())
    # Switching requires a new compile before fit (the optimizer holds adapter b's state).
    tf_lora.set_adapter(model, "default")
    with pytest.raises(ValueError, match="compile"):
        model.fit(x, y, epochs=1, verbose=0)
    # Save adapter b by name and load it into another model's default adapter.
    path = str(tmp_path / "b.adapter")
    tf_lora.save_adapter(model, path, adapter_name="b")
    other = _model()
    src = [v for v in model.weights if not v.name.startswith("lora_")]
    dst = [v for v in other.weights if not v.name.startswith("lora_")]
    for s, d in zip(src, dst):
        d.assign(s)
    tf_lora.load_adapter(other, path)
    tf_lora.set_adapter(model, "b")
    np.testing.assert_allclose(np.asarray(other(x)), np.asarray(model(x)), atol=1e-6)


def test_keras_round_trip_keeps_all_adapters(tmp_path):
    model = _model()
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=3))
    tf_lora.set_adapter(model, "b")
    _fill(model, 0.02)
    x = _x()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.adapter_names == ["default", "b"] and loaded.active_adapter == "b"
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_merge_merges_the_active_adapter():
    model = _model()
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=2))
    tf_lora.set_adapter(model, "b")
    _fill(model, 0.03)
    x = _x()
    np.testing.assert_allclose(np.asarray(tf_lora.merge(model)(x)), np.asarray(model(x)), atol=1e-5)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: tf_lora.add_adapter(m, "default", tf_lora.LoRAConfig()), ValueError, "adapter_name"),
        (lambda m: tf_lora.add_adapter(m, "has space", tf_lora.LoRAConfig()), ValueError, "adapter_name"),
        (lambda m: tf_lora.add_adapter(m, "b", {"rank": 2}), TypeError, "config"),
        (lambda m: tf_lora.add_adapter(m, "b", tf_lora.LoRAConfig(target_modules=("ffn",))), ValueError, "target_modules"),
        (lambda m: tf_lora.add_adapter(m, "b", tf_lora.LoRAConfig(modules_to_save=("classifier",))), NotImplementedError, "modules_to_save"),
        (lambda m: tf_lora.set_adapter(m, "nope"), ValueError, "adapter_name"),
        (lambda m: tf_lora.delete_adapter(m, "default"), ValueError, "default"),
        (lambda m: tf_lora.set_adapter(mha_classifier(), "default"), TypeError, "model"),
    ],
    ids=["existing_name", "not_identifier", "config_dict", "target_not_adapted", "modules_to_save", "unknown_set", "delete_default", "plain_model"],
)
def test_bad_inputs_change_nothing(call, error, match):
    model = _model()
    before = [(v.path, v.numpy().copy()) for v in model.weights]
    with pytest.raises(error, match=match):
        call(model)
    after = [(v.path, v.numpy().copy()) for v in model.weights]
    assert [p for p, _ in before] == [p for p, _ in after]
    for (_, a), (_, b) in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert model.adapter_names == ["default"] and model.active_adapter == "default"
