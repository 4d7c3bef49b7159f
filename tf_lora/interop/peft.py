"""Hugging Face PEFT adapters in and out of KerasHub models.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys such as ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``:
``lora_A`` is (r, in) and ``lora_B`` is (out, r) in torch's Linear layout. tf_lora's
``lora_a`` is (input-side kernel axes..., r) and ``lora_b`` is (r, output-side kernel
axes...), each in the kernel's own axis order, and KerasHub's converters lay a kernel out
as ``W.T`` reshaped to exactly those axes, so

    lora_a = A.T.reshape(in_axes + (r,))        lora_b = B.T.reshape((r,) + out_axes)

and both sides scale by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Module names
map through the per-architecture tables in `tf_lora.peft_maps`. A module KerasHub splits
(GPT-2's fused ``c_attn``: query, key, value) gets a shared A and one slice of B per part
(`tf_lora.peft_fused`, exact). DoRA (``use_dora``): PEFT's ``lora_magnitude_vector`` (out,)
is tf_lora's ``lora_magnitude`` reshaped to the output-side axes (both are the norm of
``W + s B A`` per output unit). Export is `tf_lora.peft_export`.

An Embedding target (``embed_tokens`` of the decoders) is saved as
``<module>.lora_embedding_A`` (r, vocab) and ``.lora_embedding_B`` (dim, r), and PEFT adds
``scaling * A.T[ids] @ B.T`` to the input lookup only: tf_lora's `LoRAEmbedding` has
``lora_a = A.T`` (vocab, r) and ``lora_b = B.T`` (r, dim), the same formula as above. A
KerasHub token embedding tied to the LM head (``tie_weights``: Gemma always, Llama / Qwen
with ``tie_word_embeddings``) would carry the update into the logits too, which PEFT does
not do, so such a target is a `NotImplementedError` both ways.

Everything is read and checked before the model changes: an unsupported PEFT feature is
a `NotImplementedError` naming the field, anything that does not fit the model a
`ValueError` naming the file and the key. tf_lora reads safetensors only, never a
pickle (``adapter_model.bin``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import keras
import numpy as np

from tf_lora.adapter_files import _adapter_layers
from tf_lora.config import LoRAConfig, QLoRAConfig, matches
from tf_lora.layers.lora import LoRALayer, _einsum_lora_equations
from tf_lora.interop.peft_files import (CONFIG_FILE, ROOT, WEIGHTS_FILE, check_features, pattern_value,
                                read_peft_directory, split_key, split_saved_key, targets)
from tf_lora.interop.peft_maps import MAPS, NameMap
from tf_lora.interop.peft_saved import saved_weights
from tf_lora.surgery import walk


# -- the model side ----------------------------------------------------------------------
def architecture(model) -> Tuple[NameMap, keras.Model, str]:
    """``(name map, backbone, backbone path prefix in model)`` of a KerasHub Task or Backbone."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a KerasHub Backbone or Task. "
                        f"Received: model={type(model).__name__}")
    backbone = getattr(model, "backbone", None)
    backbone = backbone if isinstance(backbone, keras.Model) else model
    names = [c.__name__ for c in type(backbone).__mro__]
    for nmap in MAPS:
        if any(n in names for n in nmap.backbones):
            break
    else:
        supported = sorted(b for m in MAPS for b in m.backbones)
        raise NotImplementedError(f"tf_lora has no Hugging Face name map for {type(backbone).__name__}. "
                                  f"Supported KerasHub backbones: {supported}.")
    prefix = "" if backbone is model else next(p + "/" for p, l, _ in walk(model) if l is backbone)
    return nmap, backbone, prefix


def module_names(nmap: NameMap, num_layers: int) -> Dict[str, object]:
    """``{Hugging Face module name (relative to the base model): KerasHub path in the backbone}``;
    a fused module (`NameMap.fused`) maps to the tuple of its parts' paths."""
    hf_block, keras_block = nmap.block
    names = {hf_block.format(i=i) + hf: keras_block.format(i=i) + k
             for i in range(num_layers) for hf, k in nmap.blocks.items()}
    names.update({hf_block.format(i=i) + hf: tuple(keras_block.format(i=i) + k for k in parts)
                  for i in range(num_layers) for hf, parts in nmap.fused.items()})
    names.update(nmap.top)
    names.update(nmap.embeddings)
    return names


