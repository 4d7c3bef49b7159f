"""Robustness: a bad-input matrix across the public API, faults, a long run,
and property tests.

Every bad-input case asserts the error type, that the message names the
argument, and that the model and an existing adapter file are unchanged.
"""

import os
from unittest import mock

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_lora
from models import mha_classifier, sequential_mlp


@pytest.fixture(scope="module")
def adapted():
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0))
    rng = np.random.default_rng(0)
    for v in model.lora_variables:
        v.assign(rng.standard_normal(v.shape).astype("float32") * 0.1)
    return model


def _dense():
    d = keras.layers.Dense(3)
    d.build((None, 4))
    return d


def _wrong_rank_file(path):
    tf_lora.save_adapter(tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=3)), path)
    return path


BAD_INPUTS = [
    # (id, callable(model, adapter_path, tmp), error type, argument named in the message)
    ("config_rank_zero", lambda m, p, t: tf_lora.LoRAConfig(rank=0), ValueError, "rank"),
    ("config_rank_str", lambda m, p, t: tf_lora.LoRAConfig(rank="8"), TypeError, "rank"),
    ("config_alpha_negative", lambda m, p, t: tf_lora.LoRAConfig(alpha=-1), ValueError, "alpha"),
    ("config_dropout_too_large", lambda m, p, t: tf_lora.LoRAConfig(dropout=1.5), ValueError, "dropout"),
    ("config_unknown_init", lambda m, p, t: tf_lora.LoRAConfig(init="zeros"), ValueError, "init"),
    ("qconfig_bits", lambda m, p, t: tf_lora.QLoRAConfig(bits=3), NotImplementedError, "bits"),
    ("qconfig_group_size", lambda m, p, t: tf_lora.QLoRAConfig(group_size=-64), ValueError, "group_size"),
    ("qconfig_quant_type", lambda m, p, t: tf_lora.QLoRAConfig(quant_type="int4"), ValueError, "quant_type"),
    ("adapt_no_match", lambda m, p, t: tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(target_modules=("zzz",))), ValueError, "target_modules"),
    ("adapt_twice", lambda m, p, t: tf_lora.adapt(m, tf_lora.LoRAConfig()), ValueError, "already"),
    ("adapt_unbuilt", lambda m, p, t: tf_lora.adapt(keras.Sequential([keras.layers.Dense(2, name="query")]), tf_lora.LoRAConfig()), ValueError, "model"),
    ("adapt_config_type", lambda m, p, t: tf_lora.adapt(mha_classifier(), {"rank": 4}), TypeError, "config"),
    ("adapt_regex_layernorm", lambda m, p, t: tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(target_modules="query_norm")), ValueError, "target_modules"),
    ("save_path_type", lambda m, p, t: tf_lora.save_adapter(m, 42), TypeError, "path"),
    ("save_missing_folder", lambda m, p, t: tf_lora.save_adapter(m, os.path.join(t, "no", "x.adapter")), FileNotFoundError, "path"),
    ("save_not_a_model", lambda m, p, t: tf_lora.save_adapter("model", p), TypeError, "model"),
    ("save_unknown_adapter", lambda m, p, t: tf_lora.save_adapter(m, p, adapter_name="nope"), ValueError, "adapter_name"),
    ("load_missing_file", lambda m, p, t: tf_lora.load_adapter(m, os.path.join(t, "missing.adapter")), FileNotFoundError, "path"),
    ("load_wrong_rank", lambda m, p, t: tf_lora.load_adapter(m, _wrong_rank_file(os.path.join(t, "r3.adapter"))), ValueError, "rank"),
    ("load_other_architecture", lambda m, p, t: (tf_lora.save_adapter(tf_lora.adapt(sequential_mlp(), tf_lora.LoRAConfig()), os.path.join(t, "o.adapter")), tf_lora.load_adapter(m, os.path.join(t, "o.adapter"))), ValueError, "architecture"),
    ("merge_not_a_model", lambda m, p, t: tf_lora.merge(3), TypeError, "model"),
    ("set_adapter_unknown", lambda m, p, t: tf_lora.set_adapter(m, "nope"), ValueError, "adapter_name"),
    ("add_adapter_existing", lambda m, p, t: tf_lora.add_adapter(m, "default", tf_lora.LoRAConfig()), ValueError, "adapter_name"),
    ("from_layer_wrong_type", lambda m, p, t: tf_lora.LoRADense.from_layer(keras.layers.Conv1D(2, 3)), TypeError, "layer"),
    ("from_layer_rank", lambda m, p, t: tf_lora.LoRADense.from_layer(_dense(), rank=0), ValueError, "rank"),
    ("nf4_group_size", lambda m, p, t: tf_lora.nf4.quantize(np.ones((4, 4), "float32"), group_size=0), ValueError, "group_size"),
    ("nf4_nan", lambda m, p, t: tf_lora.nf4.quantize(np.full((4, 4), np.nan, "float32"), name="proj"), ValueError, "proj"),
    ("count_not_a_model", lambda m, p, t: tf_lora.count_parameters(None), TypeError, "model"),
]


