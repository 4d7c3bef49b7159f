"""Memory of the frozen base weights and the adapters, counted from the variables.

Every number comes from the variables' actual dtypes and shapes: a QLoRA layer's base
costs its packed uint8 codes plus its scales, a LoRA layer's base its float kernel.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import keras
import tensorflow as tf


def _nbytes(variable) -> int:
    return math.prod(int(d) for d in variable.shape) * tf.as_dtype(variable.dtype).size


def _adapted_layers(model):
    from tf_lora.adapt import walk
    from tf_lora.layers.lora import LoRALayer

    found = [(model.name, model)] if isinstance(model, LoRALayer) else []
    found += [(path, layer) for path, layer, _ in walk(model) if isinstance(layer, LoRALayer)]
    seen, unique = set(), []
    for path, layer in found:  # a shared layer is counted once
        if id(layer) not in seen:
            seen.add(id(layer))
            unique.append((path, layer))
    return unique


def _layer_row(path: str, layer) -> Dict[str, Any]:
    if hasattr(layer, "storage_variables"):  # QLoRA layers
        storage, params = list(layer.storage_variables()), int(layer.base_parameter_count())
    else:
        storage, params = [layer.kernel], math.prod(int(d) for d in layer.kernel.shape)
    stored = sum(_nbytes(v) for v in storage)
    return {
        "path": path,
        "type": type(layer).__name__,
        "quantized": hasattr(layer, "storage_variables") and not getattr(layer, "fake_quant", False),
        "base_parameters": params,
        "base_float32_bytes": 4 * params,
        "base_stored_bytes": stored,
        "bits_per_parameter": 8.0 * stored / params,
        "adapter_bytes": sum(_nbytes(v) for v in layer.weights if v.name.startswith("lora_")),
        "_ids": {id(v) for v in storage} | {id(v) for v in layer.weights if v.name.startswith("lora_")},
    }


def memory_report(model: keras.layers.Layer) -> Dict[str, Any]:
    """Bytes of the adapted layers' base kernels (float32 vs as stored) and of the adapters.

    Args:
        model: a model returned by `tf_lora.adapt` (or any Keras model / adapter layer).

    Returns:
        A dict with `base_parameters`, `base_float32_bytes` (the adapted kernels as float32),
        `base_stored_bytes` (as stored: NF4 codes and scales for QLoRA layers, the float
        kernel for LoRA layers), `adapter_bytes` (`lora_` variables), `bits_per_parameter`
        (of the 4-bit quantized bases; None without any), `other_bytes` (every other
        variable of `model`: biases, norms, embeddings...), `total_bytes`, and `layers`: one
        dict per adapted layer with `path`, `type`, `quantized`, `base_parameters`,
        `base_float32_bytes`, `base_stored_bytes`, `bits_per_parameter`, `adapter_bytes`.

    Raises:
        TypeError: `model` is not a Keras layer or model.

    Example:
        >>> report = memory_report(model)  # doctest: +SKIP
        >>> report["bits_per_parameter"]    # doctest: +SKIP
        4.127
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"Received an invalid value for `model`, expected a Keras model or layer. "
            f"Received: model={type(model).__name__}"
        )
    rows = [_layer_row(path, layer) for path, layer in _adapted_layers(model)]
    counted = set().union(*(row.pop("_ids") for row in rows))
    quantized = [row for row in rows if row["quantized"]]
    q_params = sum(row["base_parameters"] for row in quantized)
    seen, other = set(), 0
    for v in model.weights:
        if id(v) not in counted and id(v) not in seen:
            seen.add(id(v))
            other += _nbytes(v)
    report: Dict[str, Any] = {
        key: sum(row[key] for row in rows)
        for key in ("base_parameters", "base_float32_bytes", "base_stored_bytes", "adapter_bytes")
    }
    report["bits_per_parameter"] = (
        8.0 * sum(row["base_stored_bytes"] for row in quantized) / q_params if q_params else None
    )
    report["other_bytes"] = other
    report["total_bytes"] = report["base_stored_bytes"] + report["adapter_bytes"] + other
    report["layers"] = rows
    return report


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def print_memory_report(model: keras.layers.Layer) -> Dict[str, Any]:
    """Prints `memory_report(model)` as a table (one row per adapted layer) and returns it.

    Example:
        >>> print_memory_report(model)  # doctest: +SKIP
        layer        type         params   float32    stored  bits/param  adapter
        mha/query    QLoRAEinsumDense 64  256 B  ...
    """
    report = memory_report(model)
    rows: List[tuple] = [
        (r["path"], r["type"], f"{r['base_parameters']:,d}", _size(r["base_float32_bytes"]),
         _size(r["base_stored_bytes"]), f"{r['bits_per_parameter']:.3f}", _size(r["adapter_bytes"]))
        for r in report["layers"]
    ]
    total_bits = 8.0 * report["base_stored_bytes"] / report["base_parameters"] if report["base_parameters"] else 0.0
    rows.append(("total", "", f"{report['base_parameters']:,d}", _size(report["base_float32_bytes"]),
                 _size(report["base_stored_bytes"]), f"{total_bits:.3f}", _size(report["adapter_bytes"])))
    header = ("layer", "type", "base params", "float32", "stored", "bits/param", "adapters")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(  # noqa: E731
        str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    )
    print(line(header))
    print("-" * len(line(header)))
    for row in rows[:-1]:
        print(line(row))
    print("-" * len(line(header)))
    print(line(rows[-1]))
    if report["bits_per_parameter"] is not None:
        print(f"4-bit bases: {report['bits_per_parameter']:.3f} bits per parameter")
    print(f"other weights: {_size(report['other_bytes'])}; model total: {_size(report['total_bytes'])}")
    return report
