"""Regression tests for issue 21, items 7, 12 and 13: what `_compat.become` and an
in-place `adapt` leave behind.

7: a layer replaced by `become` keeps Keras' per-instance `build`/`quantize` closures of
   the object it replaced, so `merge(model).quantize("int8")` skipped the merged layers.
12: `adapt(inplace=True)` failing half-way left some layers adapted (and refused a retry).
13: replaced layers lost their parent's variable-path prefix (duplicate paths,
   `get_state_tree()` raising).
"""

import importlib
import json
import os
import subprocess
import sys

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


# ------------------------------------------------------------------ in place without a second copy
# adapt(inplace=True) with float adapters adopts each target's base variables (kernel or table,
# bias) instead of copying them, so the journal that undoes a failure holds no second copy.
def _base_names(layer):
    return [n for n in ("kernel", "bias", "embeddings", "reverse_embeddings")
            if isinstance(getattr(layer, n, None), keras.Variable)]


def _one_layer_model(kind):
    """A model around one target layer named 'target' (with a kernel regularizer and constraint
    where the layer takes them), its input batch, and the target."""
    reg, con = keras.regularizers.L2(0.01), keras.constraints.MaxNorm(3.0)
    rng = np.random.default_rng(3)
    if kind in ("embedding", "reversible_untied"):
        inputs = keras.Input((5,), dtype="int32")
        if kind == "embedding":
            layer = keras.layers.Embedding(12, 6, embeddings_regularizer=reg, embeddings_constraint=con, name="target")
        else:
            layer = keras.layers.ReversibleEmbedding(12, 6, tie_weights=False, name="target")
        hidden = layer(inputs)
        outputs = layer(hidden, reverse=True) if kind == "reversible_untied" else hidden
        x = rng.integers(0, 12, (3, 5)).astype("int32")
    elif kind == "conv":
        inputs = keras.Input((7, 7, 3))
        layer = keras.layers.Conv2D(4, 3, kernel_regularizer=reg, kernel_constraint=con, name="target")
        outputs, x = layer(inputs), rng.standard_normal((2, 7, 7, 3)).astype("float32")
    elif kind == "einsum":
        inputs = keras.Input((5, 8))
        layer = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="de", kernel_regularizer=reg,
                                         name="target")
        outputs, x = layer(inputs), rng.standard_normal((2, 5, 8)).astype("float32")
    else:
        inputs = keras.Input((8,))
        layer = keras.layers.Dense(6, kernel_regularizer=reg, kernel_constraint=con, name="target")
        outputs, x = layer(inputs), rng.standard_normal((4, 8)).astype("float32")
    return keras.Model(inputs, outputs), x, layer


def _settings(variables):
    return [(v.trainable, v.regularizer, v.constraint) for v in variables]


KINDS = ["dense", "einsum", "conv", "embedding", "reversible_untied"]


@pytest.mark.parametrize("kind", KINDS)
def test_inplace_float_adapter_adopts_the_base_variables(kind):
    model, x, layer = _one_layer_model(kind)
    names = _base_names(layer)
    originals = {n: getattr(layer, n) for n in names}
    paths, before = sorted(v.path for v in model.weights), _np(model(x))
    losses = [float(_np(t)) for t in model.losses]
    assert len(losses) == (0 if kind == "reversible_untied" else 1)
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("target",)), inplace=True, verbose=0)
    new = adapted.get_layer("target")
    assert isinstance(new, tf_lora.layers.base.LoRALayer)
    for n in names:  # the very variables, frozen, at their paths; nothing copied
        assert getattr(new, n) is originals[n], n
        assert not originals[n].trainable and originals[n].regularizer is None, n
    assert sorted(v.path for v in adapted.weights if not v.name.startswith("lora_")) == paths
    assert len({id(v) for v in adapted.weights}) == len(adapted.weights)
    assert sorted(v.name for v in adapted.trainable_variables) == ["lora_a", "lora_b"]
    np.testing.assert_allclose(_np(adapted(x)), before, rtol=1e-6, atol=1e-6)
    # the base weights' regularizers are counted once (by the adapter), as in the base model
    np.testing.assert_allclose([float(_np(t)) for t in adapted.losses], losses, rtol=1e-6)
    # trains only the adapter; the adopted base stays as it was
    kept = {n: _np(v).copy() for n, v in originals.items()}
    adapted.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    _set_lora_b(adapted)
    adapted.fit(x, np.ones_like(_np(adapted(x))), verbose=0)
    for n, v in originals.items():
        np.testing.assert_array_equal(_np(v), kept[n])


