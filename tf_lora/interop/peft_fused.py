"""One PEFT LoRA on a fused projection <-> LoRAs on the KerasHub layers it is split into.

GPT-2's ``attn.c_attn`` is one Conv1D whose output rows ``[:h]``, ``[h:2h]``, ``[2h:]`` are the
query, key and value that KerasHub keeps as three EinsumDense layers. A PEFT LoRA on it is
one ``A`` (r, in) and one ``B`` (3h, r): ``delta = s * B A``.

Import (exact): part i gets ``lora_a = A`` (the same values in each part) and ``lora_b`` =
its rows ``B[i]`` of ``B``, rank r, the same alpha: ``s * B[i] A`` is exactly the fused
delta's rows. DoRA's ``lora_magnitude_vector`` (one per output row) splits the same way, and
so does the weight norm PEFT divides by (per output row). Only LoRA dropout differs in
training: PEFT draws one mask for the fused input, tf_lora one per part.

Export (`fuse`): parts that share ``A``, rank and scaling (as after an import) are written
as one rank-r adapter, ``B`` their stacked ``B[i]``: the file PEFT wrote, bit for bit.
Otherwise (independent ``A_i``, ranks ``r_i``, scalings ``s_i``, parts left out) the fused
adapter has rank ``R = sum r_i``: ``A`` the stacked ``A_i`` and ``B`` block diagonal with
``B[i] * s_i / s``, where ``s`` is the first part's scaling, written through the module's
alpha (``s * R``, or ``s * sqrt(R)`` with rsLoRA). ``s B A`` then has exactly the rows
``s_i B[i] A_i`` (zeros for a part left out): exact up to the float rounding of
``s_i / s``, at the price of a rank-R adapter (PEFT stores R x (in + 3h) numbers instead
of the parts' own). Pure NumPy; knows nothing of Keras.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np


class Part:
    """One part's adapter in torch layout: `a` (r, in), `b` (out, r) and its alpha, or `a` None for a
    part without an adapter (then only `width`, its output size, is used)."""

    def __init__(self, width: int, a: Optional[np.ndarray] = None, b: Optional[np.ndarray] = None,
                 alpha: float = 0.0, use_rslora: bool = False):
        self.width, self.a, self.b, self.alpha = width, a, b, alpha
        self.scaling = scaling(alpha, a.shape[0], use_rslora) if a is not None else 0.0


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def fuse(parts: Sequence[Part], use_rslora: bool) -> Tuple[np.ndarray, np.ndarray, int, float]:
    """``(A (R, in), B (sum of widths, R), R, alpha)`` of the one fused PEFT adapter equal to `parts`.

    Args:
        parts: The parts in the fused module's row order; at least one has an adapter.
        use_rslora: Whether PEFT scales by ``alpha / sqrt(R)``.

    Returns:
        The fused factors in torch layout, the rank and the alpha that gives the scaling.
    """
    present: List[Part] = [p for p in parts if p.a is not None]
    first = present[0]
    rank = first.a.shape[0]
    shared = len(present) == len(parts) and all(
        p.a.shape == first.a.shape and np.array_equal(p.a, first.a) and p.scaling == first.scaling for p in parts)
    if shared:
        return first.a, np.concatenate([p.b for p in parts], axis=0), rank, first.alpha
    total = sum(p.a.shape[0] for p in present)
    alpha = first.scaling * (math.sqrt(total) if use_rslora else total)
    s = scaling(alpha, total, use_rslora)
    a = np.concatenate([p.a for p in present], axis=0)
    b = np.zeros((sum(p.width for p in parts), total), np.float32)
    row = col = 0
    for p in parts:
        if p.a is not None:
            r = p.a.shape[0]
            b[row : row + p.width, col : col + r] = (p.b.astype(np.float64) * (p.scaling / s)).astype(np.float32)
            col += r
        row += p.width
    return a, b, total, alpha
