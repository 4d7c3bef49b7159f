"""QLoRA side by side: storage, quantization error and train-step time (issue 3).

Three parts, all measured in one run:

1. Storage of the frozen base, bits per parameter measured from the stored variables:
   tf_lora NF4 with double quantization (goal <= 4.13; bitsandbytes 4.127), NF4 without
   it (4.5), and Keras' `Dense.quantize("int4")` (default block 128: packed int8 kernel,
   float32 scales, int8 zero points, plus its float32 `g_idx` row-to-group map, shown
   with and without `g_idx`). The bias is not part of any of them.
2. Quantization error on normal-distributed weights (N(0, 1/in)): mean squared error of
   the dequantized kernel against the float kernel, NF4 vs Keras int4 at the same group
   size (64 and 128; both group along the input dimension for each output unit). Keras'
   dequantized kernel is read back from the layer itself: with bias 0, the int4 layer's
   output for the identity matrix as input is its dequantized kernel (Keras' sub-channel
   int4 path does not quantize the inputs); this is cross-checked against Keras' own
   `unpack_int4` + `dequantize_with_sz_map` applied to its variables.
3. Train-step time, Dense 1024 -> 1024, rank 8, input (64, 128, 1024) float32, Adam, MSE,
   with the method of `bench_lora.py` (its `make_train_step` is imported): a
   `tf.function(jit_compile=...)` custom step over `layer.trainable_variables`, variants
   timed interleaved with a rotating start, median and p10/p90, ratios of medians and
   medians of per-round ratios. Variants: `qlora` (`tf_lora.QLoRADense`, NF4 + double
   quant), `keras_int4` (`Dense.quantize("int4")` then `enable_lora(8)`; its bias stays
   trainable) and `lora` (`tf_lora.LoRADense`, float32 base), each with and without XLA.
   Goal: qlora / keras_int4 <= 1.0.

Usage:
    python benchmarks/bench_qlora.py            # full size, a few minutes on 2 cores
    python benchmarks/bench_qlora.py --quick    # tiny sizes, seconds (smoke test)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_lora import (  # noqa: E402
    Variant, _loadavg, add_size_arguments, make_dense, make_train_step, pct, resolve_sizes,
)
from keras import quantizers  # noqa: E402
from keras.src.quantizers.quantizers import dequantize_with_sz_map  # noqa: E402 (Keras' int4 math)

import tf_lora  # noqa: E402
from tf_lora import nf4  # noqa: E402
from tf_lora.layers.qlora import QLoRADense  # noqa: E402
from tf_lora.memory import memory_report  # noqa: E402

tf.get_logger().setLevel("ERROR")
KINDS = ("qlora", "keras_int4", "lora")
GOAL = 1.0  # qlora / keras_int4, with and without XLA


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = dict(rounds=5, warmup=1, batch=2, seq=8, dim=256, rank=4)
    full = dict(rounds=40, warmup=3, batch=64, seq=128, dim=1024, rank=8)
    add_size_arguments(p, quick, full)
    args = p.parse_args(argv)
    resolve_sizes(p, args, quick, full)
    if args.dim % 128:
        p.error(f"--dim must be a multiple of 128 (the group sizes compared), got {args.dim}")
    return args


def keras_int4(kernel: np.ndarray, bias: np.ndarray, block_size: int = 128) -> keras.layers.Dense:
    dense = make_dense(kernel, bias)
    dense.quantize("int4", config=quantizers.Int4QuantizationConfig(block_size=block_size))
    return dense


def _bits(variables, params: int) -> float:
    return 8.0 * sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables) / params


def storage(kernel: np.ndarray, bias: np.ndarray) -> None:
    params = kernel.size
    print(f"\n1. storage of the frozen base ({kernel.shape[0]}x{kernel.shape[1]} kernel, bias excluded)")
    rows = []
    for dq in (True, False):
        layer = QLoRADense.from_layer(make_dense(kernel, bias), tf_lora.QLoRAConfig(double_quant=dq), rank=8)
        report = memory_report(layer)
        rows.append((f"tf_lora NF4{' + DQ' if dq else ''} (group 64)", report["bits_per_parameter"],
                     ", ".join(f"{v.name} {v.dtype}{tuple(v.shape)}" for v in layer.storage_variables())))
    q = nf4.quantize(kernel)
    assert abs(nf4.bits_per_parameter(q) - rows[0][1]) < 1e-9  # layer variables == NF4Tensor arrays
    dense = keras_int4(kernel, bias)
    stored = [v for v in dense.weights if v.name != "bias"]
    rows.append(("keras int4 (block 128)", _bits(stored, params),
                 ", ".join(f"{v.name} {v.dtype}{tuple(v.shape)}" for v in stored)))
    rows.append(("keras int4 (block 128), without g_idx",
                 _bits([v for v in stored if v.name != "g_idx"], params), ""))
    rows.append(("float32", 32.0, ""))
    for name, bits, what in rows:
        print(f"  {name:<40} {bits:7.4f} bits/param   {what}")
    verdict = "met" if rows[0][1] <= 4.13 else "MISSED"
    print(f"  goal NF4 + DQ <= 4.13: {verdict}; ratio NF4+DQ / keras int4 = {rows[0][1] / rows[2][1]:.3f}")


def keras_int4_dequantized(dense: keras.layers.Dense) -> np.ndarray:
    """Keras' own dequantization of its int4 variables (what its call multiplies with)."""
    unpacked = quantizers.unpack_int4(dense._kernel, dense.units, axis=-1)
    w = dequantize_with_sz_map(unpacked, dense.kernel_scale, dense.kernel_zero, dense.g_idx, group_axis=0)
    return keras.ops.convert_to_numpy(w)


