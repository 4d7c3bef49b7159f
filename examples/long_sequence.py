"""Training on long sequences: exact chunked attention vs keras.layers.MultiHeadAttention.

The story:

1. Build a small byte-level causal transformer language model with
   `keras.layers.MultiHeadAttention` and train it for a few steps on windows of
   2,048 bytes of Python source from the standard library (offline).
2. Convert the *same* model (same initial weights) with
   `tf_lora.use_chunked_attention` and train it on the same batches.
3. Each variant runs in a fresh Python process, and the peak of TensorFlow's CPU
   allocator (`tf.config.experimental.get_memory_info("CPU:0")["peak"]`) is read
   after training: MultiHeadAttention materialises (batch, heads, T, T) score
   and probability tensors for every layer and keeps them for the backward pass;
   chunked attention computes the same softmax in tiles with a running max and
   sum and recomputes tiles in the backward pass, so its memory grows linearly
   in T. The losses of both runs agree to float32 rounding: the attention is
   exact, not an approximation.

Inside `tf_lora.adapt`, ``LoRAConfig(attention="chunked")`` makes the same swap
for LoRA fine-tuning. Run ``python examples/long_sequence.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
import warnings

from example_utils import positive

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

VARIANTS = ("mha", "chunked")
LABELS = {"mha": "keras MultiHeadAttention", "chunked": "tf_lora chunked attention"}
SOURCE_MODULES = ("argparse", "ast", "calendar", "configparser", "dataclasses", "difflib", "enum", "fractions",
                  "functools", "inspect", "pprint", "statistics", "textwrap", "tokenize", "typing")


# ------------------------------------------------------------------ args ---
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed (deterministic runs)")
    p.add_argument("--seq-len", type=positive("--seq-len"), default=2048, help="tokens (bytes) per sequence")
    p.add_argument("--batch-size", type=positive("--batch-size"), default=2)
    p.add_argument("--steps", type=positive("--steps"), default=6, help="training steps per variant")
    p.add_argument("--dim", type=positive("--dim"), default=64, help="model width")
    p.add_argument("--heads", type=positive("--heads"), default=4, help="attention heads (must divide --dim)")
    p.add_argument("--layers", type=positive("--layers"), default=2, help="transformer blocks")
    p.add_argument("--chunk-size", type=positive("--chunk-size"), default=256,
                   help="query and key chunk size of the chunked attention")
    p.add_argument("--variants", default="mha,chunked",
                   help="comma-separated variants to run, from: " + ", ".join(VARIANTS))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    args = p.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants) or len(set(variants)) != len(variants):
        p.error(f"--variants: expected distinct names from {', '.join(VARIANTS)}, got {args.variants!r}")
    args.variants = variants
    if args.dim % args.heads:
        p.error(f"--heads: must divide --dim={args.dim}, got {args.heads}")
    return args


# ---------------------------------------------------------------- worker ---
def source_windows(seq_len: int, count: int, seed: int):
    """`count` (input, next-byte) windows of standard-library Python source."""
    import numpy as np

    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in SOURCE_MODULES).encode("utf-8", "replace")
    data = np.frombuffer(text, dtype=np.uint8)
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, size=count)
    x = np.stack([data[s : s + seq_len] for s in starts]).astype("int32")
    y = np.stack([data[s + 1 : s + seq_len + 1] for s in starts]).astype("int32")
    return x, y


def build_model(args):
    import keras

    from example_utils import PositionEmbedding

    tokens = keras.Input((args.seq_len,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(256, args.dim, name="embedding")(tokens)
    x = PositionEmbedding(args.seq_len, name="position")(x)
    for i in range(args.layers):
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x)
        h = keras.layers.MultiHeadAttention(args.heads, args.dim // args.heads, name=f"block_{i}_attention")(
            h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x)
        h = keras.layers.Dense(4 * args.dim, activation="gelu", name=f"block_{i}_ffn_up")(h)
        x = x + keras.layers.Dense(args.dim, name=f"block_{i}_ffn_down")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    return keras.Model(tokens, keras.layers.Dense(256, name="lm_head")(x), name="long_lm")


def worker(args) -> dict:
    """Trains one variant in this (fresh) process; returns losses, peak memory, step time."""
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_lora

    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(args.seed)
    model = build_model(args)
    if args.worker == "chunked":
        model = tf_lora.use_chunked_attention(model, query_chunk_size=args.chunk_size, key_chunk_size=args.chunk_size)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    x, y = source_windows(args.seq_len, args.steps * args.batch_size, args.seed)
    losses, stamps = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))
            stamps.append(time.perf_counter())

    tf.config.experimental.reset_memory_stats("CPU:0")
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    steps = np.diff([t0] + stamps)
    return {
        "variant": args.worker,
        "losses": losses,
        "peak_bytes": int(peak),
        "first_step_seconds": float(steps[0]),
        "step_seconds": float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0]),
        "num_weights": int(model.count_params()),
        "step_count": len(losses),
        "is_chunked": any(type(layer).__name__ == "ChunkedAttention" for layer in model.layers),
    }


def run_variant(variant: str, argv) -> dict:
    """Runs `variant` in a fresh Python process (clean allocator statistics)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", variant]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"variant {variant!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------ main ---
def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    start = time.time()
    print(f"Training a {args.layers}-block byte-level LM on {args.batch_size} x {args.seq_len} bytes of Python source, "
          f"{args.steps} steps per variant, each variant in a fresh process...")
    runs = {}
    for variant in args.variants:
        runs[variant] = run_variant(variant, argv)
        r = runs[variant]
        print(f"  {LABELS[variant]:27s}: peak {_mib(r['peak_bytes'])}, {r['step_seconds']:.2f} s/step, "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    score_bytes = 4 * args.batch_size * args.heads * args.seq_len**2
    report = {
        "seq_len": args.seq_len,
        "runs": runs,
        "score_matrix_bytes_per_layer": score_bytes,
        "total_seconds": time.time() - start,
    }
    if len(runs) == 2:
        mha, chunked = runs["mha"], runs["chunked"]
        report["peak_ratio"] = mha["peak_bytes"] / chunked["peak_bytes"]
        report["step_time_ratio"] = chunked["step_seconds"] / mha["step_seconds"]
        report["max_loss_diff"] = max(abs(a - b) for a, b in zip(mha["losses"], chunked["losses"]))
    print_report(args, report)
    return report


def print_report(args, r):
    print(f"\n=== sequence length {args.seq_len}, batch {args.batch_size}, {args.heads} heads, {args.layers} layers ===")
    print(f"one (batch, heads, T, T) float32 score tensor: {_mib(r['score_matrix_bytes_per_layer'])} per layer")
    print(f"{'variant':28s} {'peak CPU memory':>16s} {'s/step':>7s} {'first loss':>11s} {'last loss':>10s}")
    for variant, run in r["runs"].items():
        print(f"{LABELS[variant]:28s} {_mib(run['peak_bytes']):>16s} "
              f"{run['step_seconds']:7.2f} {run['losses'][0]:11.4f} {run['losses'][-1]:10.4f}")
    if "peak_ratio" in r:
        print(f"peak memory, MultiHeadAttention / chunked : {r['peak_ratio']:.1f}x")
        print(f"step time, chunked / MultiHeadAttention  : {r['step_time_ratio']:.2f}")
        print(f"max |loss difference| over the steps      : {r['max_loss_diff']:.1e} (exact attention)")
    print(f"total time                                : {r['total_seconds']:.1f} s")


if __name__ == "__main__":
    main()
