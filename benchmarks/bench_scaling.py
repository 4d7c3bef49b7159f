"""How LoRA training throughput and memory scale, and what switching adapters costs (issue 6).

Model: a small transformer encoder built from standard Keras layers (token
``Embedding`` + learned position embedding, pre-LayerNorm blocks of
``MultiHeadAttention`` with head size 64 and a Dense GELU FFN of 4x width, a
final ``LayerNormalization``, mean pooling and a ``Dense`` classifier), adapted with
``tf_lora.adapt(base, LoRAConfig(rank=r, alpha=2r,
target_modules=("query", "key", "value", "attention_output"),
modules_to_save=("classifier",)))``. Training: ``model.compile(AdamW, sparse
categorical cross-entropy)`` then ``model.train_on_batch`` on random tokens
(no XLA), i.e. the trainer a user gets from ``fit``.

Part 1, scaling. Three sweeps around a base configuration (width 256, sequence
128, rank 16, 2 blocks, batch 8): (a) rank 1, 4, 16, 64; (b) width 128, 256,
512, each also trained with full fine-tuning (the same base model, every weight
trainable) for the LoRA / full ratios; (c) sequence length 64, 128, 256, 512.
Every configuration runs in a fresh subprocess (one per configuration;
identical configurations across sweeps are measured once and shown in every
table they belong to). Reported per configuration:

* throughput: tokens/s = batch * seq / median step time, over the timed steps
  after the tracing step and the warmup steps;
* peak: ``tf.config.experimental.get_memory_info('CPU:0')['peak']`` -- the TF
  CPU allocator's peak while training, after ``reset_memory_stats`` once the
  adapted model is built and the base model is freed (so: resident weights +
  optimizer state + activations, gradients and temporaries of a step);
* max RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess, a
  second figure that includes the Python/TensorFlow runtime (~0.7 GiB here).

The subprocesses run with ``TF_CPU_ALLOCATOR_USE_BFC=true`` (unless the variable is
set): with TensorFlow's default oneDNN CPU allocator, ``get_memory_info`` counts
only allocations of 256 KiB or more (smaller tensors -- LoRA matrices, their
optimizer slots, biases -- are served by a small-size allocator it does not
count), while the BFC allocator counts every tensor (rounded up to 256 bytes).

Part 2, switching adapters (one fresh subprocess, base configuration): adds
adapters one by one with ``tf_lora.add_adapter`` and shows that the allocator's
current bytes grow by exactly the new adapter's ``lora_a``/``lora_b`` bytes;
then, with 2, 4 and 8 added adapters, times ``tf_lora.set_adapter(model, name)``,
the first ``model.predict_on_batch`` after a switch (``set_adapter`` drops the
traced functions, so this call retraces) and a steady-state
``predict_on_batch``, cycling over the adapters. Each added adapter's ``lora_b``
is set to small random values so a stale trace would be visible: the first
prediction after every switch is checked against the eager forward pass.

Usage:
    python benchmarks/bench_scaling.py            # full size, < 5 min on 2 cores
    python benchmarks/bench_scaling.py --quick    # tiny sizes, all in one subprocess (smoke test)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

TARGETS = ("query", "key", "value", "attention_output")
RESULT_PREFIX = "BENCH_SCALING_RESULT "
MIB = 2.0**20

FULL = dict(width=256, seq=128, rank=16, layers=2, batch=8, steps=10, warmup=2, max_seconds=6.0,
            ranks=(1, 4, 16, 64), widths=(128, 256, 512), seqs=(64, 128, 256, 512),
            adapters=(2, 4, 8), switch_rounds=4)
QUICK = dict(width=32, seq=16, rank=4, layers=1, batch=2, steps=3, warmup=1, max_seconds=2.0,
             ranks=(1, 4), widths=(32,), seqs=(16, 32), adapters=(2,), switch_rounds=2)


# ----------------------------------------------------------------- worker ---
# TensorFlow/Keras are imported lazily so the orchestrating process stays light.

def _tf():
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf, keras


@functools.lru_cache(maxsize=None)
def _position_embedding_class():
    _, keras = _tf()

    @keras.saving.register_keras_serializable(package="tf_lora_bench")
    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned position embedding to a (batch, seq, dim) input."""

        def __init__(self, max_len, **kwargs):
            super().__init__(**kwargs)
            self.max_len = max_len

        def build(self, input_shape):
            self.positions = self.add_weight(name="positions", shape=(self.max_len, input_shape[-1]),
                                             initializer="glorot_uniform")

        def call(self, x):
            return x + keras.ops.cast(self.positions[: keras.ops.shape(x)[1]], x.dtype)

        def get_config(self):
            return {**super().get_config(), "max_len": self.max_len}

    return PositionEmbedding


