"""QLoRADense / QLoRAEinsumDense and memory_report against plain NumPy references.

Tolerances: float32 layer outputs within rtol=atol=1e-5 of the float64 NumPy reference
``x @ dequantize(q) + b + scaling * (x @ A) @ B`` (1e-4 for einsums and whole models, whose
float32 sums are longer); the 4-bit storage and its dequantization are compared exactly;
float16 / bfloat16 compute within 2e-2 / 6e-2 relative to the float32 output's scale.
"""

import io
import math
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from harness import run_layer_test
from models import WEIGHT_OPTIONS, mha_classifier, reference_losses, regularized_model, total_loss
from tf_lora import nf4
from tf_lora.adapt import walk
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer
from tf_lora.layers.qlora import QLoRADense, QLoRAEinsumDense
from tf_lora.memory import memory_report, print_memory_report

RTOL = ATOL = 1e-5
QLORA = (QLoRADense, QLoRAEinsumDense)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _dense(units=9, in_dim=7, activation=None, seed=3, name=None):
    base = keras.layers.Dense(units, activation=activation, name=name)
    base.build((None, in_dim))
    base.kernel.assign(_rand(in_dim, units, seed=seed))
    base.bias.assign(_rand(units, seed=seed + 1))
    return base


def _randomize_adapters(layer, seed=1):
    layer.lora_a.assign(_rand(*layer.lora_a.shape, seed=seed))
    layer.lora_b.assign(_rand(*layer.lora_b.shape, seed=seed + 1))


def _f64(v):
    return np.asarray(v).astype(np.float64)


def _nf4_kernel(kernel, group_size=64, double_quant=True, equation=None):
    """NumPy reference of the kernel a QLoRA layer computes with: NF4 (`nf4.quantize`, equal to
    bitsandbytes) of the torch weight the layer stands for, back in Keras layout. Dense (in, out):
    ``kernel.T``; EinsumDense: the ``nn.Linear`` weight (out_features, in_features), the kernel's
    output axes and contracted axes each flattened in kernel order."""
    if equation is None:
        return nf4.dequantize(nf4.quantize(kernel, group_size, double_quant)).numpy()
    lhs, out = equation.replace(" ", "").split("->")
    x_sub, k_sub = lhs.split(",")
    ins = [i for i, c in enumerate(k_sub) if c in x_sub and c not in out]
    perm = ins + [i for i, c in enumerate(k_sub) if c in out and c not in x_sub]
    matrix = np.transpose(kernel, perm).reshape(math.prod(kernel.shape[i] for i in ins), -1)  # torch weight .T
    dequantized = nf4.dequantize(nf4.quantize(matrix, group_size, double_quant)).numpy()
    return np.transpose(dequantized.reshape([kernel.shape[i] for i in perm]), np.argsort(perm))


