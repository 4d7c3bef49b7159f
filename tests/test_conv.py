"""LoRAConv1D/2D/3D (and their NF4 versions) against a plain-NumPy convolution.

Tolerances: a layer's output vs the float64 NumPy convolution with the merged
kernel ``W + scaling * tensordot(lora_a, lora_b)``: rtol=atol=1e-4 (sums of up to
~100 products of order-1 values in float32); merged kernel vs NumPy 1e-5; merged
vs unmerged models: 1e-5 relative to the output scale (ResNet50 / MobileNetV2).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from harness import run_layer_test
from tf_lora import nf4

TOL = 1e-4


def _rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype("float32")


def np_conv(x, w, strides, padding, dilation):
    """N-d convolution, channels_last, float64: x (N, *S, C), w (*K, C, O)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    ks, spatial = w.shape[:-2], x.shape[1:-1]
    eff = [d * (k - 1) + 1 for k, d in zip(ks, dilation)]
    pads = []
    for size, e, s in zip(spatial, eff, strides):
        if padding == "same":
            total = max((-(-size // s) - 1) * s + e - size, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((e - 1, 0))
        else:
            pads.append((0, 0))
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(xp.shape[1 + i] - eff[i]) // strides[i] + 1 for i in range(len(ks))]
    y = np.zeros((x.shape[0], *out, w.shape[-1]))
    for k in np.ndindex(*ks):
        sl = tuple(slice(k[i] * dilation[i], k[i] * dilation[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(len(ks)))
        y += xp[(slice(None), *sl, slice(None))] @ w[k]
    return y


CASES = {
    "conv1d_causal_dilated": (keras.layers.Conv1D, dict(kernel_size=3, dilation_rate=2, padding="causal"), (2, 11, 3)),
    "conv2d_dilated_same": (keras.layers.Conv2D, dict(kernel_size=3, dilation_rate=2, padding="same"), (2, 9, 9, 3)),
    "conv2d_strided_valid": (keras.layers.Conv2D, dict(kernel_size=(3, 2), strides=2), (2, 9, 8, 3)),
    "conv3d_dilated": (keras.layers.Conv3D, dict(kernel_size=2, dilation_rate=(1, 2, 1)), (2, 5, 6, 4, 2)),
    "conv2d_channels_first": (keras.layers.Conv2D, dict(kernel_size=3, dilation_rate=2, padding="same",
                                                        data_format="channels_first"), (2, 3, 9, 9)),
}


def _base(case, filters=5, seed=3, **extra):
    cls, kwargs, shape = CASES[case]
    conv = cls(filters, **kwargs, **extra)
    conv.build((None, *shape[1:]))
    conv.kernel.assign(_rand(*conv.kernel.shape, seed=seed))
    if conv.use_bias:
        conv.bias.assign(_rand(filters, seed=seed + 1))
    return conv, shape


def _reference(conv, kernel, x):
    channels_first = conv.data_format == "channels_first"
    xl = np.moveaxis(x, 1, -1) if channels_first else x
    y = np_conv(xl, kernel, conv.strides, conv.padding, conv.dilation_rate) + conv.bias.numpy()
    return np.moveaxis(y, -1, 1) if channels_first else y


@pytest.mark.parametrize("case", list(CASES))
def test_conv_matches_numpy_merged_kernel(case):
    conv, shape = _base(case)
    x = _rand(*shape, seed=7)
    if conv.data_format == "channels_first":
        try:
            conv(x)
        except tf.errors.UnimplementedError as e:
            # TensorFlow's CPU Conv2D runs NCHW only through oneDNN, which it turns on by default only
            # on CPUs with AVX512 (VNNI/BF16/AMX); elsewhere Keras' own channels_first Conv2D fails too.
            why = next((line for line in str(e).splitlines() if "format" in line), str(e).splitlines()[0])
            pytest.skip(f"this CPU's TensorFlow has no channels_first convolution: {why.strip()[:200]}")
    layer = getattr(tf_lora, "LoRA" + type(conv).__name__).from_layer(conv, rank=2, alpha=4)
    assert layer.lora_a.shape == (*conv.kernel_size, shape[1 if conv.data_format == "channels_first" else -1], 2)
    assert layer.lora_b.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(conv(x)))  # equal to the base at init
    layer.lora_b.assign(_rand(2, 5, seed=2))
    kernel = conv.kernel.numpy() + 2.0 * np.tensordot(layer.lora_a.numpy(), layer.lora_b.numpy(), axes=1)
    np.testing.assert_allclose(layer.merged_kernel(), kernel, rtol=1e-5, atol=1e-5)
    expected = _reference(conv, kernel, x)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=TOL, atol=TOL)
    # Unmerged == merged in place == the plain layer (the dilation is in lora_a too).
    plain = layer.to_base_layer()
    assert type(plain) is type(conv) and plain.name == conv.name
    np.testing.assert_allclose(np.asarray(plain(x)), expected, rtol=TOL, atol=TOL)
    layer.merge()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=TOL, atol=TOL)
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), conv.kernel.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,input_shape,output_shape", [
    (tf_lora.LoRAConv1D, (4, 7, 3), (4, 7, 5)),
    (tf_lora.LoRAConv2D, (4, 6, 6, 3), (4, 6, 6, 5)),
    (tf_lora.LoRAConv3D, (4, 4, 4, 4, 2), (4, 4, 4, 4, 5)),
], ids=["conv1d", "conv2d", "conv3d"])
def test_layer_harness_conv(cls, input_shape, output_shape):
    run_layer_test(lambda: cls(5, 3, padding="same", activation="relu", rank=2, alpha=4, dropout=0.1),
                   input_shape=input_shape, expected_output_shape=output_shape,
                   expected_num_trainable_weights=2, expected_num_non_trainable_weights=2)


