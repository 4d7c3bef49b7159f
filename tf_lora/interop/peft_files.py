"""PEFT adapter directories: reading and writing the files, and PEFT's own config rules.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)).
This module knows the files and what PEFT does with a config (which modules it targets,
which rank and alpha each gets, which fields ask for features tf_lora lacks); it knows
nothing of Keras models (`tf_lora.peft` does the mapping). Safetensors only: a pickle
(``adapter_model.bin``) is never read.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Dict, Optional, Tuple

import numpy as np

from tf_lora.adapter_files import _atomic_write

CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
ROOT = "base_model.model."

# Fields tf_lora reads (the rest must be empty / default: anything else is a feature it does not have).
_READ = {"r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora", "rank_pattern",
         "alpha_pattern", "layers_to_transform", "layers_pattern", "peft_type", "modules_to_save", "ensure_weight_tying",
         "use_dora"}
# Bookkeeping that does not change what the adapter computes (eva only chooses the initial A;
# fan_in_fan_out only says the base weight is (in, out), as GPT-2's Conv1D is: PEFT transposes
# when it merges, lora_A (r, in) and lora_B (out, r) are the same, and on a Linear PEFT resets it).
_IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
            "megatron_core", "runtime_config", "qalora_group_size", "eva_config", "fan_in_fan_out"}
# Initialisations that leave the base weights alone (pissa, olora, loftq, corda, lora_ga change them).
_INITS = (True, False, "gaussian", "eva", "orthogonal")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}


# -- reading ---------------------------------------------------------------------------
def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """A safetensors file as float32 arrays (bf16 included), every offset checked."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError(f"the header claims {n} bytes but the file has {len(data)}")
        header = json.loads(data[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, expected an object")
        body, tensors = data[8 + n :], {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info, dict):
                raise ValueError(f"key {key!r} has no tensor description")
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"key {key!r} has dtype {info['dtype']}, expected F32, F16, BF16 or F64")
            start, end = info["data_offsets"]
            itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
            if not 0 <= start <= end <= len(body) or end - start != itemsize * math.prod(info["shape"]):
                raise ValueError(f"key {key!r} lies outside the file or has the wrong size (truncated?)")
            raw = body[start:end]
            if dtype == "bf16":
                array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
            tensors[key] = array.astype(np.float32).reshape(info["shape"])
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as e:
        raise ValueError(f"Received an invalid value for `directory`: {path!r} is not a readable safetensors "
                         f"file (truncated or corrupted: {e}).") from None
    return tensors


def read_peft_directory(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """``(adapter_config, {key: float32 array})`` of a PEFT directory, checked for readability."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"Received an invalid value for `directory`, expected a folder path. Received: directory={directory!r}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Received an invalid value for `directory`: no folder at {directory!r}.")
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path) and os.path.isfile(os.path.join(directory, PICKLE_FILE)):
        raise ValueError(
            f"Received an invalid value for `directory`: {directory!r} holds only {PICKLE_FILE}, a pickle; loading "
            "a pickle can run arbitrary code, so tf_lora reads safetensors only. Convert it with PEFT: "
            "`peft.PeftModel.from_pretrained(base_model, directory).save_pretrained(out_dir, safe_serialization=True)`."
        )
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(f"Received an invalid value for `directory`: {directory!r} is not a PEFT adapter "
                             f"directory ({os.path.basename(path)} is missing).")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Received an invalid value for `directory`: {config_path!r} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"Received an invalid value for `directory`: {config_path!r} holds no JSON object.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"Received an invalid value for `directory`: {config_path!r} key 'peft_type' is "
                         f"{config.get('peft_type')!r}; tf_lora reads LoRA adapters only (peft_type 'LORA').")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"Received an invalid value for `directory`: {config_path!r} has no key {key!r}.")
    check_types(config, config_path)
    return config, _read_safetensors(weights_path)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_regex(v) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError, RecursionError, OverflowError):
        return False
    return True


def _names(v, regex_if_str: bool) -> bool:
    """A list of module-name strings, or (when allowed) one string that compiles as a regex."""
    if isinstance(v, str):
        return not regex_if_str or _is_regex(v)
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# field -> (what it must be, check); None is allowed for every field but `r` and `lora_alpha`.
_TYPES = {
    "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a finite number", _is_number),
    "target_modules": ("a list of module names, or a regex string", lambda v: _names(v, True)),
    "exclude_modules": ("a list of module names, or a regex string", lambda v: _names(v, True)),
    "modules_to_save": ("a list of module names", lambda v: _names(v, False) and not isinstance(v, str)),
    "layers_pattern": ("a regex string or a list of them", lambda v: (
        _is_regex(v) if isinstance(v, str) else isinstance(v, list) and all(isinstance(x, str) and _is_regex(x) for x in v))),
    "layers_to_transform": ("a layer index or a list of them", lambda v: (
        _is_int(v) or isinstance(v, list) and all(_is_int(x) for x in v))),
    "rank_pattern": ("an object of regex -> positive integer", lambda v: isinstance(v, dict) and all(
        _is_regex(k) and _is_int(x) and x > 0 for k, x in v.items())),
    "alpha_pattern": ("an object of regex -> finite number", lambda v: isinstance(v, dict) and all(
        _is_regex(k) and _is_number(x) for k, x in v.items())),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "ensure_weight_tying": ("true or false", lambda v: isinstance(v, bool)),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
}


def check_types(config: dict, path: str) -> None:
    """ValueError naming the first field tf_lora reads whose value has the wrong type or range."""
    for field, (expected, ok) in _TYPES.items():
        value = config.get(field)
        if (value is not None or field in ("r", "lora_alpha")) and not ok(value):
            raise ValueError(f"Received an invalid value for `directory`: {path!r} key {field!r} is {value!r}, "
                             f"expected {expected}.")


def _empty(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def check_features(config: dict, path: str) -> None:
    """NotImplementedError naming the first PEFT field whose value asks for a feature tf_lora lacks."""
    for field in sorted(config):
        value = config[field]
        if field in _READ or field in _IGNORED or _empty(value):
            continue
        if field == "bias" and value == "none":
            continue
        if field == "init_lora_weights" and any(value is v or value == v for v in _INITS):
            continue
        if field == "target_parameters" and not value:
            continue
        raise NotImplementedError(f"The PEFT adapter config {path!r} sets `{field}`={value!r}, which tf_lora does "
                                  "not support (only plain LoRA on the mapped linear layers is).")
    if config.get("target_modules") is None:
        raise NotImplementedError(f"The PEFT adapter config {path!r} has no `target_modules`; tf_lora supports "
                                  "module targets only.")


# -- PEFT's own matching rules (peft.tuners.tuners_utils.check_target_module_exists) ------------------------
def _in_layers(config: dict, name: str) -> bool:
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is None or layers == []:
        return True
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def targets(config: dict, name: str) -> bool:
    """Whether PEFT puts a LoRA on module `name` (all linear layers here) under `config`."""
    exclude = config.get("exclude_modules")
    if exclude:
        if re.fullmatch(exclude, name) if isinstance(exclude, str) else (
                name in exclude or any(name.endswith("." + e) for e in exclude)):
            return False
    target = config["target_modules"]
    if isinstance(target, str):
        return target.lower() == "all-linear" or re.fullmatch(target, name) is not None
    if name in target:
        return True
    return any(name.endswith("." + t) for t in target) and _in_layers(config, name)


def pattern_value(patterns: dict, name: str, default):
    """peft.utils.other.get_pattern_key: the first key matching the end of `name`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def split_saved_key(key: str, config: dict) -> Optional[Tuple[str, str]]:
    """``(module, parameter)`` of a `modules_to_save` weight, else None.

    PEFT saves a module of `modules_to_save` (matched, as PEFT does, by the end of its
    name) whole, as ``base_model.model.<module>.<parameter>``: the LM head's is
    ``base_model.model.lm_head.weight``, with no ``modules_to_save.default`` left in it.
    With ``ensure_weight_tying`` PEFT also saves the tied partner of a saved module (the LM
    head of ``model.embed_tokens``) without naming it: any other weight is then one too.
    """
    rest = key[len(ROOT):] if key.startswith(ROOT) else None
    if rest is None or ".lora_" in key or not config.get("modules_to_save"):
        return None
    for entry in config["modules_to_save"]:
        match = re.fullmatch(rf"((?:.*\.)?{re.escape(entry)})\.(.+)", rest)
        if match is not None:
            return match.group(1), match.group(2)
    if config.get("ensure_weight_tying") is True and "." in rest:
        module, param = rest.rsplit(".", 1)
        return module, param
    return None


def split_key(key: str, path: str, config: dict) -> Tuple[str, str]:
    """``(module name, kind)`` of a saved key; raises on anything else.

    `kind` is ``"lora_A"`` / ``"lora_B"`` (``<module>.lora_A.weight``, a Linear),
    ``"lora_embedding_A"`` / ``"lora_embedding_B"`` (``<module>.lora_embedding_A``, an
    Embedding; PEFT keeps them as bare parameters, no ``.weight``) or ``"base_layer"``
    (``<module>.base_layer.weight``: the base table PEFT saves with an Embedding target), or
    ``"lora_magnitude_vector"`` (DoRA's magnitude, (out,): one per output row of the torch weight).
    """
    for kind, suffix in (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"),
                         ("lora_embedding_A", ".lora_embedding_A"), ("lora_embedding_B", ".lora_embedding_B"),
                         ("base_layer", ".base_layer.weight"), ("lora_magnitude_vector", ".lora_magnitude_vector")):
        if key.startswith(ROOT) and key.endswith(suffix):
            return key[len(ROOT) : -len(suffix)], kind
    features = ((".lora_A.bias", "`lora_bias`"), (".lora_B.bias", "`lora_bias`"))
    for marker, feature in features:
        if marker in key:
            raise NotImplementedError(f"Adapter file {path!r} key {key!r} needs {feature}, which tf_lora does not support.")
    raise ValueError(f"Adapter file {path!r} key {key!r} is not a PEFT LoRA weight (expected "
                     f"'{ROOT}<module>.lora_A.weight' or '.lora_B.weight', or '.lora_embedding_A' / "
                     "'.lora_embedding_B' for an Embedding).")


def write_peft_directory(directory: str, config: dict, tensors: Dict[str, np.ndarray]) -> int:
    """Writes both files, each atomically; a failure leaves a new folder absent and an old one as it was."""
    from safetensors.numpy import save

    weights = save(tensors, metadata={"format": "pt"})
    text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        _atomic_write(os.path.join(directory, WEIGHTS_FILE), weights)
        _atomic_write(os.path.join(directory, CONFIG_FILE), text)
    except BaseException:
        if created:
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                if os.path.exists(os.path.join(directory, name)):
                    os.remove(os.path.join(directory, name))
            os.rmdir(directory)
        raise
    return len(weights) + len(text)
