"""Training tokens per second: packed rows vs KerasHub's fixed-length padded rows.

The corpus and tokenizer of `data_padding.py` (the standard library's module docstrings and
module-level function/class sources, a 16k byte-level BPE). An adapted KerasHub
`Llama3CausalLM` (2 blocks, hidden 256, 4 query / 2 key-value heads, intermediate 512, the
tokenizer's vocabulary; LoRA rank 8 on query/value; Adam) trains on three pipelines of the
same documents, `batch_size` rows per step:

- fixed: one document per row, padded to `sequence_length` (the layout of KerasHub's
  `CausalLMPreprocessor`; over-long documents truncated at the end);
- bucketing: the same rows sorted by length, batched in that order, each batch cut to
  its longest row rounded up to a multiple of 64 (bucket boundaries), batches in random order;
- packed: `tf_lora.data` packing (first-fit decreasing), with ``segment_ids`` and
  ``positions`` (exact: each document attends only to itself).

Training tokens are non-padding positions. Each round gives every pipeline the same wall
time (`--seconds`) and counts the tokens its train steps (`train_on_batch`, the same model)
consumed; rounds interleave the pipelines in one process, after a warm-up that traces
every shape. Prints tokens/s per pipeline and the ratios to fixed. Timings on a shared
machine are noisy: compare ratios from one run.

    python benchmarks/bench_packing.py [--quick] [--lengths 512 1024] [--rounds 3] [--seconds 20]
    python benchmarks/bench_packing.py --mask-memory   # chunked attention: peak step memory without/with the mask
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # for --mask-memory's peak (TensorFlow's CPU allocator)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BUCKET = 64


def make_model(vocab: int, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 512, **config):
    import keras
    import keras_hub

    import tf_lora

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(vocabulary_size=vocab, num_layers=layers, num_query_heads=heads,
                                               num_key_value_heads=kv_heads, hidden_dim=hidden,
                                               intermediate_dim=intermediate)
    lm = tf_lora.adapt(keras_hub.models.Llama3CausalLM(backbone, preprocessor=None),
                       tf_lora.LoRAConfig(rank=8, target_modules=("query", "value"), **config), inplace=True, verbose=0)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return lm


def batches(prepared, batch_size: int, bucketing: bool = False, seed: int = 0) -> list:
    """``[(x, y, sample_weight, training tokens)]`` NumPy batches in a random order."""
    rows = prepared.rows
    keys = ["token_ids", "padding_mask"] + (["segment_ids", "positions"] if prepared.packed else [])
    lengths = rows["padding_mask"].sum(1)
    order = np.argsort(lengths, kind="stable") if bucketing else np.arange(len(lengths))
    out = []
    for i in range(0, len(order), batch_size):
        index = order[i:i + batch_size]
        width = rows["token_ids"].shape[1]
        if bucketing:
            width = min(width, -(-int(lengths[index].max()) // BUCKET) * BUCKET)
        x = {k: rows[k][index, :width] for k in keys}
        out.append((x, rows["labels"][index, :width], rows["sample_weight"][index, :width],
                    int(rows["padding_mask"][index].sum())))
    return [out[i] for i in np.random.default_rng(seed).permutation(len(out))]


def train_for(model, stream: list, position: int, seconds: float):
    """Train steps on ``stream[position:]`` (cycling) for `seconds`: (tokens, elapsed, next position)."""
    tokens, start = 0, time.perf_counter()
    while True:
        x, y, w, n = stream[position % len(stream)]
        model.train_on_batch(x, y, sample_weight=w)
        tokens, position = tokens + n, position + 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return tokens, elapsed, position


def throughput(args) -> dict:
    from data_padding import bpe_tokenizer, stdlib_corpus

    from tf_lora import data

    docs = stdlib_corpus(400 if args.quick else 0)
    vocab = 2048 if args.quick else 16384
    tokenize = bpe_tokenizer(docs, vocab)
    model = make_model(vocab)
    print(f"corpus: {len(docs):,d} documents; model: Llama3CausalLM 2 blocks, hidden 256, vocabulary {vocab:,d}, "
          f"LoRA rank 8 on query/value; batch {args.batch_size} rows; {args.rounds} rounds of {args.seconds:g} s "
          "per pipeline, interleaved")
    results = {}
    for n in args.lengths:
        fixed = data.prepare(docs, tokenize, n, eos_id=0, verbose=0)
        packed = data.prepare(docs, tokenize, n, packing=True, eos_id=0, verbose=0)
        streams = {"fixed": batches(fixed, args.batch_size), "bucketing": batches(fixed, args.batch_size, True),
                   "packed": batches(packed, args.batch_size)}
        for name, stream in streams.items():  # warm-up: trace each shape (bucketing: several widths)
            widths = sorted({b[0]["token_ids"].shape[1] for b in stream})
            for width in widths[:: max(1, len(widths) // 4)] + widths[-1:]:
                x, y, w, _ = next(b for b in stream if b[0]["token_ids"].shape[1] == width)
                model.train_on_batch(x, y, sample_weight=w)
        totals = {name: [0, 0.0] for name in streams}
        positions = dict.fromkeys(streams, 0)
        for _ in range(args.rounds):
            for name, stream in streams.items():
                tokens, elapsed, positions[name] = train_for(model, stream, positions[name], args.seconds)
                totals[name][0] += tokens
                totals[name][1] += elapsed
        rate = {name: tokens / elapsed for name, (tokens, elapsed) in totals.items()}
        results[n] = dict(rate=rate, padding={"fixed": fixed.stats.padding_fraction,
                                              "packed": packed.stats.padding_fraction})
        print(f"sequence_length {n:,d}: padding fixed {fixed.stats.padding_fraction:.1%}, packed "
              f"{packed.stats.padding_fraction:.2%}")
        for name, r in rate.items():
            print(f"  {name:>10}: {r:10,.0f} training tokens/s  ({r / rate['fixed']:.2f}x fixed)")
    return results


def mask_memory_child(t: int, mode: str) -> dict:
    """In this (fresh) process: peak memory above the model's of a forward pass and a train step."""
    import tensorflow as tf

    from tf_lora import block_seam

    vocab = 512  # SmolLM2-135M's widths, 2 blocks, a small vocabulary (the logits are not what is measured)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, vocab, (1, t)).astype("int32"), "padding_mask": np.ones((1, t), "int32")}
    y = rng.integers(0, vocab, (1, t))
    lm = make_model(vocab, hidden=576, heads=9, kv_heads=3, intermediate=1536, attention="chunked")
    if mode == "kerashub_mask":  # KerasHub's own blocks: their (B, T, T) mask reaches the op
        for layer in lm._flatten_layers():
            if isinstance(layer, block_seam.PackedBlock):
                layer.__class__ = layer._packing_base
        lm.reset_compiled_functions()
    forward = tf.function(lambda x: lm(x, training=True))
    forward(x)
    lm.train_on_batch(x, y)
    peaks = {}
    for name, run in (("forward", lambda: forward(x)), ("step", lambda: lm.train_on_batch(x, y))):
        tf.config.experimental.reset_memory_stats("CPU:0")
        start = tf.config.experimental.get_memory_info("CPU:0")["current"]
        run()
        peaks[name] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - start
    return peaks


