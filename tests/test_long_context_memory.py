"""The memory bound of chunked attention + the chunked LM loss (issue 22), measured, never timed.

Each configuration trains in a fresh process (`benchmarks/bench_long_context.py`'s capped
child: TensorFlow's CPU BFC allocator, the train step's peak above the state before it), at
a length where the full attention scores and the full logits dominate a step: a 2-block
Llama 3 decoder of tiny widths (hidden 64, 4 query / 2 KV heads) with a 8,192-token
vocabulary at T=2,048, batch 1. Plain KerasHub + LoRA keeps each layer's (heads, T, T)
scores and the (T, vocab) logits for the backward (64 MiB each here); the chunked paths
hold one tile of each at a time.
"""

import importlib.util
import os

import pytest

pytest.importorskip("keras_hub")

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_long_context.py")
SIZE = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=8192,
            max_attention_memory=2**22, max_loss_memory=2**22)  # 4 MiB per chunk of each
SEQ = 2048
BOUND = 0.15  # measured 2026-12-07: plain 504 MiB, chunked 39 MiB (0.078)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunked_attention_and_loss_bound_the_train_step_peak():
    bench = _bench()
    cap, timeout = 4 * 2**30, 900  # timeout guards a hang only
    plain = bench.memory("plain", SEQ, SIZE, cap, timeout, steps=1)
    chunked = bench.memory("attn+loss", SEQ, SIZE, cap, timeout, steps=1)
    for name, result in (("plain", plain), ("attn+loss", chunked)):
        assert "peak_bytes" in result, f"{name} did not measure a step: {result}"
    # The same model and batch: the losses of the measured steps agree.
    assert abs(plain["losses"][-1] - chunked["losses"][-1]) <= 1e-4 * abs(plain["losses"][-1])
    ratio = chunked["peak_bytes"] / plain["peak_bytes"]
    scores_and_logits = 2 * (SIZE["heads"] * SEQ * SEQ * 4) + SEQ * SIZE["vocab"] * 4  # what plain must hold
    figures = (f"plain step peak {plain['peak_bytes'] / 2**20:.0f} MiB, chunked {chunked['peak_bytes'] / 2**20:.0f} "
               f"MiB, ratio {ratio:.3f} (bound {BOUND})")
    assert plain["peak_bytes"] >= scores_and_logits, f"plain holds less than its scores and logits: {figures}"
    print(figures)
    assert ratio <= BOUND, figures
