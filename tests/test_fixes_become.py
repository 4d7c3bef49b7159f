"""Regression tests for issue 21, items 7, 12 and 13: what `_compat.become` and an
in-place `adapt` leave behind.

7: a layer replaced by `become` keeps Keras' per-instance `build`/`quantize` closures of
   the object it replaced, so `merge(model).quantize("int8")` skipped the merged layers.
12: `adapt(inplace=True)` failing half-way left some layers adapted (and refused a retry).
13: replaced layers lost their parent's variable-path prefix (duplicate paths,
   `get_state_tree()` raising).
"""

import importlib

import hub_models
import keras
import numpy as np
import pytest
from models import mha_classifier

import tf_lora
from tf_lora import surgery
from tf_lora.adapt import _select

adapt_module = importlib.import_module("tf_lora.adapt")  # the module (tf_lora.adapt is the function)

X = np.random.default_rng(0).standard_normal((4, 6, 8)).astype("float32")


def _set_lora_b(model, value=0.05, seed=1):
    """A 'trained' adapter: nonzero lora_b (at init the update is zero)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        if v.name.startswith("lora_b"):
            v.assign(rng.standard_normal(tuple(v.shape)).astype("float32") * value)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


# ------------------------------------------------------------------ item 7: quantize after merge
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_merged_model_quantizes_every_layer_int8(inplace):
    base = mha_classifier()
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value", "ffn")),
                          inplace=inplace, verbose=0)
    _set_lora_b(model)
    merged = tf_lora.merge(model)
    float_out = _np(merged(X))
    # The int8 reference: the same architecture built fresh by Keras, same weights, quantized by Keras.
    reference = keras.models.clone_model(merged)
    reference.set_weights(merged.get_weights())
    reference.quantize("int8")
    merged.quantize("int8")
    names = ["query", "key", "value", "attention_output", "ffn", "classifier"]
    layers = {l.name: l for l in [*merged.get_layer("mha")._flatten_layers(include_self=False), *merged.layers]}
    for name in names:
        layer = layers[name]
        assert layer.quantization_mode == "int8", name
        assert str(layer._kernel.dtype) == "int8", name
    got, expected = _np(merged(X)), _np(reference(X))
    assert np.max(np.abs(got - expected)) <= 1e-6
    # and int8 is close to the float merged model (not bit-equal: it is quantized)
    assert 0 < np.max(np.abs(got - float_out)) < 0.05 * np.max(np.abs(float_out))


def test_become_rebinds_build_and_quantize_to_the_replaced_object():
    from tf_lora import _compat

    old, new = keras.layers.Dense(3, name="d"), keras.layers.Dense(3, name="d")
    old.build((None, 2)), new.build((None, 2))
    _compat.become(old, new)
    # Keras' Layer.__new__ wraps build/quantize in closures over the instance: they must act on `old`.
    old.quantize("int8")
    assert old.quantization_mode == "int8" and str(old._kernel.dtype) == "int8"
    assert old.build.__wrapped__.__self__ is old


# ------------------------------------------------------------------ item 12: in-place failures
def _two_branch_model():
    """Two Dense targets on separate branches: 'query' (8 -> 16) then 'value' (8 -> 2)."""
    inputs = keras.Input((8,), name="x")
    a = keras.layers.Dense(16, name="query")(inputs)
    b = keras.layers.Dense(2, name="value")(inputs)
    return keras.Model(inputs, [a, b], name="two_branch")


X2 = np.random.default_rng(2).standard_normal((5, 8)).astype("float32")


def _outputs(model):
    return [_np(t) for t in model(X2)]


def _assert_unchanged(model, before, kernels):
    after = _outputs(model)
    for e, g in zip(before, after):  # bit-identical (max difference 0.0; NaN/Inf where they were)
        assert np.array_equal(e, g, equal_nan=True)
    assert [type(model.get_layer(n)) for n in ("query", "value")] == [keras.layers.Dense] * 2
    assert [model.get_layer(n).kernel for n in ("query", "value")] == kernels  # the same variables
    assert not isinstance(model, tf_lora.AdaptedModel)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inplace_rank_too_large_for_a_later_target_changes_nothing(init):
    model = _two_branch_model()
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]
    config = tf_lora.LoRAConfig(rank=4, init=init, target_modules=("query", "value"))
    with pytest.raises(ValueError, match=r"`rank`.*at most 2.*'value'"):
        tf_lora.adapt(model, config, inplace=True, verbose=0)
    _assert_unchanged(model, before, kernels)
    # a retry with a rank both layers allow works
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, init=init, target_modules=("query", "value")),
                            inplace=True, verbose=0)
    assert isinstance(adapted.get_layer("value"), tf_lora.LoRADense)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_inplace_qlora_non_finite_kernel_changes_nothing(bad):
    model = _two_branch_model()
    kernel = _np(model.get_layer("value").kernel).copy()
    kernel[3, 1] = bad
    model.get_layer("value").kernel.assign(kernel)
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]
    config = tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"), quantization=tf_lora.QLoRAConfig())
    with pytest.raises(ValueError, match=r"'value'.*1 NaN or Inf"):
        tf_lora.adapt(model, config, inplace=True, verbose=0)
    _assert_unchanged(model, before, kernels)
    kernel[3, 1] = 0.0
    model.get_layer("value").kernel.assign(kernel)
    adapted = tf_lora.adapt(model, config, inplace=True, verbose=0)
    assert isinstance(adapted.get_layer("value"), tf_lora.QLoRADense)


def test_pissa_non_finite_kernel_is_refused_before_any_change():
    model = _two_branch_model()
    kernel = _np(model.get_layer("value").kernel).copy()
    kernel[0, 0] = np.nan
    model.get_layer("value").kernel.assign(kernel)
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]
    with pytest.raises(ValueError, match=r"'value'.*NaN or Inf"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, init="pissa", target_modules=("query", "value")),
                      inplace=True, verbose=0)
    _assert_unchanged(model, before, kernels)


def test_inplace_unexpected_failure_restores_the_replaced_layers(monkeypatch):
    model = _two_branch_model()
    model.compile(optimizer="adam", loss="mse")
    model.fit(X2, [np.zeros((5, 16)), np.zeros((5, 2))], verbose=0)  # a built optimizer with state
    optimizer = model.optimizer
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]
    before_kernel = _np(kernels[0]).copy()
    real, calls = adapt_module.make_adapter, []

    def failing(layer, config, path):
        calls.append(path)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return real(layer, config, path)

    monkeypatch.setattr(adapt_module, "make_adapter", failing)
    config = tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"))
    with pytest.raises(MemoryError, match="simulated"):
        tf_lora.adapt(model, config, inplace=True, verbose=0)
    assert calls == ["query", "value"]  # the first layer had been replaced
    _assert_unchanged(model, before, kernels)
    assert model.optimizer is optimizer
    assert [v.trainable for v in model.weights] == [True] * 4
    model.fit(X2, [np.zeros((5, 16)), np.zeros((5, 2))], verbose=0)  # the restored model still trains
    assert not np.array_equal(_np(kernels[0]), before_kernel)
    monkeypatch.setattr(adapt_module, "make_adapter", real)
    before = _outputs(model)
    adapted = tf_lora.adapt(model, config, inplace=True, verbose=0)
    assert isinstance(adapted.get_layer("query"), tf_lora.LoRADense)
    np.testing.assert_array_equal(_outputs(adapted)[0], before[0])


def test_inplace_failure_after_replacement_restores_too(monkeypatch):
    """A failure after the last replacement (the post-replacement check) restores every layer."""
    model = _two_branch_model()
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]

    def boom(*args, **kwargs):
        raise RuntimeError("simulated check failure")

    monkeypatch.setattr(surgery, "verify_adapted", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")), inplace=True, verbose=0)
    _assert_unchanged(model, before, kernels)


def test_inplace_qlora_unexpected_failure_says_what_was_replaced(monkeypatch):
    """In-place QLoRA frees each float kernel as it goes, so a failure that no check foresaw
    cannot be undone: the error says so and names the replaced layers."""
    model = _two_branch_model()
    real, calls = adapt_module.make_adapter, []

    def failing(layer, config, path):
        calls.append(path)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return real(layer, config, path)

    monkeypatch.setattr(adapt_module, "make_adapter", failing)
    config = tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"), quantization=tf_lora.QLoRAConfig())
    with pytest.raises(MemoryError, match="simulated") as info:
        tf_lora.adapt(model, config, inplace=True, verbose=0)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "['query']" in notes and "reload" in notes


# ------------------------------------------------------------------ item 13: variable paths
def _paths(model):
    return [v.path for v in model.variables]  # weights and seed-generator states


def _check_paths(base_paths, model, replaced):
    """Base variables keep their paths; new ones sit under their layer's path; all unique."""
    paths = _paths(model)
    assert len(paths) == len(set(paths)), sorted(p for p in paths if paths.count(p) > 1)
    new = [p for p in paths if p not in base_paths]
    for p in new:
        assert any(p.startswith(layer_path + "/") for layer_path in replaced), p
    return new


