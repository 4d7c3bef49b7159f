"""`adapt()`: put adapter layers in place of the matched layers of any Keras model.

Selection walks the whole layer tree (nested models, layers inside layers such
as MultiHeadAttention's projections, KerasHub decoder blocks). By default the
model is copied first (`surgery.copy_model`: object by object, sharing the
targets' variables, verified on a probe batch) and the copy is adapted; with
``inplace=True`` the model itself is. Each target is replaced where it stands
(`_compat.become`), one at a time, so QLoRA quantizes layer by layer and frees
each float kernel as it goes, and a float adapter adopts its target's base
variables instead of copying them (`_Journal`).
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import math
import sys
from typing import Dict, List, Optional, Tuple

import keras
from keras import ops

from tf_lora import _compat, distribute, surgery
from tf_lora.config import BASE_REWRITING_INITS, LoRAConfig, matches
from tf_lora.layers.base import adopting_base_weights
from tf_lora.layers.conv import LoRAConv, LoRAConv1D, LoRAConv2D, LoRAConv3D
from tf_lora.layers.embedding import LoRAEmbedding, LoRAReversibleEmbedding, _reversible_type
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer, _einsum_lora_equations
from tf_lora.surgery import is_graph_model, walk  # noqa: F401  (re-exported)


def _qlora_cls(name: str):
    from tf_lora.layers import qlora, qlora_conv_embedding  # optional modules (issue 3, issue 11)

    return getattr(qlora, name, None) or getattr(qlora_conv_embedding, name)


# Dispatch table, first match wins: (Keras layer type, LoRA class, QLoRA class name).
# Subclasses come before their bases.
DISPATCH: List[Tuple[type, type, str]] = [
    (keras.layers.EinsumDense, LoRAEinsumDense, "QLoRAEinsumDense"),
    (keras.layers.Dense, LoRADense, "QLoRADense"),
    *([(_reversible_type(), LoRAReversibleEmbedding, "QLoRAReversibleEmbedding")] if _reversible_type() else []),
    (keras.layers.Embedding, LoRAEmbedding, "QLoRAEmbedding"),
    (keras.layers.Conv1D, LoRAConv1D, "QLoRAConv1D"),
    (keras.layers.Conv2D, LoRAConv2D, "QLoRAConv2D"),
    (keras.layers.Conv3D, LoRAConv3D, "QLoRAConv3D"),
]

# What target_modules="all-linear" selects (PEFT's meaning): Dense and EinsumDense layers only,
# never embeddings or convolutions.
LINEAR_TYPES: Tuple[type, ...] = (keras.layers.Dense, keras.layers.EinsumDense, LoRADense, LoRAEinsumDense)


def all_linear_skips(config: LoRAConfig, layer) -> bool:
    """Whether ``target_modules="all-linear"`` leaves `layer` out (it is not Dense/EinsumDense)."""
    return config.target_modules == "all-linear" and not isinstance(layer, LINEAR_TYPES)


def register_adapter(layer_type: type, lora_cls: type, qlora_cls_name: str = "") -> None:
    """Adds a layer type to the dispatch table (checked before the built-ins)."""
    DISPATCH.insert(0, (layer_type, lora_cls, qlora_cls_name))


def _dispatch(layer) -> Optional[Tuple[type, type, str]]:
    if isinstance(layer, LoRALayer):
        return None
    for entry in DISPATCH:
        if isinstance(layer, entry[0]):
            return entry
    return None


# The methods through which a layer computes its outputs (and mask). An adapter class computes
# its dispatch type's versions of them; a subclass of that type that overrides one computes
# something else.
FORWARD_METHODS = ("__call__", "call", "compute_mask", "convolution_op")


def _own_forward(layer, layer_type: type) -> List[str]:
    """The `FORWARD_METHODS` that `layer`'s class defines above `layer_type` (the dispatch
    type it matched) in its method resolution order, i.e. that differ from `layer_type`'s."""
    mro = type(layer).__mro__
    above = mro[:mro.index(layer_type)] if layer_type in mro else mro
    return [name for name in FORWARD_METHODS if any(name in vars(cls) for cls in above)]