def quantization_error(kernel: np.ndarray) -> None:
    print(f"\n2. quantization MSE on N(0, 1/{kernel.shape[0]}) weights, {kernel.size:,} values "
          "(lower is better)")
    zeros, eye = np.zeros(kernel.shape[1], "float32"), np.eye(kernel.shape[0], dtype="float32")
    for group in (64, 128):
        dense = keras_int4(kernel, zeros, group)
        from_output = keras.ops.convert_to_numpy(dense(eye))  # eye @ W_deq + 0
        from_vars = keras_int4_dequantized(dense)
        gap = float(np.max(np.abs(from_output - from_vars)))
        mse_int4 = float(np.mean((from_output - kernel) ** 2))
        bits = _bits([v for v in dense.weights if v.name not in ("bias", "g_idx")], kernel.size)
        line = [f"  group {group:>3}: keras int4 {mse_int4:.4e} ({bits:.3f} bits; output vs variables "
                f"max gap {gap:.1e})"]
        for dq in (False, True):
            q = nf4.quantize(kernel, group, dq)
            mse = float(np.mean((nf4.dequantize(q).numpy() - kernel) ** 2))
            line.append(f"NF4{'+DQ' if dq else ''} {mse:.4e} ({nf4.bits_per_parameter(q):.3f} bits; "
                        f"x{mse / mse_int4:.3f} of int4)")
        print(" | ".join(line))


def make_layer(kind: str, kernel: np.ndarray, bias: np.ndarray, rank: int, alpha: float):
    if kind == "qlora":
        return QLoRADense.from_layer(make_dense(kernel, bias), tf_lora.QLoRAConfig(), rank=rank, alpha=alpha)
    if kind == "keras_int4":
        dense = keras_int4(kernel, bias)
        dense.enable_lora(rank, lora_alpha=alpha)
        return dense
    if kind == "lora":
        return tf_lora.LoRADense.from_layer(make_dense(kernel, bias), rank=rank, alpha=alpha)
    raise ValueError(kind)


