"""DoRA vs LoRA train-step time, and LoftQ vs plain NF4 reconstruction error.

(a) Step time. Dense dim -> dim, rank 8, input (batch, seq, dim) float32, Adam, MSE.
Variants: ``lora`` (LoRADense), ``dora`` (LoRADense, use_dora=True), ``qlora`` and
``qdora`` (QLoRADense, NF4 base, without / with DoRA). Same custom train step for all
(a ``tf.function`` with a GradientTape over the layer's trainable variables + Adam),
run interleaved in one process with the starting variant rotated every round, so
load from other processes hits all alike. DoRA's extra cost per step is forming
``W + s A B`` for the norm (a dim x dim x r product plus a dim x dim reduction, as in
PEFT) and the ``(m/n - 1) * x W`` term; the table reports medians and the paired
per-round ratios dora / lora and qdora / qlora.

(b) Reconstruction error. A glorot-uniform kernel (dim x dim): relative Frobenius error
``||W - (dequant(Q) + s A B)|| / ||W||`` of LoftQ (iterations 1..5, scaling s = alpha / r
included) against plain NF4's ``||W - dequant(NF4(W))|| / ||W||``, for a few ranks.

Usage:
    python benchmarks/bench_variants.py            # full size, ~2 min on 2 cores
    python benchmarks/bench_variants.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_lora  # noqa: E402
from tf_lora import nf4, variants  # noqa: E402
from tf_lora.layers.qlora import QLoRADense  # noqa: E402

tf.get_logger().setLevel("ERROR")


def _layers(dim: int, rank: int):
    dense = keras.layers.Dense(dim)
    dense.build((None, dim))
    make = {
        "lora": lambda: tf_lora.LoRADense.from_layer(dense, rank=rank, alpha=2 * rank),
        "dora": lambda: tf_lora.LoRADense.from_layer(dense, rank=rank, alpha=2 * rank, use_dora=True),
        "qlora": lambda: QLoRADense.from_layer(dense, rank=rank, alpha=2 * rank),
        "qdora": lambda: QLoRADense.from_layer(dense, rank=rank, alpha=2 * rank, use_dora=True),
    }
    return {k: f() for k, f in make.items()}


def _step_fn(layer, x, y, jit: bool):
    opt = keras.optimizers.Adam(1e-3)
    variables = layer.trainable_variables
    opt.build(variables)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x, training=True) - y))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def step_times(dim: int, batch: int, seq: int, rank: int, rounds: int, warmup: int, jit: bool) -> None:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, seq, dim)).astype("float32"))
    y = tf.constant(rng.standard_normal((batch, seq, dim)).astype("float32"))
    layers = _layers(dim, rank)
    steps = {k: _step_fn(layer, x, y, jit) for k, layer in layers.items()}
    names = list(steps)
    for _ in range(warmup):
        for k in names:
            steps[k]().numpy()
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            steps[k]().numpy()
            times[k].append(1e3 * (time.perf_counter() - t0))
    mode = "xla" if jit else "graph"
    print(f"\n(a) train step, Dense {dim} -> {dim}, rank {rank}, input ({batch}, {seq}, {dim}), {mode}, {rounds} rounds")
    print(f"{'variant':<8} {'median ms':>10} {'p10':>8} {'p90':>8}")
    print("-" * 38)
    for k in names:
        t = np.asarray(times[k])
        print(f"{k:<8} {np.median(t):>10.2f} {np.percentile(t, 10):>8.2f} {np.percentile(t, 90):>8.2f}")
    for num, den in (("dora", "lora"), ("qdora", "qlora")):
        paired = np.median(np.asarray(times[num]) / np.asarray(times[den]))
        medians = np.median(times[num]) / np.median(times[den])
        print(f"ratio {num}/{den}: {medians:.3f} (medians), {paired:.3f} (median of paired rounds)")


def reconstruction(dim: int, ranks, iters) -> None:
    kernel_layer = keras.layers.Dense(dim)
    kernel_layer.build((None, dim))
    w = kernel_layer.kernel.numpy()
    norm = np.linalg.norm(w)
    qd = lambda k: nf4.dequantize(nf4.quantize(k)).numpy()  # noqa: E731
    nf4_error = np.linalg.norm(w - qd(w)) / norm
    print(f"\n(b) reconstruction error ||W - (dequant(Q) + s A B)|| / ||W||, glorot {dim} x {dim}, NF4 group 64 + double quant")
    header = f"{'rank':>5} {'alpha':>6} {'NF4':>9} " + " ".join(f"{'loftq it' + str(i):>11}" for i in iters) + f" {'ratio it1/NF4':>14}"
    print(header)
    print("-" * len(header))
    for rank in ranks:
        alpha, s = 2 * rank, 2.0
        errors = []
        for it in iters:
            residual, a, b = variants.loftq(w, rank, s, qd, it)
            errors.append(np.linalg.norm(w - (qd(residual) + s * a @ b)) / norm)
        print(f"{rank:>5} {alpha:>6} {nf4_error:>9.5f} " + " ".join(f"{e:>11.5f}" for e in errors)
              + f" {errors[0] / nf4_error:>14.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--xla", action="store_true", help="also time with jit_compile=True")
    args = p.parse_args()
    if args.quick:
        step_times(dim=128, batch=4, seq=16, rank=4, rounds=10, warmup=2, jit=False)
        reconstruction(dim=128, ranks=(4,), iters=(1, 2))
        return
    step_times(dim=1024, batch=16, seq=128, rank=8, rounds=40, warmup=5, jit=False)
    if args.xla:
        step_times(dim=1024, batch=16, seq=128, rank=8, rounds=40, warmup=5, jit=True)
    reconstruction(dim=1024, ranks=(8, 16, 64), iters=(1, 2, 3, 5))


if __name__ == "__main__":
    main()
