"""Two tasks, two LoRA adapters, one base model: switch between them without reloading.

The story:

1. Pre-train a small transformer (standard Keras layers) as a next-word language
   model on short English product-review-like sentences generated offline, e.g.
   ``"the telescope was not really impressive at the lab"``. Every sentence has a
   *topic* (sports or science, from its nouns and places) and a *sentiment*
   (positive or negative, from its adjective, flipped by "not").
2. Put a new two-class head on the pre-trained trunk and ``tf_lora.adapt`` it:
   the adapter ``"default"`` learns the **sentiment** task.
3. ``tf_lora.add_adapter(model, "topic", ...)`` adds a second adapter to the same
   layers; ``tf_lora.set_adapter(model, "topic")`` activates it, and it learns the
   **topic** task. The two tasks label the *same* sentences independently.
4. Switch back and forth with ``tf_lora.set_adapter`` (no reloading, no copying of
   base weights) and print each adapter's accuracy on both tasks: each adapter
   solves its own task and is at chance on the other one. The base weights are
   bit-for-bit unchanged and exist once; each adapter adds a few kilobytes.
5. ``tf_lora.add_weighted_adapter(model, ["default", "topic"], [1, 1], "cat",
   combination="cat")`` merges the two adapters into a third one (their updates
   summed exactly, at rank 2r), and ``combination="ties"`` into a fourth; the report
   shows each task's accuracy before and after merging. Here both adapters rewrite
   every layer of a small trunk, so their updates interfere: the merged adapters keep
   part of the topic task and lose most of the sentiment task (measured, see
   examples/README.md).

The head has two logits per task (columns 0-1 sentiment, 2-3 topic), and each
adapter is trained on its own task's columns only, so a merged adapter can answer both.

Run ``python examples/adapter_switching.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import tf_lora  # noqa: E402
from example_utils import PositionEmbedding, positive  # noqa: E402

# ------------------------------------------------------------------ data ---
SPORTS = ("match", "game", "team", "coach", "goalkeeper", "race", "season", "striker")
SCIENCE = ("experiment", "theory", "telescope", "molecule", "study", "sample", "equation", "microscope")
SPORTS_PLACES = ("at the stadium", "on the pitch", "in the league", "at the arena")
SCIENCE_PLACES = ("at the lab", "in the journal", "at the institute", "in the paper")
POSITIVE = ("great", "brilliant", "exciting", "wonderful", "impressive", "superb", "elegant", "solid")
NEGATIVE = ("awful", "boring", "dull", "terrible", "disappointing", "weak", "sloppy", "messy")
VERBS = ("was", "seemed", "felt", "looked")
ADVERBS = ("", "really", "quite", "very", "rather")
PAD = "<pad>"
VOCAB = [PAD] + sorted(
    {w for group in (SPORTS, SCIENCE, POSITIVE, NEGATIVE, VERBS, ADVERBS) for w in group if w}
    | {w for place in SPORTS_PLACES + SCIENCE_PLACES for w in place.split()}
    | {"the", "not", "and", "this", "year"}
)
INDEX = {w: i for i, w in enumerate(VOCAB)}
SEQ_LEN = 12
TASKS = ("sentiment", "topic")


def make_sentences(n: int, rng: np.random.Generator):
    """`n` sentences as token ids (n, SEQ_LEN) and their labels {task: (n,)}.

    Topic and sentiment are drawn independently, so knowing one says nothing
    about the other: a model trained for one task is at chance on the other.
    """
    topic = rng.integers(0, 2, n)  # 0 sports, 1 science
    positive = rng.integers(0, 2, n)  # label: 1 positive
    tokens = np.zeros((n, SEQ_LEN), dtype="int32")
    for i in range(n):
        nouns, places = (SCIENCE, SCIENCE_PLACES) if topic[i] else (SPORTS, SPORTS_PLACES)
        negated = rng.random() < 0.5
        adjectives = POSITIVE if positive[i] != negated else NEGATIVE  # "not" flips the adjective
        words = ["the", rng.choice(nouns), rng.choice(VERBS)]
        words += ["not"] if negated else []
        adverb = rng.choice(ADVERBS)
        words += [adverb] if adverb else []
        words.append(rng.choice(adjectives))
        if rng.random() < 0.5:
            words += rng.choice(places).split()
        if rng.random() < 0.3:
            words += ["this", "year"]
        words = words[:SEQ_LEN]
        tokens[i, : len(words)] = [INDEX[w] for w in words]
    return tokens, {"sentiment": positive.astype("int32"), "topic": topic.astype("int32")}


def decode(tokens) -> str:
    return " ".join(VOCAB[t] for t in tokens if t)


# ----------------------------------------------------------------- model ---
def trunk(dim: int, layers: int = 2, heads: int = 4):
    """Token ids -> (batch, SEQ_LEN, dim) features: a small causal transformer."""
    tokens = keras.Input((SEQ_LEN,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(len(VOCAB), dim, name="embedding")(tokens)
    x = PositionEmbedding(SEQ_LEN, name="position")(x)
    for i in range(layers):
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x)
        h = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block_{i}_attention")(h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x)
        h = keras.layers.Dense(2 * dim, activation="gelu", name=f"block_{i}_ffn_up")(h)
        x = x + keras.layers.Dense(dim, name=f"block_{i}_ffn_down")(h)
    return tokens, keras.layers.LayerNormalization(name="final_norm")(x)


def pretrain(args, tokens_train) -> tuple:
    """Pre-trains the trunk as a next-word language model; returns (inputs, features)."""
    tokens, features = trunk(args.dim)
    lm = keras.Model(tokens, keras.layers.Dense(len(VOCAB), name="lm_head")(features), name="sentence_lm")
    lm.compile(optimizer=keras.optimizers.AdamW(3e-3),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0))
    x, y = tokens_train[:, :-1], tokens_train[:, 1:]
    x = np.pad(x, ((0, 0), (0, 1)))  # keep SEQ_LEN; the padded last step predicts <pad> (ignored)
    y = np.pad(y, ((0, 0), (0, 1)))
    steps = args.pretrain_steps * args.batch_size
    reps = -(-steps // len(x))
    print(f"Pre-training the base as a language model ({args.pretrain_steps} steps)...")
    lm.fit(np.tile(x, (reps, 1))[:steps], np.tile(y, (reps, 1))[:steps], batch_size=args.batch_size,
           epochs=1, verbose=args.verbose)
    return tokens, features


def classifier(tokens, features) -> keras.Model:
    """The base model for both tasks: pre-trained trunk + a new head, two logits per task."""
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(features)
    return keras.Model(tokens, keras.layers.Dense(2 * len(TASKS), name="classifier")(pooled),
                       name="sentence_classifier")


def task_logits(logits, task: str):
    """The two logits of `task` (columns 0-1 sentiment, 2-3 topic)."""
    i = 2 * TASKS.index(task)
    return logits[:, i : i + 2]


def task_loss(task: str):
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(y_true, y_pred):
        return cross_entropy(y_true, task_logits(y_pred, task))

    return loss


def adapter_config(args) -> tf_lora.LoRAConfig:
    # LoRA on every projection and on the head (rank 2: a full update of a task's two
    # columns): each adapter owns all of its task-specific weights.
    return tf_lora.LoRAConfig(
        rank=args.rank, alpha=args.alpha, dropout=0.0,
        target_modules=("query", "key", "value", "attention_output", "ffn_up", "ffn_down", "classifier"),
        rank_pattern={"classifier": 2}, alpha_pattern={"classifier": 2.0},
    )


def base_snapshot(model) -> dict:
    """Every non-adapter variable of `model` (by path) as a NumPy copy."""
    return {v.path: np.array(v.numpy()) for v in model.weights if not v.name.startswith("lora_")}


# ------------------------------------------------------------------ args ---
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed (deterministic runs)")
    p.add_argument("--rank", type=positive("--rank"), default=8, help="LoRA rank of the projections")
    p.add_argument("--alpha", type=positive("--alpha", float), default=16.0, help="LoRA alpha")
    p.add_argument("--pretrain-steps", type=positive("--pretrain-steps"), default=300)
    p.add_argument("--steps", type=positive("--steps"), default=300, help="training steps per adapter")
    p.add_argument("--batch-size", type=positive("--batch-size"), default=32)
    p.add_argument("--dim", type=positive("--dim"), default=64, help="model width (a multiple of 4)")
    p.add_argument("--train-size", type=positive("--train-size"), default=2000, help="labelled sentences per task")
    p.add_argument("--eval-size", type=positive("--eval-size"), default=1000)
    p.add_argument("--save-dir", metavar="DIR", help="also write sentiment.adapter and topic.adapter to DIR")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1 if sys.stdout.isatty() else 2,
                   help="Keras progress display (default: bar on a terminal, a line per epoch otherwise)")
    args = p.parse_args(argv)
    if args.dim % 4:
        p.error(f"--dim: expected a multiple of 4 (4 attention heads), got {args.dim}")
    if args.save_dir is not None and not os.path.isdir(args.save_dir):
        p.error(f"--save-dir: folder {args.save_dir!r} does not exist")
    return args


# ------------------------------------------------------------------ main ---
def train_adapter(model, name, task, x, y, args) -> float:
    """Activates adapter `name`, compiles (the optimizer is per adapter) and trains it on `task`."""
    tf_lora.set_adapter(model, name)
    model.compile(optimizer=keras.optimizers.AdamW(5e-3), loss=task_loss(task))
    steps = args.steps * args.batch_size
    reps = -(-steps // len(x))
    print(f"Training adapter {name!r} ({args.steps} steps)...")
    t0 = time.time()
    model.fit(np.tile(x, (reps, 1))[:steps], np.tile(y, reps)[:steps], batch_size=args.batch_size,
              epochs=1, verbose=args.verbose)
    return time.time() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_lm, _ = make_sentences(4000, rng)
    x_train, y_train = make_sentences(args.train_size, rng)
    x_eval, y_eval = make_sentences(args.eval_size, np.random.default_rng(args.seed + 1))
    print("Example sentences (sentiment, topic):")
    for i in range(3):
        print(f"  {decode(x_eval[i])!r:60s} {('negative', 'positive')[y_eval['sentiment'][i]]}, "
              f"{('sports', 'science')[y_eval['topic'][i]]}")

    base = classifier(*pretrain(args, x_lm))
    model = tf_lora.adapt(base, adapter_config(args))  # adapter "default": the sentiment task
    tf_lora.add_adapter(model, "topic", adapter_config(args))
    adapters = {"sentiment": "default", "topic": "topic"}
    before = base_snapshot(model)

    train_seconds = {}
    for task, name in adapters.items():
        train_seconds[task] = train_adapter(model, name, task, x_train, y_train[task], args)
        if task == "sentiment":  # to compare after training the other adapter and switching back
            sentiment_logits = model.predict(x_eval, batch_size=256, verbose=0)
    # Accuracy of every adapter on every task (the tasks label the same sentences, so
    # one prediction per adapter serves both), switching with set_adapter only.
    table, logits, switch_ms = {}, {}, []
    with tf_lora.disable_adapter(model):
        logits["base"] = model.predict(x_eval, batch_size=256, verbose=0)
    for task, name in adapters.items():
        t0 = time.perf_counter()
        tf_lora.set_adapter(model, name)
        switch_ms.append(1000 * (time.perf_counter() - t0))
        logits[task + " adapter"] = model.predict(x_eval, batch_size=256, verbose=0)
    # Merge the two adapters into a third: "cat" (rank 2r, the exact sum of both updates) and
    # "ties" (each factor pruned to its largest 10%, signs elected, disjoint mean).
    for label, combination, density in (("merged (cat)", "cat", None), ("merged (ties, 0.1)", "ties", 0.1)):
        tf_lora.add_weighted_adapter(model, list(adapters.values()), [1.0, 1.0], combination, combination=combination,
                                     density=density)
        tf_lora.set_adapter(model, combination)
        logits[label] = model.predict(x_eval, batch_size=256, verbose=0)
    for row, values in logits.items():
        table[row] = {t: float(np.mean(np.argmax(task_logits(values, t), axis=-1) == y_eval[t])) for t in TASKS}
    tf_lora.set_adapter(model, "default")  # back to the first adapter: same outputs as right after its training
    again = model.predict(x_eval, batch_size=256, verbose=0)

    after = base_snapshot(model)
    base_changed = max(float(np.max(np.abs(before[k] - after[k]))) for k in before)
    base_bytes = sum(v.nbytes for v in after.values())
    adapter_params = {}
    for task, name in adapters.items():
        adapter_params[task] = sum(int(np.prod(v.shape)) for _, layer in model.adapter_layers()
                                   for v in layer.adapter_variables(name))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.save_dir or tmp
        adapter_bytes = {task: tf_lora.save_adapter(model, os.path.join(folder, f"{task}.adapter"), adapter_name=name)
                         for task, name in adapters.items()}

    report = {
        "accuracy": table,
        "base_params": int(sum(v.size for v in after.values())),
        "base_bytes": int(base_bytes),
        "adapter_params": adapter_params,
        "adapter_bytes": adapter_bytes,
        "base_max_abs_change": base_changed,
        "switch_back_max_abs_diff": float(np.max(np.abs(again - sentiment_logits))),
        "switch_ms": float(np.median(switch_ms)),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
    }
    print_report(report)
    return report


def print_report(r):
    print("\n=== two adapters on one base ===")
    print(f"{'accuracy on held-out sentences':32s} {'sentiment task':>15s} {'topic task':>11s}")
    for row, acc in r["accuracy"].items():
        label = row + (" (adapters disabled)" if row == "base" else "")
        print(f"{label:32s} {acc['sentiment']:15.3f} {acc['topic']:11.3f}")
    print(f"shared base weights            : {r['base_params']:,d} parameters, {r['base_bytes'] / 1024:.1f} KiB, stored once")
    for task in TASKS:
        print(f"{task + ' adapter':31s}: {r['adapter_params'][task]:,d} parameters, "
              f"{r['adapter_bytes'][task] / 1024:.1f} KiB on disk")
    print(f"base weights changed by training both adapters: max |diff| = {r['base_max_abs_change']:.1e}")
    print(f"sentiment outputs before vs after training 'topic' and switching back: max |diff| = "
          f"{r['switch_back_max_abs_diff']:.1e}")
    print(f"tf_lora.set_adapter takes {r['switch_ms']:.1f} ms (no weights are copied or reloaded)")
    print(f"total time                     : {r['total_seconds']:.1f} s")


if __name__ == "__main__":
    main()
