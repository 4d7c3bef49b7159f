"""Gradient checkpointing (`LoRAConfig(gradient_checkpointing=True)`,
`tf_lora.enable_gradient_checkpointing`): the same loss and gradients as without it
(dropout on: the recomputation must draw the same masks and see the same `training`),
generate unchanged, `.keras` round trip, and the peak-memory bound measured in fresh
processes (memory, never time)."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import hub_models as H
import tf_lora

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_checkpointing  # noqa: E402


def _loss_and_grads(arch, checkpointing):
    """`checkpointing`: False, True (the config: every block recomputed) or "not_last"
    (`enable_gradient_checkpointing(recompute_last=False)` on the adapted model)."""
    keras.utils.set_random_seed(0)
    model = H.FACTORIES[arch]()
    x = H.inputs(model)
    adapted = tf_lora.adapt(model, tf_lora.LoRAConfig(rank=2, dropout=0.2, target_modules="all-linear",
                                                       gradient_checkpointing=checkpointing is True))
    if checkpointing == "not_last":
        tf_lora.enable_gradient_checkpointing(adapted, recompute_last=False)
    for i, v in enumerate(adapted.lora_variables):
        v.assign(np.random.default_rng(i).normal(0, 0.1, v.shape).astype("float32"))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            out = tf.nest.flatten(adapted(x, training=True))[0]
            loss = tf.reduce_mean(tf.square(out))
        return loss, tape.gradient(loss, [v.value for v in adapted.lora_variables])

    return adapted, step(x)


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "llama3", "bert"])
def test_same_loss_and_gradients_with_dropout(arch):
    _, (loss0, grads0) = _loss_and_grads(arch, False)
    for mode, expected in ((True, 2), ("not_last", 1)):
        model, (loss1, grads1) = _loss_and_grads(arch, mode)
        blocks = tf_lora.checkpointed_blocks(model)
        assert len(blocks) == expected and all("transformer_layer" in b or "decoder_block" in b for b in blocks), blocks
        assert blocks[0].endswith("_0"), blocks  # recompute_last=False leaves block 1 out
        assert float(loss0) == pytest.approx(float(loss1), abs=1e-7), mode
        for g0, g1 in zip(grads0, grads1):
            np.testing.assert_allclose(g1.numpy(), g0.numpy(), atol=1e-6, err_msg=str(mode))


def test_generate_keras_round_trip_and_disable(tmp_path):
    keras.utils.set_random_seed(0)
    lm = tf_lora.adapt(H.gemma(), tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"),
                                                     gradient_checkpointing=True))
    H.compile_greedy(lm)
    for i, v in enumerate(lm.lora_variables):
        v.assign(np.random.default_rng(i).normal(0, 0.1, v.shape).astype("float32"))
    lm.reset_compiled_functions()
    prompt = H.prompt()
    tokens = lm.generate(prompt, stop_token_ids=None)
    merged = tf_lora.merge(lm)
    H.compile_greedy(merged)
    np.testing.assert_array_equal(tokens["token_ids"], merged.generate(prompt, stop_token_ids=None)["token_ids"])
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.models.load_model(path)
    assert tf_lora.checkpointed_blocks(loaded) == tf_lora.checkpointed_blocks(lm)
    tf_lora.disable_gradient_checkpointing(loaded)
    assert tf_lora.checkpointed_blocks(loaded) == []


def test_peak_memory_halves_in_fresh_processes():
    off = bench_checkpointing.measure("off", seq=256, batch=4, layers=4, steps=1)
    on = bench_checkpointing.measure("on", seq=256, batch=4, layers=4, steps=1)
    assert on["peak_bytes"] <= 0.5 * off["peak_bytes"], (on["peak_bytes"], off["peak_bytes"])
    np.testing.assert_allclose(on["losses"], off["losses"], atol=1e-5)
    assert len(on["blocks"]) == 4
    # recompute_last=False stores the last block: a higher peak, still under half.
    not_last = bench_checkpointing.measure("not_last", seq=256, batch=4, layers=4, steps=1)
    assert on["peak_bytes"] < not_last["peak_bytes"] <= 0.5 * off["peak_bytes"], (not_last["peak_bytes"], on["peak_bytes"])
    np.testing.assert_allclose(not_last["losses"], off["losses"], atol=1e-5)
    assert len(not_last["blocks"]) == 3 and not any(b.endswith("decoder_block_3") for b in not_last["blocks"])


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        tf_lora.enable_gradient_checkpointing("model")
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="blocks"):
        tf_lora.enable_gradient_checkpointing(plain)
    with pytest.raises(TypeError, match="blocks"):
        tf_lora.enable_gradient_checkpointing(plain, blocks=3)
    with pytest.raises(TypeError, match="recompute_last"):
        tf_lora.enable_gradient_checkpointing(plain, recompute_last="yes")
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        tf_lora.LoRAConfig(gradient_checkpointing="yes")


def _chunked_lm(arch, checkpointing, dropout, **chunking):
    keras.utils.set_random_seed(0)
    factories = {
        "gemma": lambda: H.M.GemmaCausalLM(H.M.GemmaBackbone(
            vocabulary_size=H.VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
            intermediate_dim=32, head_dim=8, dropout=dropout), preprocessor=None),
        "mistral": lambda: H.M.MistralCausalLM(H.M.MistralBackbone(
            vocabulary_size=H.VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
            intermediate_dim=32, sliding_window=5, dropout=dropout), preprocessor=None),
    }
    model = tf_lora.adapt(factories[arch](), tf_lora.LoRAConfig(rank=2, dropout=0.1, target_modules=("query", "value"),
                                                                gradient_checkpointing=checkpointing))
    for i, v in enumerate(model.lora_variables):
        v.assign(np.random.default_rng(i).normal(0, 0.1, v.shape).astype("float32"))
    return tf_lora.use_chunked_attention(model, **chunking)


def _padded_batch(batch=3, seq=H.SEQ):
    rng = np.random.default_rng(0)
    padding = (np.arange(seq)[None] < np.array([seq, 5, 3])[:, None]).astype("int32")
    return {"token_ids": rng.integers(1, H.VOCAB, (batch, seq)) * padding, "padding_mask": padding}


_LOOPS = dict(max_memory_bytes=4 * 4 * 4 * 8)  # 4 x 4 tiles of (batch 3 x 4 heads): the op's loops


@pytest.mark.parametrize("arch, chunking, dropout, loops", [
    ("gemma", _LOOPS, 0.2, 2), ("mistral", _LOOPS, 0.2, 2), ("gemma", {}, 0.0, 2), ("mistral", {}, 0.0, 2),
    ("gemma", {}, 0.2, 0),  # KerasHub's Mistral attention has no dropout
], ids=["gemma-loops", "mistral-loops", "gemma-default_fused", "mistral-default_fused", "gemma-attention_dropout"])
def test_chunked_attention_is_not_run_again_in_the_recomputation(arch, chunking, dropout, loops, monkeypatch):
    """With chunked attention, a checkpointed block's recomputation replays the attention's
    forward output and log-sum-exp (`chunked_kernel.Memo`) instead of running its forward
    loops again: the train step traces one forward loop per block (two before). Where the op
    would pick its fused pass, a checkpointed block runs the loops instead (replayed), unless
    attention dropout is on (the loops draw masks per tile: the fused pass is kept, so the
    masks are those without checkpointing). Loss and LoRA gradients equal those without
    checkpointing (LoRA dropout, a padded batch, GQA, Mistral's sliding window) within 1e-6."""
    from tf_lora.layers import chunked_kernel

    forward = chunked_kernel._forward
    calls = []
    monkeypatch.setattr(chunked_kernel, "_forward", lambda *a: calls.append(1) or forward(*a))
    x = _padded_batch()
    results = {}
    for checkpointing in (False, True):
        model = _chunked_lm(arch, checkpointing, dropout=dropout, **chunking)
        assert len(tf_lora.checkpointed_blocks(model)) == (2 if checkpointing else 0)
        calls.clear()

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True)))
            return loss, tape.gradient(loss, [v.value for v in model.lora_variables])

        results[checkpointing] = step(x)
        traced = len(calls)
        # One forward loop per block (4 when the recomputation ran them again; 0 fused).
        assert traced == (loops if checkpointing else 2 * bool(chunking)), (checkpointing, traced)
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-6)
    for g0, g1 in zip(grads0, grads1):
        np.testing.assert_allclose(g1.numpy(), g0.numpy(), rtol=1e-5, atol=1e-6)
