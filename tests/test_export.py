"""Export for serving: merged and unmerged adapted models as SavedModels."""

import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from models import mha_classifier


def _trained():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, modules_to_save=("classifier",)))
    rng = np.random.default_rng(0)
    for v in model.lora_variables:
        v.assign(rng.standard_normal(v.shape).astype("float32") * 0.1)
    return model


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_export_serves_identical_outputs(tmp_path, merged):
    model = _trained()
    x = np.random.default_rng(1).standard_normal((3, 6, 8)).astype("float32")
    expected = np.asarray(model(x))
    served = tf_lora.merge(model) if merged else model
    path = str(tmp_path / "serving")
    served.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    got = reloaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 if merged else 1e-6)


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_export_qlora_with_chunked_attention(tmp_path, merged):
    config = tf_lora.LoRAConfig(rank=2, quantization=tf_lora.QLoRAConfig(group_size=16), attention="chunked")
    model = tf_lora.adapt(mha_classifier(), config)
    for v in model.lora_variables:
        v.assign(np.full(v.shape, 0.05, "float32"))
    x = np.random.default_rng(2).standard_normal((2, 6, 8)).astype("float32")
    expected = np.asarray(model(x))
    served = tf_lora.merge(model) if merged else model
    path = str(tmp_path / "serving")
    served.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
    got = reloaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