def test_layer_harness_qlora_conv():
    run_layer_test(lambda: tf_lora.QLoRAConv2D.from_layer(_base("conv2d_dilated_same")[0], quantization=tf_lora.QLoRAConfig(group_size=16), rank=2),
                   input_shape=(4, 9, 9, 3), expected_output_shape=(4, 9, 9, 5),
                   expected_num_trainable_weights=2, expected_num_non_trainable_weights=5, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fake_quant", [False, True], ids=["nf4_storage", "fake_quant"])
def test_qlora_conv_matches_dequantized_kernel(fake_quant):
    conv, shape = _base("conv2d_dilated_same")
    cfg = tf_lora.QLoRAConfig(group_size=16, fake_quant=fake_quant)
    layer = tf_lora.QLoRAConv2D.from_layer(conv, quantization=cfg, rank=2, alpha=4)
    x = _rand(*shape, seed=7)
    dequantized = np.asarray(nf4.dequantize(nf4.quantize(conv.kernel.numpy(), 16)))
    np.testing.assert_allclose(layer.base_kernel_value(), dequantized, rtol=1e-6, atol=1e-6)
    layer.lora_b.assign(_rand(2, 5, seed=2))
    kernel = dequantized + 2.0 * np.tensordot(layer.lora_a.numpy(), layer.lora_b.numpy(), axes=1)
    expected = _reference(conv, kernel, x)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(layer.to_base_layer()(x)), expected, rtol=TOL, atol=TOL)
    if fake_quant:
        layer.merge()
        np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=TOL, atol=TOL)
    else:
        with pytest.raises(NotImplementedError, match="NF4"):
            layer.merge()


# -- bad input ----------------------------------------------------------------------------
def _model(*layers, shape=(8, 8, 4)):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def test_groups_raise_not_implemented():
    grouped = keras.layers.Conv2D(4, 3, groups=2, name="grouped")
    model = _model(grouped)
    with pytest.raises(NotImplementedError, match="groups"):
        tf_lora.LoRAConv2D.from_layer(grouped)
    with pytest.raises(NotImplementedError, match="groups"):
        tf_lora.LoRAConv2D(4, 3, groups=2)
    kernel = grouped.kernel.numpy().copy()
    with pytest.raises(NotImplementedError, match="groups"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(target_modules=["grouped"]))
    with pytest.raises(NotImplementedError, match="groups"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(target_modules=["grouped"]), inplace=True)
    assert model.get_layer("grouped") is grouped and type(grouped) is keras.layers.Conv2D
    np.testing.assert_array_equal(grouped.kernel.numpy(), kernel)


