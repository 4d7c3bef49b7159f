"""`adapt()`: put adapter layers in place of the matched layers of any Keras model.

Selection walks the whole layer tree (nested models, layers inside layers such
as MultiHeadAttention's projections, KerasHub decoder blocks). By default the
model is copied first (`surgery.copy_model`: object by object, sharing the
targets' variables, verified on a probe batch) and the copy is adapted; with
``inplace=True`` the model itself is. Each target is replaced where it stands
(`_compat.become`), one at a time, so QLoRA quantizes layer by layer and frees
each float kernel as it goes, and a float adapter adopts its target's base
variables instead of copying them (`_Journal`). Which layers are targets, and with
which adapter class, is `tf_lora.targets`.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import sys
from typing import Dict, List, Optional, Tuple

import keras

from tf_lora import _compat, distribute, surgery
from tf_lora.config import BASE_REWRITING_INITS, LoRAConfig
from tf_lora.layers.base import adopting_base_weights
from tf_lora.layers.lora import LoRALayer
from tf_lora.targets import (  # noqa: F401  (re-exported: the dispatch table's API lives in targets.py)
    DISPATCH,
    LINEAR_TYPES,
    _dispatch,
    _own_forward,
    _precheck,
    _select,
    all_linear_skips,
    make_adapter,
    register_adapter,
)
from tf_lora.surgery import is_graph_model, walk  # noqa: F401  (re-exported)


def _interactive() -> bool:
    """In a notebook (a running IPython shell) or a terminal."""
    ipython = sys.modules.get("IPython")
    if ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None:
        return True
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def _insert_adapters(targets: Dict[str, keras.layers.Layer], config: LoRAConfig, verbose: int,
                     journal: Optional["_Journal"] = None) -> None:
    """Replaces each target by its adapter where it stands, one layer at a time.

    Each adapter is built in its target's name scope, so its variables get the target's
    paths (``block/attention/query/kernel``, new ones ``.../query/lora_a``). `journal`
    (in place only) records each target before it changes (to undo it if `adapt` fails
    later); where it says so (`_Journal.adopts`), the adapter adopts the target's base
    variables themselves (`adopting_base_weights`) instead of copies of them."""
    bar = keras.utils.Progbar(len(targets), unit_name="layer") if verbose else None
    adopts = journal is not None and journal.adopts
    for i, (path, layer) in enumerate(targets.items()):
        if journal is not None:
            journal.record(path, layer)  # before the adapter adopts (and freezes) its variables
        with _compat.scope_of(layer), adopting_base_weights(layer) if adopts else contextlib.nullcontext():
            new = make_adapter(layer, config, path)
        _compat.become(layer, new)
        del new
        if bar is not None:
            bar.update(i + 1)


class _Journal:
    """The layers an in-place `adapt` replaces, and what undoing them needs.

    Float adapters: each layer's original class and state (`_compat.snapshot`), and the
    settings (trainable, regularizer, constraint) of its own variables, kept until `adapt`
    has replaced and verified every layer, so any failure (an unforeseen error, an
    interrupt, a failed post-replacement check) restores the model exactly: same objects,
    same variables, same outputs, same optimizer. This holds no second copy of the weights:
    unless the init rewrites the base (``init="pissa"``/``"olora"``), the adapter adopts the
    replaced layer's kernel (or table) and bias variables themselves (`adopts`), so the kept
    state refers to the very variables the adapters use (undo gives them back their settings);
    only a variable that does not fit the adapter's (another dtype or autocast) is copied
    and its original kept meanwhile. PiSSA/OLoRA overwrite their base with a residual, which
    cannot be subtracted back exactly, so their adapters get copies and the originals stay
    alive until `adapt` returns (up to one extra copy of the targeted kernels). Under
    quantization the design's memory bound wins: each float kernel is freed as its layer is
    replaced, so nothing is kept; every failure that can be foreseen is checked before the
    first change (`_precheck`), and an unforeseen one names the layers already replaced.
    """

    def __init__(self, model, config: LoRAConfig):
        self.keep = config.quantization is None
        self.adopts = self.keep and config.init not in BASE_REWRITING_INITS
        self.optimizer = getattr(model, "optimizer", None) if self.keep else None
        # (path, layer, snapshot or None, [(variable, trainable, regularizer, constraint)])
        self.entries: List[Tuple[str, keras.layers.Layer, Optional[tuple], list]] = []

    def record(self, path: str, layer) -> None:
        """Called before `layer` changes (its adapter is made, then takes its place)."""
        settings = ([(v, v.trainable, v.regularizer, v.constraint) for v in _compat.own_variables(layer)]
                    if self.adopts else [])
        self.entries.append((path, layer, _compat.snapshot(layer) if self.keep else None, settings))

    def undo(self, model, error: BaseException) -> None:
        """Restores the recorded layers (float adapters), or notes on `error` what is left."""
        if not self.entries:
            return
        if self.keep:
            for _, layer, saved, settings in reversed(self.entries):
                _compat.restore(layer, saved)  # (a layer whose adapter failed to build: its own state)
                for variable, trainable, regularizer, constraint in settings:
                    variable.trainable, variable.regularizer, variable.constraint = trainable, regularizer, constraint
            if self.optimizer is not None:
                model.optimizer = self.optimizer
            _compat.reset_traced_functions(model)
        else:
            replaced = [p for p, layer, _, _ in self.entries if isinstance(layer, LoRALayer)]
            if replaced:
                note = (f"tf_lora.adapt(inplace=True) had already replaced the layers {replaced} by quantized "
                        "adapters and freed their float kernels, so the model is partially adapted: reload it "
                        "before adapting again.")
                error.__notes__ = [*getattr(error, "__notes__", []), note]
        self.entries = []


def _return_freed_memory() -> None:
    """Hands the C heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    The replaced float kernels are freed into the heap, where the 4-bit storage created
    meanwhile splits them into pieces that a later large tensor may not fit; unreturned,
    they would stay in the process's memory.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (musl)
        pass


