"""adapt() on KerasHub Backbones and Tasks: same class, generate, fit, merge, saving, in place.

One parametrized test per architecture (BERT, GPT-2, Gemma, Llama3, Qwen, Mistral,
built small from config) and mode (LoRA, QLoRA). Tolerances: LoRA at init equals
the base to 1e-6 (float32 rounding of an added zero); QLoRA at init equals its
own merge (the dequantized base) to 1e-5; a merged model equals the adapted one
to 1e-5; a reloaded model equals the saved one exactly.
"""

import os

import keras
import numpy as np
import pytest

import tf_lora
from hub_models import FACTORIES, M, compile_greedy, inputs, labels, prompt
from tf_lora.adapt import walk
from tf_lora.layers.lora import LoRALayer

QUANT = {"lora": None, "qlora": tf_lora.QLoRAConfig()}


def _out(model, x):
    return np.asarray(model(x, training=False))


def _snapshot(model):
    return [v.numpy().copy() for v in model.weights]


def _adapter_paths(model):
    return sorted(p for p, layer, _ in walk(model) if isinstance(layer, LoRALayer))


@pytest.mark.parametrize("quant", list(QUANT), ids=list(QUANT))
@pytest.mark.parametrize("arch", list(FACTORIES), ids=list(FACTORIES))
def test_adapt_keeps_class_and_everything_works(arch, quant, tmp_path):
    base = FACTORIES[arch]()
    x, y = inputs(base), None
    y = labels(base, x)
    expected = _out(base, x)
    before = _snapshot(base)
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, target_modules=("query", "value"), quantization=QUANT[quant])

    model = tf_lora.adapt(base, config)
    assert isinstance(model, type(base)) and isinstance(model, tf_lora.AdaptedModel)
    assert model.backbone is not base.backbone
    paths = _adapter_paths(model)
    assert paths and all(p.rsplit("/", 1)[-1] in ("query", "value", "_query_dense", "_value_dense") for p in paths), paths
    # Equal outputs at init.
    if quant == "lora":
        np.testing.assert_allclose(_out(model, x), expected, atol=1e-6)
    else:
        np.testing.assert_allclose(_out(model, x), _out(tf_lora.merge(model), x), atol=1e-5)
        assert np.max(np.abs(_out(model, x) - expected)) < 0.5 * np.max(np.abs(expected))

    # One fit step changes the adapters only; the optimizer holds state for them alone.
    compile_greedy(model)
    weights = _snapshot(model)
    model.fit(x, y, epochs=2, batch_size=len(y), verbose=0)
    trained = {id(v) for v in model.trainable_variables}
    assert trained and all(v.name.startswith("lora_") for v in model.trainable_variables)
    for w, v in zip(weights, model.weights):
        if id(v) not in trained:
            np.testing.assert_array_equal(w, v.numpy(), err_msg=v.path)
    assert any(not np.array_equal(w, v.numpy()) for w, v in zip(weights, model.weights) if v.name == "lora_b")
    assert len(model.optimizer.variables) == 2 * len(trained) + 2

    # merge keeps the class and the outputs; greedy generation gives the same tokens.
    merged = tf_lora.merge(model)
    assert type(merged) is type(base) and not _adapter_paths(merged)
    np.testing.assert_allclose(_out(merged, x), _out(model, x), atol=1e-5)
    if isinstance(base, M.CausalLM):
        compile_greedy(merged)
        tokens = model.generate(prompt(), stop_token_ids=None)["token_ids"]
        np.testing.assert_array_equal(tokens, merged.generate(prompt(), stop_token_ids=None)["token_ids"])

    # .keras round trip: same class, adapters restored, same outputs.
    path = str(tmp_path / "adapted.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, type(base)) and _adapter_paths(loaded) == paths
    np.testing.assert_array_equal(_out(loaded, x), _out(model, x))

    # Adapter file round trip into a fresh adapt of the same base.
    tf_lora.save_adapter(model, str(tmp_path / "task.adapter"))
    fresh = tf_lora.adapt(base, config)
    tf_lora.load_adapter(fresh, str(tmp_path / "task.adapter"))
    np.testing.assert_allclose(_out(fresh, x), _out(model, x), atol=1e-6)

    # The original is untouched.
    assert not _adapter_paths(base)
    for w, v in zip(before, base.weights):
        np.testing.assert_array_equal(w, v.numpy())
    np.testing.assert_array_equal(_out(base, x), expected)

    # In place: the same object, adapted, computing what a copy adapted at init computes.
    at_init = _out(tf_lora.adapt(base, config), x)
    same = tf_lora.adapt(base, config, inplace=True)
    assert same is base and _adapter_paths(base) == paths
    np.testing.assert_allclose(_out(base, x), at_init, atol=1e-6)


def test_multi_adapter_counts_and_memory_report_on_a_causal_lm(capsys):
    base = FACTORIES["gemma"]()
    x = inputs(base)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules="all-linear", quantization=tf_lora.QLoRAConfig()))
    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=4, target_modules=("query",)))
    tf_lora.set_adapter(model, "task_b")
    assert model.active_adapter == "task_b" and isinstance(model, M.GemmaCausalLM)
    assert {v.path.split("/")[-1] for v in model.trainable_variables} == {"lora_a_task_b", "lora_b_task_b"}
    for _, layer in model.adapter_layers():
        if "task_b" in layer.adapter_names:
            a, b = layer.adapter_variables("task_b")
            b.assign(np.ones(b.shape, "float32"))
    with tf_lora.disable_adapter(model):
        plain = _out(model, x)
    assert np.max(np.abs(_out(model, x) - plain)) > 1e-3
    counts = tf_lora.print_trainable_parameters(model)
    assert 0 < counts.trainable < counts.total and "trainable%" in capsys.readouterr().out
    report = tf_lora.memory_report(model)
    assert report["base_stored_bytes"] < 0.2 * report["base_float32_bytes"]


