"""``tf-lora train``: fine-tune a LoRA / QLoRA adapter on a JSONL file.

The steps, each a public call: `tf_lora.data.prepare` (tokenize, mask, pack),
`tf_lora.adapt(..., inplace=True)`, `compile` + `fit` (with the preprocessor detached, since the
dataset is tokenized already; `tf_lora.AdapterCheckpoint` with ``--save-every``),
`tf_lora.save_adapter` in the tf_lora and PEFT formats. The loss curve is the running mean Keras
reports after each step (it restarts each epoch) and each epoch's validation loss.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Sequence

from tf_lora.cli.common import (ADAPTER_FILE, MODEL_HELP, PEFT_DIR, UsageError, blame, chat_template, check_data,
                                check_out, load_model, model_format, positive, write_json)


def add_parser(commands) -> None:
    t = commands.add_parser("train", help="fine-tune an adapter on a JSONL file",
                            description="Fine-tune a LoRA/QLoRA adapter. JSONL lines are {\"text\"}, {\"prompt\", "
                            "\"completion\"} or {\"messages\"} (chat, rendered with the model's chat template); prompt, "
                            "system and user tokens are not trained unless --train-on-prompt. Writes DIR/adapter.safetensors, "
                            "DIR/peft/ (where the architecture maps), DIR/train_config.json, DIR/history.json, DIR/loss.png.")
    t.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    t.add_argument("--data", required=True, metavar="FILE", help="training examples (JSONL)")
    t.add_argument("--valid", metavar="FILE", help="validation examples (JSONL), evaluated after each epoch")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    t.add_argument("--rank", type=positive(int), default=8, help="LoRA rank (default 8)")
    t.add_argument("--alpha", type=positive(float), help="LoRA alpha; scaling alpha/rank (default: LoRAConfig's, 32)")
    t.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA path (default 0.05)")
    t.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                   help="layer names (contained in a layer's own name, e.g. query value), 'all-linear' (default), "
                        "or one regex matched against layer paths")
    t.add_argument("--qlora", action="store_true", help="store the frozen base weights in NF4 (QLoRA)")
    t.add_argument("--sequence-length", type=positive(int), default=1024, help="tokens per row (default 1024)")
    t.add_argument("--packing", action="store_true",
                   help="pack several examples per row (each attends only to itself; refused for a model that "
                        "does not read segment_ids/positions)")
    t.add_argument("--truncation", choices=("end", "split", "drop", "error"), default="end",
                   help="over-long examples: cut the end (default), split into windows, drop, or stop with an error")
    t.add_argument("--train-on-prompt", action="store_true", help="also train on prompt/system/user tokens")
    t.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file (or a checkpoint folder "
                   "holding one) for {\"messages\"} data; default: the model's own")
    t.add_argument("--batch-size", type=positive(int), default=4, help="rows per batch (default 4)")
    t.add_argument("--epochs", type=positive(int), default=1, help="passes over the data (default 1)")
    t.add_argument("--learning-rate", type=positive(float), default=2e-4, help="AdamW learning rate (default 2e-4)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--seed", type=int, default=0, help="random seed: adapter init, dropout, data order (default 0)")
    t.add_argument("--dtype", help="load the model in this dtype (e.g. bfloat16); not for .keras files")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    t.add_argument("--chunked-attention", action="store_true", help="exact chunked attention (long sequences)")
    t.add_argument("--chunked-loss", action="store_true", help="LM loss without the full logits (large vocabularies)")
    t.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    t.add_argument("--save-every", type=positive(int), metavar="N",
                   help="checkpoint the adapter and optimizer every N steps into DIR/checkpoints; rerunning the "
                        "same command resumes from the latest")
    t.set_defaults(run=run)


def _target_modules(values: Sequence[str]):
    if len(values) == 1 and (values[0] == "all-linear" or re.search(r"[.*+?\[\]()|^$\\]", values[0])):
        return values[0]  # "all-linear", or one regex over layer paths
    return tuple(values)


def lora_config(args):
    """The `tf_lora.LoRAConfig` the `train` arguments describe."""
    import tf_lora

    options = {"rank": "--rank", "alpha": "--alpha", "dropout": "--dropout", "target_modules": "--target-modules"}
    kwargs = dict(rank=args.rank, dropout=args.dropout, target_modules=_target_modules(args.target_modules),
                  quantization=tf_lora.QLoRAConfig() if args.qlora else None,
                  gradient_checkpointing=args.gradient_checkpointing,
                  attention="chunked" if args.chunked_attention else None, loss="chunked" if args.chunked_loss else None)
    if args.alpha is not None:
        kwargs["alpha"] = args.alpha
    try:
        return tf_lora.LoRAConfig(**kwargs)
    except (ValueError, TypeError) as e:
        field = next((f for f in options if f"`{f}`" in str(e)), "rank")
        raise UsageError(options[field], str(e)) from None


def check_packing(lm, tolerance: float = 1e-4) -> float:
    """How far the last example of a packed row is from the same example alone (relative).

    A model that ignores ``segment_ids`` / ``positions`` lets packed examples attend to each
    other; `train --packing` refuses it rather than train on the wrong function."""
    import warnings

    import numpy as np
    from keras import ops

    vocab = int(lm.backbone.token_embedding.input_dim)
    a, b = (np.arange(1, 5) * 3) % (vocab - 1) + 1, (np.arange(1, 5) * 7) % (vocab - 1) + 1
    packed = {"token_ids": np.concatenate([a, b])[None].astype("int32"), "padding_mask": np.ones((1, 8), "int32"),
              "segment_ids": np.array([[1] * 4 + [2] * 4], "int32"), "positions": np.array([[0, 1, 2, 3] * 2], "int32")}
    alone = {"token_ids": b[None].astype("int32"), "padding_mask": np.ones((1, 4), "int32")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ops.convert_to_numpy(lm(packed, training=False))[:, 4:]
        want = ops.convert_to_numpy(lm(alone, training=False))
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def plot_history(history: dict, path: str) -> bool:
    """Writes the loss curve as a PNG; False (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'tf_lora[cli]'): loss.png not written; "
              "the losses are in history.json")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = history["steps"]
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss (running mean over the epoch)")
    points = [(e["step"], e["val_loss"]) for e in history["epochs"] if e.get("val_loss") is not None]
    if points:
        ax.plot(*zip(*points), "s--", label="validation loss (end of epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def _history_callback(history: dict):
    import keras

    class Recorder(keras.callbacks.Callback):
        step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            history["steps"].append({"step": self.step, "loss": float((logs or {}).get("loss", float("nan")))})

        def on_epoch_end(self, epoch, logs=None):
            history["epochs"].append({"epoch": epoch + 1, "step": self.step,
                                      **{k: float(v) for k, v in (logs or {}).items()}})

    return Recorder()


def run(args) -> int:
    model_kind = model_format(args.model)
    formats = {"--data": check_data(args.data, "--data")}
    if args.valid is not None:
        formats["--valid"] = check_data(args.valid, "--valid")
    if args.chat_template is not None and not os.path.exists(args.chat_template):
        raise UsageError("--chat-template", f"no such file or folder: {args.chat_template!r}")
    check_out(args.out, "--out", empty=False)
    config = lora_config(args)

    import keras

    import tf_lora

    keras.utils.set_random_seed(args.seed)
    print(f"Loading {args.model} ({model_kind}) ...", flush=True)
    lm = load_model(args.model, args.dtype)
    template = chat_template(lm, args.model, args.chat_template)
    chat = [argument for argument, kind in formats.items() if kind == "chat"]
    if chat and template is None:
        raise UsageError("--chat-template", f"the {{\"messages\"}} data of {chat[0]} needs a chat template and the "
                                            "model carries none; pass --chat-template FILE")
    prepared = {}
    for argument, path in (("--data", args.data), ("--valid", args.valid)):
        if path is None:
            continue
        with blame(argument):
            prepared[argument] = tf_lora.data.prepare(
                path, lm, args.sequence_length, packing=args.packing, completion_only=not args.train_on_prompt,
                truncation=args.truncation, chat_template=template, verbose=0)
        print(f"{argument[2:]}: {prepared[argument].stats.summary()}")
    lm = tf_lora.adapt(lm, config, inplace=True)
    tf_lora.print_trainable_parameters(lm)
    if args.packing:
        error = check_packing(lm)
        if error > 1e-4:
            raise UsageError("--packing", f"{type(lm).__name__} does not keep packed examples apart (segment_ids / "
                                          f"positions change its outputs by {error:.2g}, relative); train without --packing")
    train_ds = prepared["--data"].dataset(args.batch_size, seed=args.seed)
    valid_ds = prepared["--valid"].dataset(args.batch_size, shuffle=False) if args.valid else None
    lm.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=["accuracy"],
               jit_compile=args.jit_compile)
    os.makedirs(args.out, exist_ok=True)
    history = {"steps": [], "epochs": []}
    callbacks = [_history_callback(history)]
    if args.save_every:
        callbacks.append(tf_lora.AdapterCheckpoint(os.path.join(args.out, "checkpoints"), save_freq=args.save_every,
                                                   data=train_ds))
    preprocessor, lm.preprocessor = lm.preprocessor, None  # the dataset is tokenized already
    try:
        lm.fit(train_ds, validation_data=valid_ds, epochs=args.epochs, callbacks=callbacks, shuffle=False,
               verbose=1 if sys.stdout.isatty() else 2)  # the dataset shuffles itself, per epoch
    finally:
        lm.preprocessor = preprocessor
    written = [ADAPTER_FILE]
    tf_lora.save_adapter(lm, os.path.join(args.out, ADAPTER_FILE))
    try:
        base = os.path.abspath(args.model) if model_kind == "transformers" else None
        tf_lora.save_adapter(lm, os.path.join(args.out, PEFT_DIR), format="peft", base_model_name_or_path=base)
        written.append(PEFT_DIR + "/")
    except NotImplementedError as e:
        print(f"note: PEFT format not written ({' '.join(str(e).split())}); the tf_lora format is in {ADAPTER_FILE}")
    write_json(os.path.join(args.out, "history.json"), history)
    write_json(os.path.join(args.out, "train_config.json"), {
        "tf_lora_version": tf_lora.__version__, "command": ["tf-lora"] + list(args.argv),
        "model": os.path.abspath(args.model), "model_format": model_kind, "model_class": type(lm).__name__,
        "data": os.path.abspath(args.data), "valid": args.valid and os.path.abspath(args.valid), "data_format": formats["--data"],
        "chat_template": template, "lora_config": config.to_dict(),
        "training": {k: getattr(args, k) for k in ("sequence_length", "packing", "batch_size", "epochs", "learning_rate",
                                                   "weight_decay", "seed", "truncation", "train_on_prompt", "dtype",
                                                   "jit_compile", "save_every")},
        "data_stats": {k[2:]: dataclasses.asdict(p.stats) for k, p in prepared.items()},
        "final": history["epochs"][-1] if history["epochs"] else None})
    written += ["train_config.json", "history.json"]
    if plot_history(history, os.path.join(args.out, "loss.png")):
        written.append("loss.png")
    print(f"Wrote {', '.join(written)} to {args.out}")
    return 0