@pytest.mark.parametrize("call,error,argument", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_matrix(adapted, tmp_path, call, error, argument):
    path = str(tmp_path / "existing.adapter")
    tf_lora.save_adapter(adapted, path)
    file_bytes = open(path, "rb").read()
    weights = [v.numpy().copy() for v in adapted.weights]
    names = list(adapted.adapter_names)
    with pytest.raises(error) as info:
        call(adapted, path, str(tmp_path))
    assert argument in str(info.value), str(info.value)
    assert open(path, "rb").read() == file_bytes
    assert adapted.adapter_names == names
    for before, v in zip(weights, adapted.weights):
        np.testing.assert_array_equal(before, v.numpy())


def test_interrupted_write_keeps_previous_file(adapted, tmp_path):
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(adapted, path)
    original = open(path, "rb").read()
    real_write = os.fdopen

    def half_write(fd, mode="r", *a, **k):
        f = real_write(fd, mode, *a, **k)
        orig = f.write

        def write(data):
            orig(data[: len(data) // 2])
            raise KeyboardInterrupt("killed mid-write")

        f.write = write
        return f

    with mock.patch("tf_lora.adapter_files.os.fdopen", side_effect=half_write):
        with pytest.raises(KeyboardInterrupt):
            tf_lora.save_adapter(adapted, path)
    assert open(path, "rb").read() == original
    assert os.listdir(tmp_path) == ["a.adapter"]


def test_model_checkpoint_resume_continues_from_saved_epoch(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 6, 8)).astype("float32"), rng.integers(0, 3, 32)

    def fresh():
        keras.utils.set_random_seed(7)
        model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, dropout=0.0))
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    straight = fresh()
    straight.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    ckpt = str(tmp_path / "ckpt.keras")
    first = fresh()
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(ckpt)])
    resumed = keras.models.load_model(ckpt)
    assert int(resumed.optimizer.iterations.numpy()) == 8  # 2 epochs x 4 steps
    resumed.fit(x, y, batch_size=8, epochs=4, initial_epoch=2, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations.numpy()) == 16
    for a, b in zip(straight.lora_variables, resumed.lora_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_long_run_no_retracing_no_memory_growth():
    import tensorflow as tf

    model = tf_lora.adapt(mha_classifier(seq=4, dim=8), tf_lora.LoRAConfig(rank=2, dropout=0.1))
    traces = []
    original = model.train_step

    def counting_step(data):
        traces.append(1)  # Python runs only while tracing
        return original(data)

    model.train_step = counting_step
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4000, 4, 8)).astype("float32"), rng.integers(0, 3, 4000)
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # warm up
    memory, trace_counts = [], []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch in (100, 999):
                memory.append(tf.config.experimental.get_memory_info("CPU:0")["current"])
                trace_counts.append(len(traces))

    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[Probe()])
    assert model.optimizer.iterations.numpy() == 1 + 1000
    assert trace_counts[0] == trace_counts[1], trace_counts  # no retracing during the long run
    assert len(traces) <= 3, traces  # warm-up batch size, then the long run's (relaxed) shape
    assert len(memory) == 2 and memory[1] - memory[0] < 1 << 20, memory


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_dim=st.integers(1, 9), units=st.integers(1, 9), rank=st.integers(1, 5),
    alpha=st.floats(0.5, 64.0), rslora=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_merge_unmerge_round_trip(in_dim, units, rank, alpha, rslora, seed):
    rng = np.random.default_rng(seed)
    base = keras.layers.Dense(units)
    base.build((None, in_dim))
    layer = tf_lora.LoRADense.from_layer(base, rank=rank, alpha=alpha, use_rslora=rslora)
    layer.lora_b.assign(rng.standard_normal(layer.lora_b.shape).astype("float32"))
    x = rng.standard_normal((3, in_dim)).astype("float32")
    kernel = layer.kernel.numpy().copy()
    unmerged = np.asarray(layer(x))
    layer.merge()
    tol = 1e-4 * (1 + np.abs(unmerged).max())
    np.testing.assert_allclose(np.asarray(layer(x)), unmerged, atol=tol)
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, atol=1e-5 * (1 + np.abs(layer.lora_delta()).max()))
    np.testing.assert_allclose(np.asarray(layer(x)), unmerged, atol=tol)


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rank=st.integers(1, 6), seed=st.integers(0, 2**16), targets=st.sampled_from([("query",), ("query", "value"), "all-linear"]))
def test_property_adapter_save_load_round_trip(save_dir, rank, seed, targets):
    base = sequential_mlp()
    config = tf_lora.LoRAConfig(rank=rank, target_modules=targets)
    model = tf_lora.adapt(base, config)
    rng = np.random.default_rng(seed)
    for v in model.lora_variables:
        v.assign(rng.standard_normal(v.shape).astype("float32"))
    path = str(save_dir / f"r{rank}_{seed}.adapter")
    tf_lora.save_adapter(model, path)
    other = tf_lora.adapt(base, config)
    tf_lora.load_adapter(other, path)
    for a, b in zip(model.lora_variables, other.lora_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert tf_lora.read_adapter_config(path) == config