def mask_memory(args) -> dict:
    """Chunked attention, unpacked rows, batch 1: peak memory of a forward pass and a train step
    when the decoder blocks build KerasHub's (B, T, T) mask vs hand the op ids; each in a fresh
    process (TensorFlow's CPU BFC allocator)."""
    import json
    import subprocess

    results = {}
    for mode in ("kerashub_mask", "ids"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--mask-child", mode,
                              "--mask-length", str(args.mask_length)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    old, new = results["kerashub_mask"], results["ids"]
    print(f"T={args.mask_length:,d}, batch 1, SmolLM2-135M widths, 2 blocks, chunked attention:")
    for name in ("forward", "step"):
        print(f"  {name:>7}: {old[name] / 2**20:8.1f} MiB with KerasHub's masks, {new[name] / 2**20:8.1f} MiB with "
              f"ids ({new[name] / old[name]:.2f}x, {(old[name] - new[name]) / 2**20:.1f} MiB less)")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 documents, a 2k vocabulary, short rounds")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--mask-memory", action="store_true", help="peak step memory with/without the dense mask")
    parser.add_argument("--mask-length", type=int, default=4096)
    parser.add_argument("--mask-child", choices=("kerashub_mask", "ids"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mask_child:
        import json

        print(json.dumps(mask_memory_child(args.mask_length, args.mask_child)))
        return None
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
        args.rounds = min(args.rounds, 2)
    return mask_memory(args) if args.mask_memory else throughput(args)


if __name__ == "__main__":
    main()