@pytest.mark.parametrize("kind", KINDS)
def test_inplace_failure_gives_adopted_variables_back(kind, monkeypatch):
    """A failure after the replacement restores the layer and its variables' own settings
    (trainable, regularizer, constraint): bit-identical outputs, same objects."""
    model, x, layer = _one_layer_model(kind)
    originals = {n: getattr(layer, n) for n in _base_names(layer)}
    own = list(layer.weights)
    settings, before, losses = _settings(own), _np(model(x)), [_np(t) for t in model.losses]

    def boom(*args, **kwargs):
        raise RuntimeError("simulated check failure")

    monkeypatch.setattr(surgery, "verify_adapted", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("target",)), inplace=True, verbose=0)
    restored = model.get_layer("target")
    assert restored is layer and not isinstance(layer, tf_lora.layers.base.LoRALayer)
    assert all(getattr(layer, n) is v for n, v in originals.items())
    assert [id(v) for v in layer.weights] == [id(v) for v in own] and _settings(own) == settings
    assert all(v.trainable for v in own)
    assert np.array_equal(_np(model(x)), before)
    assert [np.array_equal(_np(t), e) for t, e in zip(model.losses, losses)] == [True] * len(losses)


def test_adapter_build_failing_after_adopting_gives_the_variables_back(monkeypatch):
    """The second target's adapter fails after it has adopted (and frozen) its kernel and bias."""
    model = _two_branch_model()
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]
    real = tf_lora.LoRADense._init_from_source

    def failing(self, kernel, loftq_iter=1):
        if self.name == "value":
            assert self.kernel is kernels[1] and not kernels[1].trainable  # adopted, then the failure
            raise MemoryError("simulated")
        return real(self, kernel, loftq_iter)

    monkeypatch.setattr(tf_lora.LoRADense, "_init_from_source", failing)
    with pytest.raises(MemoryError, match="simulated"):
        tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")), inplace=True, verbose=0)
    _assert_unchanged(model, before, kernels)
    assert [v.trainable for v in model.weights] == [True] * 4


def test_copy_never_adopts_and_merging_it_leaves_the_original():
    model, x, layer = _one_layer_model("dense")
    kernel, before = layer.kernel, _np(layer.kernel).copy()
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("target",)), verbose=0)
    new = adapted.get_layer("target")
    assert new.kernel is not kernel and new.bias is not layer.bias
    assert kernel.trainable and kernel.regularizer is not None
    _set_lora_b(adapted)
    new.merge()  # an in-layer merge changes the copy's kernel only
    assert not np.array_equal(_np(new.kernel), before)
    np.testing.assert_array_equal(_np(kernel), before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inplace_base_rewriting_init_copies_and_restores_exactly(init, monkeypatch):
    """PiSSA/OLoRA overwrite the base with a residual: they get copies (the originals are kept
    until adapt returns), and a failure gives back the original values bit for bit."""
    model = _two_branch_model()
    before, kernels = _outputs(model), [model.get_layer(n).kernel for n in ("query", "value")]
    values = [_np(k).copy() for k in kernels]
    config = tf_lora.LoRAConfig(rank=2, init=init, target_modules=("query", "value"))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated check failure")

    monkeypatch.setattr(surgery, "verify_adapted", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        tf_lora.adapt(model, config, inplace=True, verbose=0)
    _assert_unchanged(model, before, kernels)
    for k, v in zip(kernels, values):
        np.testing.assert_array_equal(_np(k), v)
    monkeypatch.undo()
    adapted = tf_lora.adapt(model, config, inplace=True, verbose=0)
    residual = adapted.get_layer("query").kernel
    assert residual is not kernels[0] and not np.array_equal(_np(residual), values[0])


def test_a_variable_that_does_not_fit_is_copied():
    """A kernel the adapter's own could not stand for (here: overwrite_with_gradient) is copied;
    the bias is still adopted."""
    model = _two_branch_model()
    layer = model.get_layer("query")
    layer.kernel.overwrite_with_gradient = True
    kernel, bias, before = layer.kernel, layer.bias, _outputs(model)
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, target_modules=("query",)), inplace=True, verbose=0)
    new = adapted.get_layer("query")
    assert new.kernel is not kernel and not new.kernel.overwrite_with_gradient and new.bias is bias
    np.testing.assert_array_equal(_np(new.kernel), _np(kernel))
    np.testing.assert_allclose(_outputs(adapted)[0], before[0], rtol=1e-6, atol=1e-6)


