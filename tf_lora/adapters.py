"""Adapter files, merging, and parameter counts.

An adapter file is a safetensors file holding only the `lora_` variables and
the variables of `modules_to_save`, keyed by layer path (``"mha/query/lora_a"``,
never by index), with the `LoRAConfig` as JSON metadata. It is written
atomically, and loading checks every key and shape before assigning anything.

Adapters whose init rewrote the frozen base (``init="pissa"``, ``"olora"``,
``"loftq"``) are converted on save to a rank-2r adapter for the original base
(see `save_adapter`), or marked as relative to the rewritten base.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import tempfile
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np
from keras import ops

from tf_lora import _compat, distribute, surgery
from tf_lora.surgery import walk
from tf_lora.config import LoRAConfig, matches
from tf_lora import variants
from tf_lora.layers.lora import LoRALayer

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


def save_adapter(model: keras.Model, path: str, adapter_name: Optional[str] = None, format: str = "tf_lora",
                 base_model_name_or_path: Optional[str] = None, to_original_base: bool = True) -> int:
    """Writes the adapter (and `modules_to_save`) weights of `model` to `path`.

    Args:
        model: A model returned by `tf_lora.adapt` (or `tf_lora.from_peft`).
        path: Destination file (conventionally ``*.adapter``); replaced
            atomically, so an interrupted save leaves any previous file intact.
            With ``format="peft"``, a folder (created if missing).
            Under a multi-worker strategy only the chief writes `path`; the
            other workers (which must call this too, as with any Keras save)
            write a private temporary file that is deleted at once.
        adapter_name: Which adapter to save (default: the active one).
        format: ``"tf_lora"`` (default): one safetensors file keyed by layer path,
            with the `LoRAConfig`. ``"peft"``: a Hugging Face PEFT directory
            (``adapter_config.json`` + ``adapter_model.safetensors``, Hugging Face
            module names) that ``peft.PeftModel.from_pretrained`` and vLLM load, for
            the KerasHub architectures in `tf_lora.peft_maps` (each file atomically).
        base_model_name_or_path: With ``format="peft"``: the Hugging Face checkpoint
            written into ``adapter_config.json``.
        to_original_base: Only for adapters whose init rewrote the frozen base
            (``init="pissa"``, ``"olora"``, ``"loftq"``: the base is ``W - s A0 B0``).
            True (default): write the rank-2r adapter ``[A | A0], [B ; -B0]`` whose
            update ``s (A B - A0 B0)`` applies to the original `W` (PEFT's
            ``path_initial_model_for_weight_conversion``), with rank and alpha doubled
            in its config (alpha times sqrt(2) with rsLoRA) and init ``"he_uniform"``;
            a DoRA magnitude is kept as is (the direction ``W_res + s A B`` is the same).
            Exact for a float base. With an NF4 base, the trained model computes
            ``dequant(Q) + s A B`` while the converted adapter on the float `W` gives
            ``W - s A0 B0 + s A B``: they differ by ``W - dequant(Q) - s A0 B0``, the
            init's reconstruction error (for LoftQ the error it minimized, below plain
            NF4's; on a plain NF4 base of `W`, NF4's own error adds to it). False: write
            `A`, `B` as trained, marked as relative to the rewritten base; `load_adapter`
            then refuses a model whose base was not rewritten by the same init.
            An adapter added (`add_adapter`, `add_weighted_adapter`) to such a model
            also computes on the rewritten base, but holds no initial factors: it is
            saved only with ``to_original_base=False``, marked the same way.

    Returns:
        The file size in bytes (with ``format="peft"``, of both files).

    Raises:
        ValueError: an unknown `format`; with ``format="peft"``, an adapter on a layer
            without a Hugging Face name.
        NotImplementedError: ``to_original_base=True`` for an adapter added to a model
            whose base an init rewrote (see above); ``format="peft"`` for an adapter on
            such a base, or for an architecture without a name map,
            or with `modules_to_save`.

    Example:
        >>> save_adapter(model, "task_a.adapter")  # doctest: +SKIP
        >>> save_adapter(model, "adapter_dir", format="peft")  # doctest: +SKIP
    """
    from safetensors.numpy import save

    if format not in ("tf_lora", "peft"):
        raise ValueError(f"Received an invalid value for `format`, expected 'tf_lora' or 'peft'. Received: format={format!r}")
    if not isinstance(to_original_base, bool):
        raise TypeError(f"Received an invalid value for `to_original_base`, expected a bool. Received: to_original_base={to_original_base!r}")
    if format == "peft":
        from tf_lora import peft

        _check_model(model)
        variant = [p for p, layer in _adapter_layers(model) if layer.adapter_init_pair("default") is not None]
        if variant:
            raise NotImplementedError(
                "save_adapter(format='peft') writes LoRA and DoRA adapters on the original base only; layers "
                f"{variant[:5]} sit on a base that an init rewrote. Use format='tf_lora'.")
        return peft.save_peft(model, path, _adapter_name(model, adapter_name), base_model_name_or_path)
    if base_model_name_or_path is not None:
        raise ValueError("Received `base_model_name_or_path` with format='tf_lora'; it is only written with format='peft'.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Received an invalid value for `path`, expected a file path. Received: path={path!r}")
    path = os.fspath(path)
    chief = distribute.is_chief(model)
    folder = os.path.dirname(os.path.abspath(path))
    if chief and not os.path.isdir(folder):
        raise FileNotFoundError(f"Received an invalid value for `path`: folder {folder!r} does not exist. Received: path={path!r}")
    name = _adapter_name(model, adapter_name)
    state = adapter_state(model, name)
    tensors = {k: np.ascontiguousarray(ops.convert_to_numpy(v)) for k, v in state.items()}
    config = model.adapter_config(name) if hasattr(model, "adapter_config") else None
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
    }
    rewritten = _rewritten_layers(model)
    if rewritten and to_original_base:
        if any(layer.adapter_init_pair(name) is None for _, layer in rewritten):
            raise NotImplementedError(
                f"Received to_original_base=True for adapter {name!r}, which was added on a base that "
                f"init={rewritten[0][1].lora_init!r} rewrote (layers {[p for p, _ in rewritten][:5]}): only the "
                "adapter whose init rewrote the base converts to one for the original base. Pass "
                "to_original_base=False to write it marked as relative to the rewritten base (load_adapter "
                "then loads it only into a model whose base the same init rewrote).")
        tensors, config = _to_original_base(tensors, config, rewritten, name)
        metadata["converted_from_init"] = rewritten[0][1].lora_init
    elif rewritten:
        metadata["base"] = _model_base(model)
    metadata["lora_config"] = json.dumps(config.to_dict() if config is not None else None)
    data = save(tensors, metadata=metadata)
    with distribute.write_location(model, path) as target:  # a private temporary file off the chief
        _atomic_write(target, data)
    return len(data)


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


def load_adapter(model: keras.Model, path: str, adapter_name: Optional[str] = None) -> None:
    """Loads adapter weights saved by `save_adapter` into `model`'s adapter
    `adapter_name` (default: the active one; use `add_adapter` first to load
    into a new one).

    Everything is checked before anything is assigned; on any mismatch
    `model` is unchanged.

    Args:
        model: A model returned by `tf_lora.adapt`.
        path: A file written by `save_adapter`.
        adapter_name: Which adapter to load into (default: the active one).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: a file that is truncated, corrupted or not an adapter file;
            keys or shapes that do not fit the model (another architecture or
            target_modules); or a `rank`, `alpha` or `use_rslora` in the file's
            `LoRAConfig` that differs, for some layer (`rank_pattern` and
            `alpha_pattern` included), from that layer's adapter: the message
            names the field, the file's value and the model's. (A file saved
            from a model without a config is checked by keys and shapes only.)
            Also a file saved with ``to_original_base=False`` (relative to a base
            that PiSSA/OLoRA/LoftQ rewrote) for a model whose base the same init
            did not rewrite, or a plain file for a model whose base was rewritten.

    A folder is read as a Hugging Face PEFT directory (``adapter_config.json`` +
    ``adapter_model.safetensors``): its targets, ranks, alphas and `use_rslora` must be
    those of the model's adapter (else ValueError; `tf_lora.from_peft` adapts a base
    model from such a folder).

    Example:
        >>> load_adapter(model, "task_a.adapter")  # doctest: +SKIP
    """
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        from tf_lora import peft

        _check_model(model)
        name = _adapter_name(model, adapter_name)
        merged = [p for p, layer in _adapter_layers(model) if layer.merged]
        if merged:
            raise ValueError(f"Cannot load an adapter into merged layers {merged}; call unmerge() on them first.")
        variant = [p for p, layer in _adapter_layers(model) if layer.adapter_init_pair("default") is not None]
        if variant:
            raise NotImplementedError(f"Cannot load a PEFT directory into adapter {name!r}: layers {variant[:5]} sit "
                                      "on a base that an init rewrote, which tf_lora's PEFT format does not cover.")
        peft.load_peft(model, path, name)
        return
    tensors, metadata = _read_file(path)
    state = adapter_state(model, adapter_name)
    name = _adapter_name(model, adapter_name)
    merged = [p for p, layer in _adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"Cannot load an adapter into merged layers {merged}; call unmerge() on them first.")
    config = _file_config(metadata, path)
    tensors = _align_top_names(tensors, state)
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    # Other layers than the model's: another architecture (or target_modules), said first.
    # Same layers, other keys (e.g. a DoRA magnitude): the hyper-parameter check names why.
    if {k.rsplit("/", 1)[0] for k in state} != {k.rsplit("/", 1)[0] for k in tensors}:
        raise ValueError(
            f"Adapter file {os.fspath(path)!r} does not fit this model (a different architecture "
            f"or target_modules?). Keys missing from the file: {missing[:10]}; keys in the file "
            f"but not in the model: {extra[:10]}."
        )
    if config is not None:  # hyper-parameters next: a clearer message than the keys they change
        _check_hyperparameters(model, name, config, path)
    _check_base(model, name, metadata, path)
    if missing or extra:
        raise ValueError(
            f"Adapter file {os.fspath(path)!r} does not fit this model (a different architecture "
            f"or target_modules?). Keys missing from the file: {missing[:10]}; keys in the file "
            f"but not in the model: {extra[:10]}."
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in state.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(
            f"Adapter file {os.fspath(path)!r} has different shapes (file rank "
            f"{config.rank if config is not None else None}, a different rank or architecture?): {wrong[:10]}"
        )
    for k, v in state.items():
        v.assign(tensors[k].astype(v.dtype if isinstance(v.dtype, str) else np.float32))


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


def merge(model: keras.Model) -> keras.Model:
    """A plain Keras model with every adapter folded into its kernel.

    The result has the class of the model `tf_lora.adapt` was given (a
    `LoRAModel` gives a Functional model, an adapted ``GemmaCausalLM`` a
    ``GemmaCausalLM``), the same inputs, outputs and layer names, contains only
    Keras layers (Dense / EinsumDense with merged kernels, no tf_lora layers)
    and gives the same outputs as `model` (within float32 rounding; a QLoRA
    base is dequantized). `model` itself is not changed; preprocessors are shared.

    Example:
        >>> served = merge(model)                 # doctest: +SKIP
        >>> served.export("serving_dir")          # doctest: +SKIP
    """
    from tf_lora.train import AdaptedModel, LoRAModel

    _check_model(model)
    adapters = _adapter_layers(model)
    work = surgery.copy_model(model, share=[layer for _, layer in adapters])
    in_copy = {path: layer for path, layer, _ in walk(work)}
    for path, layer in adapters:
        with _compat.scope_of(layer):  # the plain layer's variables get the adapter's paths
            plain = layer.to_base_layer()
        _compat.become(in_copy[path], plain)
    if isinstance(work, LoRAModel):
        inputs, outputs = _compat.model_io(work)
        work = keras.Model(inputs, outputs, name=model.name)  # plain Functional over the merged layers
    elif isinstance(work, AdaptedModel):
        work.__class__ = type(work)._base_class()
        for attr in ("_lora_config", "_adapter_configs", "_active_adapter", "_saved_cache", "_saved_originals"):
            work.__dict__.pop(attr, None)
    work.trainable = True  # a plain model: nothing frozen any more
    _compat.reset_traced_functions(work)
    return work


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts (4-bit weights count as one each)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(model: keras.Model) -> ParameterCount:
    """Trainable / total parameters, as `print_trainable_parameters` prints them."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"Received an invalid value for `model`, expected a Keras model or layer. Received: {type(model).__name__}")
    storage, base = set(), 0
    for _, layer, _ in [("", model, None)] + list(walk(model)):
        if isinstance(layer, LoRALayer) and hasattr(layer, "storage_variables"):
            storage.update(id(v) for v in layer.storage_variables())
            base += int(layer.base_parameter_count())
    trainable_vars = model.lora_variables if hasattr(model, "lora_variables") else model.trainable_weights
    trainable_ids = {id(v) for v in trainable_vars if v.trainable}
    trainable = sum(int(np.prod(v.shape)) for v in model.weights if id(v) in trainable_ids)
    total = base + sum(int(np.prod(v.shape)) for v in model.weights if id(v) not in storage)
    return ParameterCount(trainable, total)


def print_trainable_parameters(model: keras.Model) -> ParameterCount:
    """Prints ``trainable params: N || all params: M || trainable%: P`` (as PEFT).

    Example:
        >>> print_trainable_parameters(model)  # doctest: +SKIP
        trainable params: 1,536 || all params: 99,840 || trainable%: 1.5385
    """
    counts = count_parameters(model)
    print(f"trainable params: {counts.trainable:,d} || all params: {counts.total:,d} || trainable%: {counts.percent:.4f}")
    return counts
