"""DoRA math (Liu et al. 2024), as PEFT's `peft/tuners/lora/dora.py` `DoraLinearLayer`.

The adapted kernel is ``W' = m * (W + s A B) / ||W + s A B||``: the norm is taken per
output unit over the kernel's input-side axes and `m` (``lora_magnitude``, shaped like
the output-side axes) starts at ``||W||``. `LoRALayer.call` never forms `W'`; it adds

    y = x W + (m / n - 1) * (x W) + (m / n) * s * (x A) B,      n = stop_gradient(||W + s A B||)

to the bias (PEFT's ``result_dora``), so the gradient treats the norm as a constant
(paper section 4.3, PEFT's ``weight_norm.detach()``). Forming ``W + s A B`` for the norm
costs one kernel-sized product per step (as in PEFT), which plain LoRA avoids.

The functions here take kernels in "LoRA layout": input-side axes first, then the
output-side axes (a Dense kernel as is; `LoRAEinsumDense` permutes its kernel).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from tf_lora import _compat


def _float32(value):
    # Variables are read in float32 also under a mixed-precision policy (Keras would cast them
    # to the compute dtype inside a layer call): m and ||W|| are float32 as `reset_magnitude` makes them.
    return ops.cast(_compat.unscaled_value(value), "float32")


def weight_norm(kernel, lora_a, lora_b, scaling: float, n_in: int):
    """``||kernel + scaling * lora_a @ lora_b||`` over the first `n_in` axes, float32,
    under stop_gradient (a constant for the backward pass)."""
    total = _float32(kernel) + scaling * ops.tensordot(_float32(lora_a), _float32(lora_b), axes=1)
    norm = ops.sqrt(ops.sum(ops.square(total), axis=tuple(range(n_in))))
    return ops.stop_gradient(norm)


def magnitude_scale(magnitude, norm):
    """``m / n`` (float32); a zero column (n == 0) gives 0 rather than NaN."""
    norm = ops.cast(norm, "float32")
    safe = ops.where(norm > 0, norm, ops.ones_like(norm))
    return ops.where(norm > 0, _float32(magnitude) / safe, ops.zeros_like(norm))


def add_update(outputs, base, lora_update, scale):
    """``outputs + (m/n - 1) * base + (m/n) * lora_update``, with `scale` = m/n.

    Computed in float32 and cast to the outputs' dtype once, as PEFT's ``result_dora``
    under autocast: in bfloat16, m/n = 1.002 would round to 1 (the spacing there is
    2**-7) and the ``- 1`` would then drop the magnitude's change altogether.
    """
    total = (ops.cast(outputs, "float32") + (scale - 1.0) * ops.cast(base, "float32")
             + scale * ops.cast(lora_update, "float32"))
    return ops.cast(total, outputs.dtype)


def np_weight_norm(kernel: np.ndarray, delta: np.ndarray, n_in: int) -> np.ndarray:
    """NumPy ``||kernel + delta||`` over the first `n_in` axes (float64 sums, float32 result)."""
    total = kernel.astype(np.float64) + delta
    return np.sqrt(np.sum(np.square(total), axis=tuple(range(n_in)))).astype(np.float32)


def np_dora_kernel(kernel: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, n_in: int) -> np.ndarray:
    """``m * (kernel + delta) / ||kernel + delta||``: the plain kernel a merge gives."""
    total = kernel.astype(np.float64) + delta
    norm = np.sqrt(np.sum(np.square(total), axis=tuple(range(n_in))))
    scale = np.where(norm > 0, magnitude / np.where(norm > 0, norm, 1.0), 0.0)
    return (total * scale).astype(np.float32)
