"""`LoRALayer`'s merge and unmerge, DoRA magnitudes, and the inits that rewrite the frozen
base (PiSSA, OLoRA, LoftQ): the part of `tf_lora.layers.base.LoRALayer` that computes
kernels in NumPy. "LoRA layout" is (input-side axes..., output-side axes...)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from keras import ops

from tf_lora import variants
from tf_lora.layers import dora
from tf_lora.layers.spec import BASE_REWRITING_INITS, DEFAULT_ADAPTER, _invalid, _scaling


class MergeMixin:
    """Merging, DoRA magnitudes and base-rewriting inits; mixed into `LoRALayer`."""

    # -- DoRA magnitude and base-rewriting inits ----------------------------
    def reset_magnitude(self, name: Optional[str] = None) -> None:
        """Sets DoRA's ``lora_magnitude`` of adapter `name` (default: the active one) to
        ``||W + s A B||``, so that the layer's outputs equal those without DoRA."""
        name = self.active_adapter if name is None else name
        to_lora = lambda k: np.asarray(self._to_lora_layout(k))  # noqa: E731
        norm = dora.np_weight_norm(to_lora(self.base_kernel_value()), to_lora(self.lora_delta(name)),
                                   len(self._lora_shapes[0]))
        self._magnitudes[name].assign(norm)

    def _store_base(self, kernel: np.ndarray) -> None:
        """Replaces the frozen base kernel (QLoRA layers quantize it)."""
        self.kernel.assign(kernel)

    _quant_dequant = None  # QLoRA layers: kernel -> dequantize(quantize(kernel)), what LoftQ alternates with

    def _init_from_source(self, kernel: Any, loftq_iter: int = 1) -> None:
        """Called by `from_layer` once the base is copied: applies a base-rewriting init
        of the default adapter from the source's float `kernel`, then sets the DoRA
        magnitudes to the norm of the adapted kernel."""
        if self.lora_init in BASE_REWRITING_INITS:
            self._rewrite_base(np.asarray(ops.convert_to_numpy(kernel), np.float32), loftq_iter)
        for name in self._magnitudes:
            self.reset_magnitude(name)

    @staticmethod
    def check_rewrite_rank(rank: int, n_in: int, n_out: int, lora_init: str, where: str) -> None:
        """A base-rewriting init splits the (n_in x n_out) kernel matrix: `rank` <= min(n_in, n_out)."""
        if rank > min(n_in, n_out):
            raise ValueError(_invalid("rank", f"at most {min(n_in, n_out)} for init={lora_init!r} on layer "
                                      f"'{where}' (its kernel is a {n_in} x {n_out} matrix)", rank))

    def _rewrite_base(self, kernel: np.ndarray, loftq_iter: int) -> None:
        (in_shape, out_shape), r = self._lora_shapes, self.rank
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        self.check_rewrite_rank(r, n_in, n_out, self.lora_init, self.name)
        to_mat = lambda k: np.asarray(self._to_lora_layout(k)).reshape(n_in, n_out)  # noqa: E731
        from_mat = lambda m: self._delta_to_kernel_layout(np.reshape(m, in_shape + out_shape))  # noqa: E731
        w = to_mat(kernel)
        if self.lora_init == "loftq":
            if self._quant_dequant is None:
                raise ValueError(_invalid("lora_init", f"'loftq' only on a QLoRA (NF4) layer, not {type(self).__name__}",
                                          self.lora_init))
            residual, a, b = variants.loftq(w, r, self.scaling, lambda m: to_mat(self._quant_dequant(from_mat(m))), loftq_iter)
        else:
            residual, a, b = getattr(variants, self.lora_init)(w, r, self.scaling)
        self._store_base(from_mat(residual))
        a, b = a.reshape(in_shape + (r,)), b.reshape((r,) + out_shape)
        for var, value in zip((self.lora_a, self.lora_b, *self._init_pairs[DEFAULT_ADAPTER]), (a, b, a, b)):
            var.assign(value)

    # -- merge / unmerge -------------------------------------------------
    def lora_delta(self, name: Optional[str] = None) -> np.ndarray:
        """``scaling * lora_a @ lora_b`` of adapter `name` (default: the active
        one; zero when none is active) in the kernel's layout, NumPy float32."""
        name = self.active_adapter if name is None else name
        if name is None:
            return np.zeros_like(self.base_kernel_value())
        spec = self._spec(name)
        a, b = (ops.convert_to_numpy(v).astype(np.float32) for v in self.adapter_variables(name))
        delta = np.tensordot(a, b, axes=([a.ndim - 1], [0])) * np.float32(_scaling(spec["rank"], spec["alpha"], spec["use_rslora"]))
        return self._delta_to_kernel_layout(delta)

    def _delta_to_kernel_layout(self, delta: np.ndarray) -> np.ndarray:
        return delta

    # -- layout hooks (DoRA, inits): "LoRA layout" is (input-side axes..., output-side axes...)
    def _to_lora_layout(self, kernel):
        """The kernel (tensor or array) permuted to LoRA layout (a Dense kernel is already)."""
        return kernel

    def _broadcast_out(self, values):
        """`values` shaped like the output-side axes, broadcastable against the outputs."""
        return values

    def _norm_kernel(self):
        """The base kernel DoRA's norm uses, Keras layout (QLoRA: dequantized)."""
        return self.kernel

    def merged_delta(self, name: Optional[str] = None) -> np.ndarray:
        """What a merge adds to the base kernel for adapter `name` (default: the active
        one): `lora_delta`, or with DoRA ``m * (W + dW) / ||W + dW|| - W``."""
        name = self.active_adapter if name is None else name
        delta = self.lora_delta(name)
        magnitude = self._magnitudes.get(name) if name is not None else None
        if magnitude is None:
            return delta
        kernel = self.base_kernel_value()
        to_lora = lambda k: np.asarray(self._to_lora_layout(k))  # noqa: E731
        merged = dora.np_dora_kernel(to_lora(kernel), to_lora(delta), ops.convert_to_numpy(magnitude), len(self._lora_shapes[0]))
        return self._delta_to_kernel_layout(merged) - kernel

    def merged_kernel(self) -> np.ndarray:
        """The kernel a plain layer needs to give this layer's outputs."""
        kernel = self.base_kernel_value()
        return kernel if self.merged or self.active_adapter is None else kernel + self.merged_delta()

    def merge(self) -> None:
        """Folds the active adapter into the frozen kernel: ``scaling * lora_a @ lora_b``,
        or with DoRA the whole ``m * (W + s A B) / ||W + s A B||``."""
        if self.merged:
            raise ValueError(f"Layer '{self.name}' is already merged; call unmerge() first.")
        if self.active_adapter is None:
            raise ValueError(f"Layer '{self.name}' has no active adapter to merge.")
        if self.adapter_magnitude() is not None:
            kernel, delta = self.base_kernel_value(), self.lora_delta()
            norm = dora.np_weight_norm(np.asarray(self._to_lora_layout(kernel)), np.asarray(self._to_lora_layout(delta)),
                                       len(self._lora_shapes[0]))
            object.__setattr__(self, "_dora_merge_norm", norm)
        self.kernel.assign(self.base_kernel_value() + self.merged_delta())
        self.merged = True

    def unmerge(self) -> None:
        """Takes the LoRA update out of the kernel again: ``kernel - scaling * lora_a @ lora_b``.

        For a float kernel this restores it, and the outputs, up to float32
        rounding (the subtraction is not bit-exact). A layer whose forward pass
        transforms its stored kernel states its own bound: for fake-quant
        `QLoRADense` / `QLoRAEinsumDense` with double quantization merge ->
        unmerge is not exact (see their `unmerge`).
        """
        if not self.merged:
            raise ValueError(f"Layer '{self.name}' is not merged; nothing to unmerge.")
        magnitude = self.adapter_magnitude()
        if magnitude is None:
            self.kernel.assign(self.base_kernel_value() - self.lora_delta())
        elif self._dora_merge_norm is None:
            raise NotImplementedError(
                f"Cannot unmerge DoRA layer '{self.name}': the norm ||W + s*A@B|| it was merged with is not "
                "known in this process (merged elsewhere, then saved); rebuild it from the unmerged model.")
        else:  # W = W' * n / m - s A B, with the norm n kept from merge()
            m = ops.convert_to_numpy(magnitude).astype(np.float64)
            ratio = np.where(m != 0, self._dora_merge_norm / np.where(m != 0, m, 1.0), 0.0)
            total = np.asarray(self._to_lora_layout(self.base_kernel_value())) * ratio
            self.kernel.assign(self._delta_to_kernel_layout(total.astype(np.float32)) - self.lora_delta())
            object.__setattr__(self, "_dora_merge_norm", None)
        self.merged = False