def _check_forward(layer, path: str, layer_type: type, lora_cls: type) -> None:
    """Refuses a subclass of a dispatch type that computes its own outputs (`_own_forward`):
    its adapter would compute `layer_type`'s function instead."""
    own = _own_forward(layer, layer_type)
    if own:
        cls = type(layer)
        base = (f"keras.layers.{layer_type.__name__}" if getattr(keras.layers, layer_type.__name__, None) is layer_type
                else f"{layer_type.__module__}.{layer_type.__qualname__}")
        raise NotImplementedError(
            f"Layer '{path}' is a {cls.__module__}.{cls.__qualname__}, a subclass of "
            f"{base} that overrides {', '.join(own)}; tf_lora's {lora_cls.__name__} "
            f"computes {layer_type.__name__}'s `call`, so the adapted model would compute something else. "
            f"Leave the layer out (exclude_modules=({layer.name!r},)), or register an adapter class that "
            f"computes {cls.__name__}'s `call`: tf_lora.register_adapter({cls.__name__}, YourLoRAClass)."
        )


def _describe(layer) -> str:
    return type(layer).__name__


def _select(model, config: LoRAConfig) -> Tuple[Dict[str, keras.layers.Layer], List[str]]:
    """Returns ({path: layer} to adapt, [paths of modules_to_save]); validates."""
    targets, adaptable, saved, seen = {}, [], [], set()
    explicit_regex = isinstance(config.target_modules, str) and config.target_modules != "all-linear"
    excluded: List[str] = []  # exclusion and modules_to_save cover a layer's sublayers too
    for path, layer, _ in walk(model):
        name = layer.name
        if any(path.startswith(p + "/") for p in excluded + saved):
            continue
        if config.modules_to_save and matches(config.modules_to_save, name, path):
            saved.append(path)
            continue
        if config.exclude_modules and matches(config.exclude_modules, name, path):
            excluded.append(path)
            if _dispatch(layer) is not None:
                adaptable.append(path)
            continue
        if isinstance(layer, LoRALayer):
            if matches(config.target_modules, name, path):
                raise ValueError(
                    f"Layer '{path}' is already a tf_lora adapter layer ({_describe(layer)}); "
                    "a model cannot be adapted twice on the same layer. Adapt the base model "
                    "or use tf_lora.merge(model) first."
                )
            continue
        entry = _dispatch(layer)
        if entry is None:
            leaf = not surgery.children(layer)
            if explicit_regex and leaf and layer.weights and matches(config.target_modules, name, path):
                supported = ", ".join(t.__name__ for t, _, _ in DISPATCH)
                raise ValueError(
                    f"Received an invalid value for `target_modules`: the regex "
                    f"{config.target_modules!r} names layer '{path}' of type {_describe(layer)}, "
                    f"which tf_lora cannot adapt. Supported layer types: {supported}."
                )
            continue
        adaptable.append(path)
        if all_linear_skips(config, layer):
            continue
        if matches(config.target_modules, name, path) and id(layer) not in seen:
            seen.add(id(layer))  # a layer reached by two paths is adapted once
            targets[path] = layer
    if not targets:
        raise ValueError(
            f"Received an invalid value for `target_modules`: it matches no adaptable layer. "
            f"Received: target_modules={config.target_modules!r}. "
            f"Adaptable layer paths in this model: {adaptable}"
        )
    if config.modules_to_save and not saved:
        raise ValueError(
            f"Received an invalid value for `modules_to_save`: it matches no layer. "
            f"Received: modules_to_save={config.modules_to_save!r}"
        )
    return targets, saved


