"""Adapter files, merge, and parameter counts."""

import os
from unittest import mock

import keras
import numpy as np
import pytest

import tf_lora
from models import mha_classifier, sequential_mlp
from tf_lora.adapt import walk
from tf_lora.layers.lora import LoRALayer


def _trained(rank=2, seed=0, **kw):
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=rank, **kw))
    rng = np.random.default_rng(seed)
    for v in model.lora_variables:
        v.assign(rng.standard_normal(v.shape).astype("float32") * 0.1)
    return model


def _x(n=4):
    return np.random.default_rng(3).standard_normal((n, 6, 8)).astype("float32")


def _state(model):
    return [v.numpy().copy() for v in model.weights]


def _assert_unchanged(model, state):
    for before, v in zip(state, model.weights):
        np.testing.assert_array_equal(before, v.numpy())


def test_save_load_round_trip(tmp_path):
    model = _trained(modules_to_save=("classifier",))
    path = tmp_path / "task.adapter"
    size = tf_lora.save_adapter(model, str(path))
    assert size == path.stat().st_size
    other = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, modules_to_save=("classifier",)))
    # Same base weights: copy them so that only the adapter differs.
    for src, dst in zip(model.weights, other.weights):
        if not (src.name.startswith("lora_") or src.path.startswith("classifier")):
            dst.assign(src)
    tf_lora.load_adapter(other, str(path))
    np.testing.assert_array_equal(np.asarray(other(_x())), np.asarray(model(_x())))
    assert tf_lora.read_adapter_config(str(path)) == model.lora_config


def test_file_holds_only_adapter_weights_keyed_by_path(tmp_path):
    from safetensors.numpy import load_file

    model = _trained(modules_to_save=("classifier",))
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(model, path)
    keys = sorted(load_file(path))
    assert keys == sorted(
        [f"mha/{p}/lora_{ab}" for p in ("query", "key", "value") for ab in "ab"] + ["classifier/bias", "classifier/kernel"]
    )


def test_interrupted_save_keeps_previous_file(tmp_path):
    model = _trained()
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(model, path)
    original = open(path, "rb").read()
    other = _trained(seed=5)

    def fail_midway(fd, *a, **k):
        raise OSError("disk full")

    with mock.patch("os.fsync", side_effect=fail_midway):
        with pytest.raises(OSError, match="disk full"):
            tf_lora.save_adapter(other, path)
    assert open(path, "rb").read() == original
    assert sorted(os.listdir(tmp_path)) == ["a.adapter"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_adapter_file_mode_respects_umask(tmp_path, umask):
    # Like any file the process writes (open(), model.save): 0o666 & ~umask, not mkstemp's 0600.
    model = _trained()
    path = tmp_path / "a.adapter"
    previous = os.umask(umask)
    try:
        tf_lora.save_adapter(model, str(path))
        tf_lora.save_adapter(model, str(path))  # replacing an existing file too
    finally:
        os.umask(previous)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert sorted(os.listdir(tmp_path)) == ["a.adapter"]


@pytest.mark.parametrize(
    "case",
    ["different_rank", "different_architecture", "truncated", "corrupted", "missing", "not_an_adapter"],
)
def test_bad_adapter_files_leave_model_unchanged(tmp_path, case):
    model = _trained()
    path = str(tmp_path / "a.adapter")
    if case == "different_rank":
        tf_lora.save_adapter(_trained(rank=4), path)
        match = "rank"
    elif case == "different_architecture":
        tf_lora.save_adapter(tf_lora.adapt(sequential_mlp(), tf_lora.LoRAConfig(rank=2)), path)
        match = "architecture"
    elif case in ("truncated", "corrupted"):
        tf_lora.save_adapter(_trained(seed=9), path)
        data = open(path, "rb").read()
        data = data[: len(data) // 2] if case == "truncated" else data[:8] + b"\x00garbage" + data[16:]
        open(path, "wb").write(data)
        match = "truncated or corrupted"
    elif case == "not_an_adapter":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(3, "float32")}, path)
        match = "not a tf_lora adapter"
    else:
        path = str(tmp_path / "nope.adapter")
        match = "no adapter file"
    state = _state(model)
    error = FileNotFoundError if case == "missing" else ValueError
    with pytest.raises(error, match=match):
        tf_lora.load_adapter(model, path)
    _assert_unchanged(model, state)


