"""Gradient accumulation with tf_lora's trainer: `gradient_accumulation_steps=k` on batches
of n gives the adapter one step on the k*n batch gives (Keras averages the k gradients;
the losses are means over the batch). Tolerance 1e-6 (float32 sums in another order)."""

import keras
import numpy as np
import pytest

import tf_lora
from models import mha_classifier

rng = np.random.default_rng(0)
X = rng.standard_normal((16, 6, 8)).astype("float32")
Y = rng.integers(0, 3, 16)


def _adapted(optimizer):
    keras.utils.set_random_seed(0)
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query", "value", "ffn"),
                                                                modules_to_save=("classifier",)))
    for i, v in enumerate(model.lora_variables):
        v.assign(np.random.default_rng(i).normal(0, 0.2, v.shape).astype("float32"))
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("make", [lambda **k: keras.optimizers.SGD(0.1, **k), lambda **k: keras.optimizers.Adam(1e-2, **k)],
                         ids=["sgd", "adam"])
def test_accumulated_steps_equal_one_big_batch(make):
    accumulated = _adapted(make(gradient_accumulation_steps=4))
    big = _adapted(make())
    accumulated.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0)  # 4 micro-batches -> 1 update per epoch
    big.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    start = _adapted(make())
    moved = False
    for a, b, s in zip(accumulated.lora_variables, big.lora_variables, start.lora_variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=a.path)
        moved |= not np.allclose(np.asarray(a), np.asarray(s))
    assert moved
    np.testing.assert_allclose(np.asarray(accumulated(X)), np.asarray(big(X)), atol=1e-5)
