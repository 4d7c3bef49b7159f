"""``tf-lora merge``: fold an adapter into the base and write a Hugging Face checkpoint.

`tf_lora.merge` folds the adapter in (a QLoRA adapter into the float base weights: the adapter's
config is applied without its quantization), then KerasHub's ``export_to_transformers`` writes
the folder, for the architectures KerasHub 0.32 exports (Llama 3, Mistral, Qwen 2, Gemma,
Gemma 3/4, Qwen 3.5, GPT-2); any other exits with status 2 naming the architecture. The folder is
written beside `--out` and renamed into place when complete. Where KerasHub's exporter leaves
``architectures`` out of ``config.json`` (GPT-2, Gemma, Qwen 2) it is added, and the model's chat
template goes into ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from tf_lora.cli.common import (HF_ARCHITECTURES, MODEL_HELP, UsageError, adapter_location, apply_adapter,
                                chat_template, check_out, load_model, model_format, write_json)


def add_parser(commands) -> None:
    m = commands.add_parser("merge", help="fold an adapter into the base and write a Hugging Face checkpoint",
                            description="Fold the adapter into the base weights (a QLoRA adapter into the float "
                            "weights) and write a Hugging Face checkpoint with KerasHub's exporter, for the "
                            "architectures KerasHub exports (Llama 3, Mistral, Qwen, Gemma, GPT-2, ...).")
    m.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    m.add_argument("--adapter", required=True, metavar="DIR", help="a train output folder, a PEFT adapter folder or "
                   "a tf_lora adapter file")
    m.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    m.add_argument("--dtype", help="load the model in this dtype (e.g. bfloat16); not for .keras files")
    m.set_defaults(run=run)


def run(args) -> int:
    model_kind = model_format(args.model)
    location = adapter_location(args.adapter)
    check_out(args.out, "--out", empty=True)

    import tf_lora

    lm = load_model(args.model, args.dtype)
    template = chat_template(lm, args.model, None)
    lm = apply_adapter(lm, location, float_base=True)
    merged = tf_lora.merge(lm)
    del lm
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=os.path.dirname(os.path.abspath(args.out)))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the checkpoint is not
    try:
        try:
            merged.export_to_transformers(tmp)
        except ValueError as e:
            if "not implemented" not in str(e):
                raise
            raise UsageError("--model", f"KerasHub cannot export {type(merged.backbone).__name__} "
                                        f"({type(merged).__name__}) to Hugging Face format: {e}") from None
        config_file = os.path.join(tmp, "config.json")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if not config.get("architectures") and config.get("model_type") in HF_ARCHITECTURES:
            config["architectures"] = [HF_ARCHITECTURES[config["model_type"]]]
            write_json(config_file, config)
        tokenizer_config = os.path.join(tmp, "tokenizer_config.json")
        if template is not None and os.path.isfile(tokenizer_config):
            with open(tokenizer_config, encoding="utf-8") as f:
                tok = json.load(f)
            tok.setdefault("chat_template", template)
            write_json(tokenizer_config, tok)
        if os.path.isdir(args.out):
            os.rmdir(args.out)  # checked empty above
        os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Wrote a merged {config.get('architectures', [config.get('model_type')])[0]} checkpoint "
          f"({model_kind} base + adapter) to {args.out}")
    return 0
