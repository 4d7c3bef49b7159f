"""Chunked attention vs full attention (keras.ops.dot_product_attention), issue 4.

B=1, 8 heads, head_dim 64, N in 1024 ... 16384, causal and non-causal. Each
(implementation, N, causal) runs in a fresh subprocess (so peak memory is its
own) under an address-space cap; a run that exceeds it is reported as OOM.
Per run: forward ms and forward+backward ms (best of --repeats, tf.function,
after a warm-up), peak memory from
``tf.config.experimental.get_memory_info('CPU:0')['peak']``, and for the chunked
version the max abs error of the output and of the q/k/v gradients against
keras.ops.dot_product_attention (float32), or against a float64 NumPy reference
computed block by block where the full version ran out of memory. Prints the
ratios chunked / full, side by side from one run; no assertion on time.

Usage:
    python benchmarks/bench_attention.py --quick          # N = 1024, 2048, 4096
    python benchmarks/bench_attention.py                  # N up to 16384
    python benchmarks/bench_attention.py --sizes 8192 --mem-cap-gb 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HEADS, HEAD_DIM = 8, 64


def _child(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_lora.layers.attention import chunked_attention

    n, causal = args.n, args.causal
    rng = np.random.default_rng(0)
    q, k, v, w = (tf.constant(rng.standard_normal((1, n, HEADS, HEAD_DIM), dtype=np.float32)) for _ in range(4))
    if args.impl == "full":
        attend = lambda q, k, v: keras.ops.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    else:
        attend = lambda q, k, v: chunked_attention(  # noqa: E731
            q, k, v, causal=causal, max_memory_bytes=args.max_memory_bytes
        )

    def fwd_bwd(attend):
        @tf.function(jit_compile=args.jit)
        def run(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                out = attend(q, k, v)
                loss = tf.reduce_sum(out * w)
            return (out, *tape.gradient(loss, [q, k, v]))

        return run

    forward = tf.function(attend, jit_compile=args.jit)
    train = fwd_bwd(attend)
    result = {"impl": args.impl, "n": n, "causal": causal}
    for name, fn in (("fwd", forward), ("fwd_bwd", train)):
        tf.config.experimental.reset_memory_stats("CPU:0")
        out = fn(q, k, v)  # warm-up (tracing) also measures the peak
        [np.asarray(x) for x in tf.nest.flatten(out)]
        result[f"{name}_peak_mb"] = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
        times, cpu_times = [], []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            [np.asarray(x) for x in tf.nest.flatten(fn(q, k, v))]
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        result[f"{name}_ms"] = min(times) * 1e3
        result[f"{name}_cpu_ms"] = min(cpu_times) * 1e3  # CPU time of all threads: steadier on a shared machine
        del out
    if args.impl == "chunked" and args.reference != "none":
        got = [np.asarray(x, np.float64) for x in train(q, k, v)]
        if args.reference == "keras":
            ref = [np.asarray(x, np.float64) for x in fwd_bwd(
                lambda q, k, v: keras.ops.dot_product_attention(q, k, v, is_causal=causal))(q, k, v)]
        else:
            ref = _numpy_reference(*(np.asarray(x, np.float64) for x in (q, k, v, w)), causal)
        errors = [float(np.max(np.abs(a - b))) for a, b in zip(got, ref)]
        result.update(reference=args.reference, err_out=errors[0], err_grad=max(errors[1:]))
    return result


def _numpy_reference(q, k, v, w, causal, block=256):
    """Float64 output and q/k/v gradients of sum(out * w), one query block at a time."""
    import numpy as np

    q, k, v, w = (x[0].transpose(1, 0, 2) for x in (q, k, v, w))  # (H, N, D)
    n, scale = q.shape[1], 1 / np.sqrt(q.shape[-1])
    out, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for start in range(0, n, block):
        stop = min(start + block, n)
        keys = stop if causal else n  # causal: the later keys are all masked
        s = np.einsum("hqd,hkd->hqk", q[:, start:stop], k[:, :keys]) * scale
        if causal:
            s = np.where(np.arange(keys)[None, :] <= np.arange(start, stop)[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, start:stop] = p @ v[:, :keys]
        dv[:, :keys] += p.transpose(0, 2, 1) @ w[:, start:stop]
        dp = w[:, start:stop] @ v[:, :keys].transpose(0, 2, 1)
        ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
        dq[:, start:stop] = ds @ k[:, :keys]
        dk[:, :keys] += ds.transpose(0, 2, 1) @ q[:, start:stop]
    return [x.transpose(1, 0, 2)[None] for x in (out, dq, dk, dv)]


def _spawn(impl, n, causal, args, reference="none") -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", impl, "--n", str(n),
        "--repeats", str(args.repeats), "--reference", reference,
    ]
    if causal:
        cmd.append("--causal")
    if args.jit:
        cmd.append("--jit")
    if args.max_memory_bytes:
        cmd += ["--max-memory-bytes", str(args.max_memory_bytes)]
    cap = int(args.mem_cap_gb * 2**30)

    def limit():  # address-space cap: an allocation beyond it fails in the child only
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": n, "causal": causal, "failed": f"timeout {args.timeout}s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
    oom = any(s in proc.stderr for s in ("bad_alloc", "OOM", "ResourceExhausted", "MemoryError", "Cannot allocate"))
    reason = f"OOM (cap {args.mem_cap_gb:g} GB)" if oom or proc.returncode < 0 else f"error: {tail}"
    return {"impl": impl, "n": n, "causal": causal, "failed": reason}


def _fmt(value, unit=""):
    return "-" if value is None else f"{value:,.0f}{unit}" if unit != "e" else f"{value:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 1024, 2048, 4096 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-cap-gb", type=float, default=20.0, help="address-space cap per run")
    parser.add_argument("--max-memory-bytes", type=int, default=None, help="chunked budget (default: the op's)")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for both")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", choices=("full", "chunked"), default=None)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--reference", choices=("keras", "numpy", "none"), default="none")
    args = parser.parse_args()
    if args.child:
        args.impl = args.child
        print(json.dumps(_child(args)))
        return
    sizes = args.sizes or ([1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384])
    rows = []
    for n in sizes:
        for causal in (False, True):
            full = _spawn("full", n, causal, args)
            chunked = _spawn("chunked", n, causal, args, reference="numpy" if "failed" in full else "keras")
            rows.append((n, causal, full, chunked))
            print(f"# N={n} causal={causal}: full {json.dumps(full)}\n#   chunked {json.dumps(chunked)}", flush=True)
    print(
        "\n| N | causal | full fwd ms | chunked fwd ms | fwd ratio | full fwd+bwd ms | chunked fwd+bwd ms "
        "| fwd+bwd ratio | full peak MB | chunked peak MB | peak ratio | err out | err grad | ref |"
    )
    print("|" + "---|" * 14)
    for n, causal, full, ch in rows:
        def ratio(key):
            if key in full and key in ch:
                return f"{ch[key] / full[key]:.2f}"
            return "-"

        full_note = full.get("failed")
        print(
            f"| {n} | {'yes' if causal else 'no'} | {full_note or _fmt(full.get('fwd_ms'))} | "
            f"{ch.get('failed') or _fmt(ch.get('fwd_ms'))} | {ratio('fwd_ms')} | "
            f"{full_note or _fmt(full.get('fwd_bwd_ms'))} | {_fmt(ch.get('fwd_bwd_ms'))} | {ratio('fwd_bwd_ms')} | "
            f"{full_note or _fmt(full.get('fwd_bwd_peak_mb'))} | {_fmt(ch.get('fwd_bwd_peak_mb'))} | "
            f"{ratio('fwd_bwd_peak_mb')} | {_fmt(ch.get('err_out'), 'e')} | {_fmt(ch.get('err_grad'), 'e')} | "
            f"{ch.get('reference', '-')} |"
        )
    print("\nCPU-time ratios chunked / full (all threads; less sensitive to other load on the machine):")
    for n, causal, full, ch in rows:
        if "fwd_cpu_ms" in full and "fwd_cpu_ms" in ch:
            print(f"  N={n} causal={causal}: fwd {ch['fwd_cpu_ms'] / full['fwd_cpu_ms']:.2f}, "
                  f"fwd+bwd {ch['fwd_bwd_cpu_ms'] / full['fwd_bwd_cpu_ms']:.2f}")
    by = {(n, c): ch for n, c, _, ch in rows}
    for n in sizes:
        a, b = by.get((n, False), {}), by.get((n, True), {})
        if "fwd_bwd_ms" in a and "fwd_bwd_ms" in b:
            print(f"chunked causal / non-causal at N={n}: fwd {b['fwd_ms'] / a['fwd_ms']:.2f}, "
                  f"fwd+bwd {b['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f} (CPU time: fwd "
                  f"{b['fwd_cpu_ms'] / a['fwd_cpu_ms']:.2f}, fwd+bwd {b['fwd_bwd_cpu_ms'] / a['fwd_bwd_cpu_ms']:.2f})")


if __name__ == "__main__":
    main()
