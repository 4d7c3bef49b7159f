"""Regression tests for issue 21, items 3, 4, 5, 9 and 10 (training-side correctness).

3: LoRA+ keeps the optimizer's weight-decay exclusions (set before or after wrapping).
4: a `modules_to_save` module trains exactly as when trained fully (BatchNorm in training mode).
5: the PEFT export of an added adapter writes the shared `modules_to_save` (live PEFT logits).
9: `disable_adapter` gives the base model's outputs, `modules_to_save` included.
10: DoRA under mixed_bfloat16 keeps the magnitude ratio and its ``- 1`` in float32.

Tolerances: weight decay exact (0 for an excluded variable, float32 rounding of ``1 - lr wd``
otherwise); full-training comparison 1e-6; PEFT logits 1e-4 (test_peft.py's ATOL); disabled
outputs vs base 1e-6; bfloat16 outputs within two bf16 rounding steps of a float32 NumPy reference.
"""

import json
import os

import keras
import numpy as np
import pytest

import tf_lora

# -- 3: LoRA+ and exclude_from_weight_decay ----------------------------------------------------------


def _decay_variables():
    return [keras.Variable(np.ones(3, "float32"), name=n) for n in ("kernel", "bias", "lora_b")]


@pytest.mark.parametrize("when", ["before_wrapping", "after_wrapping"])
@pytest.mark.parametrize("how", ["var_names", "var_list"])
def test_loraplus_keeps_weight_decay_exclusions(when, how):
    """With zero gradients AdamW only decays: ``v -= v * wd * lr`` (B: ``lr * ratio``); an
    excluded variable must not move at all, as with plain AdamW."""
    kernel, bias, lora_b = variables = _decay_variables()
    exclude = {"var_names": ["bias"]} if how == "var_names" else {"var_list": [bias]}
    opt = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    if when == "before_wrapping":
        opt.exclude_from_weight_decay(**exclude)
        plus = tf_lora.loraplus_optimizer(opt, lr_ratio=4.0)
    else:
        plus = tf_lora.loraplus_optimizer(opt, lr_ratio=4.0)
        plus.exclude_from_weight_decay(**exclude)
    plus.apply([np.zeros(3, "float32")] * 3, variables)
    np.testing.assert_array_equal(bias.numpy(), np.ones(3, "float32"))  # exactly 0 decay
    np.testing.assert_allclose(kernel.numpy(), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(lora_b.numpy(), 1 - 0.1 * 4.0 * 0.5, rtol=1e-6)


def test_loraplus_keeps_an_excluded_b_factor_undecayed():
    kernel, bias, lora_b = variables = _decay_variables()
    opt = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["lora_b"])
    plus = tf_lora.loraplus_optimizer(opt, lr_ratio=4.0)
    plus.apply([np.zeros(3, "float32")] * 3, variables)
    np.testing.assert_array_equal(lora_b.numpy(), np.ones(3, "float32"))
    np.testing.assert_allclose(bias.numpy(), 1 - 0.1 * 0.5, rtol=1e-6)


# -- 4: a saved module trains as when trained fully ----------------------------------------------------


def _head_model():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, name="query")(inputs)
    head = keras.Sequential([keras.layers.Dense(5, name="h1"), keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(2, name="h2")], name="head")
    return keras.Model(inputs, head(x), name="with_head")


def test_modules_to_save_batchnorm_trains_as_in_full_training():
    """The adapted model's LoRA stays zero (A = B = 0 get zero gradients), so its head must
    end up exactly as the head of the base trained with the projection frozen."""
    base = _head_model()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",), modules_to_save=("head",)))
    for v in model.lora_variables:
        if v.name.startswith("lora_"):
            v.assign(np.zeros(v.shape, "float32"))
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    base.get_layer("query").trainable = False  # the reference: the head trained fully
    for m in (model, base):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        m.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    head, ref = model.get_layer("head"), base.get_layer("head")
    assert [v.path for v in head.trainable_weights] == [v.path for v in ref.trainable_weights]
    assert len(head.non_trainable_weights) == 2  # the moving statistics stay non-trainable
    moved = np.max(np.abs(ref.get_layer("bn").moving_mean.numpy()))
    assert moved > 0.05  # full training moves the moving mean
    for ours, theirs in zip(head.weights, ref.weights):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6, err_msg=ours.path)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(base(x)), atol=1e-5)