# Peak memory of an in-place float LoRA adapt, measured in a fresh process (as in
# tests/test_adapt_memory.py): 12 Dense layers (1024 <-> 4096) hold F = 192 MiB of kernels.
MEMORY_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_adapt_memory as bench  # puts this checkout's tf_lora first on sys.path
import keras, numpy as np, tensorflow as tf
import tf_lora

keras.utils.set_random_seed(0)
inputs = keras.Input((1024,))
x = inputs
for i in range(6):
    x = keras.layers.Dense(4096, name=f"up_{i}")(x)
    x = keras.layers.Dense(1024, name=f"down_{i}")(x)
model = keras.Model(inputs, x)
kernels = [l.kernel for l in model.layers if isinstance(l, keras.layers.Dense)]
f_bytes = sum(int(np.prod(k.shape)) * 4 for k in kernels)
bench.settle()
alloc_before = bench._allocator_current()
if alloc_before is not None:
    tf.config.experimental.reset_memory_stats("CPU:0")
rss_before = bench.current_rss()
with bench.PeakRSS() as peak:
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=8, target_modules="all-linear"), inplace=True, verbose=0)
alloc_peak = None if alloc_before is None else tf.config.experimental.get_memory_info("CPU:0")["peak"] - alloc_before
layers = [l for l in adapted.layers if isinstance(l, tf_lora.LoRADense)]
print("RESULT " + json.dumps(dict(
    tf_lora=tf_lora.__file__, f_bytes=f_bytes, layers=len(layers), peak_method=peak.method,
    peak_increase=peak.peak - rss_before, allocator_peak_increase=alloc_peak,
    adopted=sum(l.kernel is k for l, k in zip(layers, kernels)))), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
@pytest.mark.parametrize("bfc", ["false", "true"], ids=["default_allocator", "bfc_allocator"])
def test_inplace_float_adapt_peak_memory_stays_below_a_copy_of_the_kernels(bfc):
    """Peak RSS increase during adapt(inplace=True) of float LoRA on 'all-linear' < 0.5 x F (and,
    with TensorFlow's BFC allocator, its peak of live bytes too); before adoption the journal kept
    every replaced kernel beside its adapter's copy (~1 x F). No time is asserted."""
    benchmarks = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CPU_ALLOCATOR_USE_BFC=bfc)
    proc = subprocess.run([sys.executable, "-c", MEMORY_WORKER, benchmarks], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    r = json.loads(lines[0].split(" ", 1)[1])
    assert os.path.samefile(os.path.dirname(r["tf_lora"]), os.path.dirname(tf_lora.__file__))
    f = r["f_bytes"]
    assert r["layers"] == 12 and f == 192 * 2**20
    alloc = r["allocator_peak_increase"]  # TensorFlow's count of live bytes, where its allocator keeps one
    summary = (f"F={f / 2**20:.0f} MiB, peak RSS +{r['peak_increase'] / f:.3f} x F ({r['peak_method']}), "
               f"allocator peak +{'n/a' if alloc is None else f'{alloc / f:.3f}'} x F, adopted {r['adopted']}/12")
    print(summary)
    assert r["peak_increase"] < 0.5 * f, summary
    assert (alloc is not None or bfc == "false") and (alloc is None or alloc < 0.5 * f), summary