def build_encoder(width: int, seq: int, layers: int, vocab: int = 1000, classes: int = 4):
    """Pre-LN transformer encoder classifier from standard Keras layers."""
    _, keras = _tf()
    position_embedding = _position_embedding_class()
    heads = max(1, width // 64)
    tokens = keras.Input((seq,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, width, name="embedding")(tokens)
    x = position_embedding(seq, name="position")(x)
    for i in range(layers):
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads, name=f"block_{i}_attention")(h, h)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x)
        h = keras.layers.Dense(4 * width, activation="gelu", name=f"block_{i}_ffn_up")(h)
        x = x + keras.layers.Dense(width, name=f"block_{i}_ffn_down")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    logits = keras.layers.Dense(classes, name="classifier")(x)
    return keras.Model(tokens, logits, name="encoder")


def lora_config(rank: int, **kwargs):
    import tf_lora

    return tf_lora.LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS, **kwargs)


def _n_bytes(variables) -> int:
    import numpy as np

    return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables))


def _alloc(key: str) -> int:
    tf, _ = _tf()
    return int(tf.config.experimental.get_memory_info("CPU:0")[key])


def _max_rss_bytes() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover (not on Windows)
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)


def _current_rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


def _data(cfg: dict, seed: int = 0):
    import numpy as np

    tf, _ = _tf()
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(0, 1000, size=(cfg["batch"], cfg["seq"])).astype("int32"))
    y = tf.constant(rng.integers(0, 4, size=(cfg["batch"],)).astype("int32"))
    return x, y


def measure_training(cfg: dict) -> dict:
    """One configuration: build, (adapt), train; throughput and memory."""
    import numpy as np

    tf, keras = _tf()
    import tf_lora

    keras.utils.set_random_seed(cfg.get("seed", 0))
    base = build_encoder(cfg["width"], cfg["seq"], cfg["layers"])
    total_params = int(sum(int(np.prod(v.shape)) for v in base.weights))
    if cfg["mode"] == "lora":
        model = tf_lora.adapt(base, lora_config(cfg["rank"], modules_to_save=("classifier",)))
        del base  # adapt copies; the base model's weights are not needed to train
    else:
        model = base
    gc.collect()
    x, y = _data(cfg)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    trainable = int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    resident = _alloc("current")
    tf.config.experimental.reset_memory_stats("CPU:0")

    t = time.perf_counter()
    model.train_on_batch(x, y)  # traces the train function, builds optimizer state
    trace_s = time.perf_counter() - t
    for _ in range(cfg["warmup"]):
        model.train_on_batch(x, y)
    times = []
    start = time.perf_counter()
    while len(times) < cfg["steps"] and (len(times) < 3 or time.perf_counter() - start < cfg["max_seconds"]):
        t = time.perf_counter()
        loss = model.train_on_batch(x, y)  # returns numpy: waits for the step
        times.append(time.perf_counter() - t)
    loss = float(np.asarray(loss if not isinstance(loss, (list, tuple)) else loss[0]))
    med = float(np.median(times))
    return dict(
        cfg, step_ms=1e3 * med, p10_ms=1e3 * float(np.percentile(times, 10)),
        p90_ms=1e3 * float(np.percentile(times, 90)), n_steps=len(times),
        tokens_per_s=cfg["batch"] * cfg["seq"] / med, samples_per_s=cfg["batch"] / med,
        trace_s=trace_s, peak_bytes=_alloc("peak"), resident_bytes=resident,
        max_rss_bytes=_max_rss_bytes(), trainable=trainable, total_params=total_params,
        loss_finite=bool(np.isfinite(loss)),
    )