# -- 10: DoRA under mixed_bfloat16 ----------------------------------------------------------------------


def _bf16_close(y, ref):
    """Within two bfloat16 rounding steps (2**-8 relative each) of a float32 value."""
    return np.abs(y - ref) <= 2 * 2.0 ** -8 * np.abs(ref) + 1e-6


def test_dora_mixed_bfloat16_keeps_the_ratio_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    inputs = keras.Input((64,))
    base = keras.Model(inputs, keras.layers.Dense(256, name="query")(inputs))
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=4, target_modules=("query",), use_dora=True))
    x = np.random.default_rng(0).normal(size=(1024, 64)).astype("float32")
    y_base = np.asarray(base(x), dtype=np.float32)
    y0 = np.asarray(model(x), dtype=np.float32)
    # At init (B = 0, m = ||W||) DoRA equals the base: no unit off by a bf16 step of m/n (0.4-0.8%).
    assert np.all(_bf16_close(y0, y_base))
    unit_shift = np.median(np.abs(y0 - y_base) / np.maximum(np.abs(y_base), 1e-3), axis=0)
    assert int(np.sum(unit_shift > 3e-3)) == 0
    layer = model.get_layer("query")
    magnitude = layer.lora_magnitude.numpy()
    layer.lora_magnitude.assign(magnitude * np.float32(1.002))
    y1 = np.asarray(model(x), dtype=np.float32)
    # float32 NumPy reference: bf16 inputs and kernel, the DoRA ratio m'/||W|| in float32.
    kernel = layer.kernel.numpy()
    bf16 = lambda a: np.asarray(keras.ops.cast(keras.ops.cast(a, "bfloat16"), "float32"))  # noqa: E731
    norm = np.sqrt(np.sum(np.square(kernel.astype(np.float64)), axis=0))
    ratio = (magnitude.astype(np.float64) * np.float32(1.002) / norm).astype(np.float32)
    ref = (bf16(x) @ bf16(kernel)) * ratio + layer.bias.numpy()
    assert np.all(_bf16_close(y1, ref))
    assert int(np.sum(np.all(y1 == y0, axis=0))) == 0  # every output unit moves


# -- 5: the PEFT export of an added adapter holds the shared modules_to_save --------------------------------

PEFT_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft", "llama")
PEFT_ATOL = 1e-4  # test_peft.py's tolerance for the default adapter's outputs vs PEFT's


