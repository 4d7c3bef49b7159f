"""Saving and loading adapters, merging, and parameter counts.

The file format and its checks are in `tf_lora.adapter_files`: a safetensors file of
the `lora_` variables and `modules_to_save`, keyed by layer path, with the `LoRAConfig`
as JSON metadata, written atomically; loading checks every key and shape before
assigning anything. ``format="peft"`` directories go through the reader and writer that
`tf_lora.interop` registers there.

Adapters whose init rewrote the frozen base (``init="pissa"``, ``"olora"``,
``"loftq"``) are converted on save to a rank-2r adapter for the original base
(see `save_adapter`), or marked as relative to the rewritten base.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import keras
import numpy as np
from keras import ops

from tf_lora import _compat, distribute, surgery
from tf_lora.adapter_files import (  # noqa: F401  (adapter_state, read_adapter_config: public here too)
    DIRECTORY_FORMATS,
    FORMAT,
    FORMAT_VERSION,
    _adapter_layers,
    _adapter_name,
    _align_top_names,
    _atomic_write,
    _check_base,
    _check_hyperparameters,
    _check_model,
    _file_config,
    _model_base,
    _read_file,
    _rewritten_layers,
    _to_original_base,
    adapter_state,
    read_adapter_config,
)
from tf_lora.layers.lora import LoRALayer
from tf_lora.surgery import walk


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
            the KerasHub architectures in `tf_lora.interop.peft_maps` (each file atomically).
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

    if format != "tf_lora" and format not in DIRECTORY_FORMATS:
        raise ValueError(f"Received an invalid value for `format`, expected one of {['tf_lora', *DIRECTORY_FORMATS]}. "
                         f"Received: format={format!r}")
    if not isinstance(to_original_base, bool):
        raise TypeError(f"Received an invalid value for `to_original_base`, expected a bool. Received: to_original_base={to_original_base!r}")
    if format != "tf_lora":
        _check_model(model)
        variant = [p for p, layer in _adapter_layers(model) if layer.adapter_init_pair("default") is not None]
        if variant:
            raise NotImplementedError(
                "save_adapter(format='peft') writes LoRA and DoRA adapters on the original base only; layers "
                f"{variant[:5]} sit on a base that an init rewrote. Use format='tf_lora'.")
        return DIRECTORY_FORMATS[format].save(model, path, _adapter_name(model, adapter_name), base_model_name_or_path)
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
        _check_model(model)
        name = _adapter_name(model, adapter_name)
        merged = [p for p, layer in _adapter_layers(model) if layer.merged]
        if merged:
            raise ValueError(f"Cannot load an adapter into merged layers {merged}; call unmerge() on them first.")
        variant = [p for p, layer in _adapter_layers(model) if layer.adapter_init_pair("default") is not None]
        if variant:
            raise NotImplementedError(f"Cannot load a PEFT directory into adapter {name!r}: layers {variant[:5]} sit "
                                      "on a base that an init rewrote, which tf_lora's PEFT format does not cover.")
        DIRECTORY_FORMATS["peft"].load(model, path, name)
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
