"""tf_lora.distribute in one process: TF_CONFIG checks, the chief, and fit's
refusal of a model whose variables another strategy (or none) created. The
two-worker runs are in test_multiworker.py."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora import distribute
from models import mha_classifier

GOOD = {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, "task": {"type": "worker", "index": 1}}

BAD_TF_CONFIGS = [
    ("not_json", "{cluster: 1", "not JSON"),
    ("not_object", "[1, 2]", "not a JSON object"),
    ("no_cluster", json.dumps({"task": GOOD["task"]}), "cluster"),
    ("empty_worker_list", json.dumps({**GOOD, "cluster": {"worker": []}}), "non-empty list"),
    ("address_without_port", json.dumps({**GOOD, "cluster": {"worker": ["127.0.0.1", "127.0.0.1:2"]}}), "host:port"),
    ("port_out_of_range", json.dumps({**GOOD, "cluster": {"worker": ["h:70000", "h:2"]}}), "host:port"),
    ("duplicate_address", json.dumps({**GOOD, "cluster": {"worker": ["h:1", "h:1"]}}), "twice"),
    ("no_task", json.dumps({"cluster": GOOD["cluster"]}), "task"),
    ("unknown_type", json.dumps({**GOOD, "task": {"type": "chief", "index": 0}}), "not in the cluster"),
    ("index_out_of_range", json.dumps({**GOOD, "task": {"type": "worker", "index": 2}}), "index 2"),
    ("index_not_int", json.dumps({**GOOD, "task": {"type": "worker", "index": "0"}}), "index '0'"),
]


@pytest.mark.parametrize("raw,named", [c[1:] for c in BAD_TF_CONFIGS], ids=[c[0] for c in BAD_TF_CONFIGS])
def test_malformed_tf_config_is_named(monkeypatch, raw, named):
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ValueError, match="TF_CONFIG") as info:
        distribute.read_tf_config()
    assert named in str(info.value)
    with pytest.raises(ValueError, match="TF_CONFIG"):  # before TensorFlow sees it
        tf_lora.multi_worker_strategy()


def test_good_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(GOOD))
    assert distribute.read_tf_config() == GOOD
    monkeypatch.setenv("TF_CONFIG", "")
    assert distribute.read_tf_config() is None
    assert distribute.read_tf_config({"TF_CONFIG": json.dumps({**GOOD, "task": {"type": "evaluator", "index": 0}})})


def test_single_worker_is_chief(tmp_path):
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))
    assert tf_lora.is_chief() and tf_lora.is_chief(model) and tf_lora.is_chief(tf.distribute.get_strategy())
    assert tf_lora.save_adapter(model, str(tmp_path / "a.adapter")) == (tmp_path / "a.adapter").stat().st_size


def _fit(model):
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.zeros((4, 6, 8), "float32"), np.zeros(4, "int32"), verbose=0)


def test_fit_outside_the_strategy_that_made_the_variables_is_refused():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))  # outside the scope
    before = [v.numpy().copy() for v in model.weights]
    with strategy.scope():
        with pytest.raises(ValueError, match=r"strategy\.scope\(\)") as info:
            _fit(model)
    assert "MirroredStrategy" in str(info.value) and "tf_lora.adapt" in str(info.value)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))
    other = tf.distribute.MirroredStrategy(["/cpu:0"])
    with other.scope():
        inside = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2))
    inside.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="another MirroredStrategy"):
        distribute.check_fit_strategy(_with_strategy(inside, strategy))


def _with_strategy(model, strategy):
    from tf_lora import _compat

    _compat.set_model_strategy(model, strategy)
    return model


def test_fit_inside_the_scope_that_made_the_variables(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="query"), keras.layers.Dense(2, name="head")])
        model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2))
        model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 5), "float32"), np.ones((4, 2), "float32"), verbose=0)
    assert model.distribute_strategy is strategy
