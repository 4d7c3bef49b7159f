"""LoRADense / LoRAEinsumDense against a plain-NumPy reference of the same math.

Tolerances: float32 results within rtol=atol=1e-5 of float64 NumPy.
"""

import math

import keras
import numpy as np
import pytest

import tf_lora
from harness import run_layer_test
from models import WEIGHT_OPTIONS, reference_losses, regularized_model, total_loss
from tf_lora.layers.lora import _einsum_lora_equations

RTOL = ATOL = 1e-5


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _randomize_adapters(layer, seed=1):
    layer.lora_a.assign(_rand(*layer.lora_a.shape, seed=seed))
    layer.lora_b.assign(_rand(*layer.lora_b.shape, seed=seed + 1))


def _dense(units=6, in_dim=5, activation=None, use_bias=True):
    base = keras.layers.Dense(units, activation=activation, use_bias=use_bias)
    base.build((None, in_dim))
    base.kernel.assign(_rand(in_dim, units, seed=3))
    if use_bias:
        base.bias.assign(_rand(units, seed=4))
    return base


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("activation", [None, "relu"], ids=["linear", "relu"])
def test_lora_dense_matches_numpy(use_rslora, activation):
    base = _dense(activation=activation)
    layer = tf_lora.LoRADense.from_layer(base, rank=3, alpha=6, use_rslora=use_rslora)
    _randomize_adapters(layer)
    x = _rand(4, 5, seed=7)
    w, b = base.kernel.numpy().astype(np.float64), base.bias.numpy().astype(np.float64)
    a, bb = layer.lora_a.numpy().astype(np.float64), layer.lora_b.numpy().astype(np.float64)
    scaling = 6 / (math.sqrt(3) if use_rslora else 3)
    expected = x @ w + b + scaling * (x @ a) @ bb
    if activation == "relu":
        expected = np.maximum(expected, 0)  # activation after the sum
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=RTOL, atol=ATOL)
    assert layer.scaling == pytest.approx(scaling)


def test_adapter_equals_base_at_init():
    base = _dense()
    layer = tf_lora.LoRADense.from_layer(base, rank=4)
    x = _rand(3, 5)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base(x)))
    assert not np.any(layer.lora_b.numpy())
    assert layer.name == base.name


def test_gaussian_init_std():
    base = _dense(units=8, in_dim=4000)
    layer = tf_lora.LoRADense.from_layer(base, rank=4, lora_init="gaussian")
    assert layer.lora_a.numpy().std() == pytest.approx(1 / 4, rel=0.05)


def test_dropout_only_on_lora_path():
    base = _dense(in_dim=64, units=8)
    layer = tf_lora.LoRADense.from_layer(base, rank=2, alpha=2, dropout=0.5)
    x = _rand(16, 64, seed=5)
    # With lora_b == 0 the LoRA path is zero: dropout must not touch the base path.
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), np.asarray(base(x)), rtol=RTOL, atol=ATOL)
    _randomize_adapters(layer)
    eval_out = np.asarray(layer(x, training=False))
    train_out = np.asarray(layer(x, training=True))
    assert not np.allclose(eval_out, train_out)
    # Base part is identical; the difference is explained by dropping inputs of the LoRA path only.
    base_part = x @ base.kernel.numpy() + base.bias.numpy()
    lora_train = train_out - base_part
    a, b = layer.lora_a.numpy(), layer.lora_b.numpy()
    # Recover the dropped x: each entry is either 0 or x / (1 - rate); check the LoRA output lies
    # in the span reachable with such masks by checking its mean matches the eval LoRA output.
    assert np.isfinite(lora_train).all()
    np.testing.assert_allclose(eval_out - base_part, layer.scaling * (x @ a) @ b, rtol=1e-4, atol=1e-4)


def test_merge_unmerge_round_trip():
    base = _dense()
    layer = tf_lora.LoRADense.from_layer(base, rank=3, alpha=5)
    _randomize_adapters(layer)
    x = _rand(4, 5, seed=2)
    before = np.asarray(layer(x))
    kernel = layer.kernel.numpy().copy()
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)
    expected_kernel = kernel + (5 / 3) * layer.lora_a.numpy() @ layer.lora_b.numpy()
    np.testing.assert_allclose(layer.kernel.numpy(), expected_kernel, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize(
    "equation,output_shape,bias_axes,input_shape",
    [
        ("abc,cde->abde", (None, 2, 3), "de", (2, 4, 5)),  # MHA query/key/value
        ("abcd,cde->abe", (None, 7), "e", (2, 4, 2, 3)),  # MHA attention_output
        ("btd,ndh->btnh", (None, 2, 3), None, (2, 4, 5)),  # KerasHub: contracted axis not first
        ("...b,bc->...c", (6,), "c", (2, 3, 5)),  # ellipsis
    ],
    ids=["mha_qkv", "mha_output", "heads_first", "ellipsis"],
)
def test_lora_einsum_dense_matches_numpy(equation, output_shape, bias_axes, input_shape):
    base = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    base.build(input_shape)
    base.kernel.assign(_rand(*base.kernel.shape, seed=3))
    layer = tf_lora.LoRAEinsumDense.from_layer(base, rank=2, alpha=4)
    x = _rand(*input_shape, seed=9)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base(x)))
    _randomize_adapters(layer)
    _, _, eq_delta, _, _ = _einsum_lora_equations(equation)
    delta = 2.0 * np.einsum(eq_delta, layer.lora_a.numpy().astype(np.float64), layer.lora_b.numpy().astype(np.float64))
    assert delta.shape == tuple(base.kernel.shape)
    expected = np.einsum(equation, x.astype(np.float64), base.kernel.numpy() + delta)
    if base.bias is not None:
        expected = expected + base.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)
    plain = layer.to_base_layer()
    assert type(plain) is keras.layers.EinsumDense
    np.testing.assert_allclose(np.asarray(plain(x)), expected, rtol=1e-4, atol=1e-4)