@pytest.mark.parametrize(
    "group_size,double_quant,in_dim,units",
    [(64, True, 70, 16), (64, False, 70, 16), (16, True, 7, 9), (5, False, 7, 9)],
    ids=["dq_groups_cross_rows", "no_dq", "dq_odd_count_partial_group", "tiny_groups"],
)
@pytest.mark.parametrize("activation", [None, "relu"], ids=["linear", "relu"])
def test_qlora_dense_matches_numpy(group_size, double_quant, in_dim, units, activation):
    base = _dense(units, in_dim, activation)
    cfg = tf_lora.QLoRAConfig(group_size=group_size, double_quant=double_quant)
    layer = QLoRADense.from_layer(base, quantization=cfg, rank=3, alpha=6)
    q = nf4.quantize(base.kernel.numpy(), group_size, double_quant)
    for var in layer.storage_variables():  # the layer stores exactly nf4.quantize's arrays
        np.testing.assert_array_equal(var.numpy(), q.arrays[var.name[len("nf4_"):]])
    w = nf4.dequantize(q).numpy()
    # call's dequantization (torch layout, pair table) equals nf4.dequantize bit for bit.
    np.testing.assert_array_equal(tf.transpose(layer._dequantize()).numpy(), w)
    np.testing.assert_array_equal(layer.base_kernel_value(), w)
    _randomize_adapters(layer)
    x = _rand(2, 4, in_dim, seed=7)
    expected = _f64(x) @ w + base.bias.numpy() + 2.0 * (_f64(x) @ layer.lora_a.numpy()) @ layer.lora_b.numpy()
    if activation == "relu":
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=RTOL, atol=ATOL)
    if activation is None:  # gradients reach the inputs (through the kernel) and the adapters
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.reduce_sum(layer(xt))
        gx, ga = tape.gradient(y, [xt, layer.lora_a])
        row = w.sum(axis=1) + 2.0 * layer.lora_a.numpy() @ layer.lora_b.numpy().sum(axis=1)
        np.testing.assert_allclose(gx.numpy(), np.broadcast_to(row, x.shape), rtol=RTOL, atol=ATOL)
        assert np.any(ga.numpy())


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
def test_qlora_einsum_dense_matches_numpy(equation, output_shape, bias_axes, input_shape):
    base = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    base.build(input_shape)
    base.kernel.assign(_rand(*base.kernel.shape, seed=3))
    layer = QLoRAEinsumDense.from_layer(base, quantization=tf_lora.QLoRAConfig(group_size=8), rank=2, alpha=4)
    w = _nf4_kernel(base.kernel.numpy(), 8, equation=equation)
    np.testing.assert_array_equal(layer.base_kernel_value(), w)
    _randomize_adapters(layer)
    x = _rand(*input_shape, seed=9)
    expected = np.einsum(equation, _f64(x), w + _f64(layer.lora_delta()))
    if base.bias is not None:
        expected = expected + base.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)
    plain = layer.to_base_layer()
    assert type(plain) is keras.layers.EinsumDense
    np.testing.assert_allclose(np.asarray(plain(x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("double_quant,bits", [(True, 4.1274), (False, 4.5)], ids=["dq", "no_dq"])
def test_storage_is_four_bit(double_quant, bits):
    layer = QLoRADense.from_layer(_dense(64, 1024), quantization=tf_lora.QLoRAConfig(double_quant=double_quant))
    n, groups = 1024 * 64, 1024 * 64 // 64
    expected = {"nf4_codes": ("uint8", (n // 2,)), "nf4_absmax": ("uint8" if double_quant else "float32", (groups,))}
    if double_quant:
        expected.update(nf4_nested_scale=("float32", (math.ceil(groups / 256),)), nf4_offset=("float32", ()))
    got = {v.name: (v.dtype, tuple(v.shape)) for v in layer.storage_variables()}
    assert got == expected
    assert all(not v.trainable for v in layer.storage_variables())
    # No float copy of the kernel anywhere: every float variable is small (bias, adapters, scales).
    assert "kernel" not in [v.name for v in layer.weights]
    assert all(v.dtype == "uint8" or math.prod(v.shape) <= n // 8 for v in layer.weights)
    stored = sum(v.numpy().nbytes for v in layer.storage_variables())
    assert stored == n // 2 + (groups + 4 * math.ceil(groups / 256) + 4 if double_quant else 4 * groups)
    assert 8 * stored / n == pytest.approx(bits, abs=1e-4)
    assert layer.base_parameter_count() == n
    report = memory_report(layer)
    assert report["base_stored_bytes"] == stored and report["base_float32_bytes"] == 4 * n
    assert report["bits_per_parameter"] == pytest.approx(bits, abs=1e-4)
    assert report["adapter_bytes"] == 4 * 8 * (1024 + 64)


def test_qlora_dense_harness():
    run_layer_test(
        lambda: QLoRADense.from_layer(_dense(6, 5, "relu"), quantization=tf_lora.QLoRAConfig(group_size=4),
                                      rank=2, alpha=4, dropout=0.1),
        input_shape=(8, 5),
        expected_output_shape=(8, 6),
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=5,  # codes, absmax codes, nested_scale, offset, bias
    )


@pytest.mark.parametrize("quantization,frozen", [
    (tf_lora.QLoRAConfig(group_size=8, double_quant=False), 3),  # codes, absmax, bias
    (tf_lora.QLoRAConfig(fake_quant=True, group_size=8), 2),  # kernel, bias
], ids=["no_dq", "fake_quant"])
def test_qlora_einsum_dense_harness(quantization, frozen):
    def factory():
        base = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="de")
        base.build((None, 3, 5))
        base.kernel.assign(_rand(5, 2, 3))
        return QLoRAEinsumDense.from_layer(base, quantization=quantization, rank=2)

    run_layer_test(factory, input_shape=(4, 3, 5), expected_output_shape=(4, 3, 2, 3),
                   expected_num_trainable_weights=2, expected_num_non_trainable_weights=frozen)


def _qlora_model(**quant):
    return tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(
        rank=2, dropout=0.0, target_modules=("query", "key", "value", "ffn"),
        quantization=tf_lora.QLoRAConfig(group_size=16, **quant)))


def _xy(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6, 8)).astype("float32"), rng.integers(0, 3, n)


def _adapters(model):
    return {path: layer for path, layer, _ in walk(model) if isinstance(layer, LoRALayer)}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_fit_changes_only_adapters_and_round_trips(jit_compile, tmp_path):
    model = _qlora_model()
    layers = _adapters(model)
    assert sorted(layers) == ["ffn", "mha/key", "mha/query", "mha/value"]
    assert all(type(l) in QLORA for l in layers.values())
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _xy()
    before = [v.numpy().copy() for v in model.weights]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for b, v in zip(before, model.weights):
        if v.name == "lora_b":
            assert not np.array_equal(b, v.numpy()), v.path
        elif not v.name.startswith("lora_"):  # 4-bit storage and everything else: bit-for-bit
            np.testing.assert_array_equal(b, v.numpy(), err_msg=v.path)
    if jit_compile:
        return
    # .keras round trip keeps the 4-bit storage, also inside MultiHeadAttention.
    path = str(tmp_path / "qlora.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as h5:
        stored = []
        h5.visititems(lambda name, obj: stored.append(obj.dtype) if isinstance(obj, h5py.Dataset) else None)
    assert stored.count(np.dtype("uint8")) == 2 * len(layers)  # codes and absmax codes, in the file itself
    loaded = keras.models.load_model(path)
    for name, layer in layers.items():
        restored = loaded.get_layer(name)
        assert type(restored) is type(layer) and restored.quantization == layer.quantization
        for a, b in zip(layer.storage_variables(), restored.storage_variables()):
            assert b.dtype == a.dtype and b.name == a.name
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_merge_gives_plain_float_model():
    model = _qlora_model()
    for layer in _adapters(model).values():
        _randomize_adapters(layer)
    merged = tf_lora.merge(model)
    assert not any(isinstance(l, LoRALayer) for _, l, _ in walk(merged))
    assert all(v.dtype == "float32" for v in merged.weights)
    x, _ = _xy()
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)
    plain = {path: layer for path, layer, _ in walk(merged)}
    for name, layer in _adapters(model).items():
        expected = layer.base_kernel_value() + layer.lora_delta()  # base_kernel_value: checked against NumPy above
        np.testing.assert_allclose(plain[name].kernel.numpy(), expected, rtol=1e-6, atol=1e-6)
    query = model.get_layer("mha/query")
    with pytest.raises(NotImplementedError, match=r"tf_lora\.merge\(model\)"):
        query.merge()
    with pytest.raises(NotImplementedError, match=r"tf_lora\.merge\(model\)"):
        query.unmerge()


def test_parameter_counts_count_four_bit_weights_once():
    lora = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, target_modules=("query", "key", "value", "ffn")))
    counts = tf_lora.count_parameters(_qlora_model())
    assert counts == tf_lora.count_parameters(lora)
    assert counts.total == mha_classifier().count_params() + counts.trainable


def test_memory_report(capsys):
    model = _qlora_model()
    report = print_memory_report(model)
    rows = {row["path"]: row for row in report["layers"]}
    # q/k/v kernels (8, 2, 4), ffn (8, 16): 64 and 128 weights, groups of 16 -> 4 and 8 groups.
    for name, n in (("mha/query", 64), ("ffn", 128)):
        groups = n // 16
        assert rows[name]["base_stored_bytes"] == n // 2 + groups + 4 + 4
        assert rows[name]["base_float32_bytes"] == 4 * n and rows[name]["quantized"]
    assert rows["ffn"]["adapter_bytes"] == 4 * 2 * (8 + 16)
    assert report["base_parameters"] == 3 * 64 + 128
    stored = sum(r["base_stored_bytes"] for r in report["layers"])
    assert report["bits_per_parameter"] == pytest.approx(8 * stored / (3 * 64 + 128))
    assert report["total_bytes"] == stored + report["adapter_bytes"] + report["other_bytes"]
    all_bytes = sum(v.numpy().nbytes for v in model.weights)
    assert report["total_bytes"] == all_bytes
    assert "mha/query" in capsys.readouterr().out
    lora = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))
    plain = memory_report(lora)
    assert plain["bits_per_parameter"] is None and plain["base_stored_bytes"] == plain["base_float32_bytes"]