def train_step_timing(args, kernel: np.ndarray, bias: np.ndarray, rng) -> bool:
    d = kernel.shape[0]
    x = tf.constant(rng.standard_normal((args.batch, args.seq, d)).astype("float32"))
    y = tf.constant(rng.standard_normal((args.batch, args.seq, d)).astype("float32"))
    print(f"\n3. train step: Dense {d}->{d}, rank {args.rank}, alpha {args.alpha:g}, input "
          f"({args.batch}, {args.seq}, {d}) float32, Adam, MSE; load average {_loadavg()}")
    variants = [Variant(kind, jit, make_layer(kind, kernel, bias, args.rank, args.alpha))
                for jit in (False, True) for kind in KINDS]
    w_nf4 = nf4.dequantize(nf4.quantize(kernel)).numpy()
    w_int4 = keras_int4_dequantized(variants[1].layer)
    xs = x.numpy()[:2]
    print("  forward at init vs x @ W_dequantized + b (max abs error), trainable params:")
    for v in variants[:3]:
        w = {"qlora": w_nf4, "keras_int4": w_int4, "lora": kernel}[v.kind]
        err = float(np.max(np.abs(keras.ops.convert_to_numpy(v.layer(xs)) - (xs @ w + bias))))
        n_train = sum(int(np.prod(t.shape)) for t in v.layer.trainable_variables)
        print(f"    {v.kind:<11} {err:.2e}   {n_train:,}")
    t0 = time.perf_counter()
    for v in variants:
        v.step = make_train_step(v.layer, v.jit)
        t = time.perf_counter()
        float(v.step(x, y))
        print(f"  first call (trace/compile) {v.label:<17} {1e3 * (time.perf_counter() - t):8.1f} ms")
    for _ in range(args.warmup):
        for v in variants:
            float(v.step(x, y))
    n = len(variants)
    for r in range(args.rounds):
        for i in range(n):
            v = variants[(r + i) % n]
            t = time.perf_counter()
            float(v.step(x, y))
            v.times_ms.append(1e3 * (time.perf_counter() - t))
    for v in variants:
        if not np.isfinite(float(v.step(x, y))):
            print(f"ERROR: {v.label} loss is not finite", file=sys.stderr)
            return False
    print(f"\n  {args.rounds} interleaved rounds after {args.warmup} warmup rounds "
          f"({time.perf_counter() - t0:.1f} s incl. tracing)")
    header = f"  {'variant':<11} {'jit':<5} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'(p90-p10)/med':>14}"
    print(header + "\n  " + "-" * (len(header) - 2))
    for v in variants:
        med, p10, p90 = pct(v.times_ms, 50), pct(v.times_ms, 10), pct(v.times_ms, 90)
        print(f"  {v.kind:<11} {str(v.jit):<5} {med:>10.2f} {p10:>9.2f} {p90:>9.2f} {(p90 - p10) / med:>13.0%}")
    by = {(v.kind, v.jit): np.asarray(v.times_ms) for v in variants}
    print("\n  ratios (ratio of medians | median of per-round ratios [p10, p90])")
    for jit in (False, True):
        for other in ("keras_int4", "lora"):
            ours, theirs = by["qlora", jit], by[other, jit]
            paired, of_medians = ours / theirs, np.median(ours) / np.median(theirs)
            verdict = ""
            if other == "keras_int4":
                verdict = (f"  (goal <= {GOAL:.2f} applies to the full size)" if args.quick else
                           f"  goal <= {GOAL:.2f}: {'met' if of_medians <= GOAL else 'MISSED'}")
            print(f"    qlora/{other:<10} jit={str(jit):<5} {of_medians:6.3f} | {np.median(paired):6.3f} "
                  f"[{pct(paired, 10):.3f}, {pct(paired, 90):.3f}]{verdict}")
    noise = max((pct(t, 90) - pct(t, 10)) / pct(t, 50) for t in by.values())
    print(f"\n  machine noise: worst (p90-p10)/median = {noise:.0%}; load average at end {_loadavg()} "
          f"on {os.cpu_count()} cores")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    d = args.dim
    kernel = (rng.standard_normal((d, d)) / np.sqrt(d)).astype("float32")
    bias = (0.1 * rng.standard_normal((d,))).astype("float32")
    print(f"tf_lora QLoRA bench: tensorflow {tf.__version__}, keras {keras.__version__}, "
          f"os.cpu_count()={os.cpu_count()}, devices={[x.device_type for x in tf.config.list_logical_devices()]}")
    storage(kernel, bias)
    quantization_error(kernel)
    return 0 if train_step_timing(args, kernel, bias, rng) else 1


if __name__ == "__main__":
    sys.exit(main())
