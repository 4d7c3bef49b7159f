"""Long context on a real decoder: train-step memory and time of chunked attention,
the chunked LM loss and gradient checkpointing, against plain KerasHub + LoRA.

Model: a KerasHub ``Llama3CausalLM`` built from config with SmolLM2-135M's widths
(hidden 576, 9 query heads, 3 KV heads, intermediate 1,536, vocabulary 49,152, tied
embeddings, rope theta 100,000), 2 blocks for the sweep (memory per block is additive),
batch 1, LoRA rank 8 on query/value, Adam, KerasHub's default compile (token
cross-entropy and weighted accuracy), float32, tf.function without XLA. Configurations
(all through ``LoRAConfig``):

    plain            LoRA only: KerasHub's own attention and loss
    attn             + attention="chunked"        (tf_lora.use_chunked_attention)
    attn+loss        + loss="chunked"             (tf_lora.use_chunked_loss)
    attn+loss+ckpt   + gradient_checkpointing=True (tf_lora.enable_gradient_checkpointing)

Memory: one fresh process per (configuration, T): a warm-up step, then the peak of the
next step in TensorFlow's CPU BFC allocator above the state before it (weights,
optimizer state), plus the process' total allocator peak and its peak RSS. Every child
runs under a cap (``--cap-gib``, default 14): the allocator is limited to the cap less
1.25 GiB for the runtime (``TF_CPU_BFC_MEM_LIMIT_IN_MB``) and a watchdog kills the
child when its RSS passes the cap; either way the row reads "OOM at cap". Time: one
process per T, the configurations' models interleaved round after round, the median
step (a configuration whose memory run did not fit the cap is left out). Ratios are
against plain at the same T. Each result records the git commit it measured (and the
tf_lora files that differed from it).

``--headline``: the full 30-block model, QLoRA (NF4) on every linear layer of the
blocks with chunked attention, chunked loss and checkpointing at T=16,384 (peak of the
first step, which includes tracing: an upper bound), and plain KerasHub + LoRA on
query/value at T=4,096 in a capped process.

    python benchmarks/bench_long_context.py [--lengths 512 1024 2048 4096 8192 16384]
        [--configs ...] [--rounds 5] [--cap-gib 14] [--no-time] [--no-memory]
        [--headline] [--json results.json] [--report-only]
    python benchmarks/bench_long_context.py --quick     # tiny widths, T=128, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "plain": {},
    "attn": {"attention": "chunked"},
    "attn+loss": {"attention": "chunked", "loss": "chunked"},
    "attn+loss+ckpt": {"attention": "chunked", "loss": "chunked", "gradient_checkpointing": True},
}
NAMES = {"plain": "plain KerasHub + LoRA", "attn": "chunked attention", "attn+loss": "+ chunked loss",
         "attn+loss+ckpt": "+ checkpointing"}
SMOLLM2 = dict(hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152)
# Tiny widths for --quick; small budgets so that attention and loss really run in chunks.
QUICK = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512,
             max_attention_memory=4 * 4 * 32 * 32, max_loss_memory=4 * 512 * 32)
ALL_LINEAR = ("query", "key", "value", "attention_output", "feedforward_intermediate_dense",
              "feedforward_gate_dense", "feedforward_output_dense")
RUNTIME_BYTES = int(1.25 * 2**30)  # RSS of the interpreter + TensorFlow outside the allocator
LOW_MEMORY_BYTES = 2**29  # a child is stopped (and the run fails) when the machine has less available

# ---------------------------------------------------------------------------
# Child process: everything that imports TensorFlow runs here.
CHILD = r"""
import json, os, resource, sys, time
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
task = json.loads(sys.argv[1])
import numpy as np, keras, keras_hub, tensorflow as tf
sys.path.insert(0, task["repo"])
import tf_lora
s, T, L = task["size"], task["seq"], task["layers"]

