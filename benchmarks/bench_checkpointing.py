"""Gradient checkpointing: peak train-step memory and step time, with vs without.

A KerasHub GemmaCausalLM built from config (4 blocks, hidden 256, 4 heads, sequence 512,
batch 4), LoRA rank 8 on query/value, Adam. Each mode runs in a fresh process (peak memory
is TensorFlow's CPU BFC allocator peak above the state after a warm-up step); step time is
the mean of the steps after the warm-up. Prints the ratios with / without.

    python benchmarks/bench_checkpointing.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
import numpy as np, keras, keras_hub, tensorflow as tf, tf_lora
gc, T, B, layers, steps = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
keras.utils.set_random_seed(0)
bb = keras_hub.models.GemmaBackbone(vocabulary_size=512, num_layers=layers, num_query_heads=4, num_key_value_heads=1,
                                     hidden_dim=256, intermediate_dim=1024, head_dim=64)
lm = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
lm = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=8, target_modules=("query", "value"), gradient_checkpointing=gc),
                   inplace=True, verbose=0)
lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(0, 512, (B, T)).astype("int32"), "padding_mask": np.ones((B, T), "int32")}
y = rng.integers(0, 512, (B, T))
losses = [float(np.ravel(lm.train_on_batch(x, y))[0])]
tf.config.experimental.reset_memory_stats("CPU:0")
start = tf.config.experimental.get_memory_info("CPU:0")["current"]
t = time.perf_counter()
losses += [float(np.ravel(lm.train_on_batch(x, y))[0]) for _ in range(steps)]
seconds = (time.perf_counter() - t) / steps
peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - start
print("RESULT " + json.dumps({"peak_bytes": int(peak), "step_seconds": seconds, "losses": losses,
                             "blocks": tf_lora.checkpointed_blocks(lm)}))
"""


def measure(gc: bool, seq: int, batch: int, layers: int, steps: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if gc else "0", str(seq), str(batch), str(layers), str(steps)],
                         capture_output=True, text=True, timeout=900, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sequence 128, 2 blocks, 1 timed step (smoke run)")
    args = p.parse_args(argv)
    seq, batch, layers, steps = (128, 2, 2, 1) if args.quick else (512, 4, 4, 3)
    off, on = measure(False, seq, batch, layers, steps), measure(True, seq, batch, layers, steps)
    report = {
        "peak_mib_without": off["peak_bytes"] / 2**20, "peak_mib_with": on["peak_bytes"] / 2**20,
        "memory_ratio": on["peak_bytes"] / off["peak_bytes"], "time_ratio": on["step_seconds"] / off["step_seconds"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(off["losses"], on["losses"])), "blocks": on["blocks"],
    }
    print(f"Gemma-shaped decoder, {layers} blocks, hidden 256, sequence {seq}, batch {batch}, LoRA r=8 on query/value")
    print(f"{'':24s} {'without':>10s} {'with':>10s} {'ratio':>7s}  goal")
    print("-" * 60)
    print(f"{'peak train-step MiB':24s} {report['peak_mib_without']:10.1f} {report['peak_mib_with']:10.1f} "
          f"{report['memory_ratio']:7.2f}  <= 0.5")
    print(f"{'step ms':24s} {off['step_seconds'] * 1000:10.0f} {on['step_seconds'] * 1000:10.0f} "
          f"{report['time_ratio']:7.2f}  <= 1.5")
    print(f"max |loss difference| over {steps + 1} steps: {report['max_loss_diff']:.1e}")
    return report


if __name__ == "__main__":
    main()
