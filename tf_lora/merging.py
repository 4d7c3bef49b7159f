"""Merging adapters across tasks: `add_weighted_adapter`, with PEFT's definitions.

Follows Hugging Face PEFT 0.21's `LoraModel.add_weighted_adapter`
(`peft/tuners/lora/model.py`) and `peft/utils/merge_utils.py`. tf_lora stores
``lora_a`` as (input-side axes..., r) and ``lora_b`` as (r, output-side axes...),
the transposes of PEFT's ``lora_A`` (r, in) and ``lora_B`` (out, r); every method
below is either elementwise or layout-free, so it gives the transposes of PEFT's
results. For adapters ``i`` with weights ``w_i`` and scalings ``s_i = alpha_i / r_i``:

- ``linear``: ``A = sum_i sqrt(w_i s_i) A_i``, ``B = sum_i sqrt(w_i s_i) B_i``
  (PEFT's `task_arithmetic` on A and on B; equal ranks needed).
- ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: the same weights
  ``sqrt(w_i s_i)``, applied by `ties` (magnitude pruning to `density`, sign election,
  disjoint mean), `dare_linear` (random pruning to `density`, rescaled by 1/density, sum),
  `dare_ties` (random pruning + sign election + disjoint mean) and `magnitude_prune`
  (magnitude pruning, sum), each on A and on B separately.
- ``cat``: A = concat_r(w_i s_i A_i), B = concat_r(B_i): exactly ``sum_i w_i ΔW_i`` at
  rank ``sum_i r_i``.
- ``svd``: ``ΔW = sum_i w_i ΔW_i`` (each ΔW_i = s_i A_i B_i), then its top-`svd_rank`
  singular triplets: ``A = U_r``, ``B = S_r V_r^T`` (PEFT puts S on B as well).

The new adapter has ``alpha = rank`` on every layer (scaling 1), as in PEFT. On a model
whose frozen base ``init="pissa"``/``"olora"``/``"loftq"`` rewrote, it computes on that
rewritten base (as every added adapter): `tf_lora.save_adapter` writes it only with
``to_original_base=False``, marked so, and `load_adapter` refuses it on another base.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
from keras import ops

from tf_lora.config import LoRAConfig
from tf_lora.layers.base import _scaling
from tf_lora.multi_adapter import _check

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# ------------------------------------------------------ merge_utils in NumPy ---
def magnitude_pruning(tensor: np.ndarray, density: float) -> np.ndarray:
    """Keeps the ``int(density * size)`` largest-magnitude entries, zeroes the rest."""
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    flat = np.abs(tensor).reshape(-1)
    mask = np.zeros(flat.shape, tensor.dtype)
    if k > 0:
        mask[np.argsort(-flat, kind="stable")[:k]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Keeps each entry with probability `density` and rescales the kept ones by 1/density."""
    if density >= 1:
        return tensor
    mask = (rng.random(tensor.shape) < density).astype(tensor.dtype)
    return tensor * mask / np.asarray(density, tensor.dtype)


def majority_sign_mask(stacked: np.ndarray, method: str = "total") -> np.ndarray:
    """Where each task's sign equals the elected sign (sum, or count of signs; ties -> +)."""
    magnitude = stacked.sum(0) if method == "total" else np.sign(stacked).sum(0)
    return np.sign(stacked) == np.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (weighted * mask).sum(0) / np.maximum(mask.sum(0), 1.0)


