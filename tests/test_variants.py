"""DoRA and the base-rewriting inits (PiSSA, OLoRA, LoftQ) against NumPy references.

Tolerances: float32 layer results against float64 NumPy within 1e-4 (1e-5 at init).
"""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from harness import run_layer_test
from models import mha_classifier
from tf_lora import nf4
from tf_lora.layers.lora import _einsum_lora_equations
from tf_lora.layers.qlora import QLoRADense, QLoRAEinsumDense

EINSUMS = [
    ("abc,cde->abde", (None, 2, 3), "de", (2, 4, 5)),  # MHA query/key/value
    ("abcd,cde->abe", (None, 7), "e", (2, 4, 2, 3)),  # MHA attention_output: two input-side axes
    ("btd,ndh->btnh", (None, 2, 3), None, (2, 4, 5)),  # KerasHub: contracted axis not first
    ("...b,bc->...c", (6,), "c", (2, 3, 5)),  # ellipsis
]
EINSUM_IDS = ["mha_qkv", "mha_output", "heads_first", "ellipsis"]


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _dense(units=6, in_dim=5, seed=3):
    base = keras.layers.Dense(units)
    base.build((None, in_dim))
    base.kernel.assign(_rand(in_dim, units, seed=seed))
    base.bias.assign(_rand(units, seed=seed + 1))
    return base


def _einsum(equation, output_shape, bias_axes, input_shape):
    base = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    base.build(input_shape)
    base.kernel.assign(_rand(*base.kernel.shape, seed=3))
    if base.bias is not None:
        base.bias.assign(_rand(*base.bias.shape, seed=4))
    return base


def _randomize(layer, seed=1, name=None):
    a, b = layer.adapter_variables(name)
    a.assign(_rand(*a.shape, seed=seed))
    b.assign(_rand(*b.shape, seed=seed + 1))
    m = layer.adapter_magnitude(name)
    if m is not None:
        m.assign(np.abs(_rand(*m.shape, seed=seed + 2)) + 0.5)


def _perm(equation):
    """Kernel axes -> (input-side axes, output-side axes), the NumPy reference's layout."""
    _, _, _, in_axes, out_axes = _einsum_lora_equations(equation)
    k_sub = equation.replace(" ", "").split("->")[0].split(",")[1]
    return [k_sub.index(c) for c in in_axes + out_axes], len(in_axes)


def _dora_kernel(kernel, a, b, m, scaling, equation=None):
    """m * (W + s A B) / ||W + s A B|| (norm over the input-side axes), in the kernel's layout."""
    perm, n_in = _perm(equation) if equation else ([0, 1], 1)
    w = np.transpose(kernel.astype(np.float64), perm)
    total = w + scaling * np.tensordot(a.astype(np.float64), b.astype(np.float64), axes=1)
    norm = np.sqrt(np.sum(total**2, axis=tuple(range(n_in))))
    return np.transpose(m * total / norm, np.argsort(perm))


# -- DoRA forward --------------------------------------------------------------
def test_dora_dense_matches_numpy():
    base = _dense()
    layer = tf_lora.LoRADense.from_layer(base, rank=3, alpha=6, use_dora=True)
    x = _rand(4, 5, seed=7)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    w = base.kernel.numpy()
    np.testing.assert_allclose(layer.lora_magnitude.numpy(), np.linalg.norm(w, axis=0), rtol=1e-6)  # m = ||W||
    _randomize(layer)
    a, b, m = layer.lora_a.numpy(), layer.lora_b.numpy(), layer.lora_magnitude.numpy()
    expected = x @ _dora_kernel(w, a, b, m, 2.0) + base.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.merged_kernel(), _dora_kernel(w, a, b, m, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,output_shape,bias_axes,input_shape", EINSUMS, ids=EINSUM_IDS)
def test_dora_einsum_matches_numpy(equation, output_shape, bias_axes, input_shape):
    base = _einsum(equation, output_shape, bias_axes, input_shape)
    layer = tf_lora.LoRAEinsumDense.from_layer(base, rank=2, alpha=4, use_dora=True)
    _, out_axes = layer._lora_shapes
    assert tuple(layer.lora_magnitude.shape) == out_axes  # shaped like the output-side axes
    x = _rand(*input_shape, seed=9)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    _randomize(layer)
    kernel = _dora_kernel(base.kernel.numpy(), layer.lora_a.numpy(), layer.lora_b.numpy(),
                          layer.lora_magnitude.numpy(), 2.0, equation)
    expected = np.einsum(equation, x.astype(np.float64), kernel)
    if base.bias is not None:
        expected = expected + base.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)
    plain = layer.to_base_layer()  # merge folds the magnitude into a plain kernel
    assert type(plain) is keras.layers.EinsumDense
    np.testing.assert_allclose(np.asarray(plain(x)), expected, rtol=1e-4, atol=1e-4)


