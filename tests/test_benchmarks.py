"""Smoke runs of the benchmark scripts: each runs with ``--quick`` in a subprocess,
exits 0 and prints a table and a ratio. No assertion on any measured time."""

import os
import re
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
SCRIPTS = ("bench_lora.py", "bench_scaling.py", "bench_qlora.py", "bench_attention.py", "bench_adapt_memory.py",
           "bench_variants.py", "bench_checkpointing.py", "bench_models.py")
# bench_attention's --quick still runs N = 1024..4096 (minutes on 2 cores); a single
# small N keeps this smoke test short.
SMALLER = {"bench_attention.py": ["--sizes", "256", "--repeats", "1"],
           "bench_models.py": ["--archs", "gemma", "--modes", "graph"],  # its --quick runs 2 archs x 3 modes
           # its --quick times 9 models and measures each in a fresh process: one pair is enough here
           "bench_checkpointing.py": ["--modes", "chunked/on", "--memory-modes", "chunked/off,chunked/on"]}
TABLE_RULE = re.compile(r"^\s*(-{10,}|\|(\s*-{3,}\s*\|)+)\s*$", re.MULTILINE)  # "-----" or "|---|---|"
RATIO = re.compile(r"ratio", re.IGNORECASE)


def _command(script: str, path: str) -> list:
    return [sys.executable, path, "--quick"] + SMALLER.get(script, [])


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_run(script):
    path = os.path.join(BENCHMARKS, script)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # The timeout only guards against a hang; nothing here asserts a duration.
    proc = subprocess.run(_command(script, path), capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(BENCHMARKS), timeout=900)
    tail = f"\n--- stdout tail ---\n{proc.stdout[-3000:]}\n--- stderr tail ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{script} --quick exited with {proc.returncode}{tail}"
    assert TABLE_RULE.search(proc.stdout), f"{script} printed no table{tail}"
    assert RATIO.search(proc.stdout), f"{script} printed no ratio{tail}"
    if script == "bench_scaling.py":
        for section in ("(a) rank sweep", "(b) LoRA / full fine-tuning ratios", "(c) sequence sweep",
                        "(d) switching adapters"):
            assert section in proc.stdout, f"missing section {section!r}{tail}"


def test_bench_long_context_quick_run():
    """bench_long_context.py --quick (tiny widths, T=128): every configuration's memory child
    and the interleaved timing child run and a table with ratios vs plain is printed."""
    path = os.path.join(BENCHMARKS, "bench_long_context.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(_command("bench_long_context.py", path), capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(BENCHMARKS), timeout=900)  # guards a hang only
    tail = f"\n--- stdout tail ---\n{proc.stdout[-3000:]}\n--- stderr tail ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"bench_long_context.py --quick exited with {proc.returncode}{tail}"
    assert TABLE_RULE.search(proc.stdout) and RATIO.search(proc.stdout), f"no table with ratios{tail}"
    for row in ("plain KerasHub + LoRA", "chunked attention", "+ chunked loss", "+ checkpointing"):
        line = next((ln for ln in proc.stdout.splitlines() if row in ln and ln.lstrip().startswith("128")), "")
        assert line and "OOM" not in line, f"missing row {row!r} at T=128, or it did not fit{tail}"