def _combine(method: str, tensors, weights, density: float, sign_method: str, rng) -> np.ndarray:
    weights = np.asarray(weights, np.float32).reshape((-1,) + (1,) * tensors[0].ndim)
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_pruning(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [random_pruning(t, density, rng) for t in tensors]
    stacked = np.stack(tensors)
    if method in ("ties", "dare_ties"):
        return disjoint_merge(stacked * weights, majority_sign_mask(stacked, sign_method))
    return (stacked * weights).sum(0)


# ----------------------------------------------------------------- the API ---
def _invalid(name, expected, value):
    return f"Received an invalid value for `{name}`, expected {expected}. Received: {name}={value!r}"


def add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "svd",
    density: Optional[float] = None,
    svd_rank: Optional[int] = None,
    majority_sign_method: str = "total",
    seed: Optional[int] = None,
) -> None:
    """Adds adapter `adapter_name`, a weighted combination of existing `adapters`.

    Args:
        model: a model returned by `tf_lora.adapt` holding `adapters`.
        adapters: names of the adapters to combine (e.g. ``["default", "topic"]``).
        weights: one weight per adapter.
        adapter_name: the new adapter's name (inactive until `set_adapter`).
        combination: ``"linear"``, ``"cat"``, ``"svd"`` (PEFT's default), ``"ties"``,
            ``"dare_linear"``, ``"dare_ties"`` or ``"magnitude_prune"``; see the module
            docstring for the formulas. ``linear`` and the pruning methods need every
            adapter on the same layers with equal ranks (use ``cat`` or ``svd`` otherwise).
        density: fraction of entries kept by the pruning methods, in (0, 1] (required there).
        svd_rank: rank of the ``svd`` result (default: the largest rank combined).
        majority_sign_method: ``"total"`` or ``"frequency"`` (``ties``, ``dare_ties``).
        seed: seed of the DARE random masks (NumPy; PEFT draws them with torch, so masks
            differ from PEFT's for the same seed).

    Raises:
        ValueError / TypeError: bad arguments (each message names the argument); nothing
            changes in the model.

    Example:
        >>> add_weighted_adapter(model, ["default", "topic"], [1.0, 1.0], "both", combination="cat")  # doctest: +SKIP
        >>> set_adapter(model, "both")                                                                   # doctest: +SKIP
    """
    _check(model, adapter_name, must_exist=False)
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(_invalid("adapters", "a non-empty list of adapter names", adapters))
    for name in adapters:
        _check(model, name)
    if len(set(adapters)) != len(adapters):
        raise ValueError(_invalid("adapters", "distinct adapter names", adapters))
    if not isinstance(weights, (list, tuple, np.ndarray)) or len(weights) != len(adapters):
        raise ValueError(_invalid("weights", f"{len(adapters)} numbers, one per adapter", weights))
    if not all(isinstance(w, (int, float, np.floating)) and not isinstance(w, bool) and np.isfinite(w) for w in weights):
        raise ValueError(_invalid("weights", "finite numbers", weights))
    if combination not in COMBINATIONS:
        raise ValueError(_invalid("combination", f"one of {COMBINATIONS}", combination))
    if combination in _DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(_invalid("density", f"a number in (0, 1] for combination={combination!r}", density))
    elif density is not None:
        raise ValueError(_invalid("density", f"None: combination={combination!r} does not prune", density))
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(_invalid("majority_sign_method", "'total' or 'frequency'", majority_sign_method))
    if svd_rank is not None and (combination != "svd" or not isinstance(svd_rank, int) or isinstance(svd_rank, bool)
                                 or svd_rank <= 0):
        raise ValueError(_invalid("svd_rank", "a positive integer, with combination='svd'", svd_rank))
    if len(adapters) == 1 and combination != "svd":
        combination = "linear"  # as PEFT: one adapter is a plain rescale

    plan = []  # (path, layer, new rank, new a, new b), computed before anything changes
    rng = np.random.default_rng(seed)
    for path, layer in model.adapter_layers():
        present = [(n, float(w)) for n, w in zip(adapters, weights) if n in layer.adapter_names]
        if not present:
            continue
        if getattr(layer, "merged", False):
            raise ValueError(f"Layer {path!r} is merged; unmerge it before combining adapters.")
        if any(layer._spec(n).get("use_dora") for n, _ in present):
            raise NotImplementedError(f"Layer {path!r}: combining DoRA adapters (their magnitudes) is not supported.")
        specs = {n: layer._spec(n) for n, _ in present}
        factors = {n: [ops.convert_to_numpy(v).astype(np.float32) for v in layer.adapter_variables(n)] for n, _ in present}
        scalings = {n: _scaling(specs[n]["rank"], specs[n]["alpha"], specs[n]["use_rslora"]) for n, _ in present}
        ranks = {n: specs[n]["rank"] for n, _ in present}
        if combination in _SAME_RANK:
            missing = [n for n in adapters if n not in layer.adapter_names]
            if missing or len(set(ranks.values())) != 1:
                raise ValueError(
                    f"Received combination={combination!r}, which needs every adapter on the same layers with equal "
                    f"ranks; at layer {path!r} the ranks are {ranks}" + (f" and {missing} are absent" if missing else "")
                    + ". Use combination='cat' (rank = the sum) or 'svd' instead."
                )
            ws = [np.sqrt(w * scalings[n]) if w * scalings[n] >= 0 else np.nan for n, w in present]
            if any(np.isnan(ws)):
                raise ValueError(_invalid("weights", f"non-negative weights for combination={combination!r} "
                                          "(PEFT takes sqrt(weight * scaling))", weights))
            a = _combine(combination, [factors[n][0] for n, _ in present], ws, density or 1.0, majority_sign_method, rng)
            b = _combine(combination, [factors[n][1] for n, _ in present], ws, density or 1.0, majority_sign_method, rng)
            rank = next(iter(ranks.values()))
        elif combination == "cat":
            a = np.concatenate([factors[n][0] * np.float32(w * scalings[n]) for n, w in present], axis=-1)
            b = np.concatenate([factors[n][1] for n, _ in present], axis=0)
            rank = sum(ranks.values())
        else:  # svd
            a0 = factors[present[0][0]][0]
            in_shape, out_shape = a0.shape[:-1], factors[present[0][0]][1].shape[1:]
            delta = sum(np.float32(w * scalings[n]) * (factors[n][0].reshape(-1, ranks[n]) @
                                                       factors[n][1].reshape(ranks[n], -1)) for n, w in present)
            rank = min(svd_rank or max(ranks.values()), *delta.shape)
            u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
            a = u[:, :rank].astype(np.float32).reshape(in_shape + (rank,))
            b = (s[:rank, None] * vt[:rank]).astype(np.float32).reshape((rank,) + out_shape)
        plan.append((path, layer, rank, a.astype(np.float32), b.astype(np.float32), specs[present[0][0]]["dropout"]))
    if not plan:
        raise ValueError(_invalid("adapters", "adapters present on at least one layer", adapters))

    paths = [re.escape(path) for path, *_ in plan]
    ranks = {re.escape(path): rank for path, _, rank, *_ in plan}
    config = LoRAConfig(
        rank=max(ranks.values()), alpha=float(max(ranks.values())), dropout=plan[0][5],
        target_modules="|".join(paths), rank_pattern=ranks, alpha_pattern={k: float(v) for k, v in ranks.items()},
    )
    for path, layer, rank, a, b, dropout in plan:
        layer.add_adapter(adapter_name, rank=rank, alpha=float(rank), dropout=dropout)
        new_a, new_b = layer.adapter_variables(adapter_name)
        new_a.assign(a)
        new_b.assign(b)
    model._adapter_configs[adapter_name] = config
    model.reset_compiled_functions()