def test_fake_quant_mode():
    base = _dense(9, 70)
    cfg = tf_lora.QLoRAConfig(fake_quant=True, group_size=16)
    layer = QLoRADense.from_layer(base, quantization=cfg, rank=3, alpha=6)
    assert [v.name for v in layer.storage_variables()] == ["kernel"] and layer.kernel.dtype == "float32"
    np.testing.assert_array_equal(layer.kernel.numpy(), base.kernel.numpy())  # the float kernel is kept
    w = nf4.dequantize(nf4.quantize(base.kernel.numpy(), 16)).numpy()
    _randomize_adapters(layer)
    x = _rand(4, 70, seed=5)
    expected = _f64(x) @ w + base.bias.numpy() + 2.0 * (_f64(x) @ layer.lora_a.numpy()) @ layer.lora_b.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=RTOL, atol=RTOL)
    # Gradients go to the adapters only; a user-unfrozen kernel gets the straight-through gradient.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    assert [v.name for v in layer.trainable_variables] == ["lora_a", "lora_b"]
    assert all(g is not None for g in tape.gradient(loss, layer.trainable_variables))
    with tf.GradientTape() as tape:
        tape.watch(layer.kernel.value)
        loss = tf.reduce_sum(layer(x))
    g = tape.gradient(loss, layer.kernel.value)
    np.testing.assert_allclose(g.numpy(), np.broadcast_to(x.sum(0)[:, None], w.shape), rtol=RTOL, atol=1e-4)
    # Merging in place works: the merged kernel is fake_quant(kernel) + delta, used as is.
    before = np.asarray(layer(x))
    delta = layer.lora_delta()
    layer.merge()
    np.testing.assert_allclose(layer.kernel.numpy(), w + delta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=RTOL, atol=1e-4)
    layer.unmerge()
    np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=RTOL, atol=1e-4)
    # fit through adapt.
    model = _qlora_model(fake_quant=True)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kernel = model.get_layer("mha/query").kernel.numpy().copy()
    b = model.get_layer("mha/query").lora_b.numpy().copy()
    model.fit(*_xy(), epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(kernel, model.get_layer("mha/query").kernel.numpy())
    assert not np.array_equal(b, model.get_layer("mha/query").lora_b.numpy())
    counts = tf_lora.count_parameters(model)
    assert counts.total == mha_classifier().count_params() + counts.trainable


@pytest.mark.parametrize("policy,rtol", [("mixed_float16", 2e-2), ("mixed_bfloat16", 6e-2)], ids=["fp16", "bf16"])
def test_mixed_precision(policy, rtol):
    base = _dense(32, 64)
    layer = QLoRADense.from_layer(base, quantization=tf_lora.QLoRAConfig(), rank=4)
    _randomize_adapters(layer)
    x = 0.2 * _rand(4, 64, seed=6)
    reference = np.asarray(layer(x))
    keras.config.set_dtype_policy(policy)
    mixed = QLoRADense.from_layer(_dense(32, 64), quantization=tf_lora.QLoRAConfig(), rank=4)
    for a, b in zip(mixed.weights, layer.weights):
        a.assign(b)
    y = mixed(x)
    assert tf.as_dtype(y.dtype).name == policy.split("_")[1]
    assert all(v.dtype in ("float32", "uint8") for v in mixed.weights)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(np.asarray(y, "float32"), reference, rtol=0, atol=rtol * scale)
    model = _qlora_model()  # fit under the mixed policy: adapters stay float32 and move
    optimizer = keras.optimizers.Adam(1e-2)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    b = model.get_layer("mha/query").lora_b.numpy().copy()
    model.fit(*_xy(), epochs=1, batch_size=8, verbose=0)
    after = model.get_layer("mha/query").lora_b.numpy()
    assert all(v.dtype == "float32" for v in model.lora_variables)
    assert np.isfinite(after).all() and not np.array_equal(b, after)
    keras.config.set_dtype_policy("float32")
    # compute_dtype dequantizes and multiplies in bfloat16 under a float32 policy.
    bf = QLoRADense.from_layer(base, quantization=tf_lora.QLoRAConfig(compute_dtype="bfloat16"), rank=4)
    for a, b in zip(bf.weights, layer.weights):
        a.assign(b)
    y = bf(x)
    assert y.dtype == "float32"
    np.testing.assert_allclose(np.asarray(y), reference, rtol=0, atol=6e-2 * scale)
    assert not np.array_equal(np.asarray(y), reference)


def _nan_dense():
    base = _dense(name="nan_layer")
    base.kernel.assign(np.where(np.eye(7, 9) > 0, np.nan, base.kernel.numpy()).astype("float32"))
    return base


def _inf_dense():
    base = _dense(name="nan_layer")
    base.kernel.assign(np.full((7, 9), np.inf, "float32"))
    return base


def _int4_dense():
    base = _dense()
    try:
        base.quantize("int4")
    except ValueError as e:  # Keras 3.5 (the floor) quantizes to int8 / float8 only
        pytest.skip(f"this Keras has no int4 quantization ({e})")
    return base


@pytest.mark.parametrize("make,quantization,error,match", [
    (_nan_dense, {}, ValueError, "layer 'nan_layer'.*NaN or Inf"),
    (_inf_dense, {}, ValueError, "layer 'nan_layer'.*NaN or Inf"),
    (_nan_dense, {"fake_quant": True}, ValueError, "layer 'nan_layer'.*NaN or Inf"),
    (_dense, {"bits": 8}, NotImplementedError, "bits"),
    (_dense, {"group_size": 0}, ValueError, "group_size"),
    (_dense, {"group_size": 1.5}, TypeError, "group_size"),
    (_dense, {"quant_type": "fp4"}, ValueError, "quant_type"),
    (_dense, "nf4", TypeError, "quantization"),
    (_int4_dense, {}, NotImplementedError, "quantized by Keras"),
], ids=["nan_kernel", "inf_kernel", "nan_kernel_fake_quant", "bits_8", "group_size_zero",
        "group_size_float", "unknown_quant_type", "quantization_string", "keras_int4_source"])
def test_bad_inputs(make, quantization, error, match):
    base = make()
    kernel = keras.ops.convert_to_numpy(base.kernel).copy()
    with pytest.raises(error, match=match):
        QLoRADense.from_layer(base, quantization=quantization)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(base.kernel), kernel)  # source untouched