def test_dora_gradients_hold_the_norm_constant():
    base = _dense()
    layer = tf_lora.LoRADense.from_layer(base, rank=3, alpha=6, use_dora=True)
    _randomize(layer)
    x, g = _rand(4, 5, seed=7), _rand(4, 6, seed=8)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) * g)
    grads = tape.gradient(loss, [layer.lora_a, layer.lora_b, layer.lora_magnitude])
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    w, a, b, m = (v.astype(np.float64) for v in (base.kernel.numpy(), layer.lora_a.numpy(),
                                                  layer.lora_b.numpy(), layer.lora_magnitude.numpy()))
    s = 2.0
    n = np.linalg.norm(w + s * a @ b, axis=0)  # a constant: no gradient flows through it
    c = m / n
    # y = x W + (c - 1) (x W) + c s (x A) B  =  c (x W + s (x A) B)
    d_m = np.sum(g64 * (x64 @ w + s * (x64 @ a) @ b), axis=0) / n
    d_b = s * (x64 @ a).T @ (g64 * c)
    d_a = s * x64.T @ ((g64 * c) @ b.T)
    for got, want in zip(grads, (d_a, d_b, d_m)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # Differentiating through the norm would give other A/B gradients (sanity check of the test).
    full = np.asarray(_full_norm_grad_b(x64, g64, w, a, b, m, s))
    assert not np.allclose(full, d_b, rtol=1e-3, atol=1e-3)


def _full_norm_grad_b(x, g, w, a, b, m, s):
    bt = tf.Variable(b)
    with tf.GradientTape() as tape:
        total = w + s * a @ bt
        y = x @ (m * total / tf.norm(total, axis=0))
        loss = tf.reduce_sum(y * g)
    return tape.gradient(loss, bt)


def test_dora_dropout_follows_peft(monkeypatch):
    """With dropout, PEFT computes the DoRA term from the dropped input x_d:
    y = x W + b + (c - 1) x_d W + c s (x_d A) B."""
    base = _dense(in_dim=16)
    layer = tf_lora.LoRADense.from_layer(base, rank=2, alpha=2, dropout=0.5, use_dora=True)
    _randomize(layer)
    x = _rand(8, 16, seed=5)
    mask = (np.random.default_rng(3).random(x.shape) > 0.5).astype("float32")
    monkeypatch.setattr(keras.random, "dropout", lambda inputs, rate, seed=None: inputs * mask / (1 - rate))
    x_d = x * mask / 0.5
    w, a, b, m = base.kernel.numpy(), layer.lora_a.numpy(), layer.lora_b.numpy(), layer.lora_magnitude.numpy()
    c = m / np.linalg.norm(w + a @ b, axis=0)
    expected = x @ w + base.bias.numpy() + (c - 1) * (x_d @ w) + c * ((x_d @ a) @ b)
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), x @ _dora_kernel(w, a, b, m, 1.0) + base.bias.numpy(),
                               rtol=1e-4, atol=1e-4)