def measure_switching(cfg: dict) -> dict:
    """Memory per added adapter, and set_adapter / retrace / steady forward times."""
    import numpy as np

    tf, keras = _tf()
    import tf_lora

    keras.utils.set_random_seed(cfg.get("seed", 0))
    rng = np.random.default_rng(1)
    base = build_encoder(cfg["width"], cfg["seq"], cfg["layers"])
    model = tf_lora.adapt(base, lora_config(cfg["rank"]))
    del base
    gc.collect()
    x, _ = _data(cfg)
    model_bytes = _n_bytes(model.weights)
    model.predict_on_batch(x)  # runtime warm: first trace of anything, kernels loaded
    user_fn = tf.function(lambda inputs: model(inputs, training=False))
    user_fn(x)  # a user's own tf.function, traced with the "default" adapter

    growth, checkpoints = [], []
    names = ["default"]
    for k in range(1, max(cfg["adapters"]) + 1):
        name = f"task_{k}"
        gc.collect()
        before, rss_before = _alloc("current"), _current_rss_bytes()
        tf_lora.add_adapter(model, name, lora_config(cfg["rank"]))
        gc.collect()
        after, rss_after = _alloc("current"), _current_rss_bytes()
        layers = [layer for _, layer in model.adapter_layers() if name in layer.adapter_names]
        new_vars = [v for layer in layers for v in layer.adapter_variables(name)]
        growth.append(dict(adapters_added=k, adapter_bytes=_n_bytes(new_vars), alloc_growth=after - before,
                           rss_growth=rss_after - rss_before))
        for layer in layers:  # non-zero B: each adapter gives different outputs
            _, b = layer.adapter_variables(name)
            b.assign((0.02 * rng.standard_normal(tuple(b.shape))).astype("float32"))
        names.append(name)
        if k not in cfg["adapters"]:
            continue
        rows = dict(set_ms=[], first_ms=[], steady_ms=[], eager_ms=[])
        max_err, stale = 0.0, 0
        alloc_before_switching = _alloc("current")
        for r in range(cfg["switch_rounds"]):
            for name_i in names[1:] + names[:1]:
                t = time.perf_counter()
                tf_lora.set_adapter(model, name_i)
                rows["set_ms"].append(1e3 * (time.perf_counter() - t))
                t = time.perf_counter()
                first = model.predict_on_batch(x)
                rows["first_ms"].append(1e3 * (time.perf_counter() - t))
                steady = []
                for _ in range(3):
                    t = time.perf_counter()
                    model.predict_on_batch(x)
                    steady.append(1e3 * (time.perf_counter() - t))
                rows["steady_ms"].append(float(np.median(steady)))
                t = time.perf_counter()
                eager = keras.ops.convert_to_numpy(model(x, training=False))
                rows["eager_ms"].append(1e3 * (time.perf_counter() - t))
                max_err = max(max_err, float(np.max(np.abs(first - eager))))
                if r == 0 and name_i != "default":
                    stale += int(not np.allclose(keras.ops.convert_to_numpy(user_fn(x)), eager, atol=1e-5))
        checkpoints.append(dict(
            adapters_added=k, **{key: float(np.median(v)) for key, v in rows.items()},
            switches=len(rows["set_ms"]), max_abs_first_vs_eager=max_err,
            alloc_growth_switching=_alloc("current") - alloc_before_switching,
            user_tf_function_stale=stale, user_tf_function_checked=len(names) - 1,
        ))
    return dict(cfg, growth=growth, checkpoints=checkpoints, model_bytes=model_bytes, max_rss_bytes=_max_rss_bytes())


