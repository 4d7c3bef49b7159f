"""What the `tf-lora` commands share: checking paths and formats without TensorFlow, loading a
model, its chat template and an adapter, and the `UsageError` that `main` turns into exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import zipfile
from typing import Optional

ADAPTER_FILE = "adapter.safetensors"
PEFT_DIR = "peft"
MODEL_HELP = ("a Hugging Face checkpoint folder (config.json + *.safetensors), a KerasHub preset folder, "
              "a .keras file or a .gguf file")
# KerasHub 0.32's exporter leaves `architectures` out of config.json for these model types;
# KerasHub's own loader and transformers' pipelines need it.
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gemma": "GemmaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class UsageError(Exception):
    """A bad command-line value: `main` prints ``error: argument <argument>: <message>`` and exits 2."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")
        self.argument = argument


@contextlib.contextmanager
def blame(argument: str, *kinds):
    """The library's errors about an input, as a `UsageError` naming the argument it came from."""
    try:
        yield
    except kinds or (ValueError, TypeError, NotImplementedError, FileNotFoundError) as e:
        raise UsageError(argument, " ".join(str(e).split())) from e


# -- checking paths, without TensorFlow -------------------------------------------------------
def model_format(path: str, argument: str = "--model") -> str:
    """``"transformers"``, ``"preset"``, ``"keras"`` or ``"gguf"``: what `path` holds, read from
    its name, first bytes or ``config.json`` alone.

    Raises:
        UsageError: no such path, or none of these formats.
    """
    expected = ("expected a Hugging Face checkpoint folder (config.json + *.safetensors), a KerasHub preset "
                "folder, a .keras file or a .gguf file")
    if not os.path.exists(path):
        raise UsageError(argument, f"no such file or folder: {path!r}")
    if os.path.isfile(path):
        if path.endswith(".keras"):
            if not zipfile.is_zipfile(path):
                raise UsageError(argument, f"{path!r} is not a .keras archive (not a zip file)")
            return "keras"
        if path.endswith(".gguf"):
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise UsageError(argument, f"{path!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
            return "gguf"
        raise UsageError(argument, f"unknown model format {os.path.basename(path)!r}: {expected}")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UsageError(argument, f"unknown model format: folder {path!r} has no config.json; {expected}")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(argument, f"{config_file!r} is not valid JSON ({e})") from None
    if isinstance(config, dict) and "registered_name" in config:
        return "preset"
    if isinstance(config, dict) and "model_type" in config:
        if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in os.listdir(path)):
            raise UsageError(argument, f"Hugging Face folder {path!r} has no *.safetensors weights (KerasHub converts "
                                       "safetensors checkpoints only)")
        if not config.get("architectures"):
            raise UsageError(argument, f"{config_file!r} has no 'architectures' entry (e.g. "
                                       f"[\"{HF_ARCHITECTURES.get(config['model_type'], 'LlamaForCausalLM')}\"]), "
                                       "which KerasHub needs to load a task")
        return "transformers"
    raise UsageError(argument, f"unknown model format: {config_file!r} is neither a Hugging Face config "
                               f"(no 'model_type') nor a KerasHub preset config (no 'registered_name'); {expected}")


def adapter_location(path: str, argument: str = "--adapter"):
    """``("tf_lora", file)`` or ``("peft", folder)``: a `train` output folder (its
    ``adapter.safetensors``, else its ``peft/``), a PEFT folder or a tf_lora adapter file."""
    if os.path.isfile(path):
        return "tf_lora", path
    if not os.path.isdir(path):
        raise UsageError(argument, f"no such file or folder: {path!r}")
    if os.path.isfile(os.path.join(path, ADAPTER_FILE)):
        return "tf_lora", os.path.join(path, ADAPTER_FILE)
    for folder in (path, os.path.join(path, PEFT_DIR)):
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return "peft", folder
    raise UsageError(argument, f"folder {path!r} holds no adapter ({ADAPTER_FILE}, or adapter_config.json of a "
                               "PEFT adapter)")