def test_dora_merge_unmerge_round_trip():
    base = _dense()
    layer = tf_lora.LoRADense.from_layer(base, rank=3, alpha=6, use_dora=True)
    _randomize(layer)
    x = _rand(4, 5, seed=2)
    before, kernel = np.asarray(layer(x)), layer.kernel.numpy().copy()
    layer.merge()
    np.testing.assert_allclose(layer.kernel.numpy(), _dora_kernel(kernel, layer.lora_a.numpy(), layer.lora_b.numpy(),
                                                                  layer.lora_magnitude.numpy(), 2.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)


def test_qlora_dora_uses_the_dequantized_kernel():
    base = keras.layers.EinsumDense("abc,cde->abde", (None, 4, 16), bias_axes="de")
    base.build((None, 3, 64))
    base.kernel.assign(_rand(*base.kernel.shape, seed=3))
    layer = QLoRAEinsumDense.from_layer(base, rank=2, alpha=4, use_dora=True)
    x = _rand(2, 3, 64, seed=4)
    deq = layer.base_kernel_value()
    np.testing.assert_allclose(layer.lora_magnitude.numpy(), np.linalg.norm(deq, axis=0), rtol=1e-5)
    plain = QLoRAEinsumDense.from_layer(base, rank=2, alpha=4)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
    _randomize(layer)
    kernel = _dora_kernel(deq, layer.lora_a.numpy(), layer.lora_b.numpy(), layer.lora_magnitude.numpy(), 2.0, "abc,cde->abde")
    expected = np.einsum("abc,cde->abde", x.astype(np.float64), kernel) + base.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.merged_kernel(), kernel, rtol=1e-5, atol=1e-5)


def test_dora_layer_harness():
    run_layer_test(
        lambda: tf_lora.LoRADense(6, activation="relu", rank=2, alpha=4, use_dora=True),
        input_shape=(8, 5), expected_output_shape=(8, 6),
        expected_num_trainable_weights=3, expected_num_non_trainable_weights=2,
    )


def test_dora_einsum_layer_harness():
    run_layer_test(
        lambda: tf_lora.LoRAEinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="de", rank=2, use_dora=True),
        input_shape=(2, 4, 5), expected_output_shape=(2, 4, 2, 3),
        expected_num_trainable_weights=3, expected_num_non_trainable_weights=2,
    )


def test_qlora_dora_model_trains_and_merges():
    base = mha_classifier(dim=64, heads=2)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=4, dropout=0.1, use_dora=True, quantization=tf_lora.QLoRAConfig()))
    x = _rand(4, 6, 64, seed=1)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(tf_lora.adapt(base, tf_lora.LoRAConfig(
        rank=4, quantization=tf_lora.QLoRAConfig()))(x)), rtol=1e-5, atol=1e-5)  # DoRA at init = QLoRA at init
    before = {v.path: v.numpy().copy() for v in model.lora_variables}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, _rand(4, 3, seed=2), epochs=1, verbose=0)
    assert all(not np.array_equal(before[v.path], v.numpy()) for v in model.lora_variables if v.name != "lora_a")
    merged = tf_lora.merge(model)
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)


# -- DoRA in models: fit, counts, save/load, .keras, multi-adapter, merge -------------
def test_dora_model_fit_save_load_merge(tmp_path):
    base = mha_classifier()
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, use_dora=True, target_modules=("query", "value", "ffn"))
    model = tf_lora.adapt(base, config)
    x = _rand(4, 6, 8, seed=1)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    names = sorted(v.name for v in model.lora_variables)
    assert names == sorted(["lora_a", "lora_b", "lora_magnitude"] * 3)
    counts = tf_lora.count_parameters(model)
    assert counts.trainable == sum(int(np.prod(v.shape)) for v in model.lora_variables)
    assert tf_lora.memory_report(model)["adapter_bytes"] == 4 * counts.trainable
    magnitudes = {v.path: v.numpy().copy() for v in model.lora_variables if v.name == "lora_magnitude"}
    frozen = [v.numpy().copy() for v in model.non_trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, _rand(4, 3, seed=2), epochs=2, verbose=0)
    moved = [v for v in model.lora_variables if v.name == "lora_magnitude" and not np.allclose(v.numpy(), magnitudes[v.path])]
    assert moved  # fit trains the magnitude
    for before, v in zip(frozen, model.non_trainable_weights):
        np.testing.assert_array_equal(before, v.numpy())
    trained = np.asarray(model(x))

    path = str(tmp_path / "dora.adapter")
    tf_lora.save_adapter(model, path)
    assert tf_lora.read_adapter_config(path).use_dora
    fresh = tf_lora.adapt(base, config)
    tf_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(np.asarray(fresh(x)), trained, rtol=1e-5, atol=1e-5)
    plain = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query", "value", "ffn")))
    with pytest.raises(ValueError, match="use_dora"):
        tf_lora.load_adapter(plain, path)

    keras_path = str(tmp_path / "dora.keras")
    model.save(keras_path)
    loaded = keras.models.load_model(keras_path)
    np.testing.assert_allclose(np.asarray(loaded(x)), trained, rtol=1e-5, atol=1e-5)
    assert loaded.lora_config.use_dora

    merged = tf_lora.merge(model)
    assert not any(isinstance(layer, tf_lora.LoRALayer) for layer in merged._flatten_layers())
    np.testing.assert_allclose(np.asarray(merged(x)), trained, rtol=1e-4, atol=1e-4)
    # DoRA goes out in PEFT's format too (tests/test_peft_bridge.py), for KerasHub models with a name map.
    with pytest.raises(NotImplementedError, match="no Hugging Face name map"):
        tf_lora.save_adapter(model, str(tmp_path / "peft_dir"), format="peft")


