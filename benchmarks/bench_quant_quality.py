"""Quantization error of NF4 and NF4 + LoftQ on SmolLM2-135M-Instruct, against the float model.

The float model is the GGUF file (``Q4_1``) dequantized to float32 by `tf_lora.load_gguf`: the
reference. Each variant puts its base weights on every linear layer (210 kernels) of the same
file and is scored on held-out text, the docstrings of a fixed list of standard-library modules
(text the model was not tuned on here), cut into windows of ``--length`` tokens:

- top-1 agreement: fraction of positions where the variant's argmax next token equals the
  float model's;
- NLL: mean negative log-likelihood of the real next token, nats per token (perplexity = exp).

Variants: ``float``; ``nf4`` (`tf_lora.QLoRAConfig()`: NF4, blocks of 64, double quantization),
optionally with a smaller group size; ``nf4+loftq r<R>`` (the same NF4 base with LoRA adapters of
rank R initialized by LoftQ, `LoRAConfig(init="loftq")`, before any training: what QLoRA with
LoftQ init starts from). It decides which of LoRA / QLoRA / QLoRA + LoftQ
``examples/chat_finetune.py`` uses by default.

Run: ``python benchmarks/bench_quant_quality.py`` (``--quick``: fewer windows, one LoftQ rank).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

TEXT_MODULES = ("argparse", "collections", "csv", "datetime", "functools", "itertools", "json", "logging",
                "pathlib", "random", "string", "textwrap", "threading", "typing", "unittest", "zipfile")


def heldout_windows(tokenizer, count: int, length: int):
    """``count`` windows of ``length + 1`` token ids from the modules' docstrings."""
    import importlib

    import numpy as np

    ids = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        for obj in [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]:
            if inspect.getmodule(obj) is module and inspect.getdoc(obj):
                ids.extend(np.asarray(tokenizer(inspect.getdoc(obj) + "\n\n")).tolist())
        if len(ids) >= count * (length + 1):
            break
    if len(ids) < count * (length + 1):
        raise ValueError(f"only {len(ids)} tokens of text; ask for fewer windows (--windows)")
    return np.asarray(ids[:count * (length + 1)], "int32").reshape(count, length + 1)


def logits_of(lm, windows, batch_size: int = 4):
    import numpy as np
    import tensorflow as tf

    forward = tf.function(lambda x: lm(x, training=False))
    out = []
    for begin in range(0, len(windows), batch_size):
        ids = windows[begin:begin + batch_size, :-1]
        x = {"token_ids": tf.constant(ids), "padding_mask": tf.ones(ids.shape, "int32")}
        out.append(tf.cast(forward(x), "float32").numpy())
    return np.concatenate(out)


def scores(logits, windows, reference_top1):
    import numpy as np

    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    labels = windows[:, 1:]
    nll = float(-np.take_along_axis(log_probs, labels[..., None], -1).mean())
    top1 = logits.argmax(-1)
    agreement = float((top1 == reference_top1).mean()) if reference_top1 is not None else 1.0
    return agreement, nll, top1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--loftq-ranks", default="8,32", help="comma-separated LoftQ ranks")
    parser.add_argument("--loftq-iter", type=int, default=1)
    parser.add_argument("--group-sizes", default="64,32", help="NF4 block sizes (64 is QLoRAConfig's default)")
    parser.add_argument("--quick", action="store_true", help="4 windows, LoftQ rank 8, group size 64 only")
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.loftq_ranks, args.group_sizes = 4, "8", "64"

    import numpy as np

    import tf_lora

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from chat_finetune import smollm2_path

    path = smollm2_path()
    variants = [("float", None)]
    for g in args.group_sizes.split(","):
        variants.append((f"nf4 (group {g}, double quant)", tf_lora.LoRAConfig(
            rank=8, target_modules="all-linear", quantization=tf_lora.QLoRAConfig(group_size=int(g)))))
    for r in args.loftq_ranks.split(","):
        variants.append((f"nf4 (group 64) + LoftQ rank {r}, {args.loftq_iter} iter", tf_lora.LoRAConfig(
            rank=int(r), alpha=int(r), target_modules="all-linear", init="loftq", loftq_iter=args.loftq_iter,
            quantization=tf_lora.QLoRAConfig())))
    rows, reference = [], None
    windows = None
    for name, config in variants:
        t = time.perf_counter()
        lm = tf_lora.load_gguf(path, lora=config, sequence_length=args.length)
        load_s = time.perf_counter() - t
        if windows is None:
            windows = heldout_windows(lm.preprocessor.tokenizer, args.windows, args.length)
        agreement, nll, top1 = scores(logits_of(lm, windows), windows, reference)
        reference = top1 if reference is None else reference
        rows.append((name, agreement, nll, float(np.exp(nll)), load_s))
        print(f"{name}: top-1 agreement {agreement:.3f}, NLL {nll:.3f}, load+adapt {load_s:.1f} s", flush=True)
        del lm
        gc.collect()
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1), all 210 linear kernels, {args.windows} x {args.length} "
          f"held-out tokens of standard-library docstrings:\n")
    print("| base weights | top-1 agreement with float | held-out NLL (nats) | perplexity | load + adapt (s) |")
    print("|---|---|---|---|---|")
    for name, agreement, nll, ppl, load_s in rows:
        print(f"| {name} | {agreement:.3f} | {nll:.3f} | {ppl:.1f} | {load_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