def _check_rebuildable(model) -> None:
    try:
        config = model.get_config()
        # Keras 3.5's automatic config silently leaves out arguments it cannot serialize
        # (3.15 raises): a required constructor argument missing from the config is the same failure.
        required = [name for name, p in list(inspect.signature(type(model).__init__).parameters.items())[1:]
                    if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [name for name in required if name not in config]
        if missing:
            raise NotImplementedError(f"the config lacks the constructor argument(s) {missing}")
    except Exception as e:  # NotImplementedError for auto-config failures, or the class's own
        raise TypeError(
            f"Received an invalid value for `model`: its class {type(model).__name__} cannot be rebuilt "
            f"from its config (get_config failed: {type(e).__name__}: {e}), so an adapted copy could not "
            "be saved or loaded. Implement get_config/from_config, or adapt the model itself: "
            "tf_lora.adapt(model, config, inplace=True)."
        ) from None


def _copy(model, targets: Dict[str, keras.layers.Layer], reference: Optional[surgery.Probe] = None):
    """A verified copy of `model` sharing the targets' weights, and the targets in it
    (`reference`: ``surgery.probe(model)`` if already computed)."""
    try:
        work = surgery.copy_model(model, share=targets.values())
    except Exception as e:
        raise TypeError(
            f"Received an invalid value for `model`: model {model.name!r} of class {type(model).__name__} "
            f"cannot be copied ({type(e).__name__}: {e}). Adapt it in place instead: "
            "tf_lora.adapt(model, config, inplace=True)."
        ) from None
    surgery.verify_copy(model, work, reference=reference)
    found = {path: surgery.find(work, path) for path in targets}
    lost = sorted(p for p, layer in found.items() if layer is None)
    if lost:  # pragma: no cover - a deep copy keeps names and structure
        raise RuntimeError(f"The copy of {model.name!r} lost the target layers {lost}.")
    return work, found


def adapt(model: keras.Model, config: Optional[LoRAConfig] = None, *, inplace: bool = False,
          verbose: Optional[int] = None) -> "keras.Model":
    """Adds adapters to the matched layers of `model`; returns a model of its class.

    A Functional or Sequential model comes back as a `tf_lora.LoRAModel` (a
    Functional model with the same layer names, inputs and outputs); any other
    model (a KerasHub Backbone or Task such as ``GemmaCausalLM``, any subclassed
    model) as an instance of its own class (``isinstance(result, type(model))``)
    with the adapters inside, so `generate`, `backbone` and `preprocessor` keep
    working. Either way ``isinstance(result, tf_lora.AdaptedModel)``, `fit`
    trains only the adapters and `modules_to_save`, and `.keras` files keep the
    adapters.

    Args:
        model: A built Keras model.
        config: A `tf_lora.LoRAConfig` (default: ``LoRAConfig()``).
        inplace: False (default): `model` is not modified; the result is a copy
            (made object by object and verified on a probe batch; only the
            weights of the replaced layers are not duplicated). True: `model`
            itself is adapted and returned, layer by layer. Everything that can be
            checked is checked before the first layer changes (including a rank
            that an ``init="pissa"``/``"olora"`` cannot split a kernel into, and
            NaN/Inf in a kernel to quantize or decompose). It holds no second
            copy of its weights (one exception below). Without quantization each
            adapter adopts its layer's kernel (or table) and bias variables
            themselves, frozen (the same objects, values and paths), and the replaced
            layers are kept until the call returns, so any failure restores the
            model exactly (same layers, variables and their trainable flags,
            outputs, optimizer). Exception: ``init="pissa"``/``"olora"`` rewrite
            the base, so their adapters copy it and the originals are kept until
            the call returns (meanwhile up to one extra copy of the targeted
            kernels). With quantization QLoRA frees each float kernel as it
            quantizes it (the freed memory goes back to the OS), so an
            unforeseen failure half-way cannot be undone (the error says which
            layers were replaced). On success its traced functions and
            optimizer state are dropped.
        verbose: 1 shows a progress bar over the adapted layers, 0 none;
            default: 1 in an interactive terminal or notebook.

    Returns:
        The adapted model.

    Raises:
        TypeError: wrong argument types; a class that cannot be copied or rebuilt
            from its config (the message says to pass ``inplace=True``).
        ValueError: an unbuilt model, a Task without a backbone, targets that
            match nothing (the message lists the adaptable paths), a matched
            layer already adapted, an unsupported layer type, a rank larger than
            a base-rewriting init allows, NaN/Inf in a kernel to quantize or decompose.
        NotImplementedError: a target whose class subclasses a supported type but
            computes its own outputs (overrides `call`, `compute_mask` or
            `convolution_op`); leave it out or `register_adapter` a class for it.
        RuntimeError: the copy, or the adapted model before training, computes
            something else than `model` on a probe batch (`surgery.verify_adapted`).

    Example:
        >>> inputs = keras.Input((8,))
        >>> base = keras.Model(inputs, keras.layers.Dense(4, name="query")(inputs))
        >>> model = adapt(base, LoRAConfig(rank=2))
        >>> [v.name for v in model.trainable_variables]
        ['lora_a', 'lora_b']
    """
    from tf_lora.train import AdaptedModel, LoRAModel, make_adapted

    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"Received an invalid value for `config`, expected a tf_lora.LoRAConfig. Received: config={config!r}")
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a keras.Model. Received: model={type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"Received an invalid value for `inplace`, expected a bool. Received: inplace={inplace!r}")
    if verbose is None:
        verbose = 1 if _interactive() else 0
    if isinstance(verbose, bool) or verbose not in (0, 1):
        raise ValueError(f"Received an invalid value for `verbose`, expected None, 0 or 1. Received: verbose={verbose!r}")
    if not model.built or (is_graph_model(model) and not getattr(model, "inputs", None)):
        raise ValueError(
            f"Received an unbuilt model for `model`, expected a built model (give the first layer "
            f"an input shape or call the model on data). Received: model={model.name!r}"
        )
    if "backbone" in dir(type(model)) and getattr(model, "backbone", None) is None:
        raise ValueError(
            f"Received an invalid value for `model`: the task {model.name!r} ({type(model).__name__}) has no "
            "backbone, so it has no layers to adapt. Build the task with its backbone."
        )
    if inplace and isinstance(model, AdaptedModel):
        raise ValueError(
            f"Received inplace=True for model {model.name!r}, which is already adapted. Add another adapter "
            "with tf_lora.add_adapter, or adapt a copy (inplace=False)."
        )
    if config.attention == "chunked":
        from tf_lora.convert import plan_chunked_attention

        # Checked here, before anything changes; the adapted model switches itself
        # (AdaptedModel._init_adapted), also when it is loaded from a .keras file.
        plan_chunked_attention(model, config.max_attention_memory)
    if config.loss == "chunked":
        from tf_lora.loss import check_chunked_loss

        check_chunked_loss(model, config.max_loss_memory)
    targets, _ = _select(model, config)
    for path, layer in targets.items():
        _precheck(layer, path, config)
    graph = type(model) in (_compat.Functional, keras.Sequential) or type(model) is LoRAModel
    # The base's outputs on a probe batch, before anything changes: the copy (verify_copy) and the
    # adapted model (verify_adapted) are checked against them.
    checked = surgery.adapted_tolerance(config) is not None
    if inplace:
        reference = surgery.probe(model, strict=False) if checked else None  # a probe it rejects: no check
        work, work_targets = model, targets
        journal = _Journal(model, config)
        # Traced functions and a built optimizer hold the float kernels; drop them first
        # so that each kernel is freed as soon as its layer is replaced.
        _compat.reset_traced_functions(model)
        if getattr(model, "optimizer", None) is not None and model.optimizer.built:
            model.optimizer = surgery.fresh_optimizer(model.optimizer)
    else:
        if not graph:
            _check_rebuildable(model)
        reference = surgery.probe(model)
        work, work_targets = _copy(model, targets, reference)
        journal = None  # a failure drops the copy; `model` is untouched
    try:  # in place, a failure from here on undoes the replacements (_Journal)
        with distribute.worker_local_storage() as local:  # QLoRA's uint8 codes under MultiWorkerMirroredStrategy
            _insert_adapters(work_targets, config, verbose, journal)
        distribute.broadcast_from_chief(local)
        surgery.verify_adapted(reference, work, config)  # a fresh adapter must not change the function
    except BaseException as error:
        if journal is not None:
            journal.undo(model, error)
        raise
    journal = None  # adapted and verified: the replaced layers' originals are freed
    _return_freed_memory()
    if inplace and isinstance(model, _compat.Functional) and type(model) is _compat.Functional:
        make_adapted(model, config)  # a plain Functional model becomes a LoRAModel
        return model
    if graph and not inplace:
        inputs, outputs = _compat.model_io(work)
        return LoRAModel(inputs=inputs, outputs=outputs, name=model.name, lora_config=config)
    make_adapted(work, config)
    return work