def test_multi_adapter_with_dora(tmp_path):
    base = mha_classifier()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, dropout=0.0))
    x = _rand(4, 6, 8, seed=1)
    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=2, dropout=0.0, use_dora=True, target_modules=("value",)))
    tf_lora.set_adapter(model, "task_b")
    assert sorted(v.name for v in model.trainable_variables) == ["lora_a_task_b", "lora_b_task_b", "lora_magnitude_task_b"]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    layer = model.get_layer("mha/value")
    _randomize(layer, name="task_b")
    out_b = np.asarray(model(x))
    path = str(tmp_path / "b.adapter")
    tf_lora.save_adapter(model, path, adapter_name="task_b")
    keras_path = str(tmp_path / "multi.keras")
    model.save(keras_path)
    loaded = keras.models.load_model(keras_path)
    np.testing.assert_allclose(np.asarray(loaded(x)), out_b, rtol=1e-5, atol=1e-5)
    tf_lora.set_adapter(model, "default")
    tf_lora.delete_adapter(model, "task_b")
    assert not any("task_b" in v.name for v in model.weights)
    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=2, dropout=0.0, use_dora=True, target_modules=("value",)))
    tf_lora.load_adapter(model, path, adapter_name="task_b")
    tf_lora.set_adapter(model, "task_b")
    np.testing.assert_allclose(np.asarray(model(x)), out_b, rtol=1e-5, atol=1e-5)


# -- PiSSA / OLoRA ---------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_pissa_svd_and_residual(use_rslora):
    base = _dense(units=7, in_dim=9)
    layer = tf_lora.LoRADense.from_layer(base, rank=3, alpha=12, lora_init="pissa", use_rslora=use_rslora)
    s = 12 / (math.sqrt(3) if use_rslora else 3)
    w = base.kernel.numpy().astype(np.float64)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    principal = (u[:, :3] * sv[:3]) @ vt[:3]
    a, b = layer.lora_a.numpy().astype(np.float64), layer.lora_b.numpy().astype(np.float64)
    np.testing.assert_allclose(s * a @ b, principal, rtol=1e-5, atol=1e-5)  # the top-r SVD
    np.testing.assert_allclose(layer.kernel.numpy(), w - principal, rtol=1e-5, atol=1e-5)  # residual
    np.testing.assert_allclose(np.linalg.svd(layer.kernel.numpy(), compute_uv=False)[:4], np.r_[sv[3:], 0][:4], atol=1e-5)
    # A and B carry sqrt(S_r / s) each (PEFT's Sr /= scaling): equal column / row norms.
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(sv[:3] / s), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(sv[:3] / s), rtol=1e-5)
    a0, b0 = layer.adapter_init_pair()
    np.testing.assert_array_equal(a0.numpy(), layer.lora_a.numpy())
    assert not a0.trainable and not b0.trainable
    x = _rand(4, 9, seed=3)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)  # equal at init


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_rewriting_inits_on_einsum_equal_base(init, use_dora):
    base = _einsum("btd,ndh->btnh", (None, 2, 3), None, (2, 4, 5))
    layer = tf_lora.LoRAEinsumDense.from_layer(base, rank=2, alpha=4, lora_init=init, use_dora=use_dora)
    x = _rand(2, 4, 5, seed=1)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.kernel.numpy() + layer.lora_delta(), base.kernel.numpy(), rtol=1e-5, atol=1e-5)