def build(name):
    keras.utils.set_random_seed(0)
    bb = keras_hub.models.Llama3Backbone(vocabulary_size=s["vocab"], num_layers=L, num_query_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], hidden_dim=s["hidden"], intermediate_dim=s["intermediate"],
        rope_max_wavelength=100000, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    lm = keras_hub.models.Llama3CausalLM(backbone=bb, preprocessor=None)
    kw = dict(task["configs"][name])
    if kw.get("attention") and s.get("max_attention_memory"):
        kw["max_attention_memory"] = s["max_attention_memory"]
    if kw.get("loss") and s.get("max_loss_memory"):
        kw["max_loss_memory"] = s["max_loss_memory"]
    if task.get("qlora"):
        kw["quantization"] = tf_lora.QLoRAConfig()
    config = tf_lora.LoRAConfig(rank=8, dropout=0.0, target_modules=tuple(task["targets"]), **kw)
    lm = tf_lora.adapt(lm, config, inplace=True, verbose=0)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False)  # KerasHub's loss and weighted accuracy
    return lm

rng = np.random.default_rng(0)
ids = rng.integers(0, s["vocab"], (1, T + 1)).astype("int32")
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((1, T), "int32")}
y, w = ids[:, 1:], np.ones((1, T), "float32")
step = lambda lm: float(np.ravel(lm.train_on_batch(x, y, sample_weight=w))[0])
info = lambda: tf.config.experimental.get_memory_info("CPU:0")
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}
try:
    if task["kind"] == "memory":
        lm = build(task["names"][0])
        out["weights_bytes"] = int(info()["current"])
        out["build_peak_total_bytes"] = int(info()["peak"])  # building, adapting, quantizing
        tf.config.experimental.reset_memory_stats("CPU:0")
        t = time.perf_counter(); out["losses"] = [step(lm)]; out["first_step_s"] = time.perf_counter() - t
        out["first_peak_total_bytes"] = int(info()["peak"])  # the first step, tracing included
        tf.config.experimental.reset_memory_stats("CPU:0")
        out["resident_bytes"] = start = int(info()["current"])
        for _ in range(task["steps"]):
            out["losses"].append(step(lm))
        if task["steps"]:
            out["peak_bytes"] = int(info()["peak"]) - start
            out["peak_total_bytes"] = int(info()["peak"])
    else:
        models = {n: build(n) for n in task["names"]}
        out["losses"] = {n: step(lm) for n, lm in models.items()}
        times, cpu = {n: [] for n in models}, {n: [] for n in models}
        for _ in range(task["rounds"]):
            for n, lm in models.items():
                t, c = time.perf_counter(), time.process_time()
                step(lm)
                times[n].append(time.perf_counter() - t); cpu[n].append(time.process_time() - c)
        out["step_s"] = {n: float(np.median(v)) for n, v in times.items()}
        out["cpu_s"] = {n: float(np.median(v)) for n, v in cpu.items()}  # this process' CPU seconds a step
        out["steps_s"], out["steps_cpu_s"] = times, cpu
except tf.errors.ResourceExhaustedError as e:
    lines = str(e).strip().splitlines()
    out["oom"] = "allocator: " + next((ln.strip() for ln in lines if "OOM" in ln), lines[0])[:200]
out["rss_bytes"] = int(rss())
print("RESULT " + json.dumps(out), flush=True)
"""


def _commit() -> dict:
    """The commit measured, and the tf_lora files that differ from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "tf_lora").splitlines() if ln.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown", "dirty": dirty}


