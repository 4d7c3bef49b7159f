"""Whole-model fine-tuning speed and memory: tf_lora vs Keras' own LoRA, full fine-tuning, PEFT.

KerasHub decoders built from config (random weights; speed and memory do not depend
on their values), Gemma and Llama3 shaped, at two sizes:

    small: 4 blocks, hidden 512, sequence 256, batch 4
    large: 8 blocks, hidden 1024, sequence 512, batch 4

Variants (same weights, Adam, rank 8):

    tf_lora        tf_lora.adapt(LoRAConfig(rank=8, dropout=0, target_modules=query/value), inplace=True)
    keras_lora     backbone.enable_lora(8)  (KerasHub's default targets: query/value)
    tf_qlora       tf_lora QLoRA (NF4 + double quantization) on every linear layer of the blocks,
                   LoRA on each of them (the QLoRA recipe)
    keras_int4     model.quantize("int4") of the same linear layers + enable_lora(8) on each
    full           every weight trains

Modes: ``graph`` (tf.function, the default), ``jit`` (``compile(jit_compile=True)``) and
``bf16`` (``mixed_bfloat16`` policy, tf.function).

Rules: speed ratios come from runs interleaved in one process (one process per
architecture, size and mode; the variants take turns, round after round; medians of
steps timed from one batch's end to the next, so `fit`'s per-call setup, which varies by
hundreds of ms here, is not counted);
``step/fwd`` divides a train step by a forward pass of the same model timed in the same
rounds. Peak memory comes from one fresh process per variant (TensorFlow's BFC allocator
peak during a train step, weights and optimizer state included). ``--loss-curve`` trains
tf_lora LoRA in float32 and mixed_bfloat16 from the same start on the same batches and
prints the largest relative loss difference. With ``bf16`` among the modes, one matmul of
the model's feed-forward shape is timed in float32 and bfloat16 on the same CPU: the
speed-up the CPU's bf16 kernels allow. ``--dequant`` times one pass over every
quantized kernel (tf_lora's NF4 dequantization against Keras int4's unpack and its
dequantization), what bounds the QLoRA ratio. ``--peft`` adds Hugging Face PEFT on
torch 2.13.0 CPU (the same architectures and sizes, LoRA r=8 on q_proj/v_proj) as an
external reference, in its own process; it needs ``pip install "torch==2.13.0"
transformers peft`` and is never a tf_lora dependency.

    python benchmarks/bench_models.py [--sizes small large] [--archs gemma llama3]
        [--modes graph jit bf16] [--rounds 5] [--no-memory] [--dequant] [--loss-curve] [--peft] [--json out.json]
    python benchmarks/bench_models.py --quick      # a 2-block smoke run of every path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("tf_lora", "keras_lora", "tf_qlora", "keras_int4", "full")
MODES = ("graph", "jit", "bf16")
SIZES = {
    "small": dict(layers=4, hidden=512, seq=256, batch=4),
    "large": dict(layers=8, hidden=1024, seq=512, batch=4),
    "quick": dict(layers=2, hidden=128, seq=64, batch=2),
}
VOCAB = 4096
HEADS = 8
# The linear layers of a block, by KerasHub name, per architecture (QLoRA variants adapt all).
LINEAR = {
    "gemma": ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"),
    "llama3": ("query", "key", "value", "attention_output", "feedforward_intermediate_dense",
               "feedforward_gate_dense", "feedforward_output_dense"),
}
QV = ("query", "value")

# ---------------------------------------------------------------------------
# Child process: everything that imports TensorFlow runs here.
CHILD = r"""
import json, os, sys, time
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
task = json.loads(sys.argv[1])
import numpy as np, keras, keras_hub, tensorflow as tf
sys.path.insert(0, task["repo"])
import tf_lora
if task["mode"] == "bf16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
arch, size, V = task["arch"], task["size"], task["vocab"]
L, H, T, B = size["layers"], size["hidden"], size["seq"], size["batch"]
LINEAR, QV = tuple(task["linear"]), ("query", "value")