def test_olora_matches_peft_definition():
    base = _dense(units=6, in_dim=8)
    layer = tf_lora.LoRADense.from_layer(base, rank=2, alpha=4, lora_init="olora")
    q, r = np.linalg.qr(base.kernel.numpy().T.astype(np.float64))  # torch weight (out, in) = Q R
    np.testing.assert_allclose(layer.lora_a.numpy(), r[:2].T, rtol=1e-5, atol=1e-5)  # lora_A = R_r
    np.testing.assert_allclose(layer.lora_b.numpy(), q[:, :2].T, rtol=1e-5, atol=1e-5)  # lora_B = Q_r


def _pissa_model_trained(config, base):
    model = tf_lora.adapt(base, config)
    for _, layer in model.adapter_layers():
        a, b = layer.lora_a, layer.lora_b
        a.assign(a.numpy() + 0.1 * _rand(*a.shape, seed=5))
        b.assign(b.numpy() + 0.1 * _rand(*b.shape, seed=6))
        if layer.adapter_magnitude() is not None:
            layer.lora_magnitude.assign(layer.lora_magnitude.numpy() * 1.1)
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_pissa_adapter_converts_to_original_base(tmp_path, use_dora, use_rslora):
    base = mha_classifier()
    config = tf_lora.LoRAConfig(rank=2, alpha=6, dropout=0.0, init="pissa", use_dora=use_dora, use_rslora=use_rslora,
                                rank_pattern={"value": 3})
    model = _pissa_model_trained(config, base)
    x = _rand(4, 6, 8, seed=1)
    trained = np.asarray(model(x))
    path = str(tmp_path / "pissa.adapter")
    tf_lora.save_adapter(model, path)  # default: for the original base, rank 2r
    converted = tf_lora.read_adapter_config(path)
    assert (converted.init, converted.rank, dict(converted.rank_pattern)) == ("he_uniform", 4, {"value": 6})
    assert converted.scaling_for(4, converted.alpha) == pytest.approx(config.scaling_for(2, config.alpha))
    fresh = tf_lora.adapt(base, converted)  # a plain LoRA model on the unmodified base
    tf_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(np.asarray(fresh(x)), trained, rtol=1e-4, atol=1e-4)

    # The option: keep the adapter relative to the residual; only a PiSSA model loads it.
    residual_path = str(tmp_path / "residual.adapter")
    tf_lora.save_adapter(model, residual_path, to_original_base=False)
    with pytest.raises(ValueError, match="rewritten by init='pissa'"):
        tf_lora.load_adapter(tf_lora.adapt(base, _plain(config)), residual_path)
    again = tf_lora.adapt(base, config)
    tf_lora.load_adapter(again, residual_path)
    np.testing.assert_allclose(np.asarray(again(x)), trained, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="original base"):  # a plain adapter file on a rewritten base
        plain_path = str(tmp_path / "plain.adapter")
        tf_lora.save_adapter(tf_lora.adapt(base, _plain(config)), plain_path)
        tf_lora.load_adapter(again, plain_path)


def _plain(config):
    import dataclasses

    return dataclasses.replace(config, init="he_uniform")