def make_adapter(layer, config: LoRAConfig, path: str) -> LoRALayer:
    """Builds the adapter layer for `layer` (through the dispatch table)."""
    entry = _dispatch(layer)
    if entry is None:
        supported = ", ".join(t.__name__ for t, _, _ in DISPATCH)
        raise ValueError(
            f"Layer '{path}' of type {_describe(layer)} cannot be adapted. "
            f"Supported layer types: {supported}."
        )
    _, lora_cls, qlora_name = entry
    kwargs = dict(
        rank=config.rank_for(layer.name, path),
        alpha=config.alpha_for(layer.name, path),
        dropout=float(config.dropout),
        use_rslora=config.use_rslora,
        lora_init=config.init,
    )
    if config.use_dora:  # only when asked: adapter classes without DoRA never see the argument
        kwargs["use_dora"] = True
    if config.init == "loftq":
        kwargs["loftq_iter"] = config.loftq_iter
    if config.quantization is not None:
        if not qlora_name:
            raise NotImplementedError(f"No QLoRA layer is registered for {_describe(layer)} ('{path}').")
        return _qlora_cls(qlora_name).from_layer(layer, quantization=config.quantization, **kwargs)
    return lora_cls.from_layer(layer, **kwargs)




def _precheck(layer, path: str, config: LoRAConfig) -> None:
    """Everything `make_adapter` could refuse, checked before any layer changes."""
    entry = _dispatch(layer)
    if entry is None:  # pragma: no cover - _select only returns dispatchable layers
        raise ValueError(f"Layer '{path}' of type {_describe(layer)} cannot be adapted.")
    layer_type, lora_cls, qlora_name = entry
    LoRALayer._check_source(layer, layer_type, layer_type.__name__)
    _check_forward(layer, path, layer_type, lora_cls)
    if isinstance(layer, keras.layers.EinsumDense):
        _einsum_lora_equations(layer.equation)
    if issubclass(lora_cls, LoRAConv):
        LoRAConv.check_groups(layer)
    if config.quantization is not None and not qlora_name:
        raise NotImplementedError(f"No QLoRA layer is registered for {_describe(layer)} ('{path}').")
    _check_variants(layer, path, config, _qlora_cls(qlora_name) if config.quantization is not None else lora_cls)
    _check_values(layer, path, config)


def _check_values(layer, path: str, config: LoRAConfig) -> None:
    """What `make_adapter` would refuse in the weights: a rank that a base-rewriting init
    cannot split the kernel into, NaN/Inf in a kernel that is quantized or decomposed."""
    rewriting = config.init in BASE_REWRITING_INITS
    if rewriting and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        shape = [int(d) for d in layer.kernel.shape]
        n_in = shape[0]
        if isinstance(layer, keras.layers.EinsumDense):  # the kernel's input-side axes
            in_axes = _einsum_lora_equations(layer.equation)[3]
            k_sub = layer.equation.replace(" ", "").split("->")[0].split(",")[1]
            n_in = math.prod(d for c, d in zip(k_sub, shape) if c in in_axes)
        LoRALayer.check_rewrite_rank(config.rank_for(layer.name, path), n_in, math.prod(shape) // n_in,
                                     config.init, path)
    if rewriting or config.quantization is not None:
        name = "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel"
        source = getattr(layer, name, None)
        if source is not None and not bool(ops.all(ops.isfinite(source))):
            bad = int(ops.sum(ops.cast(ops.logical_not(ops.isfinite(source)), "int32")))
            how = "quantization (NF4)" if config.quantization is not None else f"init={config.init!r}"
            raise ValueError(
                f"Received a model whose layer '{path}' cannot be adapted with {how}: its `{name}` contains "
                f"{bad} NaN or Inf values. Fix the weights or leave the layer out (exclude_modules)."
            )


def _check_variants(layer, path: str, config: LoRAConfig, cls: type) -> None:
    """`use_dora` and `init` need the adapter class to implement them."""
    if config.use_dora and not getattr(cls, "supports_dora", False):
        raise NotImplementedError(
            f"Received use_dora=True, but layer '{path}' of type {_describe(layer)} has no DoRA in tf_lora "
            f"({cls.__name__}); DoRA is implemented for Dense and EinsumDense. Exclude the layer "
            "(exclude_modules) or use use_dora=False."
        )
    inits = getattr(cls, "supported_inits", ("he_uniform", "gaussian"))
    if config.init not in inits:
        raise NotImplementedError(
            f"Received init={config.init!r}, but layer '{path}' of type {_describe(layer)} ({cls.__name__}) "
            f"supports only init in {tuple(inits)}."
        )


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
