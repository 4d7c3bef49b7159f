"""Host memory and time of QLoRA `adapt` on a large KerasHub model, in place vs copied (issue 9).

Model: a KerasHub ``GemmaBackbone`` built from config (random weights, no download;
221.5M float32 parameters at full size, 84 adapted kernels), adapted with
``tf_lora.adapt(model, LoRAConfig(rank=8, target_modules="all-linear",
quantization=QLoRAConfig()), inplace=...)``. Each mode runs in its own fresh
subprocess: ``inplace`` (``inplace=True``) and ``clone`` (the default
``inplace=False``; the base model is deleted after adapt, as a user who keeps only
the adapted model would).

F = the float32 bytes of the adapted kernels (``memory_report(model)["base_float32_bytes"]``).
Reported per mode, as fractions of F:

* peak: the process's peak RSS during ``adapt`` minus its RSS just before (taken
  after ``gc.collect()`` and glibc's ``malloc_trim``, so that memory left free by
  building the model is not counted as released by adapt). The
  peak is the kernel's high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before adapt), or, where that reset is not
  allowed, the maximum of a thread sampling RSS every millisecond.
* released: live memory given back. After adapt (and ``gc.collect()``), a probe
  of F bytes is allocated through TensorFlow (one float32 tensor per adapted
  kernel, same sizes) and ``released = F - (RSS after the probe - RSS before
  adapt)``: memory freed by adapt counts whether it went back to the OS or stays
  in an allocator pool where TensorFlow reuses it (the BFC allocator keeps freed
  tensors in its pool, so RSS alone would not show them; TensorFlow's default
  allocator frees them into the C heap, which adapt hands back to the OS). The
  ideal for NF4 is 1 - 4.127/32 = 0.87. In ``clone`` mode the float kernels are
  freed only when the base model is deleted, after adapt has returned.
* allocator: with ``TF_CPU_ALLOCATOR_USE_BFC=true``, TensorFlow's own count of live
  bytes (``get_memory_info("CPU:0")["current"]``) before minus after adapt, as a
  cross-check of the probe (n/a with the default allocator, which keeps no stats).

and the adapt wall time. Targets for ``inplace`` (issue 9): peak <= 0.25 x F and
released >= 0.6 x F.

The subprocesses use TensorFlow's default CPU allocator unless
``TF_CPU_ALLOCATOR_USE_BFC`` is set in the environment.

Usage:
    python benchmarks/bench_adapt_memory.py            # 221.5M parameters, ~1 min per mode on 2 cores
    python benchmarks/bench_adapt_memory.py --quick    # a small Gemma, seconds (smoke test)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Measure the tf_lora of this checkout, not whichever one is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "tf_lora")):
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

RESULT_PREFIX = "BENCH_ADAPT_MEMORY_RESULT "
MIB = 2.0**20
MODES = ("inplace", "clone")
PEAK_GOAL, RELEASED_GOAL = 0.25, 0.6  # for inplace, fractions of F
# GemmaBackbone arguments; Gemma's FFN projections have intermediate_dim // 2 units each.
FULL = dict(vocabulary_size=32000, num_layers=12, num_query_heads=8, num_key_value_heads=4,
            hidden_dim=1024, intermediate_dim=8192, head_dim=128)
QUICK = dict(vocabulary_size=1000, num_layers=2, num_query_heads=4, num_key_value_heads=2,
             hidden_dim=256, intermediate_dim=2048, head_dim=64)


# ------------------------------------------------------------- RSS probes ---
def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRSS:
    """Peak RSS over a `with` block: the kernel's VmHWM after resetting it, or a
    1 ms sampling thread where the reset is not allowed."""

    def __enter__(self):
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            if _hwm() > current_rss() + 16 * MIB:
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "sampled every 1 ms"
        self.peak, self._stop = current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        if self.method == "VmHWM":
            self.peak = max(self.peak, _hwm())
        return False


def settle() -> None:
    """Collects garbage and hands the C heap's free pages back to the OS (glibc), so that
    the RSS before adapt holds no memory left free by building the model (adapt itself
    returns what it frees the same way; counting both would inflate `released`)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):  # not glibc
            pass


def _allocator_current():
    import tensorflow as tf

    try:
        return int(tf.config.experimental.get_memory_info("CPU:0")["current"])
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None


