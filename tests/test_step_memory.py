"""What a train step leaves allocated (issue 22 headline), measured in a fresh process, never timed.

The 30-block QLoRA headline of `benchmarks/bench_long_context.py` (commit 6418e5a) found
3.7 GiB still allocated in TensorFlow's CPU BFC allocator after the first train step, about
3.3 (T, hidden) float32 arrays per block, which pushed the first step's peak to 6.99 GiB.
The cause was TensorFlow's default grappler on the train step (constant folding together with
the memory optimizer; with either one off those buffers go): the optimized step leaves
T-sized buffers allocated from one step to the next. tf_lora's ``train_graph_rewrites="auto"``
(no memory optimizer on CPU) does not. This file checks that the state after a step is the
state before it plus the optimizer's slots and a small remainder, and that it does not grow
from step to step.

The model: a 4-block Llama 3 decoder (hidden 256, 4 query / 2 KV heads, intermediate 512,
vocabulary 1,024), QLoRA (NF4) on every linear layer, gradient checkpointing, chunked
attention and chunked loss (the headline's configuration), batch 1, T=4,096.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("keras_hub")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BLOCKS, HIDDEN = 4096, 4, 256
ACTIVATION = SEQ * HIDDEN * 4  # one (T, hidden) float32 array: 4 MiB
# Measured 2026-12-07 (TF 2.21), left above the state before the step and the Adam slots:
# 14.4 MiB at 238d19c ("auto"), 69.7 MiB at 6418e5a (TensorFlow's default grappler; 53.3 MiB at
# 238d19c with train_graph_rewrites={}).
BOUND = 2 * BLOCKS * ACTIVATION  # 32 MiB: fewer than two (T, hidden) arrays a block

CHILD = r"""
import gc, json, os, sys
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
import numpy as np, keras, keras_hub, tensorflow as tf
sys.path.insert(0, sys.argv[1])
import tf_lora
T, L, H = (int(a) for a in sys.argv[2:5])
keras.utils.set_random_seed(0)
bb = keras_hub.models.Llama3Backbone(vocabulary_size=1024, num_layers=L, num_query_heads=4, num_key_value_heads=2,
    hidden_dim=H, intermediate_dim=2 * H, rope_max_wavelength=100000, layer_norm_epsilon=1e-5,
    tie_word_embeddings=True)
lm = keras_hub.models.Llama3CausalLM(backbone=bb, preprocessor=None)
config = tf_lora.LoRAConfig(rank=8, dropout=0.0, target_modules="all-linear", attention="chunked", loss="chunked",
                            gradient_checkpointing=True, quantization=tf_lora.QLoRAConfig())
lm = tf_lora.adapt(lm, config, inplace=True, verbose=0)
lm.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False)
ids = np.random.default_rng(0).integers(0, 1024, (1, T + 1)).astype("int32")
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((1, T), "int32")}
current = lambda: int(tf.config.experimental.get_memory_info("CPU:0")["current"])
out = {"before": current(), "losses": [], "after": []}
for _ in range(3):
    out["losses"].append(float(np.ravel(lm.train_on_batch(x, ids[:, 1:], sample_weight=np.ones((1, T), "float32")))[0]))
    gc.collect()
    out["after"].append(current())
out["optimizer"] = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in lm.optimizer.variables)
print("RESULT " + json.dumps(out), flush=True)
"""


def _run_child() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", CHILD, REPO, str(SEQ), str(BLOCKS), str(HIDDEN)],
                          capture_output=True, text=True, env=env, timeout=900)  # the timeout guards a hang only
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_a_train_step_leaves_only_the_optimizer_state_allocated():
    out = _run_child()
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    retained = out["after"][0] - out["before"] - out["optimizer"]
    figures = (f"before {mib(out['before'])}, after each step {[mib(a) for a in out['after']]}, optimizer slots "
               f"{mib(out['optimizer'])}: retained {mib(retained)} (bound {mib(BOUND)}, one (T, hidden) array "
               f"{mib(ACTIVATION)}, {BLOCKS} blocks)")
    print(figures)
    assert all(abs(loss) < 1e3 for loss in out["losses"]), out["losses"]
    # Not a leak: later steps end where the first ended (1 MiB of slack for allocator bookkeeping).
    assert max(out["after"]) - min(out["after"]) <= 2**20, figures
    # And the first step leaves no per-block activations behind.
    assert retained <= BOUND, figures