def _vm_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def run_child(task: dict, cap_bytes: int, timeout: float) -> dict:
    """Runs one child under the cap: the allocator limited to the cap less the runtime, and
    killed by a watchdog when its RSS passes the cap. Returns its RESULT (``oom`` set when
    it did not fit), with the commit and the child's highest RSS the watchdog saw."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               TF_CPU_BFC_MEM_LIMIT_IN_MB=str(max(64, (cap_bytes - RUNTIME_BYTES) // 2**20)))
    task = dict(task, repo=REPO)
    info, killed, seen, t0 = _commit(), None, 0, time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(task)], stdout=out, stderr=err,
                                text=True, env=env, cwd=REPO)
        while proc.poll() is None:
            seen = max(seen, _vm_rss(proc.pid))
            if seen > cap_bytes:
                killed = f"watchdog: RSS {seen / 2**30:.2f} GiB > cap"
            elif _mem_available() < LOW_MEMORY_BYTES:  # the machine, not the cap: not an OOM result
                killed = f"machine memory low: {_mem_available() / 2**30:.2f} GiB available, child RSS {seen / 2**30:.2f} GiB"
            elif time.perf_counter() - t0 > timeout:
                killed = f"timeout after {timeout:.0f} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is not None:
        result = json.loads(line[len("RESULT "):])
    elif killed and killed.startswith("watchdog"):
        result = {"oom": killed}
    elif killed:
        raise RuntimeError(f"child {task['kind']} {task['names']} T={task['seq']}: {killed}")
    else:
        raise RuntimeError(f"child {task['kind']} {task['names']} T={task['seq']} exited with "
                           f"{proc.returncode}:\n{stderr[-3000:]}")
    result.update(info, watched_rss_bytes=seen, cap_bytes=cap_bytes, wall_s=time.perf_counter() - t0)
    return result


def _task(kind, names, seq, size, layers=2, **kw) -> dict:
    return dict(kind=kind, names=list(names), seq=seq, size=size, layers=layers,
                configs={n: CONFIGS[n] for n in names}, targets=kw.pop("targets", ("query", "value")), **kw)


def memory(name, seq, size, cap, timeout, layers=2, steps=1, **kw) -> dict:
    """Train-step peak of one configuration at one length, in a fresh capped process."""
    return run_child(_task("memory", [name], seq, size, layers, steps=steps, **kw), cap, timeout)


def step_times(names, seq, size, rounds, cap, timeout) -> dict:
    """Median step seconds of `names`' models at one length, interleaved in one process."""
    return run_child(_task("time", names, seq, size, rounds=rounds), cap, timeout)


def _fits_together(names, mem, cap) -> list:
    """The configurations whose models fit one timing process: the sum of their resident
    states plus the largest step peak under the allocator limit (largest peaks dropped first)."""
    ok = [n for n in names if "peak_bytes" in mem.get(n, {})]
    limit = cap - RUNTIME_BYTES
    while ok and sum(mem[n]["resident_bytes"] for n in ok) + max(mem[n]["peak_bytes"] for n in ok) > 0.9 * limit:
        ok.remove(max(ok, key=lambda n: mem[n]["peak_bytes"]))
    return ok


def _mib(b):
    return f"{b / 2**20:,.0f}"


