"""Several adapters on one base model: add, switch, disable, delete.

Every adapter layer holds each adapter's own `lora_a` / `lora_b`; the base
weights exist once. Switching changes which pair the forward pass uses (and
which variables are trainable); it never copies or reloads base weights.
After switching, call `model.compile(...)` again before `fit` (the optimizer
holds state for the previously active adapter only).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from tf_lora.targets import all_linear_skips
from tf_lora.checkpointing import checkpointed_blocks, disable_gradient_checkpointing, enable_gradient_checkpointing
from tf_lora.config import LoRAConfig, matches
from tf_lora.train import AdaptedModel, LoRAModel


def _check(model, name: Optional[str] = None, must_exist: bool = True) -> None:
    if not isinstance(model, AdaptedModel):
        raise TypeError(
            f"Received an invalid value for `model`, expected a model returned by tf_lora.adapt. "
            f"Received: model={type(model).__name__}"
        )
    if name is None:
        return
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Received an invalid value for `adapter_name`, expected an identifier string. Received: adapter_name={name!r}")
    if must_exist and name not in model.adapter_names:
        raise ValueError(
            f"Received an invalid value for `adapter_name`, expected one of {model.adapter_names}. "
            f"Received: adapter_name={name!r}"
        )
    if not must_exist and name in model.adapter_names:
        raise ValueError(
            f"Received an invalid value for `adapter_name`, expected a new name; {name!r} exists "
            f"(adapters: {model.adapter_names})."
        )


def add_adapter(model: LoRAModel, adapter_name: str, config: LoRAConfig) -> None:
    """Adds a new, inactive adapter to the layers of `model` that `config` targets.

    Targets are matched among the model's adapter layers (the layers `adapt`
    already adapted); `rank`, `alpha`, `dropout`, `use_rslora`, `init` and the
    patterns may differ from the first adapter. `modules_to_save` and
    `quantization` belong to the model, not to one adapter, and must be unset.

    ``gradient_checkpointing=True`` is honoured as `adapt` honours it: it turns on
    `tf_lora.enable_gradient_checkpointing` for the model (a model-wide setting, so it
    applies to every adapter; `tf_lora.disable_gradient_checkpointing` turns it off),
    unless the model already checkpoints blocks; `False` leaves the model as it is.

    On a model whose frozen base ``init="pissa"``/``"olora"``/``"loftq"`` rewrote, the
    new adapter computes on that rewritten base: save it with
    ``tf_lora.save_adapter(..., to_original_base=False)``, which marks the file so.

    Raises:
        TypeError: `model` is not an adapted model, or `config` not a `LoRAConfig`.
        ValueError: a taken or invalid `adapter_name`; `target_modules` matching none
            of the model's adapter layers; `quantization`/`attention`/`loss` set;
            ``use_dora=True`` on merged layers (a DoRA magnitude starts at the norm of
            the unmerged kernel: unmerge first); ``gradient_checkpointing=True`` on a
            model without blocks to checkpoint.
        NotImplementedError: `modules_to_save`, a base-rewriting `init`, or
            ``use_dora=True`` on layers without DoRA.
        A failed call leaves the model as it was.

    Example:
        >>> add_adapter(model, "task_b", LoRAConfig(rank=4))  # doctest: +SKIP
        >>> set_adapter(model, "task_b")                       # doctest: +SKIP
    """
    _check(model, adapter_name, must_exist=False)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"Received an invalid value for `config`, expected a tf_lora.LoRAConfig. Received: config={config!r}")
    if config.modules_to_save:
        raise NotImplementedError("Received `modules_to_save` for an added adapter: modules_to_save are shared by all "
                                  "adapters of a model; set them in tf_lora.adapt.")
    shared_base = config.quantization is None or config.quantization == model.lora_config.quantization
    if not shared_base or config.attention is not None:
        raise ValueError("Received `quantization`/`attention` for an added adapter: they describe the shared base "
                         "model; leave them unset (None) or equal to the model's.")
    if config.loss is not None:  # the model's training loss, shared by every adapter
        raise ValueError("Received an invalid value for `loss` for an added adapter, expected None: the chunked LM "
                         "loss is a setting of the whole model (tf_lora.use_chunked_loss(model) or tf_lora.adapt). "
                         f"Received: loss={config.loss!r}")
    from tf_lora.config import BASE_REWRITING_INITS

    if config.init in BASE_REWRITING_INITS:
        raise NotImplementedError(
            f"Received init={config.init!r} for an added adapter: it rewrites the frozen base, which all "
            "adapters of the model share. Use it in tf_lora.adapt, or 'he_uniform'/'gaussian' here.")
    targets = []
    for path, layer in model.adapter_layers():
        excluded = config.exclude_modules and matches(config.exclude_modules, layer.name, path)
        if not excluded and not all_linear_skips(config, layer) and matches(config.target_modules, layer.name, path):
            targets.append((path, layer))
    if not targets:
        raise ValueError(
            f"Received an invalid value for `target_modules`: it matches none of the model's adapter layers "
            f"{[p for p, _ in model.adapter_layers()]}. Received: target_modules={config.target_modules!r}"
        )
    no_dora = [f"{p} ({type(layer).__name__})" for p, layer in targets if config.use_dora and not layer.supports_dora]
    if no_dora:
        raise NotImplementedError(f"Received use_dora=True, but layers {no_dora[:5]} have no DoRA in tf_lora.")
    merged = [p for p, layer in targets if layer.merged]
    if config.use_dora and merged:
        raise ValueError(
            f"Received use_dora=True for layers {merged[:5]}, which are merged: a DoRA magnitude starts at the "
            "norm of the unmerged kernel. Call unmerge() on them first.")
    # Raises (having changed nothing) where the model has no block to checkpoint.
    enabled = config.gradient_checkpointing and not checkpointed_blocks(model)
    if enabled:
        enable_gradient_checkpointing(model)
    added = []
    try:
        for path, layer in targets:
            layer.add_adapter(
                adapter_name, rank=config.rank_for(layer.name, path), alpha=config.alpha_for(layer.name, path),
                dropout=float(config.dropout), use_rslora=config.use_rslora, lora_init=config.init,
                **({"use_dora": True} if config.use_dora else {}),
            )
            added.append(layer)
    except BaseException:
        for layer in added:
            layer.delete_adapter(adapter_name)
        if enabled:
            disable_gradient_checkpointing(model)
        raise
    model._adapter_configs[adapter_name] = config
    model.reset_compiled_functions()


def set_adapter(model: LoRAModel, adapter_name: str) -> None:
    """Makes `adapter_name` the adapter used (and trained) by `model`.

    Layers the adapter does not cover run as their base layer.
    """
    _check(model, adapter_name)
    layers = model.adapter_layers()
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"Cannot switch adapters while layers {merged} are merged; unmerge them first.")
    for _, layer in layers:
        layer.set_active_adapter(adapter_name if adapter_name in layer.adapter_names else None)
    object.__setattr__(model, "_active_adapter", adapter_name)
    model._freeze()
    model.reset_compiled_functions()


@contextlib.contextmanager
def disable_adapter(model: LoRAModel) -> Iterator[LoRAModel]:
    """Context manager in which `model` gives its base model's outputs.

    Every adapter layer runs as its base layer, and the `modules_to_save` switch to
    the frozen copies of their original weights that `adapt` kept (as PEFT's
    ``ModulesToSaveWrapper`` switches to its ``original_module``); nothing trains
    inside. On exit the adapters that were active and the trained modules are back.
    (On a base that ``init="pissa"``/``"olora"``/``"loftq"`` rewrote, the layers
    compute that residual base, as in PEFT.)

    Raises:
        TypeError: `model` is not an adapted model.
        ValueError: merged adapter layers, or a model loaded from a file that lacks
            the original `modules_to_save` weights.

    Example:
        >>> with disable_adapter(model):       # doctest: +SKIP
        ...     base_logits = model(x)
    """
    _check(model)
    layers = model.adapter_layers()
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"Cannot disable adapters while layers {merged} are merged; unmerge them first.")
    previous = [(layer, layer.active_adapter) for _, layer in layers]
    previous_name = model.active_adapter
    was_original = model._saved_originals.switched  # a nested disable_adapter leaves them as it found them
    model._use_original_modules(True)  # raises before anything changed
    for _, layer in layers:
        layer.set_active_adapter(None)
    object.__setattr__(model, "_active_adapter", None)
    model._freeze()
    model.reset_compiled_functions()
    try:
        yield model
    finally:
        model._use_original_modules(was_original)
        for layer, name in previous:
            layer.set_active_adapter(name)
        object.__setattr__(model, "_active_adapter", previous_name)
        model._freeze()
        model.reset_compiled_functions()


def delete_adapter(model: LoRAModel, adapter_name: str) -> None:
    """Removes an added adapter and its variables (not the active one, not "default")."""
    _check(model, adapter_name)
    if adapter_name == "default":
        raise ValueError("Received adapter_name='default': the default adapter cannot be deleted.")
    if adapter_name == model.active_adapter:
        raise ValueError(f"Received adapter_name={adapter_name!r}, the active adapter; call set_adapter with another first.")
    for _, layer in model.adapter_layers():
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
    del model._adapter_configs[adapter_name]
    model.reset_compiled_functions()