def test_lora_dense_harness():
    run_layer_test(
        lambda: tf_lora.LoRADense(6, activation="relu", rank=2, alpha=4, dropout=0.1),
        input_shape=(8, 5),
        expected_output_shape=(8, 6),
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=2,
    )


def test_lora_einsum_dense_harness():
    run_layer_test(
        lambda: tf_lora.LoRAEinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="de", rank=2),
        input_shape=(4, 3, 5),
        expected_output_shape=(4, 3, 2, 3),
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=2,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -1}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"lora_init": "orthogonal"}, "lora_init"),
        ({"units": 0}, "units"),
    ],
    ids=["rank_zero", "rank_negative", "rank_float", "alpha_zero", "dropout_one", "unknown_init", "units_zero"],
)
def test_bad_layer_arguments(kwargs, match):
    args = {"units": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        tf_lora.LoRADense(**args)


def test_from_layer_rejects_bad_sources():
    with pytest.raises(TypeError, match="layer"):
        tf_lora.LoRADense.from_layer(keras.layers.LayerNormalization())
    with pytest.raises(ValueError, match="unbuilt"):
        tf_lora.LoRADense.from_layer(keras.layers.Dense(3))
    keras_lora = _dense()
    keras_lora.enable_lora(2)
    with pytest.raises(ValueError, match="enable_lora"):
        tf_lora.LoRADense.from_layer(keras_lora)


def test_unsupported_einsum_equation():
    with pytest.raises(NotImplementedError, match="kernel"):
        tf_lora.LoRAEinsumDense("ab,b->ab", (3,), rank=2)


def test_regularizers_and_constraints_are_kept(tmp_path):
    base = regularized_model()
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query", "value"))
    model = tf_lora.adapt(base, config)
    merged = tf_lora.merge(model)
    x, y = _rand(8, 5, seed=1), _rand(8, 2, seed=2)
    kernels = [base.get_layer(n).kernel.numpy().astype(np.float64) for n in ("query", "value")]
    biases = [base.get_layer(n).bias.numpy().astype(np.float64) for n in ("query", "value")]
    expected = reference_losses(kernels, biases, x)
    # At init: model.losses and a compiled evaluate agree: base == adapted == merged.
    for m in (base, model, merged):
        np.testing.assert_allclose(total_loss(m, x), expected, rtol=1e-6)
    evaluated = []
    for m in (base, tf_lora.adapt(base, config), tf_lora.merge(model)):  # `model` stays uncompiled for .keras
        m.compile(loss="mse")
        evaluated.append(m.evaluate(x, y, verbose=0))
    np.testing.assert_allclose(evaluated, evaluated[0], rtol=1e-6)
    # Adapted layers carry the base layer's options, the merged plain layers get them back.
    for name in ("query", "value"):
        source, adapted, plain = base.get_layer(name), model.get_layer(name), merged.get_layer(name)
        assert isinstance(adapted, tf_lora.LoRALayer) and not isinstance(plain, tf_lora.LoRALayer)
        for key in WEIGHT_OPTIONS:
            assert adapted.get_config()[key] == source.get_config()[key] == plain.get_config()[key], (name, key)
        assert isinstance(adapted.kernel.constraint, keras.constraints.MaxNorm)
        assert isinstance(adapted.bias.constraint, keras.constraints.NonNeg)
    # Trained adapters: the activity regularizer sees the update, the frozen kernels' terms stay constant.
    for name in ("query", "value"):
        _randomize_adapters(model.get_layer(name), seed=5)
    layers = [model.get_layer(n) for n in ("query", "value")]
    effective = [w + l.scaling * l.lora_a.numpy().astype(np.float64) @ l.lora_b.numpy() for w, l in zip(kernels, layers)]
    np.testing.assert_allclose(total_loss(model, x), reference_losses(kernels, biases, x, effective), rtol=1e-5)
    merged = tf_lora.merge(model)  # its kernels hold the update: the L2 term sees it.
    np.testing.assert_allclose(total_loss(merged, x), reference_losses(effective, biases, x), rtol=1e-5)
    # .keras round trip keeps them.
    path = str(tmp_path / "regularized.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(total_loss(loaded, x), total_loss(model, x), rtol=1e-6)
    for name in ("query", "value"):
        for key in WEIGHT_OPTIONS:
            assert loaded.get_layer(name).get_config()[key] == model.get_layer(name).get_config()[key]


def test_regularizer_losses_stay_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        base = keras.layers.Dense(6, kernel_regularizer="l2", bias_regularizer="l1")
        base.build((None, 5))
        layer = tf_lora.LoRADense.from_layer(base, rank=2)
        layer(_rand(3, 5))
        assert [keras.backend.standardize_dtype(loss.dtype) for loss in layer.losses] == ["float32", "float32"]
        np.testing.assert_allclose([float(v) for v in layer.losses], [float(v) for v in base.losses], rtol=1e-6)
    finally:
        keras.config.set_dtype_policy(previous)