def build():
    keras.utils.set_random_seed(0)
    if arch == "gemma":
        bb = keras_hub.models.GemmaBackbone(vocabulary_size=V, num_layers=L, num_query_heads=task["heads"],
            num_key_value_heads=1, hidden_dim=H, intermediate_dim=8 * H, head_dim=H // task["heads"])
        return keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
    bb = keras_hub.models.Llama3Backbone(vocabulary_size=V, num_layers=L, num_query_heads=task["heads"],
        num_key_value_heads=2, hidden_dim=H, intermediate_dim=7 * H // 2)
    return keras_hub.models.Llama3CausalLM(backbone=bb, preprocessor=None)

def linear(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))

def make(variant):
    m = build()
    if variant == "tf_lora":
        m = tf_lora.adapt(m, tf_lora.LoRAConfig(rank=8, dropout=0.0, target_modules=QV), inplace=True, verbose=0)
    elif variant == "tf_qlora":
        m = tf_lora.adapt(m, tf_lora.LoRAConfig(rank=8, dropout=0.0, target_modules=LINEAR,
                                                quantization=tf_lora.QLoRAConfig()), inplace=True, verbose=0)
    elif variant == "keras_lora":
        m.backbone.enable_lora(8)
    elif variant == "keras_int4":
        m.quantize("int4", filters=linear)
        m.backbone.enable_lora(8, target_layer_names=list(LINEAR))
    m.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=task["mode"] == "jit",
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m

rng = np.random.default_rng(0)
def batch():
    x = rng.integers(0, V, (B, T + 1)).astype("int32")
    return {"token_ids": x[:, :-1], "padding_mask": np.ones((B, T), "int32")}, x[:, 1:]
x, y = batch()
ds = tf.data.Dataset.from_tensors((x, y)).repeat()

def trainable(m):
    return int(sum(np.prod(v.shape) for v in m.trainable_variables))

out = {}
if task["kind"] == "time":
    models = {v: make(v) for v in task["variants"]}
    forwards = {}
    for v, m in models.items():
        m.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
        f = tf.function(lambda inputs, m=m: m(inputs, training=False), jit_compile=task["mode"] == "jit")
        f(x); forwards[v] = f
    steps, fwds = {v: [] for v in models}, {v: [] for v in models}
    k = task["steps_per_round"]

    class Clock(keras.callbacks.Callback):  # a step: from one batch's end to the next's
        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
    clock = Clock()
    for _ in range(task["rounds"]):
        for v, m in models.items():
            clock.ends = []
            m.fit(ds, steps_per_epoch=k + 1, epochs=1, verbose=0, callbacks=[clock])
            steps[v].extend(np.diff(clock.ends).tolist())
            t = time.perf_counter(); forwards[v](x).numpy(); fwds[v].append(time.perf_counter() - t)
    out = {v: {"step_s": float(np.median(steps[v])), "fwd_s": float(np.median(fwds[v])),
               "trainable": trainable(models[v])} for v in models}
elif task["kind"] == "memory":
    m = make(task["variants"][0])
    m.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
    tf.config.experimental.reset_memory_stats("CPU:0")
    resident = tf.config.experimental.get_memory_info("CPU:0")["current"]
    m.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
    out = {"resident_bytes": int(resident), "peak_bytes": int(tf.config.experimental.get_memory_info("CPU:0")["peak"])}
elif task["kind"] == "dequant":
    # One pass over every quantized kernel, as each layer's train step does it: tf_lora's NF4
    # dequantization (twice a step: forward and backward) against Keras int4's unpack (once a
    # step) and its scale/zero-point dequantization (twice: forward and backward), following
    # Keras' EinsumDense._int4_call. Each kernel is summed so nothing is pruned.
    from keras.src import quantizers
    from keras.src.layers.core.einsum_dense import dequantize_with_sz_map
    q, k4 = make("tf_qlora"), make("keras_int4")
    ql = [l for l in q._flatten_layers() if isinstance(l, (tf_lora.QLoRADense, tf_lora.QLoRAEinsumDense))]
    kl = [l for l in k4._flatten_layers() if getattr(l, "quantization_mode", None) == "int4"]
    unpack = lambda l: quantizers.unpack_int4(tf.convert_to_tensor(l._kernel), l._int4_unpacked_column_size,
                                              axis=-1, dtype="int8")
    def scale(l, u):
        if getattr(l, "_int4_block_size", None) in (None, -1):
            return tf.cast(u, "float32") / l.kernel_scale
        return dequantize_with_sz_map(u, tf.convert_to_tensor(l.kernel_scale), tf.convert_to_tensor(l.kernel_zero),
                                      tf.convert_to_tensor(l.g_idx), group_axis=0)
    unpacked = [unpack(l) for l in kl]
    passes = {
        "tf_nf4_dequantize": tf.function(lambda: tf.add_n([tf.reduce_sum(l._dequantize()) for l in ql])),
        "keras_int4_unpack": tf.function(lambda: tf.add_n([tf.reduce_sum(tf.cast(unpack(l), "float32")) for l in kl])),
        "keras_int4_dequantize": tf.function(lambda: tf.add_n([tf.reduce_sum(tf.cast(scale(l, u), "float32"))
                                                               for l, u in zip(kl, unpacked)])),
        "sum_only": tf.function(lambda: tf.add_n([tf.reduce_sum(tf.cast(u, "float32")) for u in unpacked])),
    }
    for f in passes.values():
        f()
    times = {n: [] for n in passes}
    for _ in range(task["rounds"]):
        for n, f in passes.items():
            t = time.perf_counter(); f().numpy(); times[n].append(time.perf_counter() - t)
    out = {n: float(np.median(v)) for n, v in times.items()}
    out["weights"] = int(sum(np.prod(l.kernel_shape) for l in ql))
elif task["kind"] == "matmul":
    # What bounds the bf16 speed-up on this CPU: one (B*T, H) x (H, 4H) matmul, float32 vs
    # bfloat16, interleaved (oneDNN uses AVX512-BF16 / AMX where the CPU has them).
    n, k = B * T, H
    f = tf.function(lambda a, b: tf.matmul(a, b))
    pair = {d: (tf.cast(tf.random.normal([n, k]), d), tf.cast(tf.random.normal([k, 4 * k]), d))
            for d in ("float32", "bfloat16")}
    for d, (a, b) in pair.items():
        f(a, b).numpy()
    times = {d: [] for d in pair}
    for _ in range(task["rounds"]):
        for d, (a, b) in pair.items():
            t = time.perf_counter()
            for _ in range(5):
                r = f(a, b)
            r.numpy(); times[d].append((time.perf_counter() - t) / 5)
    out = {d: float(np.median(v)) for d, v in times.items()}
    out["shape"] = [n, k, 4 * k]
elif task["kind"] == "curve":
    m = make("tf_lora")
    m.compile(optimizer=keras.optimizers.Adam(2e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # A learnable stream: each token is a fixed permutation of the one before, 10% noise.
    perm = np.random.default_rng(1).permutation(V)
    losses = []
    for step in range(task["steps"]):
        r = np.random.default_rng(100 + step)
        seq = np.empty((B, T + 1), "int64"); seq[:, 0] = r.integers(0, V, B)
        for t in range(T):
            seq[:, t + 1] = np.where(r.random(B) < 0.1, r.integers(0, V, B), perm[seq[:, t]])
        xb = {"token_ids": seq[:, :-1].astype("int32"), "padding_mask": np.ones((B, T), "int32")}
        losses.append(float(np.ravel(m.train_on_batch(xb, seq[:, 1:].astype("int32")))[0]))
    out = {"losses": losses}
print("RESULT " + json.dumps(out))
"""

# PEFT on torch, the same shapes (Hugging Face GemmaForCausalLM / LlamaForCausalLM).
PEFT_CHILD = r"""
import json, sys, time
task = json.loads(sys.argv[1])
import numpy as np, torch, transformers, peft
torch.set_num_threads(2); torch.manual_seed(0)
s, V, arch = task["size"], task["vocab"], task["arch"]
L, H, T, B, heads = s["layers"], s["hidden"], s["seq"], s["batch"], task["heads"]
if arch == "gemma":
    cfg = transformers.GemmaConfig(vocab_size=V, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=H // heads, max_position_embeddings=T)
    model = transformers.GemmaForCausalLM(cfg)
else:
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=7 * H // 2, num_hidden_layers=L,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=T, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.from_numpy(np.random.default_rng(0).integers(0, V, (B, T + 1)))
out = {}
for dtype in task["dtypes"]:
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else torch.enable_grad
    def step():
        with ctx():
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    def forward():
        with torch.no_grad(), ctx():
            model(ids[:, :-1])
    step(); step(); forward()
    st, fw = [], []
    for _ in range(task["rounds"]):
        t = time.perf_counter(); step(); st.append(time.perf_counter() - t)
        t = time.perf_counter(); forward(); fw.append(time.perf_counter() - t)
    out[dtype] = {"step_s": float(np.median(st)), "fwd_s": float(np.median(fw))}
print("RESULT " + json.dumps(out))
"""


def _run(code: str, task: dict, timeout: int = 3600) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(task)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"child {task.get('kind', 'peft')} {task.get('arch')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def _task(kind, arch, size, mode="graph", variants=VARIANTS, **extra) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(kind=kind, arch=arch, size=SIZES[size], mode=mode, variants=list(variants), vocab=VOCAB,
                heads=HEADS, linear=list(LINEAR[arch]), repo=repo, **extra)


def tokens(size: str) -> int:
    return SIZES[size]["seq"] * SIZES[size]["batch"]


def print_speed(arch, size, mode, res):
    s = SIZES[size]
    print(f"\n{arch} {size} ({s['layers']} blocks, hidden {s['hidden']}, seq {s['seq']}, batch {s['batch']}), {mode}")
    print(f"{'variant':12s} {'trainable':>11s} {'step ms':>8s} {'tokens/s':>9s} {'step/fwd':>9s}  ratio")
    print("-" * 80)
    for v, r in res.items():
        ratio = ""
        if v == "tf_lora" and "keras_lora" in res:
            ratio = f"{r['step_s'] / res['keras_lora']['step_s']:.2f}x keras_lora (goal <= 0.9)"
        if v == "tf_qlora" and "keras_int4" in res:
            ratio = f"{r['step_s'] / res['keras_int4']['step_s']:.2f}x keras_int4 (goal <= 0.85)"
        print(f"{v:12s} {r['trainable']:11,d} {r['step_s'] * 1e3:8.0f} {tokens(size) / r['step_s']:9.0f} "
              f"{r['step_s'] / r['fwd_s']:9.2f}  {ratio}")


def machine() -> dict:
    """The CPU the figures come from: its name, cores, and whether it has bfloat16 instructions
    (without AVX512-BF16 / AMX-BF16, ``mixed_bfloat16`` is emulated and slower than float32)."""
    info = {"cpu": "unknown", "cores": os.cpu_count(), "bf16_instructions": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["cpu"] == "unknown":
            info["cpu"] = value.strip()
        if key.strip() == "flags":
            flags = value.split()
            info["bf16_instructions"] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
            info["avx512"] = "avx512f" in flags
            break
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["small", "large"], choices=["small", "large"])
    p.add_argument("--archs", nargs="+", default=["gemma", "llama3"], choices=list(LINEAR))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--memory-modes", nargs="+", choices=("graph", "bf16"),
                   help="modes of the peak-memory runs (default: those of --modes but jit)")
    p.add_argument("--loss-curve", action="store_true", help="float32 vs mixed_bfloat16 loss curves (tf_lora LoRA)")
    p.add_argument("--dequant", action="store_true",
                   help="time one dequantization pass over the quantized kernels, tf_lora NF4 vs Keras int4")
    p.add_argument("--peft", action="store_true", help="also time Hugging Face PEFT on torch (optional)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--quick", action="store_true", help="tiny 2-block model, 1 round: a smoke run of every path")
    args = p.parse_args(argv)
    sizes = ["quick"] if args.quick else args.sizes
    rounds = 1 if args.quick else args.rounds
    memory_modes = args.memory_modes or [m for m in args.modes if m != "jit"]
    report = {"machine": machine(), "speed": {}, "memory": {}, "dequant": {}, "curve": {}, "peft": {}}
    m = report["machine"]
    print(f"CPU: {m['cpu']}, {m['cores']} cores, AVX512 {'yes' if m.get('avx512') else 'no'}, "
          f"bfloat16 instructions: {', '.join(m['bf16_instructions']) or 'none (bf16 is emulated)'}")
    for size in sizes:
        for arch in args.archs:
            for mode in args.modes:
                k = 1 if size == "large" else 2
                t0 = time.perf_counter()
                res = _run(CHILD, _task("time", arch, size, mode, rounds=rounds, steps_per_round=k))
                report["speed"][f"{arch}/{size}/{mode}"] = res
                print_speed(arch, size, mode, res)
                print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if not args.no_memory:
                mem = {}
                for mode in memory_modes:
                    for v in VARIANTS:
                        mem[f"{v}/{mode}"] = _run(CHILD, _task("memory", arch, size, mode, variants=[v]))
                report["memory"][f"{arch}/{size}"] = mem
                print(f"\n{arch} {size}: peak train-step memory, fresh process per variant (MiB: peak / resident)")
                for key, r in mem.items():
                    print(f"  {key:18s} {r['peak_bytes'] / 2**20:8.0f} / {r['resident_bytes'] / 2**20:6.0f}")
                for mode in memory_modes:
                    q, k4 = mem[f"tf_qlora/{mode}"]["peak_bytes"], mem[f"keras_int4/{mode}"]["peak_bytes"]
                    lo, kl = mem[f"tf_lora/{mode}"]["peak_bytes"], mem[f"keras_lora/{mode}"]["peak_bytes"]
                    print(f"  {mode}: tf_qlora / keras_int4 peak {q / k4:.2f} (goal < 1); tf_lora / keras_lora {lo / kl:.2f}")
            if args.dequant or args.quick:
                d = _run(CHILD, _task("dequant", arch, size, rounds=max(3, 3 * rounds)))
                report["dequant"][f"{arch}/{size}"] = d
                ms = {n: v * 1e3 for n, v in d.items() if n != "weights"}
                ours = 2 * ms["tf_nf4_dequantize"]
                theirs = ms["keras_int4_unpack"] + 2 * ms["keras_int4_dequantize"]
                print(f"\n{arch} {size}: one pass over the {d['weights']:,d} quantized weights (ms, a sum of each "
                      f"kernel included; that sum alone: {ms['sum_only']:.1f})")
                print(f"  tf_lora NF4 dequantize {ms['tf_nf4_dequantize']:.1f}; Keras int4 unpack "
                      f"{ms['keras_int4_unpack']:.1f}, dequantize {ms['keras_int4_dequantize']:.1f}")
                print(f"  per train step: tf_lora 2 x dequantize = {ours:.1f}; Keras unpack + 2 x dequantize = "
                      f"{theirs:.1f}; ratio {ours / theirs:.2f}")
            if args.peft:
                try:
                    res = _run(PEFT_CHILD, dict(arch=arch, size=SIZES[size], vocab=VOCAB, heads=HEADS, rounds=rounds,
                                                dtypes=["fp32", "bf16"]))
                except RuntimeError as e:
                    print(f"\nPEFT reference skipped: {str(e).splitlines()[-1]}")
                else:
                    report["peft"][f"{arch}/{size}"] = res
                    for dtype, r in res.items():
                        print(f"  PEFT torch {arch} {size} {dtype}: step {r['step_s'] * 1e3:.0f} ms, "
                              f"{tokens(size) / r['step_s']:.0f} tokens/s, step/fwd {r['step_s'] / r['fwd_s']:.2f}")
    for size in sizes:
        for arch in args.archs:
            g, b = report["speed"].get(f"{arch}/{size}/graph"), report["speed"].get(f"{arch}/{size}/bf16")
            if g and b:
                print(f"{arch} {size}: mixed_bfloat16 speed-up over float32 (tf_lora LoRA, separate processes): "
                      f"{g['tf_lora']['step_s'] / b['tf_lora']['step_s']:.2f}x (goal >= 1.4)")
    if "bf16" in args.modes:
        for size in sizes:
            mm = _run(CHILD, _task("matmul", args.archs[0], size, rounds=max(5, 3 * rounds)))
            report["matmul"] = {**report.get("matmul", {}), size: mm}
            n, k, f = mm["shape"]
            print(f"{size}: one {n}x{k} @ {k}x{f} matmul, float32 {mm['float32'] * 1e3:.2f} ms, bfloat16 "
                  f"{mm['bfloat16'] * 1e3:.2f} ms: bf16 speed-up {mm['float32'] / mm['bfloat16']:.2f}x on this CPU "
                  "(what bounds the mixed_bfloat16 one)")
    if args.loss_curve:
        steps = 4 if args.quick else 30
        for arch in args.archs:
            size = sizes[0]
            f32 = _run(CHILD, _task("curve", arch, size, "graph", steps=steps))["losses"]
            b16 = _run(CHILD, _task("curve", arch, size, "bf16", steps=steps))["losses"]
            rel = max(abs(a - b) / abs(a) for a, b in zip(f32, b16))
            report["curve"][arch] = {"float32": f32, "bf16": b16, "max_rel_diff": rel}
            print(f"{arch} {size} loss curve, {steps} steps: float32 {f32[0]:.3f} -> {f32[-1]:.3f}, "
                  f"bf16 {b16[0]:.3f} -> {b16[-1]:.3f}, max relative difference {rel:.3%}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return report


if __name__ == "__main__":
    main()
