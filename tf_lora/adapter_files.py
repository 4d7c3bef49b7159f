"""The adapter file format and the checks around it (core; `tf_lora.adapters` uses it).

An adapter file is a safetensors file holding only the `lora_` variables and the
variables of `modules_to_save`, keyed by layer path (``"mha/query/lora_a"``, never by
index), with the `LoRAConfig` as JSON metadata. It is written atomically
(`_atomic_write`), and `_read_file` plus the `_check_*` functions validate a file
before `load_adapter` assigns anything.

Formats kept as directories (Hugging Face PEFT) live in `tf_lora.interop`, which
registers its reader and writer here with `register_directory_format`: the core never
imports the bridge.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import keras
import numpy as np
from keras import ops

from tf_lora import variants
from tf_lora.config import LoRAConfig, matches
from tf_lora.layers.lora import LoRALayer
from tf_lora.surgery import walk


class DirectoryFormat(NamedTuple):
    """A directory adapter format: ``save(model, path, adapter_name, base_model_name_or_path)``
    returns the bytes written; ``load(model, path, adapter_name)`` fills the adapter."""

    save: Callable
    load: Callable


DIRECTORY_FORMATS: Dict[str, DirectoryFormat] = {}


def register_directory_format(name: str, save: Callable, load: Callable) -> None:
    """Registers the writer and reader of a directory format (``save_adapter(format=name)``;
    `load_adapter` reads a directory with the one named ``"peft"``)."""
    DIRECTORY_FORMATS[name] = DirectoryFormat(save, load)


FORMAT = "tf_lora.adapter"


FORMAT_VERSION = "1"


def _check_model(model, name: str = "model") -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a keras.Model adapted with "
            f"tf_lora.adapt. Received: {name}={type(model).__name__}"
        )


def _adapter_layers(model) -> List[Tuple[str, LoRALayer]]:
    """``[(path, layer)]`` of the adapter layers, each once (at its first path)."""
    seen, found = set(), []
    for path, layer, _ in walk(model):
        if isinstance(layer, LoRALayer) and id(layer) not in seen:
            seen.add(id(layer))
            found.append((path, layer))
    return found


def _adapter_name(model, adapter_name):
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", None) or "default"
    names = getattr(model, "adapter_names", ["default"])
    if adapter_name not in names:
        raise ValueError(f"Received an invalid value for `adapter_name`, expected one of {names}. "
                         f"Received: adapter_name={adapter_name!r}")
    return adapter_name


def adapter_state(model, adapter_name: Optional[str] = None) -> Dict[str, keras.Variable]:
    """``{key: variable}`` of everything an adapter file holds for `model`:
    adapter `adapter_name`'s (default: the active one) ``lora_a``/``lora_b``
    keyed ``"<layer path>/lora_a"``, plus the `modules_to_save` variables."""
    _check_model(model)
    name = _adapter_name(model, adapter_name)
    state: Dict[str, keras.Variable] = {}
    for path, layer in _adapter_layers(model):
        if name in layer.adapter_names:
            a, b = layer.adapter_variables(name)
            state[f"{path}/lora_a"], state[f"{path}/lora_b"] = a, b
            magnitude = layer.adapter_magnitude(name)
            if magnitude is not None:
                state[f"{path}/lora_magnitude"] = magnitude
    config = getattr(model, "lora_config", None)
    if config is not None and config.modules_to_save:
        for path, layer, _ in walk(model):
            if matches(config.modules_to_save, layer.name, path):
                for i, var in enumerate(layer.weights):
                    key = f"{path}/{var.name}"
                    state[key if key not in state else f"{key}#{i}"] = var
    if not state:
        raise ValueError(
            f"Received an invalid value for `model`, expected a model with tf_lora adapter "
            f"layers. Received: model={model.name!r}, which has none."
        )
    return state


def _umask() -> int:
    """The process umask, read without changing it where the OS allows it (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (a brief, conservative window)
    os.umask(mask)
    return mask


def _atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically: a temporary file in the same folder,
    fsynced, then renamed over `path`. A failure leaves any previous file intact
    and no temporary file behind. The file gets the mode any file the process
    creates gets (``0o666 & ~umask``), not `mkstemp`'s private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".adapter", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _rewritten_layers(model) -> List[Tuple[str, LoRALayer]]:
    """The adapter layers whose frozen base an init rewrote: the default adapter's
    (it holds the initial factors). Every adapter of the model computes on that base,
    also an added one (on a layer it does not cover, the layer runs as that base)."""
    return [(p, layer) for p, layer in _adapter_layers(model) if layer.adapter_init_pair("default") is not None]


def _model_base(model) -> str:
    """``"original"``, or ``"residual:<init>"`` where an init rewrote the frozen base."""
    rewritten = _rewritten_layers(model)
    return "residual:" + rewritten[0][1].lora_init if rewritten else "original"


def _to_original_base(tensors: dict, config: Optional[LoRAConfig], rewritten, name: str):
    """Rank-2r tensors ``[A | A0], [B ; -B0]`` and the matching config (rank and alpha
    doubled, alpha times sqrt(2) with rsLoRA: the same scaling; init 'he_uniform')."""
    tensors = dict(tensors)
    for path, layer in rewritten:
        a0, b0 = (ops.convert_to_numpy(v) for v in layer.adapter_init_pair(name))
        a, b = tensors[f"{path}/lora_a"], tensors[f"{path}/lora_b"]
        tensors[f"{path}/lora_a"], tensors[f"{path}/lora_b"] = (
            np.ascontiguousarray(t) for t in variants.to_original_base(a, b, a0, b0))
    if config is not None:
        factor = 2 ** 0.5 if config.use_rslora else 2.0
        config = dataclasses.replace(
            config, init="he_uniform", rank=2 * config.rank, alpha=factor * config.alpha,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
        )
    return tensors, config


def _read_file(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
    from safetensors.numpy import load

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Received an invalid value for `path`, expected a file path. Received: path={path!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Received an invalid value for `path`: no adapter file at {path!r}.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"Received an invalid value for `path`: {path!r} is not a readable tf_lora adapter "
            f"file (truncated or corrupted: {e})."
        ) from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"Received an invalid value for `path`: {path!r} is not a tf_lora adapter file (format {metadata.get('format')!r}).")
    return tensors, metadata


def _file_config(metadata: dict, path: str) -> Optional[LoRAConfig]:
    """The file's `LoRAConfig`, or None for a file saved from a model without one."""
    try:
        data = json.loads(metadata.get("lora_config") or "null")
        return None if data is None else LoRAConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"Received an invalid value for `path`: {os.fspath(path)!r} holds an unreadable "
            f"LoRAConfig in its metadata ({e})."
        ) from None


