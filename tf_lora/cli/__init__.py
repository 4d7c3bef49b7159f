"""`tf-lora`: fine-tune, generate and merge from the command line (also ``python -m tf_lora``).

A thin layer over the public API, as mlx-lm's ``mlx_lm.lora`` / ``generate`` / ``fuse``: one
short module per command parses its arguments, checks every path and format first (a bad one
exits with status 2 and one line naming the argument, before any model or data loads), then calls
`tf_lora.data.prepare`, `tf_lora.adapt`, `fit`, `tf_lora.save_adapter`, `tf_lora.load_adapter` /
`tf_lora.from_peft`, `tf_lora.merge` and KerasHub's ``export_to_transformers``. Errors the
library raises about an input (a bad JSONL line, an adapter for another model) exit 2 too,
naming the argument; anything else is a bug and shows its traceback.

- ``tf-lora train --model PATH --data train.jsonl --out DIR`` (`tf_lora.cli.train`): writes
  ``DIR/adapter.safetensors`` (tf_lora format), ``DIR/peft/`` (PEFT format, where the
  architecture has a name map; otherwise a note says why not), ``DIR/train_config.json``
  (everything the run used), ``DIR/history.json`` and ``DIR/loss.png`` (with matplotlib:
  ``pip install 'tf_lora[cli]'``; without it the PNG is skipped with a note).
- ``tf-lora generate --model PATH [--adapter DIR] --prompt TEXT [--chat]`` (`tf_lora.cli.generate`).
- ``tf-lora merge --model PATH --adapter DIR --out DIR`` (`tf_lora.cli.merge`): a merged
  Hugging Face checkpoint.

``PATH`` is a Hugging Face checkpoint folder KerasHub converts (``config.json`` with
``model_type`` and ``architectures``, ``*.safetensors``), a KerasHub preset folder (what
``save_to_preset`` writes), a ``.keras`` file of a KerasHub CausalLM, or a ``.gguf`` file
(`tf_lora.load_gguf`).

Example:
    >>> from tf_lora.cli import main
    >>> main(["train", "--model", "./qwen-hf", "--data", "train.jsonl", "--out", "run1"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tf_lora.cli import generate, merge, train
from tf_lora.cli.common import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tf-lora`` argument parser, one sub-command per module."""
    parser = argparse.ArgumentParser(prog="tf-lora", description="LoRA / QLoRA fine-tuning of KerasHub causal LMs "
                                     "(a thin layer over the tf_lora Python API).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,merge}")
    for module in (train, generate, merge):
        module.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``tf-lora`` with `argv` (default ``sys.argv[1:]``) and returns the exit status:
    0, or 2 for a bad argument (argparse's own usage errors exit 2 themselves)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except UsageError as e:
        print(f"tf-lora {args.command}: error: {e}", file=sys.stderr)
        return 2