def _lora_shapes(layer) -> Tuple[tuple, tuple]:
    """(input-side axes, output-side axes) of the layer's LoRA factors, in the kernel's order."""
    if isinstance(layer, LoRALayer):
        return tuple(layer._lora_shapes[0]), tuple(layer._lora_shapes[1])
    if isinstance(layer, keras.layers.EinsumDense):
        _, _, _, in_axes, out_axes = _einsum_lora_equations(layer.equation)
        dims = dict(zip(layer.equation.replace(" ", "").split("->")[0].split(",")[1], layer.kernel.shape))
        return tuple(dims[c] for c in in_axes), tuple(dims[c] for c in out_axes)
    if isinstance(layer, keras.layers.Embedding):  # also KerasHub's ReversibleEmbedding: (vocab,) -> (dim,)
        return (int(layer.input_dim),), (int(layer.output_dim),)
    if isinstance(layer, keras.layers.Dense):
        return (int(layer.kernel.shape[0]),), (int(layer.kernel.shape[1]),)
    raise ValueError(f"Layer {layer.name!r} of type {type(layer).__name__} is not a Dense, EinsumDense or "
                     "Embedding layer.")


def tied_head(nmap: NameMap, model, layer) -> bool:
    """Whether `layer` is a token embedding that `model` also reads in reverse as its LM head."""
    if not getattr(layer, "tie_weights", False):
        return False
    return nmap.tied_readers is None or any(c.__name__ in nmap.tied_readers for c in type(model).__mro__)


def _tied_embedding_error(where: str, module: str, path: str) -> NotImplementedError:
    return NotImplementedError(
        f"{where} puts a LoRA on the Embedding {module!r} (`target_modules` embed_tokens), but layer {path!r} is a "
        "tied token embedding (`tie_weights=True`: the LM head reads the same table), so tf_lora's adapted table "
        "would change the logits too, while PEFT adapts only the input lookup. tf_lora does not untie a KerasHub "
        "embedding; use a model built with `tie_word_embeddings=False`, or leave embed_tokens out of `target_modules`.")


# -- the plan: everything checked, nothing changed ---------------------------------------------------------
class Plan(collections.namedtuple("Plan", "config weights saved magnitudes fused", defaults=({}, {}))):
    """`config`: the tf_lora `LoRAConfig`; `weights`: ``{keras path: (lora_a, lora_b)}`` in tf_lora layout;
    `saved`: ``{keras path: {variable attribute: array}}`` of the `modules_to_save` layers; `magnitudes`:
    ``{keras path: lora_magnitude}`` (DoRA); `fused`: ``{PEFT key: keras paths}`` of the fused modules."""


