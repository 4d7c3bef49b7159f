"""Gradient checkpointing: peak train-step memory and step time, with vs without.

A KerasHub GemmaCausalLM built from config (4 blocks, hidden 256, 4 heads, sequence 512,
batch 4), LoRA rank 8 on query/value, Adam. Modes: without checkpointing, with it (every
block recomputed, the default) and with ``recompute_last=False`` (every block but the
last). Peak memory: each mode in a fresh process (TensorFlow's CPU BFC allocator peak
above the state after a warm-up step). Step time: the three modes' models in one process,
interleaved round after round, the median step. Prints the ratios with / without.

    python benchmarks/bench_checkpointing.py [--rounds 5] [--quick]
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
modes, T, B, layers, steps = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def make(mode):
    keras.utils.set_random_seed(0)
    bb = keras_hub.models.GemmaBackbone(vocabulary_size=512, num_layers=layers, num_query_heads=4, num_key_value_heads=1,
                                         hidden_dim=256, intermediate_dim=1024, head_dim=64)
    lm = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
    lm = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=8, target_modules=("query", "value"), gradient_checkpointing=mode == "on"),
                       inplace=True, verbose=0)
    if mode == "not_last":
        tf_lora.enable_gradient_checkpointing(lm, recompute_last=False)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return lm

rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(0, 512, (B, T)).astype("int32"), "padding_mask": np.ones((B, T), "int32")}
y = rng.integers(0, 512, (B, T))
step = lambda lm: float(np.ravel(lm.train_on_batch(x, y))[0])
if len(modes) == 1:  # peak memory, in this fresh process
    lm = make(modes[0])
    losses = [step(lm)]
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = tf.config.experimental.get_memory_info("CPU:0")["current"]
    losses += [step(lm) for _ in range(steps)]
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - start
    print("RESULT " + json.dumps({"peak_bytes": int(peak), "losses": losses, "blocks": tf_lora.checkpointed_blocks(lm)}))
else:  # step time, the modes interleaved
    models = {m: make(m) for m in modes}
    times = {m: [] for m in modes}
    for lm in models.values():
        step(lm)
    for _ in range(steps):
        for m, lm in models.items():
            t = time.perf_counter(); step(lm); times[m].append(time.perf_counter() - t)
    print("RESULT " + json.dumps({m: float(np.median(v)) for m, v in times.items()}))
"""


MODES = ("off", "on", "not_last")  # without; with (every block); with recompute_last=False


def _child(modes, seq: int, batch: int, layers: int, steps: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", CHILD, ",".join(modes), str(seq), str(batch), str(layers), str(steps)],
                         capture_output=True, text=True, timeout=900, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def measure(mode, seq: int, batch: int, layers: int, steps: int) -> dict:
    """Peak train-step memory of one mode (``"off"``, ``"on"``, ``"not_last"``) in a fresh
    process: peak bytes, the losses of 1 + `steps` steps, the checkpointed blocks."""
    if mode not in MODES:
        raise ValueError(f"Received an invalid value for `mode`, expected one of {MODES}. Received: mode={mode!r}")
    return _child([mode], seq, batch, layers, steps)


def step_times(seq: int, batch: int, layers: int, rounds: int) -> dict:
    """Median step seconds of every mode, the three models interleaved in one process."""
    return _child(list(MODES), seq, batch, layers, rounds)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sequence 128, 2 blocks, 1 step (smoke run)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    args = p.parse_args(argv)
    seq, batch, layers, steps, rounds = (128, 2, 2, 1, 1) if args.quick else (512, 4, 4, 3, args.rounds)
    mem = {m: measure(m, seq, batch, layers, steps) for m in MODES}
    times = step_times(seq, batch, layers, rounds)
    off = mem["off"]
    report = {
        "peak_mib": {m: r["peak_bytes"] / 2**20 for m, r in mem.items()},
        "step_ms": {m: t * 1000 for m, t in times.items()},
        "memory_ratio": mem["on"]["peak_bytes"] / off["peak_bytes"],
        "memory_ratio_not_last": mem["not_last"]["peak_bytes"] / off["peak_bytes"],
        "time_ratio": times["on"] / times["off"],
        "time_ratio_not_last": times["not_last"] / times["off"],
        "max_loss_diff": max(abs(a - b) for m in ("on", "not_last") for a, b in zip(off["losses"], mem[m]["losses"])),
        "blocks": mem["on"]["blocks"], "blocks_not_last": mem["not_last"]["blocks"],
    }
    print(f"Gemma-shaped decoder, {layers} blocks, hidden 256, sequence {seq}, batch {batch}, LoRA r=8 on query/value")
    print(f"{'':22s} {'without':>9s} {'with':>9s} {'ratio':>6s} {'not last':>11s} {'ratio':>6s}  goal")
    print("-" * 80)
    pk, ms = report["peak_mib"], report["step_ms"]
    print(f"{'peak train-step MiB':22s} {pk['off']:9.1f} {pk['on']:9.1f} {report['memory_ratio']:6.2f} "
          f"{pk['not_last']:11.1f} {report['memory_ratio_not_last']:6.2f}  <= 0.5")
    print(f"{'step ms (median)':22s} {ms['off']:9.0f} {ms['on']:9.0f} {report['time_ratio']:6.2f} "
          f"{ms['not_last']:11.0f} {report['time_ratio_not_last']:6.2f}  <= 1.5")
    print(f"'with' recomputes all {len(report['blocks'])} blocks; 'not last' (recompute_last=False) "
          f"{len(report['blocks_not_last'])}, storing the last block's activations")
    print(f"max |loss difference| over {steps + 1} steps: {report['max_loss_diff']:.1e}")
    return report


if __name__ == "__main__":
    main()
