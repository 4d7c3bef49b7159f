"""A small layer-test harness in the spirit of Keras' `run_layer_test`.

`run_layer_test` checks, for one layer: the config round trip, the output
shape, trainable / non-trainable weight counts, one `fit` step that changes
only the trainable weights, a `mixed_float16` forward pass with float32
variables, `jit_compile`, and a `.keras` save/load round trip.
"""

import os
import tempfile

import keras
import numpy as np


def _model_around(layer_factory, input_shape, dtype="float32"):
    inputs = keras.Input(input_shape[1:], batch_size=None, dtype=dtype)
    layer = layer_factory()
    outputs = layer(inputs)
    return keras.Model(inputs, outputs), layer


def run_layer_test(
    layer_factory,
    input_shape,
    expected_output_shape,
    expected_num_trainable_weights,
    expected_num_non_trainable_weights,
    rtol=1e-5,
    atol=1e-5,
    input_data=None,
):
    """Runs the standard checks; `layer_factory()` returns a fresh layer.

    `input_data` (default: standard normal float32 of `input_shape`) is what the
    layer is called on, e.g. integer ids for an embedding.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal(input_shape).astype("float32") if input_data is None else np.asarray(input_data)
    dtype = str(x.dtype)

    # Config round trip.
    layer = layer_factory()
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config

    # Output shape and weight counts.
    model, layer = _model_around(layer_factory, input_shape, dtype)
    y = np.asarray(model(x))
    assert y.shape == tuple(expected_output_shape), (y.shape, expected_output_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights

    # One fit step: trainable weights move, non-trainable ones are bit-for-bit equal.
    frozen = [w.numpy().copy() for w in layer.non_trainable_weights]
    train = [w.numpy().copy() for w in layer.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    target = rng.standard_normal(y.shape).astype("float32")
    model.fit(x, target, epochs=1, batch_size=len(x), verbose=0)
    for before, w in zip(frozen, layer.non_trainable_weights):
        np.testing.assert_array_equal(before, w.numpy())
    if train:
        assert any(not np.array_equal(b, w.numpy()) for b, w in zip(train, layer.trainable_weights))

    # jit_compile forward matches eager.
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), np.asarray(model(x)), rtol=rtol, atol=atol)

    # .keras round trip.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "layer.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=rtol, atol=atol)

    # mixed_float16: float16 compute, float32 variables.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mp_model, mp_layer = _model_around(layer_factory, input_shape, dtype)
        y16 = mp_model(x)
        assert str(y16.dtype) in ("float16", "<dtype: 'float16'>"), y16.dtype
        for w in mp_layer.weights:
            if w.name.startswith("lora_"):
                assert w.dtype == "float32", (w.name, w.dtype)
        assert np.all(np.isfinite(np.asarray(y16, dtype="float32")))
    finally:
        keras.config.set_dtype_policy(previous)
    return model, layer