@pytest.mark.parametrize("layer", [
    keras.layers.DepthwiseConv2D(3, name="target"),
    keras.layers.Conv2DTranspose(4, 3, name="target"),
    keras.layers.SeparableConv2D(4, 3, name="target"),
], ids=["depthwise", "transpose", "separable"])
def test_unsupported_conv_types(layer):
    model = _model(layer)
    with pytest.raises(ValueError, match="cannot adapt"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(target_modules="target"))
    with pytest.raises(TypeError, match="Conv2D"):
        tf_lora.LoRAConv2D.from_layer(layer)


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding="causal"), "padding"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(data_format="nhwc"), "data_format"),
    (dict(filters=0), "filters"),
], ids=["causal_2d", "zero_kernel", "bad_format", "zero_filters"])
def test_bad_constructor_values(kwargs, match):
    args = {"filters": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        tf_lora.LoRAConv2D(**args)


# -- frozen BatchNormalization ----------------------------------------------------------------
def test_frozen_batchnorm_keeps_moving_statistics(tmp_path):
    conv = keras.layers.Conv2D(6, 3, padding="same", name="conv")
    bn = keras.layers.BatchNormalization(name="bn")
    model = _model(conv, bn, keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
                   keras.layers.Dense(3, name="head"))
    x = _rand(4, 8, 8, 4, seed=1)
    bn_layer = model.get_layer("bn")
    bn_layer.moving_mean.assign(_rand(6, seed=2, scale=0.1))
    bn_layer.moving_variance.assign(np.full(6, 2.0, "float32"))
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=["conv"]))
    frozen_bn = adapted.get_layer("bn")
    assert not frozen_bn.trainable
    before = [v.numpy().copy() for v in frozen_bn.weights]
    # training=True still uses the moving statistics (inference mode): same as training=False.
    np.testing.assert_allclose(np.asarray(adapted(x, training=True)), np.asarray(adapted(x, training=False)), atol=1e-6)
    b_before = adapted.get_layer("conv").lora_b.numpy().copy()
    adapted.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    adapted.fit(x, _rand(4, 3, seed=3), epochs=2, batch_size=2, verbose=0)
    for b, v in zip(before, frozen_bn.weights):
        np.testing.assert_array_equal(b, v.numpy(), err_msg=v.name)  # gamma, beta, moving mean / variance
    assert not np.array_equal(b_before, adapted.get_layer("conv").lora_b.numpy())
    # The adapter file round trip and a second adapter on the conv layer.
    path = os.path.join(tmp_path, "conv.adapter")
    tf_lora.save_adapter(adapted, path)
    out = np.asarray(adapted(x))
    tf_lora.add_adapter(adapted, "other", tf_lora.LoRAConfig(rank=3, target_modules=["conv"]))
    tf_lora.set_adapter(adapted, "other")
    np.testing.assert_allclose(np.asarray(adapted(x)), np.asarray(model(x)), atol=1e-6)  # zero lora_b
    tf_lora.set_adapter(adapted, "default")
    adapted.get_layer("conv").lora_b.assign(np.zeros((2, 6), "float32"))
    tf_lora.load_adapter(adapted, path)
    np.testing.assert_allclose(np.asarray(adapted(x)), out, atol=1e-6)
    # .keras round trip.
    adapted.save(os.path.join(tmp_path, "m.keras"))
    loaded = keras.models.load_model(os.path.join(tmp_path, "m.keras"))
    assert isinstance(loaded.get_layer("conv"), tf_lora.LoRAConv2D)
    np.testing.assert_allclose(np.asarray(loaded(x)), out, atol=1e-6)


# -- real models nobody here wrote ------------------------------------------------------------
APPLICATIONS = {
    # (constructor, target_modules regex matching exactly the Conv2D layers)
    "resnet50": (keras.applications.ResNet50, r".*_conv"),
    "mobilenet_v2": (keras.applications.MobileNetV2, r"Conv1|Conv_1|.*_expand|.*_project"),
}


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_keras_applications_conv2d(name):
    build, targets = APPLICATIONS[name]
    base = build(weights=None, input_shape=(32, 32, 3), classes=4, classifier_activation=None)
    x = _rand(2, 32, 32, 3, seed=0)
    y_base = np.asarray(base(x))
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, alpha=4, target_modules=targets), inplace=True)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    adapted = [layer for layer in model.layers if isinstance(layer, tf_lora.LoRAConv2D)]
    assert not convs and len(adapted) == {"resnet50": 53, "mobilenet_v2": 35}[name]
    np.testing.assert_array_equal(np.asarray(model(x)), y_base)  # equal to the base at init
    # One fit step (eager: tracing ResNet50's train step costs ~30 s here) trains only adapters.
    frozen = [(v.path, v.numpy().copy()) for v in model.weights if not v.name.startswith("lora_")]
    b_before = [layer.lora_b.numpy().copy() for layer in adapted]
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    model.fit(x, np.array([0, 3]), batch_size=2, verbose=0)
    weights = {v.path: v for v in model.weights}
    for path, value in frozen:  # every base weight, BatchNormalization's moving statistics included
        np.testing.assert_array_equal(value, weights[path].numpy(), err_msg=path)
    assert any(not np.array_equal(b, layer.lora_b.numpy()) for b, layer in zip(b_before, adapted))
    # Merge equal, with random adapters of a visible size.
    rng = np.random.default_rng(1)
    for layer in adapted:
        layer.lora_b.assign((0.02 * rng.standard_normal(layer.lora_b.shape)).astype("float32"))
    y = np.asarray(model(x))
    # The adapters do change the outputs. (With weights=None MobileNetV2's signal decays to ~1e-12 at the
    # logits; float32 rounding is relative, so the checks here are relative to the output scale.)
    assert np.abs(y - y_base).max() > 1e-2 * np.abs(y_base).max()
    merged = tf_lora.merge(model)
    assert not any(isinstance(layer, tf_lora.LoRALayer) for layer in merged.layers)
    np.testing.assert_allclose(np.asarray(merged(x)), y, rtol=0, atol=1e-5 * np.abs(y).max())
