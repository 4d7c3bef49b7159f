"""Gradient checkpointing: peak train-step memory and step time, with vs without.

A KerasHub GemmaCausalLM built from config (by default issue 22's setting: 6 blocks,
hidden 256, 4 query heads and 1 key/value head of 64, intermediate 1,024, sequence 1,024,
batch 4), LoRA rank 8 on query/value, Adam; KerasHub's own attention ("full"), tf_lora's
chunked attention (``use_chunked_attention``, "chunked": at this size the op picks its fused
pass, a whole score matrix, unless checkpointed) or the chunked op's loops in 16 MiB tiles
(``use_chunked_attention(max_memory_bytes=16 MiB)``, "loops"). Checkpointing modes: without
("off"), every block recomputed ("on", the default of ``enable_gradient_checkpointing``),
every block but the last (``recompute_last=False``, "not_last"), and "rerun": "on" as it
was before the recomputation replayed the chunked attention's forward results
(`tf_lora.layers.chunked_kernel.Memo`; reproduced here by hiding the memo while the step is
traced, so the recomputation runs the attention's forward again, fused where it fits).

Peak memory: each mode in a fresh process (TensorFlow's CPU BFC allocator peak above the
state after a warm-up step). Step time: every mode's model in one process, interleaved
round after round; the median wall and CPU (process) time per step. Prints the ratios
with / without checkpointing per attention, and the load average (a shared machine's
wall times are noisy; CPU times less so).

    python benchmarks/bench_checkpointing.py [--rounds 5] [--blocks 6 --seq 1024 --batch 4]
        [--not-last] [--no-memory] [--quick]
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
from tf_lora.layers import chunked_kernel
cfg = json.loads(sys.argv[1])
modes, T, B, layers, steps = cfg["modes"], cfg["seq"], cfg["batch"], cfg["layers"], cfg["steps"]
rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(0, 512, (B, T)).astype("int32"), "padding_mask": np.ones((B, T), "int32")}
y = rng.integers(0, 512, (B, T))
step = lambda lm: float(np.ravel(lm.train_on_batch(x, y))[0])

def make(mode):
    attention, ckpt = mode.split("/")
    keras.utils.set_random_seed(0)
    bb = keras_hub.models.GemmaBackbone(vocabulary_size=512, num_layers=layers, num_query_heads=4, num_key_value_heads=1,
                                         hidden_dim=256, intermediate_dim=1024, head_dim=64)
    lm = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
    lm = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=8, target_modules=("query", "value"),
                                              gradient_checkpointing=ckpt in ("on", "rerun")), inplace=True, verbose=0)
    if attention != "full":
        tf_lora.use_chunked_attention(lm, max_memory_bytes=16 * 2**20 if attention == "loops" else None)
    if ckpt == "not_last":
        tf_lora.enable_gradient_checkpointing(lm, recompute_last=False)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    active = chunked_kernel.active_memo
    if ckpt == "rerun":  # trace the step without the memo: the recomputation reruns the attention
        chunked_kernel.active_memo = lambda: None
    try:
        first = step(lm)  # traces the train function
    finally:
        chunked_kernel.active_memo = active
    return lm, first

if len(modes) == 1:  # peak memory, in this fresh process
    lm, first = make(modes[0])
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = tf.config.experimental.get_memory_info("CPU:0")["current"]
    losses = [first] + [step(lm) for _ in range(steps)]
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - start
    print("RESULT " + json.dumps({"peak_bytes": int(peak), "losses": losses, "blocks": tf_lora.checkpointed_blocks(lm)}))
else:  # step time, the modes interleaved
    models = {m: make(m)[0] for m in modes}
    wall, cpu = {m: [] for m in modes}, {m: [] for m in modes}
    for lm in models.values():  # a warm-up round, not timed
        step(lm)
    for _ in range(steps):
        for m, lm in models.items():
            t, c = time.perf_counter(), time.process_time()
            step(lm)
            wall[m].append(time.perf_counter() - t); cpu[m].append(time.process_time() - c)
    med = lambda d: {m: float(np.median(v)) for m, v in d.items()}
    print("RESULT " + json.dumps({"wall": med(wall), "cpu": med(cpu), "load": os.getloadavg()}))
"""

ATTENTIONS = ("full", "chunked", "loops")
CHECKPOINTING = ("off", "on", "not_last", "rerun")
MODES = tuple(f"{a}/{c}" for a in ATTENTIONS for c in CHECKPOINTING if a != "full" or c != "rerun")


def _mode(mode: str) -> str:
    # "off" / "on" / "not_last" alone: KerasHub's own attention (the earlier modes).
    mode = mode if "/" in mode else f"full/{mode}"
    if mode not in MODES:
        raise ValueError(f"Received an invalid value for `mode`, expected one of {MODES} (or a checkpointing mode "
                         f"alone: {CHECKPOINTING[:3]}). Received: mode={mode!r}")
    return mode