def _layer_paths(base, config):
    """The variable-path prefix of each target (from its kernel: '<prefix>/kernel')."""
    targets, _ = _select(base, config)
    return [layer.kernel.path.rsplit("/", 1)[0] for layer in targets.values()]


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("make", ["mha", "gpt2", "gemma"])
def test_adapted_and_merged_models_keep_variable_paths(make, inplace, quantize):
    factory = {"mha": mha_classifier, "gpt2": hub_models.gpt2, "gemma": hub_models.gemma}[make]
    base = factory()
    x = X if make == "mha" else hub_models.inputs(base)
    base(x)
    base_paths = _paths(base)
    assert len(base_paths) == len(set(base_paths))
    config = tf_lora.LoRAConfig(rank=2, target_modules="all-linear",
                                quantization=tf_lora.QLoRAConfig() if quantize else None)
    replaced = _layer_paths(base, config)
    if make != "mha":  # the same layer names in several blocks: a lost prefix makes paths collide
        names = [p.rsplit("/", 1)[-1] for p in replaced]
        assert len(set(names)) < len(names)
    model = tf_lora.adapt(base, config, inplace=inplace, verbose=0)
    new = _check_paths(base_paths, model, replaced)
    assert {p.rsplit("/", 1)[-1] for p in new} >= {"lora_a", "lora_b"}
    if not quantize:  # every base variable is still there, at its path
        assert set(base_paths) <= set(_paths(model))
    else:  # only the quantized kernels are gone
        assert {p for p in base_paths if p not in set(_paths(model))} == {p + "/kernel" for p in replaced}
    model.compile(optimizer="adam", loss="mse")
    tree = model.get_state_tree()
    assert "lora_a" in str(tree["trainable_variables"])
    if not quantize:
        assert sorted(p for p, _ in _flat(tree["trainable_variables"])) == sorted(v.path for v in model.trainable_variables)
    merged = tf_lora.merge(model)
    assert sorted(_paths(merged)) == sorted(base_paths)
    merged.compile(optimizer="adam", loss="mse")
    merged.get_state_tree()


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def test_added_adapter_variables_sit_under_their_layer():
    base = hub_models.gpt2()
    base(hub_models.inputs(base))
    config = tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"))
    replaced = _layer_paths(base, config)
    model = tf_lora.adapt(base, config, verbose=0)
    tf_lora.add_adapter(model, "second", tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")))
    new = _check_paths(_paths(base), model, replaced)
    assert sum(p.endswith("/lora_a_second") for p in new) == len(replaced) == 4
    model.compile(optimizer="adam", loss="mse")
    model.get_state_tree()


def test_a_loaded_adapted_model_keeps_its_variable_paths(tmp_path):
    base = hub_models.gpt2()
    base(hub_models.inputs(base))
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")), verbose=0)
    model.save(tmp_path / "adapted.keras")
    loaded = keras.models.load_model(tmp_path / "adapted.keras")
    # (seed-generator states are auto-named per process, so compare the weights)
    assert sorted(v.path for v in loaded.weights) == sorted(v.path for v in model.weights)
    assert len(set(_paths(loaded))) == len(_paths(loaded))
    loaded.compile(optimizer="adam", loss="mse")
    loaded.get_state_tree()