def test_chunked_attention_on_bert_and_gpt2():
    """In place; KerasHub decoders (here GPT-2) are covered in depth by test_long_context.py."""
    base = FACTORIES["bert"]()
    x = inputs(base)
    expected = _out(base, x)
    chunked = tf_lora.use_chunked_attention(base, query_chunk_size=4)
    assert chunked is base
    kinds = {type(layer).__name__ for _, layer, _ in walk(chunked)}
    assert "ChunkedAttention" in kinds and "MultiHeadAttention" not in kinds
    np.testing.assert_allclose(_out(chunked, x), expected, atol=1e-5)
    plain = FACTORIES["bert"]()
    adapted = tf_lora.adapt(plain, tf_lora.LoRAConfig(rank=2, attention="chunked"))
    assert isinstance(adapted, M.BertTextClassifier) and _adapter_paths(adapted)
    assert "ChunkedAttention" in {type(layer).__name__ for _, layer, _ in walk(adapted)}
    assert "ChunkedAttention" not in {type(layer).__name__ for _, layer, _ in walk(plain)}
    gpt2 = tf_lora.use_chunked_attention(FACTORIES["gpt2"]())
    assert "ChunkedCachedMultiHeadAttention" in {type(layer).__name__ for _, layer, _ in walk(gpt2)}


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("inplace_not_bool", TypeError, "inplace"),
        ("task_without_backbone", ValueError, "backbone"),
        ("no_match", ValueError, "Adaptable layer paths"),
        ("inplace_twice", ValueError, "already"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_leaves_the_model_unchanged(case, error, match):
    base = FACTORIES["gpt2"]()
    config = tf_lora.LoRAConfig(rank=2)
    kwargs = {}
    if case == "inplace_not_bool":
        kwargs = {"inplace": "yes"}
    elif case == "task_without_backbone":
        base.backbone = None
    elif case == "no_match":
        config = tf_lora.LoRAConfig(target_modules=("nothing_like_this",))
    elif case == "inplace_twice":
        tf_lora.adapt(base, config, inplace=True)
    before = _adapter_paths(base) if base.backbone is not None else []
    weights = _snapshot(base)
    with pytest.raises(error, match=match):
        tf_lora.adapt(base, config, **kwargs)
    assert (_adapter_paths(base) if base.backbone is not None else []) == before
    for w, v in zip(weights, base.weights):
        np.testing.assert_array_equal(w, v.numpy())