def test_pissa_keras_round_trip_keeps_initial_factors(tmp_path):
    base = mha_classifier()
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, init="pissa", use_dora=True)
    model = _pissa_model_trained(config, base)
    x = _rand(4, 6, 8, seed=1)
    keras_path = str(tmp_path / "pissa.keras")
    model.save(keras_path)
    loaded = keras.models.load_model(keras_path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "after_reload.adapter")
    tf_lora.save_adapter(loaded, path)
    fresh = tf_lora.adapt(base, tf_lora.read_adapter_config(path))
    tf_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(tf_lora.merge(loaded)(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)


# -- LoftQ -----------------------------------------------------------------------------
@pytest.mark.parametrize("loftq_iter", [1, 3])
def test_loftq_error_below_nf4(loftq_iter):
    base = keras.layers.Dense(64)
    base.build((None, 128))
    w = base.kernel.numpy()
    plain_error = np.linalg.norm(w - nf4.dequantize(nf4.quantize(w)).numpy())
    layer = QLoRADense.from_layer(base, rank=8, alpha=32, lora_init="loftq", loftq_iter=loftq_iter)  # s = 4
    approx = layer.base_kernel_value() + layer.lora_delta()  # lora_delta includes s = alpha / r
    loftq_error = np.linalg.norm(w - approx)
    assert loftq_error < 0.9 * plain_error, (loftq_error, plain_error)
    # Reference: one LoftQ step by hand, the SVD of NF4's error scaled by s.
    if loftq_iter == 1:
        err = w.astype(np.float64) - nf4.dequantize(nf4.quantize(w)).numpy()
        u, sv, vt = np.linalg.svd(err, full_matrices=False)
        np.testing.assert_allclose(4 * layer.lora_a.numpy().astype(np.float64) @ layer.lora_b.numpy(),
                                   (u[:, :8] * sv[:8]) @ vt[:8], atol=1e-5)
        np.testing.assert_allclose(loftq_error, np.sqrt(np.sum(sv[8:] ** 2)), rtol=1e-4)
    x = _rand(4, 128, seed=2)
    np.testing.assert_allclose(np.asarray(layer(x)), x @ approx + base.bias.numpy(), rtol=1e-4, atol=1e-4)


def test_loftq_model_and_conversion(tmp_path):
    base = mha_classifier(dim=64, heads=2)
    config = tf_lora.LoRAConfig(rank=4, alpha=16, dropout=0.0, init="loftq", loftq_iter=2,
                                target_modules=("query", "value"), quantization=tf_lora.QLoRAConfig())
    model = tf_lora.adapt(base, config)
    x = _rand(2, 6, 64, seed=1)
    plain = tf_lora.adapt(base, _plain(config))
    for name in ("mha/query", "mha/value"):  # the model's kernels are closer to the float ones than plain QLoRA's
        lq, lp = model.get_layer(name), plain.get_layer(name)
        w = base.get_layer("mha")._query_dense.kernel.numpy() if name.endswith("query") else \
            base.get_layer("mha")._value_dense.kernel.numpy()
        assert np.linalg.norm(w - lq.base_kernel_value() - lq.lora_delta()) < np.linalg.norm(w - lp.base_kernel_value())
    layer = model.get_layer("mha/query")
    w = base.get_layer("mha")._query_dense.kernel.numpy()
    init_error = w - (layer.base_kernel_value() + layer.lora_delta())  # W - deq(Q) - s A0 B0
    _randomize(layer, seed=3)  # "training"
    trained_kernel = layer.base_kernel_value() + layer.lora_delta()
    path = str(tmp_path / "loftq.adapter")
    tf_lora.save_adapter(model, path)
    # On the float base, the converted adapter gives W + s (A B - A0 B0): the trained kernel plus the init's error.
    float_model = tf_lora.adapt(base, tf_lora.LoRAConfig(**{**tf_lora.read_adapter_config(path).to_dict(),
                                                            "quantization": None}))
    tf_lora.load_adapter(float_model, path)
    converted = float_model.get_layer("mha/query")
    np.testing.assert_allclose(converted.kernel.numpy() + converted.lora_delta() - trained_kernel, init_error, atol=1e-4)


# -- bad input -------------------------------------------------------------------------
def test_loftq_without_quantization_raises():
    with pytest.raises(ValueError, match="`init`.*quantization"):
        tf_lora.LoRAConfig(init="loftq")
    with pytest.raises(ValueError, match="lora_init"):
        tf_lora.LoRADense.from_layer(_dense(), rank=2, lora_init="loftq")
    with pytest.raises(ValueError, match="loftq_iter"):
        tf_lora.LoRAConfig(init="loftq", loftq_iter=0, quantization=tf_lora.QLoRAConfig())
    with pytest.raises(TypeError, match="use_dora"):
        tf_lora.LoRAConfig(use_dora=1)
    assert tf_lora.LoRAConfig.from_dict(tf_lora.LoRAConfig(use_dora=True).to_dict()).use_dora


class _NoDoraEmbedding(tf_lora.LoRALayer):
    """A stand-in adapter class without DoRA (as an Embedding/Conv adapter may be)."""

    @classmethod
    def from_layer(cls, layer, **kwargs):  # pragma: no cover - adapt must refuse before
        raise AssertionError("use_dora must be refused before from_layer")


def test_use_dora_on_unsupported_layer_type_raises():
    import sys

    adapt_module = sys.modules["tf_lora.adapt"]

    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(10, 8, name="embed")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2, name="query")(x))
    adapt_module.register_adapter(keras.layers.Embedding, _NoDoraEmbedding, "")
    try:
        with pytest.raises(NotImplementedError, match="use_dora.*Embedding"):
            tf_lora.adapt(base, tf_lora.LoRAConfig(use_dora=True, target_modules=("embed", "query")))
        with pytest.raises(NotImplementedError, match="init='pissa'.*Embedding"):
            tf_lora.adapt(base, tf_lora.LoRAConfig(init="pissa", target_modules=("embed",)))
    finally:
        adapt_module.DISPATCH.pop(0)
    with pytest.raises(NotImplementedError, match="use_dora"):
        _NoDoraEmbedding(use_dora=True)