def plan(model, directory: str) -> Plan:
    """Reads and checks a PEFT directory against `model`; changes nothing."""
    config, tensors = read_peft_directory(directory)
    config_path = os.path.join(os.fspath(directory), CONFIG_FILE)
    weights_path = os.path.join(os.fspath(directory), WEIGHTS_FILE)
    check_features(config, config_path)
    nmap, backbone, keras_prefix = architecture(model)
    _check_base_model(config, nmap, config_path)
    names = module_names(nmap, int(backbone.num_layers))
    layers = {p: l for p, l, _ in walk(model)}
    factors: Dict[str, Dict[str, np.ndarray]] = {}
    saved_factors: Dict[str, Dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"Adapter file {weights_path!r} key {key!r} holds NaN or infinite values.")
        saved = split_saved_key(key, config)
        if saved is not None:
            saved_factors.setdefault(saved[0], {})[saved[1]] = value
            continue
        module, kind = split_key(key, weights_path, config)
        factors.setdefault(module, {})[kind] = value
    prefix = _detect_prefix(nmap, names, factors, weights_path)
    explicit = not isinstance(config["target_modules"], str) or config["target_modules"].lower() != "all-linear"
    unsupported = {prefix + u: what for u, what in nmap.unsupported.items()}
    unsupported.update(nmap.outer)
    for full, what in unsupported.items():
        if explicit:
            if targets(config, full):
                raise NotImplementedError(f"The PEFT adapter config {config_path!r} `target_modules` targets {full!r}, "
                                          f"{what}, which tf_lora does not adapt yet.")
    # PEFT puts no LoRA inside a `modules_to_save` module ("all-linear" + modules_to_save=["pooler"]),
    # nor on an Embedding under "all-linear".
    expected = {prefix + hf for hf in names if targets(config, prefix + hf)
                and (explicit or hf not in nmap.embeddings)
                and not any(prefix + hf == s or (prefix + hf).startswith(s + ".") for s in saved_factors)}
    extra, missing = sorted(set(factors) - expected), sorted(expected - set(factors))
    if extra:
        raise ValueError(f"Adapter file {weights_path!r} holds weights for {extra[:5]}, which {config_path!r} "
                         f"`target_modules` does not target.")
    if missing:
        raise ValueError(f"{config_path!r} targets {missing[:5]} but {weights_path!r} holds no weights for them.")
    if not expected:
        raise ValueError(f"Adapter file {weights_path!r} holds no LoRA weights.")
    weights, ranks, alphas, magnitudes, fused = {}, {}, {}, {}, {}
    use_dora = config.get("use_dora") is True
    for module in sorted(expected):
        target = names[module[len(prefix):]]
        paths = tuple(keras_prefix + t for t in (target if isinstance(target, tuple) else (target,)))
        for path in paths:
            if path not in layers:
                raise ValueError(f"Adapter file {weights_path!r} key {module!r} maps to layer {path!r}, which the "
                                 "model lacks.")
        layer = layers[paths[0]]
        pair = dict(factors[module])
        embedding = module[len(prefix):] in nmap.embeddings
        kinds = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        base = pair.pop("base_layer", None) if embedding else None
        magnitude = pair.pop("lora_magnitude_vector", None)
        if (magnitude is not None) != (use_dora and not embedding):
            raise ValueError(f"Adapter file {weights_path!r} key {ROOT + module}.lora_magnitude_vector is "
                             f"{'missing' if magnitude is None else 'present'}, but {config_path!r} sets "
                             f"`use_dora`={config.get('use_dora')!r}.")
        if set(pair) != set(kinds):
            raise ValueError(f"Adapter file {weights_path!r} has {sorted(pair)} for module {module!r}, "
                             f"expected {list(kinds)}.")
        if embedding and tied_head(nmap, model, layer):
            raise _tied_embedding_error(f"The PEFT adapter {config_path!r}", module, paths[0])
        if embedding and use_dora:
            raise NotImplementedError(f"The PEFT adapter {config_path!r} sets `use_dora` with the Embedding target "
                                      f"{module!r}; tf_lora has no DoRA on Embedding layers.")
        a, b = pair[kinds[0]], pair[kinds[1]]
        rank = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
        shapes = [_lora_shapes(layers[p]) for p in paths]
        in_shape = shapes[0][0]
        widths = [math.prod(out) for _, out in shapes]
        want_a, want_b = (rank, math.prod(in_shape)), (sum(widths), rank)
        if a.shape != want_a or b.shape != want_b:
            names_ab = f".{kinds[0]}/B" if embedding else ".lora_A/B.weight"
            raise ValueError(f"Adapter file {weights_path!r} key {ROOT + module}{names_ab} has shapes "
                             f"{a.shape}/{b.shape}, expected {want_a}/{want_b} for layer(s) {list(paths)} (rank {rank}).")
        if magnitude is not None and magnitude.shape != (sum(widths),):
            raise ValueError(f"Adapter file {weights_path!r} key {ROOT + module}.lora_magnitude_vector has shape "
                             f"{magnitude.shape}, expected {(sum(widths),)} for layer(s) {list(paths)}.")
        if base is not None:  # PEFT saves the base table with an Embedding target: it must be the model's
            table = keras.ops.convert_to_numpy(layer.embeddings).astype(np.float32)
            if base.shape != table.shape or not np.array_equal(base, table):
                raise ValueError(f"Adapter file {weights_path!r} key {ROOT + module}.base_layer.weight is not the "
                                 f"model's table {paths[0]}.embeddings (another base checkpoint?).")
        alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        # A fused module (GPT-2's c_attn) is exactly its parts with one shared A: part i gets lora_a = A
        # and the rows of B (and of the DoRA magnitude) that are its output units (tf_lora.peft_fused).
        offsets = np.cumsum([0] + widths)
        for path, (_, out_shape), lo, hi in zip(paths, shapes, offsets[:-1], offsets[1:]):
            weights[path] = (a.T.reshape(in_shape + (rank,)), b[lo:hi].T.reshape((rank,) + out_shape))
            ranks[path], alphas[path] = rank, alpha
            if magnitude is not None:
                magnitudes[path] = magnitude[lo:hi].reshape(out_shape)
        if isinstance(target, tuple):
            fused[ROOT + module + ".lora_A.weight"] = paths
    saved = saved_weights(nmap, prefix, keras_prefix, layers, saved_factors, config, config_path, weights_path)
    both = sorted(set(saved) & set(weights))
    if both:
        raise NotImplementedError(f"The PEFT adapter {config_path!r} both adapts and saves (`modules_to_save`) "
                                  f"layers {both}, which tf_lora does not support.")
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        lora_config = LoRAConfig(
            rank=r, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
            target_modules="(?:" + "|".join(re.escape(p) for p in weights) + ")",
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern={p: v for p, v in ranks.items() if v != r},
            alpha_pattern={p: v for p, v in alphas.items() if v != alpha},
            modules_to_save="(?:" + "|".join(re.escape(p) for p in saved) + ")" if saved else (),
            use_dora=use_dora,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"Received an invalid value for `directory`: {config_path!r} does not give a valid "
                         f"LoRA configuration ({e}).") from None
    return Plan(lora_config, weights, saved, magnitudes, fused)