def report(results: dict, names, lengths, cap) -> None:
    """Prints the sweep table: peak MiB and median step seconds with ratios vs plain."""
    print(f"\n{'T':>6s}  {'configuration':22s} {'peak MiB':>9s} {'ratio':>6s} {'total MiB':>9s} "
          f"{'step s':>8s} {'ratio':>6s} {'cpu':>5s}  commit")
    print("-" * 92)
    for seq in lengths:
        r = results.get(str(seq), {})
        mem, tim = r.get("memory", {}), r.get("time", {})
        base_m = mem.get("plain", {})
        base_t = tim.get("step_s", {}).get("plain")
        base_c = tim.get("cpu_s", {}).get("plain")
        for n in names:
            m = mem.get(n)
            if m is None or "error" in m:
                peak, ratio, total = ("-", "", "") if m is None else ("failed", "", "(see json)")
            elif "oom" in m:
                peak, ratio, total = "OOM", "", f"> {m['cap_bytes'] / 2**30:.0f} GiB cap"
            else:
                peak, total = _mib(m["peak_bytes"]), _mib(m["peak_total_bytes"])
                if "peak_bytes" in base_m:
                    ratio = f"{m['peak_bytes'] / base_m['peak_bytes']:.2f}"
                elif _plain_bound(base_m, m)[0]:  # plain did not fit: an upper bound on the ratio
                    ratio = f"<{m['peak_bytes'] / _plain_bound(base_m, m)[0]:.2f}"
                else:
                    ratio = ""
            t = tim.get("step_s", {}).get(n)
            step = f"{t:.2f}" if t is not None else ("-" if m is None or "oom" not in m else "OOM")
            tratio = f"{t / base_t:.2f}" if t is not None and base_t else ""
            c = tim.get("cpu_s", {}).get(n)
            cratio = f"{c / base_c:.2f}" if c is not None and base_c else ""
            commit = (m or tim or {}).get("commit", "")
            if (m or tim or {}).get("dirty"):
                commit += "+dirty"
            print(f"{seq:6d}  {NAMES[n]:22s} {peak:>9s} {ratio:>6s} {total:>9s} {step:>8s} {tratio:>6s} {cratio:>5s}  {commit}")
        runs = [mem[n]["losses"] for n in names if n in mem and "losses" in mem[n]]
        if len(runs) > 1:
            worst = max((max(v) - min(v)) / abs(v[0]) for v in zip(*runs))
            print(f"{'':8s}losses of the {min(map(len, runs))} steps agree within a relative {worst:.1e}")
    print(f"peak MiB: train-step allocator peak above the state before it; total: the process' allocator peak; "
          f"OOM: did not fit a {cap / 2**30:.0f} GiB cap (plain over the cap: a ratio '<x' is the upper bound "
          f"its allocator limit gives); step s: median wall-clock step; cpu: ratio of the "
          f"median CPU seconds a step (process time, less sensitive to other jobs on the machine)")
    for line in goal_lines(results, lengths):
        print(line)


GOALS = [("memory", 4096, 0.20), ("memory", 8192, 0.12), ("time", 512, 1.15),
         ("time", 2048, 1.0), ("time", 4096, 1.0), ("time", 8192, 1.0), ("time", 16384, 1.0)]
"""Issue 22's goals for chunked attention + chunked loss (the "attn+loss" configuration):
train-step peak at most 0.20x plain at T=4,096 and 0.12x at 8,192; step time at most 1.15x
plain at T=512 and 1.0x at T >= 2,048."""


def _plain_bound(plain: dict, other: dict):
    """Lower bound on plain's step peak (bytes) when it did not fit the cap, and how it was
    reached. An allocator OOM means the step needed more than the allocator limit less the
    resident state before the step (weights and optimizer state; taken from `other`, whose
    weights are the same). A watchdog kill (RSS over the cap) gives no such bound."""
    if not plain.get("oom", "").startswith("allocator") or "resident_bytes" not in other:
        return None, "killed by the RSS watchdog: no lower bound on its step peak"
    bound = plain["cap_bytes"] - RUNTIME_BYTES - other["resident_bytes"]
    return bound, f"its step peak > {_mib(bound)} MiB (allocator limit less the state before the step)"


def goal_lines(results: dict, lengths) -> list:
    """One line per goal of `GOALS` at a measured length: the chunked attention + loss ratio
    against plain and whether it meets the goal. Where plain did not fit the cap there is
    no ratio: a memory goal shows the upper bound the cap gives, a time goal shows none."""
    lines = []
    for kind, seq, goal in GOALS:
        if seq not in lengths:
            continue
        r = results.get(str(seq), {})
        a, p = r.get("memory", {}).get("attn+loss", {}), r.get("memory", {}).get("plain", {})
        head = f"goal: chunked attention + loss {kind} <= {goal:.2f}x plain at T={seq:,}: "
        if "oom" in p:
            over = f"plain over the {p['cap_bytes'] / 2**30:.0f} GiB cap"
            bound, how = _plain_bound(p, a)
            if kind == "time":
                lines.append(head + f"{over}, no ratio (plain cannot run here)")
            elif bound is None or "peak_bytes" not in a:
                lines.append(head + f"{over} ({how}), not decided")
            else:
                upper = a["peak_bytes"] / bound
                verdict = "met" if upper <= goal else "not decided (the bound is above the goal)"
                lines.append(head + f"{over}, {how}: ratio < {upper:.3f}, {verdict}")
        elif kind == "memory":
            if "peak_bytes" in p and "peak_bytes" in a:
                ratio = a["peak_bytes"] / p["peak_bytes"]
                lines.append(head + f"{ratio:.3f} ({_mib(a['peak_bytes'])} / {_mib(p['peak_bytes'])} MiB), "
                             + ("met" if ratio <= goal else "NOT met"))
            else:
                lines.append(head + "not measured")
        else:
            t = r.get("time", {})
            st, ct = t.get("step_s", {}), t.get("cpu_s", {})
            if "attn+loss" in st and "plain" in st:
                ratio = st["attn+loss"] / st["plain"]
                cpu = f", CPU-seconds ratio {ct['attn+loss'] / ct['plain']:.2f}" if "attn+loss" in ct else ""
                lines.append(head + f"{ratio:.2f} ({st['attn+loss']:.2f} / {st['plain']:.2f} s, median of "
                             f"{len(t['steps_s']['plain'])} interleaved rounds{cpu}), "
                             + ("met" if ratio <= goal else "NOT met"))
            else:
                lines.append(head + "not measured")
    return lines