def worker(tasks: list) -> int:
    tf, _ = _tf()
    for i, task in enumerate(tasks):
        if i:  # several tasks in one process (--quick): per-task peaks via reset
            gc.collect()
            tf.config.experimental.reset_memory_stats("CPU:0")
        result = measure_switching(task) if task["mode"] == "switch" else measure_training(task)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------ orchestrator ---
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 1-2 configurations per sweep, one subprocess for all (smoke test)")
    p.add_argument("--steps", type=int, default=None, help="max timed steps per configuration (default 10)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop timing a configuration after this many seconds, once 3 steps are timed (default 6)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON list of tasks
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 3:
        p.error(f"--steps must be >= 3, got {args.steps}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        p.error(f"--max-seconds must be positive, got {args.max_seconds}")
    return args


def plan(settings: dict):
    """Unique tasks, and for every table the keys of its rows."""
    base = {k: settings[k] for k in ("width", "seq", "rank", "layers", "batch", "steps", "warmup", "max_seconds")}

    def task(mode, **over):
        t = dict(base, mode=mode, **over)
        if mode == "full":
            t["rank"] = 0
        return t

    def key(t):
        return json.dumps({k: t[k] for k in ("mode", "width", "seq", "rank")}, sort_keys=True)

    tables = {"rank": [], "width": [], "seq": []}
    tasks = {}
    for w in settings["widths"]:
        pair = []
        for mode in ("lora", "full"):
            t = task(mode, width=w)
            tasks.setdefault(key(t), t)
            pair.append(key(t))
        tables["width"].append(tuple(pair))  # LoRA and full run back to back: similar machine load
    for r in settings["ranks"]:
        t = task("lora", rank=r)
        tasks.setdefault(key(t), t)
        tables["rank"].append(key(t))
    for s in settings["seqs"]:
        t = task("lora", seq=s)
        tasks.setdefault(key(t), t)
        tables["seq"].append(key(t))
    switch = dict(base, mode="switch", adapters=list(settings["adapters"]),
                  switch_rounds=settings["switch_rounds"])
    return list(tasks.items()), tables, switch, key


def run_worker(tasks: list) -> tuple:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(tasks)]
    # With the default (oneDNN) CPU allocator, get_memory_info counts only allocations >= 256 KiB;
    # the BFC allocator counts every tensor (override: TF_CPU_ALLOCATOR_USE_BFC=false).
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC=os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "true"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    error = None
    if proc.returncode != 0 or len(results) != len(tasks):
        error = f"worker exited with {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
    return results, error


def _mib(n) -> str:
    return f"{n / MIB:.1f}"


def _ratio(a, b, fmt=".2f") -> str:
    return format(a / b, fmt) if b else "n/a"


def print_training_table(title: str, rows: list, label: str) -> None:
    print(f"\n{title}")
    header = (f"{label:>6} {'tokens/s':>10} {'tok/s@p10':>10} {'samples/s':>10} {'step ms':>9} {'p10-p90 ms':>15} {'steps':>6} "
              f"{'trainable':>10} {'of params':>10} {'peak MiB':>9} {'resident MiB':>13} {'max RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for value, r in rows:
        print(f"{value:>6} {r['tokens_per_s']:>10,.0f} {r['batch'] * r['seq'] / r['p10_ms'] * 1e3:>10,.0f} "
              f"{r['samples_per_s']:>10.1f} {r['step_ms']:>9.1f} "
              f"{r['p10_ms']:>7.1f}-{r['p90_ms']:<7.1f} {r['n_steps']:>6} {r['trainable']:>10,} "
              f"{r['total_params']:>10,} {_mib(r['peak_bytes']):>9} {_mib(r['resident_bytes']):>13} "
              f"{_mib(r['max_rss_bytes']):>12}")


def print_width_table(title: str, pairs: list) -> None:
    print(f"\n{title}")
    header = (f"{'width':>6} {'LoRA tok/s':>11} {'full tok/s':>11} {'speed LoRA/full':>16} {'same @p10':>10} "
              f"{'LoRA peak':>10} {'full peak':>10} {'peak LoRA/full':>15} "
              f"{'LoRA RSS':>9} {'full RSS':>9} {'RSS LoRA/full':>14} {'trainable LoRA/full':>20}")
    print(header + "    (peak, RSS in MiB)")
    print("-" * len(header))
    for width, lora, full in pairs:
        print(f"{width:>6} {lora['tokens_per_s']:>11,.0f} {full['tokens_per_s']:>11,.0f} "
              f"{_ratio(lora['tokens_per_s'], full['tokens_per_s']):>16} "
              f"{_ratio(full['p10_ms'], lora['p10_ms']):>10} "
              f"{_mib(lora['peak_bytes']):>10} {_mib(full['peak_bytes']):>10} "
              f"{_ratio(lora['peak_bytes'], full['peak_bytes']):>15} "
              f"{_mib(lora['max_rss_bytes']):>9} {_mib(full['max_rss_bytes']):>9} "
              f"{_ratio(lora['max_rss_bytes'], full['max_rss_bytes']):>14} "
              f"{_ratio(lora['trainable'], full['trainable'], '.2%'):>19}")


def print_switching(r: dict) -> bool:
    print(f"\n(d) switching adapters: width {r['width']}, seq {r['seq']}, rank {r['rank']} for every adapter, "
          f"batch {r['batch']}, {r['layers']} blocks")
    print("memory per added adapter (TF CPU allocator 'current' before/after tf_lora.add_adapter):")
    header = f"{'added':>6} {'adapter bytes':>14} {'allocator growth':>17} {'growth/adapter':>15} {'RSS growth':>11}"
    print(header)
    print("-" * len(header))
    for g in r["growth"]:
        ratio = g["alloc_growth"] / g["adapter_bytes"]
        rss = g["rss_growth"]
        rss_text = "n/a" if rss != rss else f"{rss / 1024:,.0f} KiB"
        print(f"{g['adapters_added']:>6} {g['adapter_bytes']:>14,} {g['alloc_growth']:>17,} {ratio:>15.3f} {rss_text:>11}")
    total = sum(g["alloc_growth"] for g in r["growth"])
    expected = sum(g["adapter_bytes"] for g in r["growth"])
    # BFC rounds every tensor up to 256 bytes and may hand out a free chunk of up to twice the
    # request without splitting it, so single rows can exceed the adapter bytes by a few percent.
    ok = abs(total / expected - 1.0) < 0.10 or abs(total - expected) <= 8192 * len(r["growth"])
    print(f"total over {len(r['growth'])} added adapters: allocator growth {total:,} bytes = "
          f"{total / expected:.3f} x their lora_a/lora_b bytes ({expected:,}); only the adapter bytes "
          f"(within 10%): {'yes' if ok else 'NO'}. For scale: the adapted model's weights are "
          f"{r['model_bytes']:,} bytes, one adapter is {r['growth'][0]['adapter_bytes'] / r['model_bytes']:.2%} "
          "of them. (RSS moves in pages/arena chunks, for reference.)")
    print(f"\nswitch cost, cycling over all adapters {r['switch_rounds']} times (medians over the switches):")
    header = (f"{'added':>6} {'switches':>9} {'set_adapter ms':>15} {'1st predict ms':>15} {'steady ms':>10} "
              f"{'1st/steady':>11} {'retrace ms':>11} {'eager ms':>9} {'alloc growth':>13} {'per switch':>11} "
              f"{'max|1st-eager|':>15}")
    print(header)
    print("-" * len(header))
    for c in r["checkpoints"]:
        print(f"{c['adapters_added']:>6} {c['switches']:>9} {c['set_ms']:>15.2f} {c['first_ms']:>15.1f} {c['steady_ms']:>10.2f} "
              f"{c['first_ms'] / c['steady_ms']:>11.1f} {c['first_ms'] - c['steady_ms']:>11.1f} "
              f"{c['eager_ms']:>9.1f} {c['alloc_growth_switching']:>13,} "
              f"{c['alloc_growth_switching'] / c['switches']:>11,.0f} {c['max_abs_first_vs_eager']:>15.2e}")
        ok &= c["max_abs_first_vs_eager"] < 1e-4
    stale = sum(c["user_tf_function_stale"] for c in r["checkpoints"])
    checked = sum(c["user_tf_function_checked"] for c in r["checkpoints"])
    print("'1st predict' = model.predict_on_batch right after set_adapter (set_adapter drops the traced "
          "functions, so it retraces); 'steady' = the next calls; 'eager' = model(x) without tf.function; "
          "'alloc growth' = allocator bytes kept after all the switches of the row (copying base weights "
          f"would add up to {r['model_bytes']:,} bytes per switch).")
    print(f"note: a user's own tf.function(lambda x: model(x)) traced before set_adapter gave the new "
          f"adapter's outputs after {checked - stale} of {checked} switches"
          + ("" if not stale else " -- it keeps the adapter it was traced with; retrace it after set_adapter"))
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.max_seconds is not None:
        settings["max_seconds"] = args.max_seconds
    tasks, tables, switch, key = plan(settings)
    t0 = time.perf_counter()
    try:
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        load = "n/a"
    print(f"tf_lora scaling bench{' (--quick)' if args.quick else ''}: encoder with {settings['layers']} blocks, "
          f"head size 64, FFN 4x, batch {settings['batch']}, AdamW, train_on_batch (no XLA); "
          f"LoRA alpha = 2*rank on {'/'.join(TARGETS)}, classifier in modules_to_save")
    print(f"python {sys.version.split()[0]}, os.cpu_count()={os.cpu_count()}, load average at start {load}; "
          f"{len(tasks)} training configurations + switching, "
          f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC', 'true')}, "
          f"{'one subprocess for all' if args.quick else 'one fresh subprocess each'}")
    print(f"timing: after 1 tracing step and {settings['warmup']} warmup steps, median of up to "
          f"{settings['steps']} steps (at least 3, stop after {settings['max_seconds']:g} s)")

    results, errors = {}, []
    if args.quick:
        out, error = run_worker([t for _, t in tasks] + [switch])
        errors += [error] if error else []
        for (k, _), res in zip(tasks, out):
            results[k] = res
        switch_result = out[len(tasks)] if len(out) > len(tasks) else None
    else:
        for k, t in tasks:
            out, error = run_worker([t])
            if error:
                errors.append(f"{k}: {error}")
            if out:
                results[k] = out[0]
                r = out[0]
                print(f"  measured {t['mode']:<4} width {t['width']:>4} seq {t['seq']:>4} rank {t['rank']:>3}: "
                      f"{r['tokens_per_s']:>9,.0f} tokens/s, peak {_mib(r['peak_bytes'])} MiB "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        out, error = run_worker([switch])
        errors += [error] if error else []
        switch_result = out[0] if out else None

    def rows(keys, field):
        return [(json.loads(k)[field], results[k]) for k in keys if k in results]

    s = settings
    print_training_table(f"(a) rank sweep: width {s['width']}, seq {s['seq']}", rows(tables["rank"], "rank"), "rank")
    pairs = [(json.loads(lk)["width"], results[lk], results[fk]) for lk, fk in tables["width"]
             if lk in results and fk in results]
    print_training_table(f"(b) width sweep, LoRA rank {s['rank']}, seq {s['seq']}",
                         rows([lk for lk, _ in tables["width"]], "width"), "width")
    print_training_table(f"(b) width sweep, full fine-tuning, seq {s['seq']}",
                         rows([fk for _, fk in tables["width"]], "width"), "width")
    print_width_table("(b) LoRA / full fine-tuning ratios", pairs)
    print_training_table(f"(c) sequence sweep: width {s['width']}, rank {s['rank']}", rows(tables["seq"], "seq"), "seq")
    print("\ntok/s@p10 = tokens/s at the 10th-percentile step time (less sensitive to other load on the machine); "
          "peak = TF CPU allocator peak while training (weights + optimizer state + step temporaries); "
          "resident = allocator bytes before the first step (weights); max RSS = whole process incl. runtime.")
    ok = True
    if switch_result is not None:
        ok = print_switching(switch_result)
    bad = [k for k, r in results.items() if not r["loss_finite"]]
    if bad:
        errors.append(f"non-finite loss in {bad}")
    if not ok:
        print("note: a switching check did not hold (see above); the benchmark reports, it does not fail")
    try:
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        load = "n/a"
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at end {load}")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