def read_adapter_config(path: str) -> LoRAConfig:
    """The `LoRAConfig` stored in an adapter file.

    Raises:
        ValueError: the file is not a readable adapter file, or holds no config
            (it was saved from a model that has none).
    """
    _, metadata = _read_file(path)
    config = _file_config(metadata, path)
    if config is None:
        raise ValueError(
            f"Received an invalid value for `path`: {os.fspath(path)!r} holds no LoRAConfig "
            "(it was saved from a model without one)."
        )
    return config


_CHECKED_FIELDS = ("rank", "alpha", "use_rslora", "use_dora")


def _check_hyperparameters(model, name: str, config: LoRAConfig, path: str) -> None:
    """Raises if a layer's adapter `name` has another rank, alpha or use_rslora
    than `config` (the file's) gives that layer, per layer (patterns included)."""
    differences: Dict[Tuple[str, object, object], List[str]] = {}
    for layer_path, layer in _adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        spec = layer._spec(name)
        saved = {
            "rank": config.rank_for(layer.name, layer_path),
            "alpha": config.alpha_for(layer.name, layer_path),
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
        }
        for field in _CHECKED_FIELDS:
            if saved[field] != spec[field]:
                differences.setdefault((field, saved[field], spec[field]), []).append(layer_path)
    if differences:
        lines = "; ".join(
            f"`{field}`: file {field}={saved_value!r}, model {field}={model_value!r} (layers {paths[:5]})"
            for (field, saved_value, model_value), paths in differences.items()
        )
        raise ValueError(
            f"Received an invalid value for `path`: adapter file {os.fspath(path)!r} was saved with "
            f"other hyper-parameters than adapter {name!r} of this model has: {lines}. Adapt the base "
            "model with the file's config (tf_lora.read_adapter_config(path)) to load it."
        )


def _check_base(model, name: str, metadata: dict, path: str) -> None:
    """A file relative to a rewritten base (``to_original_base=False``) loads only where
    the same init rewrote the base, and a plain file never loads onto a rewritten base."""
    file_base = metadata.get("base", "original")
    model_base = _model_base(model)
    if file_base != model_base:
        describe = lambda b: "the original base" if b == "original" else f"a base rewritten by init={b.split(':')[1]!r}"  # noqa: E731
        raise ValueError(
            f"Received an invalid value for `path`: adapter file {os.fspath(path)!r} applies to "
            f"{describe(file_base)}, but adapter {name!r} of this model sits on {describe(model_base)}. "
            "Save with tf_lora.save_adapter(..., to_original_base=True) (the default) to get an adapter for "
            "the original base, and load it into a model adapted with the file's config "
            "(tf_lora.read_adapter_config(path))."
        )


def _align_top_names(tensors: Dict[str, np.ndarray], state: Dict[str, object]) -> Dict[str, np.ndarray]:
    """The file's keys with a top-level layer name renamed where it differs from the model's only by
    Keras' automatic numbering (``qwen_backbone`` saved, ``qwen_backbone_1`` here because the process
    had built a model of that class before). Only a name that is unique on both sides with that stem
    is renamed; everything else (and the shapes and hyper-parameters) is checked as before."""
    if set(tensors) == set(state):
        return tensors

    def top(keys):
        return {k.split("/", 1)[0] for k in keys if "/" in k}

    def stems(names):
        out: Dict[str, List[str]] = {}
        for n in names:
            out.setdefault(re.sub(r"_\d+$", "", n), []).append(n)
        return out

    ours, theirs = stems(top(state) - top(tensors)), stems(top(tensors) - top(state))
    rename = {t[0]: ours[s][0] for s, t in theirs.items() if len(t) == 1 and len(ours.get(s, ())) == 1}
    if not rename:
        return tensors
    return {(rename[k.split("/", 1)[0]] + "/" + k.split("/", 1)[1] if k.split("/", 1)[0] in rename else k): v
            for k, v in tensors.items()}
