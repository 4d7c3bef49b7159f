"""Adapter initializations that rewrite the frozen base: PiSSA, OLoRA, LoftQ (pure NumPy).

Every function works on the kernel as a matrix ``W`` of shape (in, out) (Keras' layout;
an EinsumDense kernel is first permuted to (input-side axes, output-side axes) and
reshaped) and returns ``(residual, A, B)`` with ``A`` (in, r), ``B`` (r, out) such that
``residual + s * A @ B`` is (approximately, for LoftQ) ``W``. The layer then stores
`residual` as its frozen base, so its outputs equal the base model's at init.

Sources (PEFT 0.21): `peft/tuners/lora/layer.py` `LoraLayer.pissa_init` and `olora_init`,
`peft/utils/loftq_utils.py` `loftq_init` and `_low_rank_decomposition`. PEFT stores
``lora_A`` (r, in) and ``lora_B`` (out, r) of the torch weight (out, in); the factors here
are their transposes.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np


def _svd_factors(matrix: np.ndarray, rank: int, scaling: float) -> Tuple[np.ndarray, np.ndarray]:
    """``A, B`` with ``scaling * A @ B`` the best rank-`rank` approximation of `matrix`:
    ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) V_r^T`` (the singular values are split
    evenly and divided by the scaling, as PEFT's `pissa_init` does with ``Sr /= scaling``)."""
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank] / scaling)
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def pissa(w: np.ndarray, rank: int, scaling: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PiSSA (Meng et al. 2024): the principal singular components become the adapter.

    ``W = U S V^T``; ``A = U_r sqrt(S_r/s)``, ``B = sqrt(S_r/s) V_r^T``, so
    ``s A B = U_r S_r V_r^T``, and the residual is ``W - s A B`` (the minor components).
    """
    a, b = _svd_factors(w, rank, scaling)
    return (w.astype(np.float64) - scaling * (a.astype(np.float64) @ b)).astype(np.float32), a, b


def olora(w: np.ndarray, rank: int, scaling: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLoRA (Büyükakyüz 2024), as PEFT's `olora_init`: QR of the torch weight ``W^T = Q R``;
    ``lora_B = Q[:, :r]``, ``lora_A = R[:r]`` (no division by the scaling), residual
    ``W - s (Q_r R_r)^T``. Here ``A = R_r^T`` (in, r), ``B = Q_r^T`` (r, out)."""
    q, r = np.linalg.qr(w.T.astype(np.float64))
    a, b = r[:rank].T.astype(np.float32), q[:, :rank].T.astype(np.float32)
    return (w.astype(np.float64) - scaling * (a.astype(np.float64) @ b)).astype(np.float32), a, b


def loftq(w: np.ndarray, rank: int, scaling: float, quant_dequant: Callable[[np.ndarray], np.ndarray],
          num_iter: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LoftQ (Li et al. 2023), as PEFT's `loftq_init` but with the scaling included.

    Starting from ``R = W``, each iteration quantizes ``R`` (``Q = quant_dequant(R)``) and
    fits ``s A B`` to the quantization error ``W - Q`` by a rank-r SVD; the next
    iteration quantizes ``R = W - s A B``. Returns ``(R, A, B)`` of the last iteration:
    the layer stores NF4(R), which dequantizes to the last `Q`, and
    ``||W - (Q + s A B)||`` is the SVD tail of ``W - Q``, below plain NF4's ``||W - NF4(W)||``
    already at ``num_iter=1``. PEFT assigns ``A, B = R, L`` of ``_low_rank_decomposition``
    without dividing by the scaling, which is right only for ``alpha == r``.
    """
    target = w.astype(np.float64)
    residual = w.astype(np.float32)
    for i in range(num_iter):
        error = target - quant_dequant(residual).astype(np.float64)
        a, b = _svd_factors(error, rank, scaling)
        if i + 1 == num_iter:
            break
        residual = (target - scaling * (a.astype(np.float64) @ b)).astype(np.float32)
    return residual, a, b


def to_original_base(a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray,
                     rank_axis_a: int = -1) -> Tuple[np.ndarray, np.ndarray]:
    """The rank-2r pair ``[A | A0], [B ; -B0]``, whose update ``s (A B - A0 B0)`` is what
    training added to a base rewritten by PiSSA/OLoRA/LoftQ (``W = W_res + s A0 B0``), so it
    applies to the original `W` (PEFT's `LoraModel.subtract_mutated_init`). With the rank
    doubled, alpha doubles too (``sqrt(2)`` times with rsLoRA) to keep the scaling."""
    return np.concatenate([a, a0], axis=rank_axis_a), np.concatenate([b, -b0], axis=0)