# ----------------------------------------------------------------- worker ---
def measure(task: dict) -> dict:
    """One mode in this (fresh) process: build, adapt, probe."""
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    import tf_lora

    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(0)
    model = keras_hub.models.GemmaBackbone(**task["model"])
    params = int(sum(int(np.prod(v.shape)) for v in model.weights))
    config = tf_lora.LoRAConfig(rank=8, target_modules="all-linear", quantization=tf_lora.QLoRAConfig())
    settle()
    rss_before, alloc_before = current_rss(), _allocator_current()
    inplace = task["mode"] == "inplace"
    with PeakRSS() as peak:
        start = time.perf_counter()
        adapted = tf_lora.adapt(model, config, inplace=inplace, verbose=0)
        seconds = time.perf_counter() - start
    assert (adapted is model) == inplace
    tf_lora_file = tf_lora.__file__
    del model  # clone mode: the user keeps only the adapted copy
    gc.collect()
    rss_after, alloc_after = current_rss(), _allocator_current()
    report = tf_lora.memory_report(adapted)
    f_bytes = int(report["base_float32_bytes"])
    probe = [tf.fill([row["base_parameters"]], 1.0) for row in report["layers"]]
    rss_probe = current_rss()
    del probe
    return dict(
        mode=task["mode"], tf_lora=tf_lora_file, params=params, f_bytes=f_bytes, layers=len(report["layers"]),
        stored_bytes=int(report["base_stored_bytes"]), seconds=seconds, peak_method=peak.method,
        rss_before=rss_before, peak_increase=peak.peak - rss_before, rss_after=rss_after,
        released=f_bytes - (rss_probe - rss_before),
        allocator_released=None if alloc_before is None else alloc_before - alloc_after,
    )


def run_worker(task: dict, timeout: float = None) -> dict:
    """Runs `measure(task)` in a fresh Python process and returns its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"worker {task['mode']} exited with {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------ orchestrator ---
def _fmt(value, f_bytes) -> str:
    return "n/a" if value is None else f"{value / f_bytes:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small Gemma (smoke test)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one JSON task
    args = p.parse_args(argv)
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    sizes = QUICK if args.quick else FULL
    allocator = "BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true") else "default"
    print(f"tf_lora adapt memory bench{' (--quick)' if args.quick else ''}: GemmaBackbone({sizes}), "
          f"QLoRA rank 8 on 'all-linear'; one fresh process per mode, {allocator} TF CPU allocator, "
          f"os.cpu_count()={os.cpu_count()}")
    results = {mode: run_worker(dict(mode=mode, model=sizes)) for mode in MODES}
    first = results[MODES[0]]
    f_bytes = first["f_bytes"]
    print(f"model: {first['params']:,} float32 parameters ({first['params'] * 4 / MIB:,.0f} MiB); "
          f"{first['layers']} adapted kernels, F = {f_bytes:,} bytes ({f_bytes / MIB:,.1f} MiB) as float32, "
          f"{first['stored_bytes'] / MIB:,.1f} MiB as NF4; peak RSS via {first['peak_method']}; "
          f"tf_lora from {os.path.dirname(first['tf_lora'])}")
    header = (f"{'mode':>8} {'RSS before MiB':>15} {'peak +MiB':>10} {'peak/F':>7} {'released MiB':>13} "
              f"{'released/F':>11} {'allocator released/F':>21} {'adapt s':>8}")
    print(header)
    print("-" * len(header))
    for mode in MODES:
        r = results[mode]
        print(f"{mode:>8} {r['rss_before'] / MIB:>15,.0f} {r['peak_increase'] / MIB:>10,.0f} "
              f"{_fmt(r['peak_increase'], f_bytes):>7} {r['released'] / MIB:>13,.0f} "
              f"{_fmt(r['released'], f_bytes):>11} {_fmt(r['allocator_released'], f_bytes):>21} "
              f"{r['seconds']:>8.1f}")
    print("peak = peak RSS during adapt - RSS before; released = F - (RSS after an F-byte TensorFlow probe "
          "- RSS before), the probe allocated after adapt (clone: after deleting the base model).")
    inplace, clone = results["inplace"], results["clone"]
    print(f"ratios clone/inplace: peak {clone['peak_increase'] / max(inplace['peak_increase'], 1):.2f}, "
          f"adapt time {clone['seconds'] / inplace['seconds']:.2f}")
    ok_peak = inplace["peak_increase"] <= PEAK_GOAL * f_bytes
    ok_released = inplace["released"] >= RELEASED_GOAL * f_bytes
    print(f"inplace targets: peak <= {PEAK_GOAL} x F: {'yes' if ok_peak else 'NO'}; "
          f"released >= {RELEASED_GOAL} x F: {'yes' if ok_released else 'NO'}"
          + ("" if not args.quick else " (--quick: a small model, where fixed costs weigh more)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