def check_data(path: str, argument: str) -> str:
    """Reads the JSONL file once (a bad line is named) and returns its format's name."""
    from tf_lora.data import formats

    if not os.path.isfile(path):
        raise UsageError(argument, f"no such file: {path!r}")
    with blame(argument):
        records, where = formats.read_examples(path)
        return formats.format_for(records[0], where[0]).name


def check_out(path: str, argument: str, empty: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(argument, f"{path!r} is a file, expected a folder")
    if empty and os.path.isdir(path) and os.listdir(path):
        raise UsageError(argument, f"folder {path!r} is not empty")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(argument, f"folder {parent!r} does not exist")


@contextlib.contextmanager
def _missing_key(path: str):
    try:
        yield
    except KeyError as e:  # KerasHub's converters index the checkpoint's config directly
        raise UsageError("--model", f"KerasHub could not load {path!r}: its config lacks the key {e} that KerasHub's "
                                    "converter reads") from e


# -- loading --------------------------------------------------------------------------------
def load_model(path: str, dtype: Optional[str] = None):
    """The KerasHub CausalLM (with its preprocessor) that `path` holds (see `model_format`)."""
    kind = model_format(path)
    if dtype is not None and kind == "keras":
        raise UsageError("--dtype", "a .keras file keeps the dtype it was saved with")
    with blame("--model", ValueError, TypeError, NotImplementedError, FileNotFoundError, OSError), \
            _missing_key(path):
        if kind == "gguf":
            try:
                from tf_lora.interop.gguf import load_gguf
            except ImportError as e:
                raise UsageError("--model", f"loading a .gguf file needs tf_lora.load_gguf and the gguf package "
                                            f"(pip install 'tf_lora[gguf]'): {e}") from None
            lm = load_gguf(path, dtype=dtype)
        elif kind == "keras":
            import keras

            lm = keras.saving.load_model(path)
        else:
            import keras_hub

            lm = keras_hub.models.CausalLM.from_preset(path, **({"dtype": dtype} if dtype else {}))
    import keras_hub

    if not isinstance(lm, keras_hub.models.CausalLM) or getattr(getattr(lm, "preprocessor", None), "tokenizer",
                                                                 None) is None:
        raise UsageError("--model", f"{path!r} holds a {type(lm).__name__} without a preprocessor and tokenizer, "
                                    "expected a KerasHub CausalLM with its tokenizer")
    return lm


def chat_template(lm, model_path: str, template_path: Optional[str]) -> Optional[str]:
    """`--chat-template` (a Jinja file, or a folder holding one), else the template the model's
    tokenizer carries, else the one of a Hugging Face checkpoint folder; None if there is none."""
    from tf_lora.data import read_chat_template
    from tf_lora.data.chat_template import template_of

    if template_path is not None:
        with blame("--chat-template", ValueError, FileNotFoundError, OSError):
            if os.path.isdir(template_path):
                return read_chat_template(template_path)
            with open(template_path, encoding="utf-8") as f:
                return f.read()
    carried = template_of(getattr(lm, "preprocessor", None)) or template_of(lm)
    if carried is None and os.path.isdir(model_path):
        with contextlib.suppress(ValueError, FileNotFoundError):
            carried = read_chat_template(model_path)
    return carried


def apply_adapter(lm, location, float_base: bool = False):
    """Adapts `lm` in place with the adapter at ``adapter_location(...)`` and loads its weights.

    ``float_base=True`` leaves out a QLoRA adapter's NF4 quantization (for merging into the
    original float weights)."""
    import tf_lora

    kind, path = location
    with blame("--adapter"):
        if kind == "peft":
            return tf_lora.from_peft(lm, path, inplace=True)
        config = tf_lora.read_adapter_config(path)
        if float_base and config.quantization is not None:
            config = dataclasses.replace(config, quantization=None)
        lm = tf_lora.adapt(lm, config, inplace=True)
        tf_lora.load_adapter(lm, path)
    return lm


def positive(kind):
    """An argparse type: a positive `kind` (int or float)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, received {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, received {text!r}")
        return value

    return parse


def write_json(path: str, value) -> None:
    """Writes `value` as JSON atomically (a temporary file beside `path`, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)