def test_bad_layer_arguments():
    with pytest.raises(NotImplementedError, match="merged"):
        QLoRADense(4, quantization=tf_lora.QLoRAConfig(), merged=True)
    with pytest.raises(NotImplementedError, match="bits"):
        QLoRAEinsumDense("ab,bc->ac", (4,), quantization={"bits": 8})
    with pytest.raises(ValueError, match="group_size"):
        tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(quantization=tf_lora.QLoRAConfig(group_size=0)))


@pytest.mark.parametrize("fake_quant", [False, True], ids=["nf4_storage", "fake_quant"])
def test_regularizers_and_constraints_are_kept(fake_quant, tmp_path):
    base = regularized_model()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(
        rank=2, dropout=0.0, target_modules=("query", "value"),
        quantization=tf_lora.QLoRAConfig(group_size=16, fake_quant=fake_quant)))
    assert {type(model.get_layer(n)) for n in ("query", "value")} == set(QLORA)
    x, y = _rand(8, 5, seed=1), _rand(8, 2, seed=2)
    # Reference: the regularizers see the kernels the layers compute with (dequantized NF4).
    kernels = [_f64(nf4.dequantize(nf4.quantize(base.get_layer(n).kernel.numpy(), 16))) for n in ("query", "value")]
    biases = [_f64(base.get_layer(n).bias.numpy()) for n in ("query", "value")]
    for name in ("query", "value"):
        for key in WEIGHT_OPTIONS:
            assert model.get_layer(name).get_config()[key] == base.get_layer(name).get_config()[key], (name, key)
    merged = tf_lora.merge(model)
    for m in (model, merged):
        np.testing.assert_allclose(total_loss(m, x), reference_losses(kernels, biases, x), rtol=1e-6)
    for name in ("query", "value"):
        for key in WEIGHT_OPTIONS:
            assert merged.get_layer(name).get_config()[key] == base.get_layer(name).get_config()[key], (name, key)
    # Against the float base model only NF4's quantization error remains (about 1% here).
    np.testing.assert_allclose(total_loss(model, x), total_loss(base, x), rtol=5e-2)
    evaluated = []
    for m in (tf_lora.adapt(base, model.lora_config), tf_lora.merge(model)):
        m.compile(loss="mse")
        evaluated.append(m.evaluate(x, y, verbose=0))
    np.testing.assert_allclose(evaluated[0], evaluated[1], rtol=1e-5)
    path = str(tmp_path / "qlora_regularized.keras")
    model.save(path)
    np.testing.assert_allclose(total_loss(keras.models.load_model(path), x), total_loss(model, x), rtol=1e-6)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "no_double_quant"])
