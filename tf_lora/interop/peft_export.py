"""tf_lora adapters out to PEFT directories (`save_adapter(format="peft")`).

The inverse of `tf_lora.peft`'s import: ``A = lora_a.reshape(-1, r).T`` (r, in) and
``B = lora_b.reshape(r, -1).T`` (out, r), names from the tables in `tf_lora.peft_maps`.
A fused Hugging Face module (GPT-2's ``c_attn``) gets one adapter built from its parts by
`tf_lora.peft_fused.fuse` (exact); DoRA's magnitude is written as ``lora_magnitude_vector``
(out,) and ``use_dora``. A DoRA adapter on some but not all parts of a fused module is a
`NotImplementedError`: PEFT's fused DoRA would rescale the parts without an adapter too.
"""

from __future__ import annotations

import collections
import os
from typing import Dict, Optional, Tuple

import keras
import numpy as np

from tf_lora.adapter_files import _adapter_layers
from tf_lora.interop.peft import _lora_shapes, _tied_embedding_error, architecture, module_names, tied_head
from tf_lora.interop.peft_files import ROOT, write_peft_directory
from tf_lora.interop.peft_fused import Part, fuse
from tf_lora.interop.peft_maps import NameMap
from tf_lora.interop.peft_saved import saved_contents
from tf_lora.surgery import walk


def _hf_name(nmap: NameMap, keras_path: str, num_layers: int) -> Optional[str]:
    """The Hugging Face module name (relative to the base model) of a backbone path, or None."""
    reverse = {k: hf for hf, k in module_names(nmap, num_layers).items() if isinstance(k, str)}
    return reverse.get(keras_path)


def _numpy(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable).astype(np.float32)


