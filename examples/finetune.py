"""Fine-tune a small language model with tf_lora, offline, in a few minutes on a CPU.

The story of the README's first command:

1. Build a small causal transformer language model from standard Keras layers
   (Embedding, MultiHeadAttention, LayerNormalization, Dense), byte-level.
2. Pre-train it briefly on English prose: the documentation strings of the
   Python standard library (present on every machine with Python, no download).
3. Adapt it with QLoRA (NF4 base weights + LoRA on the attention projections)
   to a different body of text: the standard library's Python *source code*.
4. Report perplexity on held-out source files before and after, trainable
   parameters, memory (base weights float32 vs NF4, optimizer state vs full
   fine-tuning), adapter size on disk, merged-vs-adapted difference, speed.

With ``--dataset NAME`` it instead fine-tunes a classifier on a
tensorflow-datasets text dataset (e.g. ``imdb_reviews``) when that dataset is
already prepared in the TFDS data dir; without it (and no network) it says so
at once and exits with status 2.

Run ``python examples/finetune.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")
import absl.logging  # noqa: E402

absl.logging.set_verbosity(absl.logging.ERROR)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import tf_lora  # noqa: E402
from example_utils import PositionEmbedding, positive  # noqa: E402

# Fixed module lists keep the corpora identical on every machine.
PROSE_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json",
    "logging", "os", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "zipfile",
)
CODE_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "configparser", "copy", "csv",
    "dataclasses", "difflib", "dis", "enum", "fnmatch", "fractions", "functools", "getopt", "gzip",
    "heapq", "hmac", "ipaddress", "keyword", "linecache", "locale", "numbers", "operator", "optparse",
    "pprint", "queue", "quopri", "random", "sched", "secrets", "selectors", "shlex", "statistics",
    "string", "stringprep", "textwrap", "timeit", "tokenize", "uu", "wave", "weakref", "zipapp",
)


# ---------------------------------------------------------------- corpora ---
def prose_corpus() -> bytes:
    """English prose: docstrings of standard-library modules, classes, functions."""
    docs = []
    for name in PROSE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module] + [v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isfunction(v)]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in docs:
                docs.append(doc)
    return "\n\n".join(docs).encode("utf-8", "replace")


def code_corpus() -> tuple:
    """Python source of standard-library modules: (train bytes, held-out bytes).

    The held-out part is whole files (every fifth module), never seen in training.
    """
    train, held_out = [], []
    for i, name in enumerate(CODE_MODULES):
        try:
            source = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):
            continue
        (held_out if i % 5 == 4 else train).append(source)
    return "\n".join(train).encode("utf-8", "replace"), "\n".join(held_out).encode("utf-8", "replace")


def windows(data: bytes, seq_len: int, count: int, rng: np.random.Generator):
    """`count` random (input, next-byte target) windows of length `seq_len`."""
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = rng.integers(0, len(arr) - seq_len - 1, size=count)
    x = np.stack([arr[s : s + seq_len] for s in starts]).astype("int32")
    y = np.stack([arr[s + 1 : s + seq_len + 1] for s in starts]).astype("int32")
    return x, y


# ------------------------------------------------------------------ model ---
def language_model(seq_len=128, dim=128, heads=4, layers=2, vocab=256) -> keras.Model:
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, dim, name="embedding")(tokens)
    x = PositionEmbedding(seq_len, name="position")(x)
    for i in range(layers):
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x)
        h = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block_{i}_attention")(h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x)
        h = keras.layers.Dense(4 * dim, activation="gelu", name=f"block_{i}_ffn_up")(h)
        x = x + keras.layers.Dense(dim, name=f"block_{i}_ffn_down")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(vocab, name="lm_head")(x)
    return keras.Model(tokens, logits, name="byte_lm")


def lm_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def perplexity(model, x, y) -> float:
    logits = model.predict(x, batch_size=64, verbose=0)
    return float(math.exp(float(keras.ops.mean(lm_loss()(y, logits)))))


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


# ------------------------------------------------------------------- args ---
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed (deterministic runs)")
    p.add_argument("--rank", type=positive("--rank"), default=8, help="LoRA rank")
    p.add_argument("--alpha", type=positive("--alpha", float), default=16.0, help="LoRA alpha")
    p.add_argument("--pretrain-steps", type=positive("--pretrain-steps"), default=300)
    p.add_argument("--steps", type=positive("--steps"), default=200, help="fine-tuning steps")
    p.add_argument("--batch-size", type=positive("--batch-size"), default=16)
    p.add_argument("--seq-len", type=positive("--seq-len"), default=128)
    p.add_argument("--dim", type=positive("--dim"), default=128)
    p.add_argument("--layers", type=positive("--layers"), default=2)
    p.add_argument("--eval-windows", type=positive("--eval-windows"), default=256)
    p.add_argument("--no-quant", action="store_true", help="plain LoRA (float32 base) instead of QLoRA/NF4")
    p.add_argument("--chunked-attention", action="store_true", help="use tf_lora.ChunkedAttention while adapting")
    p.add_argument("--save-adapter", metavar="PATH", help="write the trained adapter to PATH")
    p.add_argument("--dataset", metavar="NAME", help="fine-tune a classifier on a TFDS text dataset instead")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1 if sys.stdout.isatty() else 2,
                   help="Keras progress display (default: bar on a terminal, a line per epoch otherwise)")
    args = p.parse_args(argv)
    if args.save_adapter:
        folder = os.path.dirname(os.path.abspath(args.save_adapter))
        if not os.path.isdir(folder):
            p.error(f"--save-adapter: folder {folder!r} does not exist")
    if args.dataset is not None:
        import tensorflow_datasets as tfds

        if args.dataset not in tfds.list_builders():
            p.error(f"--dataset: unknown tensorflow-datasets name {args.dataset!r}")
    return args


# ------------------------------------------------------------- pipelines ---
def pretrain(args, rng):
    prose = prose_corpus()
    model = language_model(args.seq_len, args.dim, layers=args.layers)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3), loss=lm_loss(), jit_compile=True)
    x, y = windows(prose, args.seq_len, args.pretrain_steps * args.batch_size, rng)
    print(f"Pre-training on {len(prose):,d} bytes of standard-library docstrings (English prose)...")
    model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=args.verbose)
    return model


def adapt_config(args, **extra):
    return tf_lora.LoRAConfig(
        rank=args.rank, alpha=args.alpha, dropout=0.05,
        target_modules=("query", "key", "value", "attention_output"),
        quantization=None if args.no_quant else tf_lora.QLoRAConfig(),
        attention="chunked" if args.chunked_attention else None,
        **extra,
    )


def finetune_lm(args) -> dict:
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    base = pretrain(args, rng)
    code_train, code_eval = code_corpus()
    x_eval, y_eval = windows(code_eval, args.seq_len, args.eval_windows, np.random.default_rng(args.seed + 1))
    ppl_base = perplexity(base, x_eval, y_eval)

    model = tf_lora.adapt(base, adapt_config(args))
    ppl_adapted_init = perplexity(model, x_eval, y_eval)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=lm_loss(), jit_compile=True)
    x, y = windows(code_train, args.seq_len, args.steps * args.batch_size, rng)
    print(f"Fine-tuning {'QLoRA (NF4)' if not args.no_quant else 'LoRA'} adapters on {len(code_train):,d} bytes of Python source...")
    t0 = time.time()
    model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=args.verbose)
    train_seconds = time.time() - t0
    ppl_after = perplexity(model, x_eval, y_eval)

    counts = tf_lora.count_parameters(model)
    memory = tf_lora.memory_report(model) if hasattr(tf_lora, "memory_report") else None
    merged = tf_lora.merge(model)
    merged_diff = float(np.max(np.abs(merged.predict(x_eval[:32], verbose=0) - model.predict(x_eval[:32], verbose=0))))
    with tempfile.TemporaryDirectory() as d:
        path = args.save_adapter or os.path.join(d, "code.adapter")
        adapter_bytes = tf_lora.save_adapter(model, path)
    all_params = sum(int(np.prod(v.shape)) for v in base.weights)
    report = {
        "perplexity_base": ppl_base,
        "perplexity_adapted_at_init": ppl_adapted_init,
        "perplexity_after": ppl_after,
        "trainable_params": counts.trainable,
        "all_params": counts.total,
        "trainable_percent": counts.percent,
        "optimizer_state_bytes": 2 * 4 * counts.trainable,
        "optimizer_state_full_bytes": 2 * 4 * all_params,
        "adapter_bytes": adapter_bytes,
        "merged_max_abs_diff": merged_diff,
        "tokens_per_second": args.steps * args.batch_size * args.seq_len / train_seconds,
        "total_seconds": time.time() - start,
        "memory": memory,
    }
    print_report(args, report)
    return report


def print_report(args, r):
    mode = "LoRA (float32 base)" if args.no_quant else "QLoRA (NF4 base, double quantization)"
    print("\n=== tf_lora fine-tuning report ===")
    print(f"method                         : {mode}, rank {args.rank}, alpha {args.alpha:g}")
    print(f"perplexity on held-out code    : {r['perplexity_base']:.2f} (base) -> "
          f"{r['perplexity_adapted_at_init']:.2f} (adapted, before training) -> {r['perplexity_after']:.2f} (after)")
    print(f"trainable parameters           : {r['trainable_params']:,d} of {r['all_params']:,d} ({r['trainable_percent']:.2f}%)")
    if r["memory"] is not None:
        m = r["memory"]
        print(f"adapted base weights           : {_mib(m['base_float32_bytes'])} as float32 -> {_mib(m['base_stored_bytes'])} stored")
    print(f"optimizer state (AdamW)        : {_mib(r['optimizer_state_bytes'])} vs {_mib(r['optimizer_state_full_bytes'])} for full fine-tuning")
    print(f"adapter size on disk           : {r['adapter_bytes'] / 1024:.1f} KiB")
    print(f"max |merged - adapted| output  : {r['merged_max_abs_diff']:.2e}")
    print(f"training throughput            : {r['tokens_per_second']:,.0f} tokens/s")
    print(f"total time                     : {r['total_seconds']:.1f} s")


# --------------------------------------------------- TFDS classification ---
def tfds_prepared(name: str) -> bool:
    """Whether `name` is already prepared in the local TFDS data dir (no network)."""
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    root = os.path.join(data_dir, name)
    for dirpath, _, files in os.walk(root):
        if "dataset_info.json" in files:
            return True
    del tfds
    return False


def finetune_classifier(args) -> dict:
    import tensorflow_datasets as tfds

    if not tfds_prepared(args.dataset):
        print(f"Dataset {args.dataset!r} is not prepared in the TFDS data dir and this run does not download. "
              f"On a machine with network: python -c \"import tensorflow_datasets as tfds; tfds.load('{args.dataset}')\"",
              file=sys.stderr)
        raise SystemExit(2)
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    lm = pretrain(args, rng)
    (train, test), info = tfds.load(args.dataset, split=["train", "test"], as_supervised=True, with_info=True,
                                    download=False, try_gcs=False)
    classes = info.features["label"].num_classes

    def to_arrays(ds, limit):
        xs, ys = [], []
        for text, label in tfds.as_numpy(ds.take(limit)):
            b = np.frombuffer(bytes(text)[: args.seq_len].ljust(args.seq_len, b" "), dtype=np.uint8)
            xs.append(b.astype("int32"))
            ys.append(int(label))
        return np.stack(xs), np.array(ys)

    x, y = to_arrays(train, args.steps * args.batch_size)
    xt, yt = to_arrays(test, args.eval_windows)
    features = lm.get_layer("final_norm").output
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(features)
    head = keras.layers.Dense(classes, name="classifier")(pooled)
    base = keras.Model(lm.input, head, name="classifier_model")
    model = tf_lora.adapt(base, adapt_config(args, modules_to_save=("classifier",)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=loss, metrics=["accuracy"])
    before = model.evaluate(xt, yt, verbose=0)[1]
    model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=args.verbose)
    after = model.evaluate(xt, yt, verbose=0)[1]
    counts = tf_lora.count_parameters(model)
    print(f"\n{args.dataset}: accuracy {before:.3f} -> {after:.3f}; trainable {counts.trainable:,d} "
          f"({counts.percent:.2f}%); {time.time() - start:.1f} s")
    return {"accuracy_before": before, "accuracy_after": after, "trainable_percent": counts.percent}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dataset:
        return finetune_classifier(args)
    return finetune_lm(args)


if __name__ == "__main__":
    main()
