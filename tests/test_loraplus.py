"""LoRA+ (`tf_lora.loraplus_optimizer`): B factors at lr * ratio, everything else unchanged.

References: SGD's update is exactly -lr * g (B: -lr * ratio * g), checked to float32
rounding (rtol 1e-6); Adam/AdamW are checked against two plain Keras optimizers, one per
variable group, with the learning rates LoRA+ prescribes (atol 1e-7)."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from models import mha_classifier

X = np.random.default_rng(0).standard_normal((4, 6, 8)).astype("float32")
Y = np.array([0, 1, 2, 1])


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, target_modules=("query", "value", "ffn")))
    rng = np.random.default_rng(seed)
    for v in model.lora_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    return model


def _grads(model):
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(Y, model(X))
    return variables, tape.gradient(loss, [v.value for v in variables])


def test_sgd_updates_are_minus_lr_ratio_g_for_b_and_minus_lr_g_for_a():
    model = _model()
    variables, grads = _grads(model)
    before = [v.numpy().copy() for v in variables]
    opt = tf_lora.loraplus_optimizer(keras.optimizers.SGD(0.1), lr_ratio=16.0)
    opt.apply(grads, variables)
    names = [v.name for v in variables]
    assert sorted(set(names)) == ["lora_a", "lora_b"] and names.count("lora_b") == 3
    for v, g, b in zip(variables, grads, before):
        ratio = 16.0 if v.name == "lora_b" else 1.0
        np.testing.assert_allclose(v.numpy() - b, -0.1 * ratio * g.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs", [(keras.optimizers.Adam, {}), (keras.optimizers.AdamW, {"weight_decay": 0.1})],
                         ids=["adam", "adamw_decay"])
def test_matches_two_plain_optimizers_with_the_loraplus_rates(cls, kwargs):
    model, reference = _model(), _model()
    plus = tf_lora.loraplus_optimizer(cls(1e-2, **kwargs), lr_ratio=4.0)
    ref_a, ref_b = cls(1e-2, **kwargs), cls(4e-2, **kwargs)
    for _ in range(3):
        variables, grads = _grads(model)
        plus.apply(grads, variables)
        ref_vars, ref_grads = _grads(reference)
        is_b = [v.name == "lora_b" for v in ref_vars]
        ref_a.apply([g for g, b in zip(ref_grads, is_b) if not b], [v for v, b in zip(ref_vars, is_b) if not b])
        ref_b.apply([g for g, b in zip(ref_grads, is_b) if b], [v for v, b in zip(ref_vars, is_b) if b])
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(v.numpy(), r.numpy(), atol=1e-7, rtol=1e-6)
    assert any(not np.allclose(v.numpy(), w.numpy()) for v, w in zip(model.trainable_variables, _model().trainable_variables))


def test_named_adapters_and_fit_with_schedule():
    model = _model()
    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=3, target_modules=("query",)))
    tf_lora.set_adapter(model, "task_b")
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    opt = tf_lora.loraplus_optimizer(keras.optimizers.Adam(schedule), lr_ratio=8)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, epochs=2, verbose=0)
    assert isinstance(model.optimizer, keras.optimizers.Adam) and type(model.optimizer).__name__ == "LoraPlusAdam"
    assert [v.name for v in model.trainable_variables] == ["lora_a_task_b", "lora_b_task_b"]
    assert len(opt._loraplus) == 1  # only lora_b_task_b gets the raised rate


def test_saved_model_with_loraplus_optimizer_loads_in_a_fresh_process(tmp_path):
    model = _model()
    model.compile(optimizer=tf_lora.loraplus_optimizer(keras.optimizers.AdamW(1e-3), lr_ratio=12.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, epochs=2, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "expected.npy", np.asarray(model(X)))
    script = textwrap.dedent(f"""
        import numpy as np, keras, tf_lora
        m = keras.models.load_model({path!r})
        assert type(m.optimizer).__name__ == "LoraPlusAdamW", type(m.optimizer)
        assert m.optimizer.lr_ratio == 12.5
        assert int(m.optimizer.iterations.numpy()) == 2, int(m.optimizer.iterations.numpy())
        x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype("float32")
        np.testing.assert_allclose(np.asarray(m(x)), np.load({str(tmp_path / "expected.npy")!r}), atol=1e-6)
        m.fit(x, np.array([0, 1, 2, 1]), epochs=1, verbose=0)
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("ratio", [0, -1.0, float("inf"), True, "16"], ids=["zero", "negative", "inf", "bool", "str"])
def test_bad_lr_ratio(ratio):
    with pytest.raises(ValueError, match="lr_ratio"):
        tf_lora.loraplus_optimizer(keras.optimizers.Adam(), lr_ratio=ratio)


def test_bad_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        tf_lora.loraplus_optimizer("adam")
    with pytest.raises(TypeError, match="optimizer"):
        tf_lora.loraplus_optimizer(keras.optimizers.Adam)
    built = keras.optimizers.Adam()
    built.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="optimizer"):
        tf_lora.loraplus_optimizer(built)
    with pytest.raises(ValueError, match="already"):
        tf_lora.loraplus_optimizer(tf_lora.loraplus_optimizer(keras.optimizers.SGD()))
