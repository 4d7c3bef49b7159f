"""PEFT `modules_to_save` <-> KerasHub layers: the LM head / input embedding and BERT's pooler.

PEFT saves a module of `modules_to_save` whole (``base_model.model.lm_head.weight``);
`tf_lora.peft_maps` says which KerasHub layer variable each such weight is (``saved`` /
``saved_outer``). A KerasHub ``ReversibleEmbedding`` is the input embedding and the LM head
at once: untied, ``embeddings`` is ``embed_tokens.weight`` and ``reverse_embeddings`` is
``lm_head.weight.T``; tied (``tie_weights``), both are its one ``embeddings`` table. PEFT
trains a copy of a tied head (untied) unless ``ensure_weight_tying``: such a head maps only
when it equals the table, else `NotImplementedError`. On export a token embedding is
written as both ``embed_tokens`` and ``lm_head`` (what the layer computes), and a tied one
sets ``ensure_weight_tying`` so that PEFT keeps them one table.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import keras
import numpy as np

from tf_lora.config import LoRAConfig, matches
from tf_lora.interop.peft_files import ROOT
from tf_lora.interop.peft_maps import NameMap
from tf_lora.surgery import walk


def variable_of(layer, spec: str) -> Tuple[str, bool]:
    """``(variable attribute, transposed)`` of a table entry (``"kernel.T"``) on `layer`.

    A tied ``ReversibleEmbedding`` has no ``reverse_embeddings``: the LM head is
    ``embeddings`` itself, so ``reverse_embeddings.T`` (``lm_head.weight``) is ``embeddings``.
    """
    attr, transposed = (spec[:-2], True) if spec.endswith(".T") else (spec, False)
    if attr == "reverse_embeddings" and getattr(layer, "tie_weights", False):
        return "embeddings", not transposed
    return attr, transposed


def saved_weights(nmap: NameMap, prefix: str, keras_prefix: str, layers: dict, saved_factors: dict, config: dict,
                   config_path: str, weights_path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """``{keras path: {variable attribute: array}}`` of the file's `modules_to_save` weights, all checked."""
    tables = {prefix + hf: entry for hf, entry in nmap.saved.items()}
    tables.update(nmap.saved_outer)
    for entry in config.get("modules_to_save") or ():
        if not any(m == entry or m.endswith("." + entry) for m in saved_factors):
            raise ValueError(f"{config_path!r} `modules_to_save` names {entry!r} but {weights_path!r} holds no "
                             f"weights for it.")
    out: Dict[str, Dict[str, np.ndarray]] = {}
    sources: Dict[Tuple[str, str], set] = {}
    for module, params in sorted(saved_factors.items()):
        if module not in tables:
            raise NotImplementedError(
                f"The PEFT adapter {config_path!r} `modules_to_save` saves {module!r}, which tf_lora does not map "
                f"onto a KerasHub {nmap.name} layer (mapped: {sorted(tables)}).")
        keras_path, table = tables[module]
        path = keras_prefix + keras_path
        layer = layers.get(path)
        if layer is None:
            raise ValueError(f"Adapter file {weights_path!r} saves module {module!r} (`modules_to_save`), which maps "
                             f"to layer {path!r}, which the model lacks.")
        if set(params) != set(table):
            raise ValueError(f"Adapter file {weights_path!r} holds {sorted(params)} for `modules_to_save` module "
                             f"{module!r}, expected {sorted(table)}.")
        for param, value in sorted(params.items()):
            attr, transposed = variable_of(layer, table[param])
            variable = getattr(layer, attr, None)
            value = value.T if transposed else value
            key = f"{ROOT}{module}.{param}"
            if not isinstance(variable, keras.Variable) or tuple(variable.shape) != value.shape:
                shape = tuple(variable.shape) if isinstance(variable, keras.Variable) else None
                raise ValueError(f"Adapter file {weights_path!r} key {key!r} has shape {value.shape} (as "
                                 f"{path}.{attr}), expected {shape}.")
            if attr in out.setdefault(path, {}) and not np.array_equal(out[path][attr], value):
                raise NotImplementedError(_tied_message(config_path, path, sorted(sources[path, attr] | {key})))
            out[path][attr] = np.ascontiguousarray(value)
            sources.setdefault((path, attr), set()).add(key)
    for (path, attr), keys in sources.items():
        layer = layers[path]
        if getattr(layer, "tie_weights", False) and len(keys) == 1:
            # PEFT saved one of the tied pair (say lm_head): it trained a copy, the other kept the base table.
            if not np.array_equal(out[path][attr], keras.ops.convert_to_numpy(getattr(layer, attr))):
                raise NotImplementedError(_tied_message(config_path, path, sorted(keys)))
    return out


def _tied_message(config_path: str, path: str, keys) -> str:
    return (f"The PEFT adapter {config_path!r} `modules_to_save` gives {keys}, which differ from each other or from "
            f"the model's, but layer {path!r} ties the input embedding and the LM head (one table, "
            "`tie_weights=True`); PEFT trained them untied. tf_lora does not untie a KerasHub embedding; load it into "
            "a model built with `tie_word_embeddings=False`.")


def saved_contents(model, config: Optional[LoRAConfig], nmap: NameMap, keras_prefix: str, prefix: str
                    ) -> Tuple[Dict[str, np.ndarray], list, bool]:
    """``({key: float32 array}, PEFT modules_to_save, ensure_weight_tying)`` of the model's
    `modules_to_save` layers.

    A KerasHub token embedding is PEFT's ``embed_tokens`` and ``lm_head`` at once (tied or
    not), so both are written: that is what the layer computes, whichever of the two trained.
    A tied one also sets PEFT's ``ensure_weight_tying``, so PEFT keeps the two one table.
    """
    if config is None or not config.modules_to_save:
        return {}, [], False
    entries: Dict[str, list] = {}
    for hf, (keras_path, table) in nmap.saved.items():
        entries.setdefault(keras_path, []).append((hf, prefix + hf, table))
    for hf, (keras_path, table) in nmap.saved_outer.items():
        entries.setdefault(keras_path, []).append((hf, hf, table))
    tensors: Dict[str, np.ndarray] = {}
    modules, tied = [], False
    found: Dict[int, tuple] = {}  # a layer reached by two paths (a CausalLM's token_embedding) counts once
    for path, layer, _ in walk(model):
        if matches(config.modules_to_save, layer.name, path):
            found.setdefault(id(layer), (layer, []))[1].append(path)
    for layer, paths in found.values():
        tied = tied or bool(getattr(layer, "tie_weights", False))
        inside = [p[len(keras_prefix):] for p in paths if p.startswith(keras_prefix)]
        path, rel = paths[0], next((r for r in inside if r in entries), None)
        if rel is None:
            raise ValueError(f"Layer {path!r} is in `modules_to_save` but has no Hugging Face name in tf_lora's "
                             f"{nmap.name} table ({sorted(entries)}), so PEFT could not load it.")
        for name, module, table in entries[rel]:
            keys = {f"{ROOT}{module}.{param}": spec for param, spec in table.items()}
            if set(keys) <= set(tensors):
                continue  # the same weights under another name (BERT's pooler / pooler.dense)
            for key, spec in keys.items():
                attr, transposed = variable_of(layer, spec)
                value = keras.ops.convert_to_numpy(getattr(layer, attr)).astype(np.float32)
                tensors[key] = np.ascontiguousarray(value.T if transposed else value)
            modules.append(name)
    return tensors, sorted(modules), tied