def peft_directory_contents(model, adapter_name: str, base_model_name_or_path: Optional[str] = None
                            ) -> Tuple[dict, Dict[str, np.ndarray]]:
    """``(adapter_config, {key: float32 array})`` PEFT loads for adapter `adapter_name` of `model`."""

    nmap, backbone, keras_prefix = architecture(model)
    config = model.adapter_config(adapter_name) if hasattr(model, "adapter_config") else None
    num_layers = int(backbone.num_layers)
    prefix = nmap.prefixes[0]
    # `modules_to_save` belong to the model (set in adapt) and every adapter computes with them:
    # PEFT keeps them per adapter, so each adapter's directory holds them, an added one's too.
    model_config = getattr(model, "lora_config", None) or config
    saved_tensors, saved_modules, tied = saved_contents(model, model_config, nmap, keras_prefix, prefix)
    tensors, ranks, alphas, rslora, dora = {}, {}, {}, set(), set()
    fused_of = {}  # keras path -> (Hugging Face module, part index) for the parts of fused modules
    for hf, paths in module_names(nmap, num_layers).items():
        if isinstance(paths, tuple):
            fused_of.update({keras_prefix + p: (hf, i) for i, p in enumerate(paths)})
    fused = collections.defaultdict(dict)  # Hugging Face module -> {part index: layer}
    for path, layer in _adapter_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        spec = layer._spec(adapter_name)
        rslora.add(bool(spec["use_rslora"]))
        dora.add(bool(spec["use_dora"]))
        if path in fused_of:
            fused[fused_of[path][0]][fused_of[path][1]] = layer
            continue
        hf = _hf_name(nmap, path[len(keras_prefix):], num_layers) if path.startswith(keras_prefix) else None
        if hf is None:
            raise ValueError(f"Layer {path!r} has an adapter but no Hugging Face name in tf_lora's {nmap.name} "
                             f"table ({sorted(nmap.blocks.values()) + sorted(nmap.top.values()) + sorted(nmap.embeddings.values())}), so PEFT could not load it.")
        module = prefix + hf
        embedding = hf in nmap.embeddings
        if embedding and tied_head(nmap, model, layer):
            raise _tied_embedding_error(f"Adapter {adapter_name!r} of {model.name!r}", module, path)
        a, b = (keras.ops.convert_to_numpy(v).astype(np.float32) for v in layer.adapter_variables(adapter_name))
        r = int(spec["rank"])
        names_ab = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
        tensors[f"{ROOT}{module}{names_ab[0]}"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{ROOT}{module}{names_ab[1]}"] = np.ascontiguousarray(b.reshape(r, -1).T)
        ranks[module], alphas[module] = r, float(spec["alpha"])
        magnitude = layer.adapter_magnitude(adapter_name)
        if magnitude is not None:
            tensors[f"{ROOT}{module}.lora_magnitude_vector"] = _numpy(magnitude).reshape(-1)
    layers = {p: l for p, l, _ in walk(model)}
    for hf, adapted in sorted(fused.items()):
        module, paths = prefix + hf, module_names(nmap, num_layers)[hf]
        parts, magnitudes = [], []
        for i, path in enumerate(paths):
            layer = adapted.get(i)
            width = int(np.prod(_lora_shapes(layers[keras_prefix + path])[1]))
            if layer is None:
                parts.append(Part(width))
                continue
            spec = layer._spec(adapter_name)
            a, b = (_numpy(v) for v in layer.adapter_variables(adapter_name))
            r = int(spec["rank"])
            parts.append(Part(width, a.reshape(-1, r).T, b.reshape(r, -1).T, float(spec["alpha"]), bool(spec["use_rslora"])))
            if layer.adapter_magnitude(adapter_name) is not None:
                magnitudes.append(_numpy(layer.adapter_magnitude(adapter_name)).reshape(-1))
        if magnitudes and len(magnitudes) != len(paths):
            raise NotImplementedError(
                f"Adapter {adapter_name!r} puts DoRA on {sorted(keras_prefix + paths[i] for i in adapted)} but not on all "
                f"of {[keras_prefix + p for p in paths]}, which Hugging Face fuses into {module!r}: PEFT's DoRA on "
                "the fused module would rescale the parts without an adapter too. Adapt all of them, or none with DoRA.")
        a, b, r, alpha = fuse(parts, next(iter(rslora)))
        tensors[f"{ROOT}{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{ROOT}{module}.lora_B.weight"] = np.ascontiguousarray(b)
        if magnitudes:
            tensors[f"{ROOT}{module}.lora_magnitude_vector"] = np.concatenate(magnitudes)
        ranks[module], alphas[module] = r, float(alpha)
    if not tensors:
        raise ValueError(f"Received an invalid value for `model`: {model.name!r} has no adapter {adapter_name!r} layers.")
    tensors.update(saved_tensors)
    if len(rslora) > 1:
        raise ValueError("PEFT has one `use_rslora` per adapter; the layers of this adapter disagree.")
    if len(dora) > 1:
        raise ValueError("PEFT has one `use_dora` per adapter; the layers of this adapter disagree (some use DoRA).")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    modules = sorted(ranks)
    all_names = [prefix + hf for hf in module_names(nmap, num_layers)]
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    by_leaf = sorted(n for n in all_names if n.rsplit(".", 1)[-1] in leaves)
    clash = any(u.rsplit(".", 1)[-1] in leaves for u in list(nmap.unsupported) + list(nmap.outer))
    target_modules = leaves if by_leaf == modules and not clash else modules
    dropout = float(config.dropout) if config is not None else 0.0
    adapter_config = {
        "peft_type": "LORA",
        "task_type": nmap.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": rslora.pop(),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "bias": "none",
        "fan_in_fan_out": nmap.conv1d,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": saved_modules or None,
        "ensure_weight_tying": tied,
        "use_dora": dora.pop(),
    }
    return adapter_config, tensors


def save_peft(model, directory: str, adapter_name: str, base_model_name_or_path: Optional[str] = None) -> int:
    """Writes a PEFT directory (see `tf_lora.save_adapter`); returns the bytes written."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"Received an invalid value for `path`, expected a folder path. Received: path={directory!r}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError("Received an invalid value for `base_model_name_or_path`, expected None or a string. "
                        f"Received: base_model_name_or_path={base_model_name_or_path!r}")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"Received an invalid value for `path`: {directory!r} is a file, expected a folder.")
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"Received an invalid value for `path`: folder {parent!r} does not exist.")
    adapter_config, tensors = peft_directory_contents(model, adapter_name, base_model_name_or_path)
    return write_peft_directory(directory, adapter_config, tensors)