def test_unmerge_fake_quant_bound(double_quant):
    # Pins the documented behaviour of QLoRA unmerge (and LoRALayer.unmerge's pointer to it).
    group_size = 4  # 70 * 40 / 4 = 700 groups: three blocks of 256 scales with double quantization
    base = _dense(40, 70)
    cfg = tf_lora.QLoRAConfig(fake_quant=True, group_size=group_size, double_quant=double_quant)
    layer = QLoRADense.from_layer(base, quantization=cfg, rank=3, alpha=6)
    _randomize_adapters(layer)
    layer.lora_b.assign(layer.lora_b.numpy() * 0.1)
    x = _rand(4, 70, seed=5)
    before, effective = np.asarray(layer(x)), layer.base_kernel_value()
    layer.merge()
    layer.unmerge()
    # The float kernel is now fake_quant(W) (the values the layer computed with), not W.
    np.testing.assert_allclose(layer.kernel.numpy(), effective, rtol=1e-6, atol=1e-6)
    moved = np.abs(np.moveaxis(layer.base_kernel_value() - effective, -1, 0).reshape(-1))
    if not double_quant:  # NF4 alone is idempotent: exact up to float32 rounding.
        assert moved.max() <= 1e-6
        np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=RTOL, atol=RTOL)
        return
    # Double quantization is not idempotent: each element moves by at most half a step of
    # the 8-bit scale code times its block's nested scale (NumPy from the second quantization).
    q = nf4.quantize(effective, group_size, double_quant=True)
    group = np.arange(moved.size) // group_size
    bound = 0.5 * np.diff(np.asarray(nf4.DYNAMIC_MAP)).max() * q.nested_scale[group // nf4.NESTED_GROUP_SIZE]
    assert np.all(moved <= bound * (1 + 1e-5) + 1e-7)
    assert moved.max() > 1e-5  # not exact: the documented behaviour, not a rounding effect
    after = np.asarray(layer(x))
    assert np.abs(after - before).max() > 1e-5
    kernel_bound = np.moveaxis(bound.reshape(40, 70), 0, -1)  # back to Keras layout (in, out)
    assert np.all(np.abs(after - before) <= np.abs(_f64(x)) @ kernel_bound + 1e-5)


@pytest.mark.parametrize("equation,output_shape,input_shape", [
    (None, None, (3, 4, 70)),  # QLoRADense
    ("btd,ndh->btnh", (None, 2, 3), (2, 4, 5)),  # KerasHub query: kernel (heads, in, head_dim)
    ("btnh,nhd->btd", (None, 6), (2, 4, 2, 3)),  # KerasHub attention_output: two contracted axes
    ("...b,bc->...c", (6,), (2, 3, 5)),  # ellipsis
], ids=["dense", "heads_first", "output", "ellipsis"])
@pytest.mark.parametrize("jit_compile", [None, False, True], ids=["eager", "graph", "xla"])
def test_gradients_match_numpy(equation, output_shape, input_shape, jit_compile):
    """The backward pass dequantizes the kernel again (nothing float is kept between the
    passes): gradients of the input and of both adapter factors equal float64 NumPy's
    for the dequantized kernel, to 1e-4."""
    if equation is None:
        base = _dense(16, input_shape[-1])
        layer = QLoRADense.from_layer(base, quantization=tf_lora.QLoRAConfig(group_size=16), rank=3, alpha=6)
        equation = "...i,io->...o"
    else:
        base = keras.layers.EinsumDense(equation, output_shape)
        base.build(input_shape)
        base.kernel.assign(_rand(*base.kernel.shape, seed=3))
        layer = QLoRAEinsumDense.from_layer(base, quantization=tf_lora.QLoRAConfig(group_size=8), rank=3, alpha=6)
    _randomize_adapters(layer)
    x = _rand(*input_shape, seed=9)
    dy = _rand(*layer(x).shape, seed=11)

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, layer.lora_a, layer.lora_b], output_gradients=tf.constant(dy))

    fn = grads if jit_compile is None else tf.function(grads, jit_compile=jit_compile)
    got = [np.asarray(g) for g in fn(tf.constant(x))]
    # NumPy: dx = dy (W + s A B)^T with W dequantized (Keras layout).
    total = _f64(layer.base_kernel_value()) + _f64(layer.lora_delta())
    lhs, out = equation.split("->")
    x_sub, k_sub = lhs.split(",")
    np.testing.assert_allclose(got[0], np.einsum(f"{out},{k_sub}->{x_sub}", _f64(dy), total), rtol=1e-4, atol=1e-4)
    # The adapter factors: as the float LoRA layer's autodiff over the dequantized kernel.
    float_cls = LoRADense if isinstance(layer, QLoRADense) else LoRAEinsumDense
    float_layer = float_cls.from_layer(layer.to_base_layer(), rank=3, alpha=6)
    float_layer.kernel.assign(layer.base_kernel_value())
    float_layer.lora_a.assign(layer.lora_a)
    float_layer.lora_b.assign(layer.lora_b)
    with tf.GradientTape() as tape:
        y = float_layer(tf.constant(x))
    want = tape.gradient(y, [float_layer.lora_a, float_layer.lora_b], output_gradients=tf.constant(dy))
    for g, w in zip(got[1:], want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-4)