def test_added_adapter_cannot_rewrite_the_base():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))
    with pytest.raises(NotImplementedError, match="init='pissa'"):
        tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=2, init="pissa"))
    assert model.adapter_names == ["default"]


def test_rank_too_large_for_svd_init_raises():
    with pytest.raises(ValueError, match="`rank`"):
        tf_lora.LoRADense.from_layer(_dense(units=3, in_dim=5), rank=4, lora_init="pissa")


# -- live comparison with PEFT ------------------------------------------------------------
def _peft_linear(w, b, rank, alpha, **kwargs):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    lin = torch.nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.T.copy()))
        lin.bias.copy_(torch.from_numpy(b.copy()))
    module = torch.nn.Sequential()
    module.add_module("proj", lin)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, **kwargs)
    return torch, peft.get_peft_model(module, cfg)


def test_dora_matches_peft_live():
    base = _dense(units=6, in_dim=5)
    layer = tf_lora.LoRADense.from_layer(base, rank=2, alpha=6, use_dora=True)
    _randomize(layer)
    torch, pm = _peft_linear(base.kernel.numpy(), base.bias.numpy(), 2, 6, use_dora=True)
    proj = pm.base_model.model.proj
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(torch.from_numpy(layer.lora_a.numpy().T.copy()))
        proj.lora_B["default"].weight.copy_(torch.from_numpy(layer.lora_b.numpy().T.copy()))
        proj.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(layer.lora_magnitude.numpy().copy()))
    x = _rand(4, 5, seed=3)
    xt = torch.from_numpy(x)
    yt = pm(xt)
    np.testing.assert_allclose(np.asarray(layer(x)), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    g = _rand(4, 6, seed=4)
    (yt * torch.from_numpy(g)).sum().backward()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) * g)
    ga, gb, gm = tape.gradient(loss, [layer.lora_a, layer.lora_b, layer.lora_magnitude])
    np.testing.assert_allclose(np.asarray(ga), proj.lora_A["default"].weight.grad.numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), proj.lora_B["default"].weight.grad.numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gm), proj.lora_magnitude_vector["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_pissa_matches_peft_live():
    base = _dense(units=6, in_dim=8)
    layer = tf_lora.LoRADense.from_layer(base, rank=2, alpha=8, lora_init="pissa")
    torch, pm = _peft_linear(base.kernel.numpy(), base.bias.numpy(), 2, 8, init_lora_weights="pissa")
    proj = pm.base_model.model.proj
    np.testing.assert_allclose(layer.kernel.numpy(), proj.base_layer.weight.detach().numpy().T, rtol=1e-5, atol=1e-5)
    peft_delta = 4.0 * (proj.lora_B["default"].weight @ proj.lora_A["default"].weight).detach().numpy().T
    np.testing.assert_allclose(layer.lora_delta(), peft_delta, rtol=1e-5, atol=1e-5)
    # SVD signs may differ; the magnitudes of the factors agree.
    np.testing.assert_allclose(np.abs(layer.lora_a.numpy()), np.abs(proj.lora_A["default"].weight.detach().numpy().T),
                               rtol=1e-4, atol=1e-5)