def _check_base_model(config: dict, nmap: NameMap, config_path: str) -> None:
    """When `base_model_name_or_path` is a local checkpoint, its model_type must be this architecture's."""
    base = config.get("base_model_name_or_path")
    hf_config = os.path.join(base, "config.json") if isinstance(base, str) and base else None
    if hf_config and os.path.isfile(hf_config):
        try:
            with open(hf_config, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            return
        if model_type and model_type not in nmap.model_types:
            raise ValueError(f"The PEFT adapter {config_path!r} was made for a {model_type!r} model "
                             f"({base!r}), but the model is a {nmap.name} model.")


def _detect_prefix(nmap: NameMap, names: Dict[str, str], factors: dict, path: str) -> str:
    """The base-model prefix (``"model."`` for a CausalLM) the file's module names use."""
    for prefix in sorted(nmap.prefixes, key=len, reverse=True):
        if factors and all(m.startswith(prefix) and m[len(prefix):] in names for m in factors):
            return prefix
    for module in sorted(factors):
        rest = next((module[len(p):] for p in sorted(nmap.prefixes, key=len, reverse=True) if module.startswith(p)), module)
        if rest not in names:
            for u, what in {**nmap.unsupported, **nmap.outer}.items():
                if rest == u or module == u:
                    raise NotImplementedError(f"Adapter file {path!r} adapts {module!r}, {what}, which tf_lora does "
                                              "not adapt yet.")
            raise ValueError(f"Adapter file {path!r} key {ROOT + module}.lora_A.weight names a layer this "
                             f"{nmap.name} model lacks (another architecture, or more layers than the model has?).")
    raise ValueError(f"Adapter file {path!r} mixes module-name prefixes {sorted(nmap.prefixes)}.")


# -- public entry points --------------------------------------------------------------
def assign(model, steps: Plan, adapter_name: str = "default") -> None:
    layers = {p: l for p, l, _ in walk(model)}
    for path, (a, b) in steps.weights.items():
        lora_a, lora_b = layers[path].adapter_variables(adapter_name)
        lora_a.assign(a.astype(np.float32))
        lora_b.assign(b.astype(np.float32))
        if path in steps.magnitudes:
            layers[path].adapter_magnitude(adapter_name).assign(steps.magnitudes[path].astype(np.float32))
    for path, variables in steps.saved.items():
        for attr, value in variables.items():
            variable = getattr(layers[path], attr)
            variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def from_peft(model: keras.Model, directory: str, inplace: bool = False,
              quantization: Optional[QLoRAConfig] = None) -> keras.Model:
    """`model` adapted with the PEFT LoRA adapter in `directory`, as an instance of its class.

    Args:
        model: A KerasHub CausalLM / TextClassifier task or Backbone (Llama3, Qwen, Mistral,
            Gemma, BERT, GPT-2) holding the base checkpoint the adapter was trained on, e.g. from
            ``keras_hub.models.Llama3Backbone.from_preset("./hf-checkpoint")``.
        directory: A PEFT adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors``). Keys saved from a ``*ForCausalLM``
            (``base_model.model.model.layers...``) also load into the bare Backbone.
        inplace: As for `tf_lora.adapt`.
        quantization: A `tf_lora.QLoRAConfig` to store the adapted layers' base weights in
            NF4 (QLoRA): an adapter trained with PEFT on a bitsandbytes NF4 model (blocksize
            64, double quantization) then computes what it computes there, on MLP and attention
            projections alike (each kernel's codes are bitsandbytes' for the Hugging Face weight).

    Returns:
        The adapted model: adapters sit on exactly the layers the adapter targets, its
        `modules_to_save` (the LM head ``lm_head`` / ``embed_tokens``: KerasHub's
        ``token_embedding``; BERT's ``pooler.dense``: ``pooled_dense``) hold the saved
        weights, and its outputs equal ``peft.PeftModel.from_pretrained(hf_model, directory)``'s.

    Raises:
        NotImplementedError: a PEFT feature tf_lora does not support (`lora_bias`,
            an Embedding target on a tied token embedding, a `modules_to_save` module with no KerasHub layer, a head that
            differs from a tied embedding table, ...) or an architecture without a name map.
        ValueError: an unreadable directory, a non-LoRA `peft_type`, keys naming layers the
            model lacks, shape mismatches. Nothing changes on any error.

    Example:
        >>> lm = keras_hub.models.Llama3CausalLM(                        # doctest: +SKIP
        ...     keras_hub.models.Llama3Backbone.from_preset("./llama-hf"), preprocessor=None)
        >>> lm = tf_lora.from_peft(lm, "./my-peft-adapter")              # doctest: +SKIP
    """
    from tf_lora.adapt import adapt
    from tf_lora.train import AdaptedModel

    if isinstance(model, AdaptedModel):
        raise ValueError(f"Received an invalid value for `model`: {model.name!r} is already adapted. Pass the base "
                         "model, or load the weights into its adapter with tf_lora.load_adapter(model, directory).")
    if quantization is not None and not isinstance(quantization, QLoRAConfig):
        raise TypeError("Received an invalid value for `quantization`, expected None or a tf_lora.QLoRAConfig. "
                        f"Received: quantization={quantization!r}")
    steps = plan(model, directory)
    config = dataclasses.replace(steps.config, quantization=quantization)
    adapted = adapt(model, config, inplace=inplace, verbose=0)
    assign(adapted, steps)
    return adapted


def load_peft(model, directory: str, adapter_name: str) -> None:
    """Loads a PEFT directory into adapter `adapter_name` of an adapted model (see `load_adapter`)."""
    steps = plan(model, directory)
    layers = {p: l for p, l in _adapter_layers(model) if adapter_name in l.adapter_names}
    if set(layers) != set(steps.weights):
        raise ValueError(f"The PEFT adapter {os.fspath(directory)!r} targets other layers than adapter {adapter_name!r} "
                         f"of this model: only in the adapter {sorted(set(steps.weights) - set(layers))[:5]}, only in "
                         f"the model {sorted(set(layers) - set(steps.weights))[:5]}. Use tf_lora.from_peft on the base model.")
    config = getattr(model, "lora_config", None)
    selector = config.modules_to_save if config is not None else ()
    kept = sorted({p for p, l, _ in walk(model) if selector and matches(selector, l.name, p)})
    if kept != sorted(steps.saved):
        raise ValueError(f"The PEFT adapter {os.fspath(directory)!r} saves (`modules_to_save`) layers "
                         f"{sorted(steps.saved)}, the model's `modules_to_save` are layers {kept}.")
    cfg = steps.config
    for key, paths in steps.fused.items():
        have = [layers[p]._spec(adapter_name)["rank"] for p in paths]
        need = cfg.rank_for(layers[paths[0]].name, paths[0])
        if any(r != need for r in have):
            raise NotImplementedError(
                f"The PEFT adapter {os.fspath(directory)!r} key {key!r} is one rank-{need} LoRA on a fused projection, "
                f"which tf_lora represents exactly only as a shared A of rank {need} on each of {list(paths)}; adapter "
                f"{adapter_name!r} of the model has ranks {have} there. Use tf_lora.from_peft on the base model.")
    for path, layer in layers.items():
        spec = layer._spec(adapter_name)
        want = dict(rank=cfg.rank_for(layer.name, path), alpha=cfg.alpha_for(layer.name, path), use_rslora=cfg.use_rslora,
                    use_dora=cfg.use_dora)
        for field, value in want.items():
            if spec[field] != value:
                raise ValueError(f"The PEFT adapter {os.fspath(directory)!r} gives layer {path!r} {field}={value!r}, "
                                 f"adapter {adapter_name!r} of the model has {field}={spec[field]!r}.")
    assign(model, steps, adapter_name)