def test_train_step_keeps_no_float_kernel_per_layer(tmp_path):
    """Peak memory of a train step over 8 stacked 1024x1024 QLoRA layers, in a fresh
    process: above the resident weights it stays under 3 float kernels (12 MiB), while
    keeping each layer's dequantized kernel for the backward pass would take 8 (32 MiB)."""
    import subprocess
    import sys
    code = r'''
import os, json
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
import numpy as np, keras, tensorflow as tf, tf_lora
inputs = keras.Input((1024,))
h = inputs
for i in range(8):
    h = keras.layers.Dense(1024, name=f"d{i}")(h)
model = tf_lora.adapt(keras.Model(inputs, h), tf_lora.LoRAConfig(rank=4, dropout=0.0, target_modules="all-linear",
                      quantization=tf_lora.QLoRAConfig()), inplace=True, verbose=0)
model.compile(optimizer="adam", loss="mse")
x = np.random.default_rng(0).standard_normal((16, 1024)).astype("float32")
model.train_on_batch(x, x)
tf.config.experimental.reset_memory_stats("CPU:0")
start = tf.config.experimental.get_memory_info("CPU:0")["current"]
model.train_on_batch(x, x)
print("PEAK", tf.config.experimental.get_memory_info("CPU:0")["peak"] - start)
'''
    env = dict(__import__("os").environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = int(next(ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")).split()[1])
    kernel = 1024 * 1024 * 4
    assert peak < 3 * kernel, (peak / 2**20, "MiB")