@pytest.mark.parametrize(
    "file_kwargs,model_kwargs,match",
    [
        ({"alpha": 32}, {"alpha": 8}, r"`alpha`: file alpha=32.0, model alpha=8.0 \(layers \['mha/query', 'mha/key', 'mha/value'\]\)"),
        ({"use_rslora": True}, {}, r"`use_rslora`: file use_rslora=True, model use_rslora=False"),
        ({"alpha_pattern": {"query": 64}}, {}, r"`alpha`: file alpha=64.0, model alpha=32.0 \(layers \['mha/query'\]\)"),
        ({"rank_pattern": {"value": 4}}, {}, r"`rank`: file rank=4, model rank=2 \(layers \['mha/value'\]\)"),
    ],
    ids=["alpha", "use_rslora", "alpha_pattern", "rank_pattern"],
)
def test_load_adapter_checks_file_alpha(tmp_path, file_kwargs, model_kwargs, match):
    base = mha_classifier()
    source = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, dropout=0.0, **file_kwargs))
    rng = np.random.default_rng(0)
    for v in source.lora_variables:
        v.assign(rng.standard_normal(v.shape).astype("float32"))
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(source, path)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, dropout=0.0, **model_kwargs))
    state = _state(model)
    with pytest.raises(ValueError, match=match):
        tf_lora.load_adapter(model, path)
    _assert_unchanged(model, state)
    # The remedy the message names: adapt with the file's config, then it loads exactly.
    fitting = tf_lora.adapt(base, tf_lora.read_adapter_config(path))
    tf_lora.load_adapter(fitting, path)
    np.testing.assert_array_equal(np.asarray(fitting(_x())), np.asarray(source(_x())))


def test_file_without_config_loads_by_keys_and_shapes(tmp_path):
    # A plain Keras model holding adapter layers has no LoRAConfig to save or check.
    inputs = keras.Input((5,))
    model = keras.Model(inputs, tf_lora.LoRADense(3, rank=2, name="q")(inputs))
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(model, path)
    tf_lora.load_adapter(model, path)
    with pytest.raises(ValueError, match="holds no LoRAConfig"):
        tf_lora.read_adapter_config(path)


def test_load_into_merged_layer_raises(tmp_path):
    model = _trained()
    path = str(tmp_path / "a.adapter")
    tf_lora.save_adapter(model, path)
    model.get_layer("mha/query").merge()
    state = _state(model)
    with pytest.raises(ValueError, match="unmerge"):
        tf_lora.load_adapter(model, path)
    _assert_unchanged(model, state)


def test_save_to_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        tf_lora.save_adapter(_trained(), str(tmp_path / "no" / "a.adapter"))


def test_merge_returns_plain_keras_model_with_same_outputs():
    model = _trained(modules_to_save=("classifier",), target_modules="all-linear")
    merged = tf_lora.merge(model)
    assert not isinstance(merged, tf_lora.LoRAModel)
    assert not any(isinstance(l, LoRALayer) for _, l, _ in walk(merged))
    assert [l.name for l in merged.layers] == [l.name for l in model.layers]
    x = _x()
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    # The adapted model is unchanged by merge.
    assert isinstance(model.get_layer("mha/query"), tf_lora.LoRAEinsumDense)
    assert not model.get_layer("mha/query").merged
    # The merged kernel is base + scaling * A @ B (NumPy reference).
    layer = model.get_layer("ffn")
    expected = layer.kernel.numpy() + layer.scaling * layer.lora_a.numpy() @ layer.lora_b.numpy()
    np.testing.assert_allclose(merged.get_layer("ffn").kernel.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_merge_sequential():
    model = tf_lora.adapt(sequential_mlp(), tf_lora.LoRAConfig(rank=2))
    for v in model.lora_variables:
        v.assign(np.full(v.shape, 0.1, "float32"))
    x = np.random.default_rng(0).standard_normal((3, 5)).astype("float32")
    np.testing.assert_allclose(np.asarray(tf_lora.merge(model)(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_parameter_counts(capsys):
    base = mha_classifier()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2))
    counts = tf_lora.print_trainable_parameters(model)
    # q/k/v: lora_a (8, 2) + lora_b (2, 2, 4) each.
    expected_trainable = 3 * (8 * 2 + 2 * 2 * 4)
    assert counts.trainable == expected_trainable
    assert counts.total == base.count_params() + expected_trainable
    out = capsys.readouterr().out
    assert out.strip() == (
        f"trainable params: {expected_trainable:,d} || all params: {counts.total:,d} || "
        f"trainable%: {100 * expected_trainable / counts.total:.4f}"
    )
    assert tf_lora.count_parameters(model) == counts


@pytest.mark.parametrize("fn", ["save_adapter", "load_adapter", "merge"])
def test_functions_reject_non_models(fn, tmp_path):
    args = ("not a model", str(tmp_path / "x.adapter")) if fn != "merge" else ("not a model",)
    if fn == "load_adapter":
        tf_lora.save_adapter(_trained(), args[1])
    with pytest.raises(TypeError, match="model"):
        getattr(tf_lora, fn)(*args)