def _child(modes, seq: int, batch: int, layers: int, steps: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    config = json.dumps(dict(modes=list(modes), seq=seq, batch=batch, layers=layers, steps=steps))
    out = subprocess.run([sys.executable, "-c", CHILD, config], capture_output=True, text=True, timeout=1800, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def measure(mode, seq: int, batch: int, layers: int, steps: int) -> dict:
    """Peak train-step memory of one mode (``"full/on"``, ``"chunked/off"``...; ``"on"`` alone
    is ``"full/on"``) in a fresh process: peak bytes, the losses of 1 + `steps` steps, the
    checkpointed blocks."""
    return _child([_mode(mode)], seq, batch, layers, steps)


def step_times(modes, seq: int, batch: int, layers: int, rounds: int) -> dict:
    """Median wall and CPU seconds per step of every mode (models interleaved in one process),
    and the load average at the end."""
    return _child([_mode(m) for m in modes], seq, batch, layers, rounds)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 blocks, sequence 128, batch 2, 1 round (smoke run)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--not-last", action="store_true", help="also recompute_last=False")
    p.add_argument("--no-memory", action="store_true", help="step times only")
    p.add_argument("--modes", help="comma-separated modes to time (default: full, chunked and loops x off, on, "
                                   "rerun); the */off of each is added")
    p.add_argument("--memory-modes", help="comma-separated modes whose peak memory to measure (default: all timed)")
    args = p.parse_args(argv)
    seq, batch, layers, steps, rounds = ((128, 2, 2, 1, 1) if args.quick else
                                         (args.seq, args.batch, args.blocks, 2, args.rounds))
    ckpts = ("off", "on", "rerun") + (("not_last",) if args.not_last else ())
    modes = [m for m in MODES if m.split("/")[1] in ckpts]
    if args.modes:
        chosen = [_mode(m) for m in args.modes.split(",")]
        modes = [m for m in MODES if m in chosen or any(c.split("/")[0] + "/off" == m for c in chosen)]
    times = step_times(modes, seq, batch, layers, rounds)
    mem_modes = modes if not args.memory_modes else [_mode(m) for m in args.memory_modes.split(",")]
    mem = {} if args.no_memory else {m: measure(m, seq, batch, layers, steps) for m in mem_modes}
    wall, cpu = times["wall"], times["cpu"]
    report = {"modes": modes, "step_ms": {m: 1000 * t for m, t in wall.items()},
              "cpu_ms": {m: 1000 * t for m, t in cpu.items()}, "load": times["load"],
              "peak_mib": {m: r["peak_bytes"] / 2**20 for m, r in mem.items()},
              "time_ratio": {m: wall[m] / wall[m.split("/")[0] + "/off"] for m in modes},
              "cpu_ratio": {m: cpu[m] / cpu[m.split("/")[0] + "/off"] for m in modes}}
    if mem:
        off = lambda m: mem.get(m.split("/")[0] + "/off", mem.get("full/off", mem[m]))  # noqa: E731
        report["memory_ratio"] = {m: mem[m]["peak_bytes"] / off(m)["peak_bytes"] for m in mem}
        report["max_loss_diff"] = max(abs(a - b) for m in mem for a, b in zip(off(m)["losses"], mem[m]["losses"]))
    print(f"Gemma-shaped decoder, {layers} blocks, hidden 256, sequence {seq}, batch {batch}, LoRA r=8 on query/value; "
          f"median of {rounds} interleaved rounds; load average {', '.join(f'{v:.1f}' for v in times['load'])}")
    print(f"{'attention / checkpointing':28s} {'step ms':>8s} {'ratio':>6s} {'CPU ms':>8s} {'ratio':>6s} "
          f"{'peak MiB':>9s} {'ratio':>6s}")
    print("-" * 80)
    for m in modes:
        peak = (f"{report['peak_mib'][m]:9.1f} {report['memory_ratio'][m]:6.2f}" if m in mem else f"{'-':>9s} {'-':>6s}")
        print(f"{m:28s} {report['step_ms'][m]:8.0f} {report['time_ratio'][m]:6.2f} {report['cpu_ms'][m]:8.0f} "
              f"{report['cpu_ratio'][m]:6.2f} {peak}")
    print("ratios: against the same attention without checkpointing (goal: step <= 1.5, peak <= 0.5); 'rerun': the "
          "recomputation runs the chunked attention's forward again (before the replay)")
    if mem:
        print(f"max |loss difference| over {steps + 1} steps: {report['max_loss_diff']:.1e}")
    return report


if __name__ == "__main__":
    main()
