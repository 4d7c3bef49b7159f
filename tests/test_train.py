"""LoRAModel: fit touches only adapters and modules_to_save; Keras features work."""

import os
import tempfile

import keras
import numpy as np
import pytest

import tf_lora
from models import data, mha_classifier, nested_model


def _xy(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6, 8)).astype("float32"), rng.integers(0, 3, n)


def _compiled(jit_compile=False, **config):
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0, **config))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager_graph", "xla"])
def test_fit_changes_only_adapters_and_saved_modules(jit_compile):
    model = _compiled(jit_compile, modules_to_save=("classifier",))
    x, y = _xy()
    before = {v.path + str(i): v.numpy().copy() for i, v in enumerate(model.weights)}
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for i, v in enumerate(model.weights):
        changed = not np.array_equal(before[v.path + str(i)], v.numpy())
        should_change = v.name == "lora_b" or v.path.startswith("classifier/")
        if v.name == "lora_a":
            continue  # lora_a receives zero gradient at step 0 (lora_b == 0) but moves afterwards
        assert changed == should_change, v.path
    # Base kernels and biases bit-for-bit unchanged is covered above; the optimizer only
    # holds state for the trained variables (Adam: 2 slots each + iterations + lr).
    trained = model.lora_variables
    assert {v.name for v in trained} == {"lora_a", "lora_b", "kernel", "bias"}
    assert len(model.optimizer.variables) == 2 * len(trained) + 2


def test_trainable_variables_are_exactly_lora_and_saved():
    model = _compiled(modules_to_save=("classifier",))
    names = sorted(v.path for v in model.trainable_variables)
    assert all(v.name.startswith("lora_") or v.path.startswith("classifier/") for v in model.trainable_variables)
    assert len(names) == 3 * 2 + 2
    assert [id(v) for v in model.lora_variables] == [id(v) for v in model.weights if v.trainable]


def test_sample_weights_metrics_evaluate_predict_callbacks():
    model = _compiled()
    x, y = _xy()
    seen = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs["accuracy"]))
    sw = np.linspace(0.0, 1.0, len(x)).astype("float32")
    model.fit(x, y, sample_weight=sw, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert len(seen) == 2
    loss, acc = model.evaluate(x, y, verbose=0)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0
    assert model.predict(x, verbose=0).shape == (len(x), 3)
    # Zero sample weights: the loss (hence the update) is zero.
    zero = _compiled()
    snapshot = [v.numpy().copy() for v in zero.lora_variables]
    zero.fit(x, y, sample_weight=np.zeros(len(x), "float32"), epochs=1, batch_size=32, verbose=0)
    for b, v in zip(snapshot, zero.lora_variables):
        np.testing.assert_allclose(b, v.numpy(), atol=1e-7)


def test_train_step_selects_lora_even_if_user_unfreezes_a_layer():
    model = _compiled()
    model.get_layer("ffn").kernel.trainable = True  # user flips a base variable
    kernel = model.get_layer("ffn").kernel.numpy().copy()
    x, y = _xy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(kernel, model.get_layer("ffn").kernel.numpy())


def test_keras_round_trip_of_adapted_model():
    model = _compiled(modules_to_save=("classifier",))
    x, y = _xy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "adapted.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    assert isinstance(loaded, tf_lora.LoRAModel)
    assert isinstance(loaded.get_layer("mha/query"), tf_lora.LoRAEinsumDense)
    assert loaded.lora_config == model.lora_config
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert sorted(v.path for v in loaded.trainable_variables) == sorted(v.path for v in model.trainable_variables)
    # Training continues after loading.
    loaded.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.fit(x, y, epochs=1, verbose=0)


def test_nested_model_fit():
    base = nested_model()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2))
    model.compile("adam", "mse")
    kernel = model.get_layer("encoder/attn/query").kernel.numpy().copy()
    model.fit(data(base), np.zeros((16, 2), "float32"), epochs=1, verbose=0)
    np.testing.assert_array_equal(kernel, model.get_layer("encoder/attn/query").kernel.numpy())


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit(policy):
    keras.config.set_dtype_policy(policy)
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0))
    opt = keras.optimizers.Adam(1e-2)
    if policy == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _xy()
    b = model.get_layer("mha/query").lora_b.numpy().copy()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert all(v.dtype == "float32" for v in model.lora_variables)
    assert not np.array_equal(b, model.get_layer("mha/query").lora_b.numpy())
    assert np.all(np.isfinite(model.get_layer("mha/query").lora_b.numpy()))


def _bn_model():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="query")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_fit_keeps_frozen_batchnorm_statistics(tmp_path):
    """Issue 14.2: frozen layers run in inference mode; the adapter round trip is exact."""
    rng = np.random.default_rng(0)
    x, y = 3.0 + rng.standard_normal((64, 4)).astype("float32"), rng.standard_normal((64, 2)).astype("float32")
    base = _bn_model()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",)))
    bn = model.get_layer("bn")
    mean, var = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), var)
    tf_lora.save_adapter(model, str(tmp_path / "a.adapter"))
    fresh = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",)))
    tf_lora.load_adapter(fresh, str(tmp_path / "a.adapter"))
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))
    # A BatchNormalization in modules_to_save trains fully, statistics included.
    saved = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",), modules_to_save=("bn",)))
    saved.compile(keras.optimizers.Adam(1e-2), "mse")
    saved.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.max(np.abs(saved.get_layer("bn").moving_mean.numpy() - mean)) > 0.1


def test_fit_with_nothing_to_train_raises():
    """Issue 14.1: a fit that could not move the loss is an error, not a silent no-op."""
    model = _compiled()
    x, y = _xy()
    with tf_lora.disable_adapter(model):
        with pytest.raises(ValueError, match="nothing to train"):
            model.fit(x, y, epochs=1, verbose=0)
