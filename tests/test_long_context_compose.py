"""Chunked attention and the chunked LM loss compose with QLoRA, the multi-adapter API,
MirroredStrategy, `jit_compile=True`, `mixed_bfloat16` and gradient checkpointing (issue 22).

Every test compares the chunked paths with the plain path on the same weights, on a
padded batch (row 1 padded from token 40 of 64), and shows that the chunked paths ran:
the train step's graph holds no (.., T, T) score or mask and no (tokens, vocab) logits
outside the chunked loops. Tolerances: loss and LoRA gradients within a relative 1e-5
(max |chunked - plain| / max |plain| per variable, float32); per-step `fit` losses
within a relative 1e-5; bfloat16 (8-bit mantissa, relative rounding 2^-8 ~ 4e-3 per
op) within a relative 1e-2 of the float32 plain loss; greedy tokens identical.
Models and helpers are test_long_context.py's (tiny Llama 3 and Gemma 2 with soft-caps).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import tf_lora
from tf_lora import _compat
from tf_lora.loss import _active
from test_long_context import (CHUNK, LM_VOCAB, LOSS_BUDGET, REL, T, _chunked_kinds, _lm, _lm_batch, _rel,
                               _top_level_shapes, _train_loss_and_grads)

ATTENTION_BUDGET = 4 * 4 * 2 * CHUNK * CHUNK  # batch 2 x 4 heads x 16 x 16 float32 tiles: 4 x 4 tiles at T=64
CHUNKED = dict(attention="chunked", max_attention_memory=ATTENTION_BUDGET, loss="chunked",
               max_loss_memory=LOSS_BUDGET)
BF16_REL = 1e-2
TIED = ("query", "value", "token_embedding")  # LoRA on the soft-capped tied output embedding too


def _full_tensors(model, step, x, y, sw):
    """Top-level tensors of the train step shaped like full scores/masks (.., T, T) or full
    logits (.., vocab) with more rows than a kernel (the chunked paths build neither)."""
    context = _active(model) if "_tf_lora_chunked_loss" in model.__dict__ else _nullcontext()
    with context:
        shapes = _top_level_shapes(step, x, y, sw)
    return sorted({s for s in shapes if len(s) >= 2 and (s[-2:] == (T, T) or (
        s[-1] == LM_VOCAB and int(np.prod(s[:-1])) > 32))})


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_equal_loss_and_grads(got, want, rel=REL):
    (loss_c, grads_c), (loss, grads) = got, want
    assert abs(loss_c - loss) <= rel * abs(loss), (loss_c, loss)
    assert len(grads) == len(grads_c) > 0
    worst = max(_rel(a, b) for a, b in zip(grads_c, grads))
    print(f"rel loss error {abs(loss_c - loss) / abs(loss):.2e}, worst rel gradient error {worst:.2e}")
    assert worst <= rel, worst
    return worst


def _greedy(model):
    prompt = {"token_ids": np.zeros((1, 24), "int32"), "padding_mask": np.zeros((1, 24), "int32")}
    prompt["token_ids"][0, :5], prompt["padding_mask"][0, :5] = [5, 6, 7, 8, 9], 1
    model.compile(sampler="greedy")
    return model.generate(prompt, stop_token_ids=None)["token_ids"]


# --- QLoRA -------------------------------------------------------------------------------


def test_qlora_with_chunked_attention_and_loss_equals_plain_qlora():
    """NF4 base weights on the attention projections and on the tied, soft-capped output
    embedding (the chunked loss's projection is then a QLoRA layer)."""
    model = _lm("gemma2_soft_capped", ("query", "value", "token_embedding"), quantization=tf_lora.QLoRAConfig())
    assert {type(layer).__name__ for _, layer in model.adapter_layers()} == {
        "QLoRAEinsumDense", "QLoRAReversibleEmbedding"}
    x, y, sw = _lm_batch()
    loss, grads, step = _train_loss_and_grads(model, x, y, sw)
    assert _full_tensors(model, step, x, y, sw)  # the plain step builds them: the check can fail
    tokens = _greedy(model)
    tf_lora.use_chunked_attention(model, query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    tf_lora.use_chunked_loss(model, max_memory_bytes=LOSS_BUDGET)
    loss_c, grads_c, step = _train_loss_and_grads(model, x, y, sw)
    assert _full_tensors(model, step, x, y, sw) == []
    _assert_equal_loss_and_grads((loss_c, grads_c), (loss, grads))
    np.testing.assert_array_equal(_greedy(model), tokens)


def test_gradient_checkpointing_qlora_and_both_chunked_paths_equal_plain_qlora():
    qlora = dict(quantization=tf_lora.QLoRAConfig())
    plain = _lm("llama3_separate_head", ("query", "value", "token_embedding"), **qlora)
    both = _lm("llama3_separate_head", ("query", "value", "token_embedding"), gradient_checkpointing=True,
               **qlora, **CHUNKED)
    assert tf_lora.checkpointed_blocks(both) and _chunked_kinds(both) == {"ChunkedLlamaAttention"}
    x, y, sw = _lm_batch()
    want = _train_loss_and_grads(plain, x, y, sw)[:2]
    loss_c, grads_c, step = _train_loss_and_grads(both, x, y, sw)
    assert _full_tensors(both, step, x, y, sw) == []
    _assert_equal_loss_and_grads((loss_c, grads_c), want)


# --- the multi-adapter API ---------------------------------------------------------------


def _two_adapters(**config):
    """The tied output embedding is adapted too: the chunked loss trains the active adapter's pair on it."""
    targets = ("query", "value", "token_embedding")
    model = _lm("gemma2_soft_capped", targets, **config)
    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=3, dropout=0.0, target_modules=targets))
    tf_lora.set_adapter(model, "task_b")
    rng = np.random.default_rng(11)
    for v in model.lora_variables:  # task_b differs from default
        v.assign(0.1 * rng.standard_normal(v.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def _per_adapter(model, x, y, sw):
    found = {}
    for name in ("default", "task_b"):
        tf_lora.set_adapter(model, name)
        loss, grads, step = _train_loss_and_grads(model, x, y, sw)
        found[name] = (loss, grads, np.asarray(model(x)), _full_tensors(model, step, x, y, sw))
    with tf_lora.disable_adapter(model):
        found[None] = (None, None, np.asarray(model(x)), None)
    return found


def test_multi_adapter_switching_and_training_with_chunked_paths():
    x, y, sw = _lm_batch()
    plain = _two_adapters()
    want = _per_adapter(plain, x, y, sw)
    model = _two_adapters()
    tf_lora.use_chunked_attention(model, query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    tf_lora.use_chunked_loss(model, max_memory_bytes=LOSS_BUDGET)
    got = _per_adapter(model, x, y, sw)
    for name in ("default", "task_b"):
        _assert_equal_loss_and_grads(got[name][:2], want[name][:2])
        assert want[name][3] and got[name][3] == []  # only the plain steps build full scores and logits
    assert abs(want["default"][0] - want["task_b"][0]) > 1e-3  # the adapters differ: a swap would fail
    for name in ("default", "task_b", None):
        expected = want[name][2]
        np.testing.assert_allclose(got[name][2], expected, rtol=0, atol=REL * np.abs(expected).max())

    # Training task_b (both chunked paths) leaves default as it was and matches plain training.
    for m in (plain, model):
        tf_lora.set_adapter(m, "task_b")
        m.compile(optimizer=keras.optimizers.SGD(0.1))
    default = [v.numpy().copy() for _, layer in model.adapter_layers() for v in layer.adapter_variables("default")]
    task_b = [v.numpy().copy() for v in model.lora_variables]
    history = model.fit(x, y, sample_weight=sw, epochs=2, shuffle=False, verbose=0).history["loss"]
    history_plain = plain.fit(x, y, sample_weight=sw, epochs=2, shuffle=False, verbose=0).history["loss"]
    print("multi-adapter fit losses", history, history_plain)
    np.testing.assert_allclose(history, history_plain, rtol=REL)
    after = [v.numpy() for _, layer in model.adapter_layers() for v in layer.adapter_variables("default")]
    assert all(np.array_equal(a, b) for a, b in zip(default, after)) and len(after) == 10
    assert max(np.max(np.abs(a - v.numpy())) for a, v in zip(task_b, model.lora_variables)) > 1e-3  # it trained
    assert max(_rel(a.numpy(), b.numpy()) for a, b in zip(model.lora_variables, plain.lora_variables)) <= REL
    tf_lora.set_adapter(model, "default")
    _assert_equal_loss_and_grads(_train_loss_and_grads(model, x, y, sw)[:2], want["default"][:2])


# --- jit_compile and mixed_bfloat16 --------------------------------------------------------


def _fit_losses(model, x, y, sw, jit_compile, epochs=2, learning_rate=0.1):
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), jit_compile=jit_compile)
    return model.fit(x, y, sample_weight=sw, epochs=epochs, batch_size=2, shuffle=False, verbose=0).history["loss"]


def test_jit_compile_fit_with_both_chunked_paths_equals_graph_fit():
    """(The graph fit of both chunked paths equals the plain fit: test_long_context.py.)"""
    x, y, sw = _lm_batch()
    graph = _fit_losses(_lm("gemma2_soft_capped", ("query", "value", "token_embedding"), **CHUNKED), x, y, sw, False)
    model = _lm("gemma2_soft_capped", ("query", "value", "token_embedding"), **CHUNKED)
    xla = _fit_losses(model, x, y, sw, True)
    assert model.jit_compile is True and _chunked_kinds(model) and "_tf_lora_chunked_loss" in model.__dict__
    assert graph[0] - graph[-1] > 1e-3  # it trains
    print("jit: max rel loss error", max(abs(a - b) / b for a, b in zip(xla, graph)))
    np.testing.assert_allclose(xla, graph, rtol=REL)


def test_mixed_bfloat16_fit_with_both_chunked_paths_is_close_to_float32_plain():
    x, y, sw = _lm_batch()
    plain = _lm("gemma2_soft_capped", TIED)
    want = _train_loss_and_grads(plain, x, y, sw)[0]
    plain = _fit_losses(plain, x, y, sw, False)
    keras.config.set_dtype_policy("mixed_bfloat16")  # the conftest fixture restores float32
    model = _lm("gemma2_soft_capped", TIED, **CHUNKED)
    keras.config.set_dtype_policy("float32")
    assert model.backbone.compute_dtype == "bfloat16" and _chunked_kinds(model)
    loss, grads, step = _train_loss_and_grads(model, x, y, sw)
    assert _full_tensors(model, step, x, y, sw) == []
    assert all(g.dtype == np.float32 for g in grads)  # the adapters stay float32
    bf16 = _fit_losses(model, x, y, sw, False)
    print("bf16: rel loss error", abs(loss - want) / want, "fit", max(abs(a - b) / b for a, b in zip(bf16, plain)))
    assert abs(loss - want) <= BF16_REL * want
    np.testing.assert_allclose(bf16, plain, rtol=BF16_REL)
    assert plain[0] - plain[-1] > 2 * BF16_REL * plain[0]  # it trains by more than the tolerance


# --- MirroredStrategy ------------------------------------------------------------------------

MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    sys.path.insert(0, sys.argv[1])
    import tf_lora
    from test_long_context import _lm, _lm_batch, _chunked_kinds
    from test_long_context_compose import CHUNKED

    x, y, sw = _lm_batch()
    x, y, sw = ({k: np.concatenate([v, v[::-1]]) for k, v in x.items()}, np.concatenate([y, y[::-1]]),
                np.concatenate([sw, sw[::-1]]))  # 4 rows, 2 of them padded: one padded row per replica
    init = [v.numpy() for v in _lm("gemma2_soft_capped", ("query", "value", "token_embedding")).lora_variables]
    # (the same values as the QLoRA models': _lm assigns every adapter variable from one seeded generator)

    def train(model):
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        history = model.fit(x, y, sample_weight=sw, batch_size=4, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"], [v.numpy() for v in model.lora_variables]

    qlora = dict(quantization=tf_lora.QLoRAConfig())
    result = {"plain": train(_lm("gemma2_soft_capped", ("query", "value", "token_embedding"), **qlora))}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _lm("gemma2_soft_capped", ("query", "value", "token_embedding"), gradient_checkpointing=True,
                    **qlora, **CHUNKED)
        kinds = sorted({type(v.value).__name__ for v in model.lora_variables})
        result["mirrored"] = train(model)
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync, "kinds": kinds, "chunked": sorted(_chunked_kinds(model)),
        "loss_step": "_tf_lora_chunked_loss" in model.__dict__, "losses": {k: v[0] for k, v in result.items()},
        "checkpointed": len(tf_lora.checkpointed_blocks(model)),
        "weights_rel": max(rel(a, b) for a, b in zip(result["mirrored"][1], result["plain"][1])),
        "moved": max(rel(a, b) for a, b in zip(result["mirrored"][1], init)),
    }))
    """
)


@pytest.mark.skipif(not _compat.averages_replica_gradients(), reason="multi-replica fit needs Keras >= 3.8")
def test_mirrored_strategy_fit_with_both_chunked_paths_equals_single_device():
    """The headline configuration under MirroredStrategy: QLoRA + gradient checkpointing +
    both chunked paths, against the single-device plain QLoRA model."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", MIRRORED, tests_dir], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and "MirroredVariable" in result["kinds"], result
    assert result["chunked"] == ["ChunkedCachedGemmaAttention"] and result["loss_step"], result
    assert result["checkpointed"] == 2, result
    losses = result["losses"]
    assert losses["plain"][0] - losses["plain"][-1] > 1e-3 and result["moved"] > 1e-3, result  # it trains
    print("mirrored:", result)
    np.testing.assert_allclose(losses["mirrored"], losses["plain"], rtol=REL)
    assert result["weights_rel"] <= REL, result


def test_add_adapter_refuses_the_model_wide_chunked_loss():
    """`loss="chunked"` (like `attention`) describes the shared model, not one adapter:
    add_adapter used to accept it and silently train without it."""
    model = _lm("gemma2_soft_capped", TIED)
    for config in (dict(loss="chunked"), dict(loss="chunked", max_loss_memory=LOSS_BUDGET)):
        with pytest.raises(ValueError, match=r"`loss`.*added adapter.*loss='chunked'"):
            tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=2, target_modules=TIED, **config))
    assert model.adapter_names == ["default"] and "_tf_lora_chunked_loss" not in model.__dict__
    tf_lora.add_adapter(model, "task_b", tf_lora.LoRAConfig(rank=2, target_modules=TIED))  # without it: fine