def test_peft_export_of_an_added_adapter_writes_the_shared_head(tmp_path):
    torch = pytest.importorskip("torch", reason="the live PEFT test needs torch")
    peft = pytest.importorskip("peft", reason="the live PEFT test needs peft")
    transformers = pytest.importorskip("transformers", reason="the live PEFT test needs transformers")
    import keras_hub

    base_dir = os.path.join(PEFT_FIXTURES, "base")
    base = keras_hub.models.Llama3CausalLM(keras_hub.models.Llama3Backbone.from_preset(base_dir), preprocessor=None)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"),
                                                   modules_to_save=("token_embedding",)))
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=3, alpha=6, target_modules=("query", "value")))
    tf_lora.set_adapter(model, "b")
    rng = np.random.default_rng(1)
    for v in model.lora_variables:  # adapter b's factors and the shared, trained head
        v.assign(v.numpy() + rng.normal(0, 0.2 if "lora" in v.name else 0.05, v.shape).astype("float32"))
    directory = str(tmp_path / "b")
    tf_lora.save_adapter(model, directory, format="peft", adapter_name="b")
    with open(os.path.join(directory, "adapter_config.json")) as f:
        assert json.load(f)["modules_to_save"] == ["embed_tokens", "lm_head"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(hf, directory).eval()
    tokens = np.load(os.path.join(PEFT_FIXTURES, "ref.npz"))["tokens"]
    ours = np.asarray(model({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}, training=False))
    with torch.no_grad():
        theirs = loaded(input_ids=torch.tensor(tokens)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) <= PEFT_ATOL


# -- 9: disable_adapter switches modules_to_save to their originals --------------------------------------


def _trained_head_model():
    base = _head_model()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query",), modules_to_save=("head",)))
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    return base, model, x


def _check_disabled(model, x, y_base, y_trained):
    with tf_lora.disable_adapter(model):
        assert np.max(np.abs(np.asarray(model(x)) - y_base)) <= 1e-6
        assert np.max(np.abs(model.predict(x, verbose=0) - y_base)) <= 1e-6
        assert model.lora_variables == []  # nothing trains inside
    np.testing.assert_array_equal(np.asarray(model(x)), y_trained)  # the trained head is back


def test_disable_adapter_gives_the_base_outputs_with_modules_to_save(tmp_path):
    base, model, x = _trained_head_model()
    y_base, y_trained = np.asarray(base(x)), np.asarray(model(x))
    assert np.max(np.abs(y_trained - y_base)) > 0.1
    head = model.get_layer("head")
    n_weights = len(model.weights)
    _check_disabled(model, x, y_base, y_trained)
    with tf_lora.disable_adapter(model):  # nested: the inner exit leaves the originals in place
        with tf_lora.disable_adapter(model):
            pass
        assert np.max(np.abs(np.asarray(model(x)) - y_base)) <= 1e-6
    _check_disabled(model, x, y_base, y_trained)
    assert len(model.weights) == n_weights and head.get_layer("bn").trainable
    # The originals travel with the model's .keras file ...
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), y_trained)
    _check_disabled(loaded, x, y_base, y_trained)
    # ... and an adapter file holds the trained head, loaded onto a fresh adaptation of the base.
    tf_lora.save_adapter(model, str(tmp_path / "a.adapter"))
    fresh = tf_lora.adapt(base, model.lora_config)
    tf_lora.load_adapter(fresh, str(tmp_path / "a.adapter"))
    np.testing.assert_array_equal(np.asarray(fresh(x)), y_trained)
    _check_disabled(fresh, x, y_base, y_trained)
    # merge gives a plain model: no originals in it.
    merged = tf_lora.merge(model)
    np.testing.assert_allclose(np.asarray(merged(x)), y_trained, atol=1e-5)
    assert len(merged.weights) == len(base.weights)


def test_disable_adapter_restores_a_keras_hub_head():
    import keras_hub

    backbone = keras_hub.models.Llama3Backbone.from_preset(os.path.join(PEFT_FIXTURES, "base"))
    base = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"),
                                                   modules_to_save=("token_embedding",)))
    rng = np.random.default_rng(2)
    for v in model.lora_variables:
        v.assign(v.numpy() + rng.normal(0, 0.1, v.shape).astype("float32"))
    tokens = np.load(os.path.join(PEFT_FIXTURES, "ref.npz"))["tokens"]
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    y_base, y_trained = np.asarray(base(x)), np.asarray(model(x))
    assert np.max(np.abs(y_trained - y_base)) > 0.1
    _check_disabled(model, x, y_base, y_trained)
    merged = tf_lora.merge(model)
    assert type(merged) is type(base) and len(merged.weights) == len(base.weights)


def test_a_model_file_without_the_originals_loads_and_disable_adapter_refuses(tmp_path, monkeypatch):
    """A .keras file from before the originals were kept: the model loads and computes as saved;
    disable_adapter, which cannot know the base head, raises and changes nothing."""
    from tf_lora import train

    _, model, x = _trained_head_model()
    y_trained = np.asarray(model(x))
    path = str(tmp_path / "old.keras")
    with monkeypatch.context() as m:
        m.setattr(train._Originals, "to_save", lambda self: {})
        model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), y_trained)
    with pytest.raises(ValueError, match="original `modules_to_save`"):
        with tf_lora.disable_adapter(loaded):
            pass
    assert loaded.active_adapter == "default"
    np.testing.assert_array_equal(np.asarray(loaded(x)), y_trained)
