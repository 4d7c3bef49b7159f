"""Host memory of adapt(): the float kernels it replaces are freed (issue 9, inplace=True).

The in-process tests check with weak references that nothing keeps a replaced kernel
(or, after a copy, the original model) alive; the last one measures the process's memory
in a subprocess. None of them measures time.
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import hub_models
import pytest

import tf_lora
from tf_lora.adapt import _select

QLORA = tf_lora.LoRAConfig(rank=2, target_modules="all-linear", quantization=tf_lora.QLoRAConfig())


def _kernel_refs(model, config):
    targets, _ = _select(model, config)
    return [weakref.ref(layer.kernel) for layer in targets.values()]


def test_inplace_frees_every_replaced_kernel():
    model = hub_models.gemma()
    refs = _kernel_refs(model, QLORA)
    assert tf_lora.adapt(model, QLORA, inplace=True, verbose=0) is model
    gc.collect()
    assert refs and [r for r in refs if r() is not None] == []


def test_a_copy_does_not_keep_the_original_alive():
    base = hub_models.gemma()
    refs = _kernel_refs(base, QLORA) + [weakref.ref(base), weakref.ref(base.backbone.token_embedding.embeddings)]
    model = tf_lora.adapt(base, QLORA, verbose=0)
    del base
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert isinstance(model.backbone.get_layer("decoder_block_0").attention.query_dense, tf_lora.QLoRAEinsumDense)


# ------------------------------------------------------- measured, in a fresh process
BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_adapt_memory.py")
# A 3-block Gemma with full-size blocks (hidden 1024, FFN 4096): F = 180 MiB of float
# kernels, far above the noise of a process's RSS, built and adapted in ~20 s on 2 cores.
SMALL_GEMMA = dict(vocabulary_size=1000, num_layers=3, num_query_heads=8, num_key_value_heads=4,
                   hidden_dim=1024, intermediate_dim=8192, head_dim=128)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
@pytest.mark.parametrize("bfc", ["false", "true"], ids=["default_allocator", "bfc_allocator"])
def test_inplace_qlora_peak_and_released_memory(bfc):
    """Issue 9's bounds, measured by bench_adapt_memory's worker in a fresh process: peak RSS
    increase during adapt <= 0.25 x F, and >= 0.6 x F released afterwards (an F-byte TensorFlow
    probe after adapt grows RSS by <= 0.4 x F over the RSS before adapt). No time is asserted;
    the timeout only guards against a hang."""
    task = {"mode": "inplace", "model": SMALL_GEMMA}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CPU_ALLOCATOR_USE_BFC=bfc)
    proc = subprocess.run([sys.executable, BENCH, "--worker", json.dumps(task)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_ADAPT_MEMORY_RESULT ")]
    assert proc.returncode == 0 and lines, f"worker exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    r = json.loads(lines[0].split(" ", 1)[1])
    assert os.path.samefile(os.path.dirname(r["tf_lora"]), os.path.dirname(tf_lora.__file__))
    f = r["f_bytes"]
    assert r["layers"] == 21 and f >= 100 * 2**20
    summary = (f"F={f / 2**20:.0f} MiB, peak +{r['peak_increase'] / f:.3f} x F ({r['peak_method']}), "
               f"released {r['released'] / f:.3f} x F")
    assert r["peak_increase"] <= 0.25 * f, summary
    assert r["released"] >= 0.6 * f, summary