def headline(size, cap, timeout) -> dict:
    """The 30-block model: QLoRA on every linear layer + checkpointing + chunked attention and
    loss at T=16,384, and plain LoRA on query/value at T=4,096, each capped; plain with 2 and
    4 blocks at T=4,096 give the per-block memory that extrapolates plain's 30-block peak."""
    plain2 = memory("plain", 4096, size, cap, timeout, layers=2)
    plain4 = memory("plain", 4096, size, cap, timeout, layers=4)
    print(f"headline plain T=4096, 2 and 4 blocks: {plain2}\n{plain4}", flush=True)
    big = memory("attn+loss+ckpt", 16384, size, cap, timeout, layers=30, steps=0, qlora=True, targets=ALL_LINEAR)
    print(f"headline QLoRA T=16384: {big}", flush=True)
    plain = memory("plain", 4096, size, cap, timeout, layers=30, steps=0)
    print(f"headline plain T=4096: {plain}", flush=True)
    return {"qlora_16384": big, "plain_4096": plain, "plain_4096_2_blocks": plain2, "plain_4096_4_blocks": plain4}


def print_headline(h: dict) -> None:
    """Prints the 30-block rows of `headline`."""
    big, plain = h["qlora_16384"], h["plain_4096"]
    print("\n30-block SmolLM2-135M widths, batch 1, first train step (tracing included)")
    print(f"{'':52s} {'alloc peak MiB':>14s} {'RSS MiB':>9s} {'step s':>8s}  commit")
    print("-" * 96)
    for label, r in (("QLoRA all linear + ckpt + chunked attn/loss, T=16,384", big),
                     ("plain KerasHub + LoRA q/v, T=4,096", plain)):
        if "oom" in r:
            print(f"{label:52s} OOM at cap {r['cap_bytes'] / 2**30:.0f} GiB ({r['oom'][:60]})  {r['commit']}")
        else:
            print(f"{label:52s} {_mib(r['first_peak_total_bytes']):>14s} {_mib(r['rss_bytes']):>9s} "
                  f"{r['first_step_s']:8.0f}  {r['commit']}")
    two, four = h.get("plain_4096_2_blocks", {}), h.get("plain_4096_4_blocks", {})
    if "peak_total_bytes" in two and "peak_total_bytes" in four:
        per_block = (four["peak_total_bytes"] - two["peak_total_bytes"]) / 2
        print(f"plain T=4,096 step peak (allocator total): 2 blocks {_mib(two['peak_total_bytes'])} MiB, 4 blocks "
              f"{_mib(four['peak_total_bytes'])} MiB: {_mib(per_block)} MiB a block, so 30 blocks "
              f"~{(two['peak_total_bytes'] + 28 * per_block) / 2**30:.1f} GiB")
    if "first_peak_total_bytes" in big:
        worst = max(big["first_peak_total_bytes"], big.get("build_peak_total_bytes", 0))
        print(f"goal: QLoRA 30 blocks trains T=16,384 with peak under 6 GiB: allocator peak {worst / 2**30:.2f} GiB "
              f"(first step and build), process RSS {big['rss_bytes'] / 2**30:.2f} GiB: "
              + ("met" if worst < 6 * 2**30 else "NOT met") + (" (RSS, runtime included, also under)"
                                                                if big["rss_bytes"] < 6 * 2**30 else " (RSS above)"))
    else:
        print(f"goal: QLoRA 30 blocks trains T=16,384 with peak under 6 GiB: NOT met ({big.get('oom', 'no result')})")
    extrapolated = ""
    if "peak_total_bytes" in two and "peak_total_bytes" in four:
        extrapolated = f"; 2/4-block extrapolation ~{(two['peak_total_bytes'] + 28 * per_block) / 2**30:.1f} GiB"
    if "oom" in plain:
        print(f"goal: plain KerasHub + LoRA cannot train T=4,096 (30 blocks): over the {plain['cap_bytes'] / 2**30:.0f} "
              f"GiB cap ({plain['oom'][:60]}){extrapolated}: met")
    else:
        print(f"goal: plain KerasHub + LoRA cannot train T=4,096 (30 blocks): it fit, allocator peak "
              f"{plain.get('first_peak_total_bytes', 0) / 2**30:.2f} GiB{extrapolated}: NOT shown")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny widths, T=128, 2 rounds (smoke run)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (at most 3 for T >= 8,192)")
    p.add_argument("--cap-gib", type=float, default=14.0, help="memory cap of every child process (GiB)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child process")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--headline", action="store_true", help="also run the 30-block headline (hours on 2 cores)")
    p.add_argument("--json", help="results file: read if present, merged and written after every measurement")
    p.add_argument("--report-only", action="store_true", help="print the table from --json, measure nothing")
    args = p.parse_args(argv)
    size, lengths, rounds = (QUICK, [128], 2) if args.quick else (SMOLLM2, args.lengths, args.rounds)
    cap = int(args.cap_gib * 2**30)
    results = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    names = [n for n in CONFIGS if n in args.configs]
    for seq in [] if args.report_only else lengths:
        r = results.setdefault(str(seq), {})
        if not args.no_memory:
            for n in names:
                try:
                    m = memory(n, seq, size, cap, args.timeout)
                except RuntimeError as e:  # a crash, a timeout or the machine's memory: recorded, not an OOM
                    m = {"error": str(e)[-2000:], **_commit()}
                r.setdefault("memory", {})[n] = m
                if "error" in m:
                    print(f"T={seq} {n}: failed: {m['error'][-300:]}", flush=True)
                    save()
                    continue
                print(f"T={seq} {n}: " + ("OOM " + m["oom"] if "oom" in m else f"peak {_mib(m['peak_bytes'])} MiB, "
                      f"total {_mib(m['peak_total_bytes'])} MiB, RSS {_mib(m['rss_bytes'])} MiB"), flush=True)
                save()
        if not args.no_time:
            fit = _fits_together(names, r.get("memory", {}), cap) if r.get("memory") else names
            if fit:
                try:
                    r["time"] = step_times(fit, seq, size, rounds if seq < 8192 else min(rounds, 3), cap, args.timeout)
                except RuntimeError as e:
                    r["time"] = {"error": str(e)[-2000:], **_commit()}
                print(f"T={seq} step s: {r['time'].get('step_s', r['time'].get('oom', r['time'].get('error')))}",
                      flush=True)
                save()
    if args.headline and not args.report_only:
        results["headline"] = headline(size, cap, args.timeout)
        save()
    print(f"\nLlama3CausalLM, {'tiny' if args.quick else 'SmolLM2-135M'} widths (hidden {size['hidden']}, {size['heads']}/{size['kv_heads']} heads, "
          f"vocabulary {size['vocab']}), 2 blocks, batch 1, LoRA r=8 on query/value, Adam, float32")
    report(results, names, lengths, cap)
    if "headline" in results:
        print_headline(results["headline"])
    return results


if __name__ == "__main__":
    main()
