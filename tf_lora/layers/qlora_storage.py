"""How QLoRA layers store their frozen base kernel in NF4: layout, build, writes, merge rules.

`_NF4Storage` is the storage half of qlora.py's `_NF4Base` (the other half dequantizes and
computes). It keeps the packed codes and group scales of `nf4.quantize` as non-trainable
variables (or, with ``QLoRAConfig(fake_quant=True)``, a float `kernel`).

Layout: NF4 groups are runs of `group_size` consecutive elements of the torch-layout weight
flattened row-major, as bitsandbytes cuts them. Which torch weight a kernel stands for:

- by default the kernel with its last axis moved first, (out, ...): torch's ``nn.Linear``
  weight (out, in) for a Dense kernel (in, out), and the table (vocab, dim) for embeddings;
- for `QLoRAEinsumDense` (``nf4_layout="linear"``, the default) the ``nn.Linear`` weight the einsum equals: (out_features, in_features), where the
  in-features are the kernel's axes contracted with the input and the out-features its axes
  passed to the output, each flattened in kernel order. That is the matrix a LoRA update
  ``lora_a @ lora_b`` of the layer lives in, and Hugging Face's weight for every KerasHub
  attention projection: query/key/value kernels (hidden, heads, head_dim) or
  (heads, hidden, head_dim) are q/k/v_proj (heads*head_dim, hidden), attention_output kernels
  (heads, head_dim, hidden) are o_proj (hidden, heads*head_dim). Layers saved before this
  layout have no ``nf4_layout`` in their config and load with ``"last_axis_first"`` (the kernel's
  last axis first, as above), so old `.keras` files keep their stored codes' meaning.

The layer's `nf4_tensor()` is the `nf4.NF4Tensor` of that weight in Keras orientation
(``shape`` = kernel shape by default, (in_features, out_features) for the linear layout), so
`nf4.to_bitsandbytes(layer.nf4_tensor())` is bitsandbytes' state of the equivalent Linear.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lora import nf4
from tf_lora.config import QLoRAConfig
from tf_lora.layers.lora import _invalid

NF4_LAYOUTS = ("linear", "last_axis_first")


def _as_quantization(quantization: Any) -> QLoRAConfig:
    if quantization is None:
        return QLoRAConfig()
    if isinstance(quantization, QLoRAConfig):
        return quantization
    if isinstance(quantization, Mapping):
        return QLoRAConfig.from_dict(quantization)
    raise TypeError(_invalid("quantization", "a tf_lora.QLoRAConfig, its to_dict() or None", quantization))


class _MatrixView:
    """The (in_features, out_features) matrix of a kernel tensor or variable, read lazily.

    ``view[..., o0:o1]`` reads only the kernel slice holding those output columns, so
    `nf4.quantize` (which reads its input a slice of output units at a time) never holds a
    second full-size float copy of the kernel.
    """

    def __init__(self, kernel: Any, perm: Tuple[int, ...], n_in: int):
        self._kernel, self._perm, self._ndim = kernel, perm, len(perm)
        dims = [int(kernel.shape[i]) for i in perm]
        self._axis = perm[n_in]  # the first output axis: slices are taken along it
        self._inner = math.prod(dims[n_in + 1:])
        self._rows = math.prod(dims[:n_in])
        self.shape = (self._rows, math.prod(dims[n_in:]))

    def __getitem__(self, key):
        if key == (0, 0):  # `nf4._slicer` probes the dtype
            return self._kernel[(0,) * self._ndim]
        o0, o1 = key[-1].start, key[-1].stop  # (..., slice(o0, o1))
        a0, a1 = o0 // self._inner, -(-o1 // self._inner)
        block = np.asarray(self._kernel[(slice(None),) * self._axis + (slice(a0, a1),)])
        block = np.transpose(block, self._perm).reshape(self._rows, -1)
        return block[:, o0 - a0 * self._inner:o1 - a0 * self._inner]


class _NF4Storage:
    """NF4 storage of the base kernel: replaces the parents' float `_build_kernel`.

    Subclasses choose the torch weight the codes flatten through `_linear_layout`.
    """

    @classmethod
    def from_layer(cls, layer, quantization: Union[QLoRAConfig, Mapping, None] = None, rank: int = 8,
                   alpha: float = 32.0, dropout: float = 0.0, use_rslora: bool = False,
                   lora_init: str = "he_uniform", **kwargs):
        """A built adapter with `layer`'s name, dtype policy, bias and NF4-quantized kernel
        (or table), for every QLoRA class: the float class's `from_layer` plus `quantization`.

        `layer` is not modified. Raises `ValueError` naming the layer if its kernel holds NaN/Inf.
        """
        return super().from_layer(
            layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            lora_init=lora_init, quantization=_as_quantization(quantization), **kwargs,
        )

    def __init__(self, *args, quantization: Union[QLoRAConfig, Mapping, None] = None, **kwargs):
        quantization = _as_quantization(quantization)
        super().__init__(*args, **kwargs)
        self.quantization = quantization
        if self.merged and not self.quantization.fake_quant:
            raise NotImplementedError(
                f"Received merged=True for layer '{self.name}' with 4-bit storage: an NF4 base "
                "cannot hold a merged LoRA update. Use QLoRAConfig(fake_quant=True) or tf_lora.merge()."
            )
        self.kernel_shape = None

    @property
    def fake_quant(self) -> bool:
        return self.quantization.fake_quant

    def _build_kernel(self, kernel_shape) -> None:
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        # autocast=False: the scales (and the fake-quant kernel) are read in float32
        # under mixed precision; the result is cast to the compute dtype once.
        if self.fake_quant:
            self.kernel = self.add_weight(
                name="kernel", shape=self.kernel_shape, initializer=self.kernel_initializer,
                constraint=self.kernel_constraint, trainable=False, autocast=False,
            )
            return
        n, cfg = math.prod(self.kernel_shape), self.quantization
        groups = -(-n // cfg.group_size)
        add = lambda name, shape, dtype: self.add_weight(  # noqa: E731
            name=name, shape=shape, dtype=dtype, initializer="zeros", trainable=False, autocast=False
        )
        self.nf4_codes = add("nf4_codes", ((n + 1) // 2,), "uint8")
        self.nf4_absmax = add("nf4_absmax", (groups,), "uint8" if cfg.double_quant else "float32")
        if cfg.double_quant:
            nested = -(-groups // nf4.NESTED_GROUP_SIZE)
            self.nf4_nested_scale = add("nf4_nested_scale", (nested,), "float32")
            self.nf4_offset = add("nf4_offset", (), "float32")

    # -- layout: which torch weight the NF4 groups flatten -------------------
    def _linear_layout(self) -> Optional[Tuple[Tuple[int, ...], int]]:
        """``(perm, n_in)``: the kernel's axes in the order (in-features..., out-features...)
        and how many are in-features; None: the kernel's last axis is the output (default)."""
        return None

    def _matrix_shape(self) -> tuple:
        """The `nf4.NF4Tensor` shape: (in_features, out_features), or the kernel shape."""
        layout = self._linear_layout()
        if layout is None:
            return self.kernel_shape
        dims = [self.kernel_shape[i] for i in layout[0]]
        return (math.prod(dims[:layout[1]]), math.prod(dims[layout[1]:]))

    def _torch_axes(self, ndim: Optional[int] = None) -> List[int]:
        """Kernel axes in the order of the torch-layout weight (out..., in...)."""
        layout, ndim = self._linear_layout(), ndim or len(self.kernel_shape)
        if layout is None:
            return [ndim - 1, *range(ndim - 1)]
        perm, n_in = layout
        return [*perm[n_in:], *perm[:n_in]]

    def _torch_shape(self) -> List[int]:
        """The dequantized kernel's shape in torch layout (before flattening to (out, in))."""
        return [self.kernel_shape[i] for i in self._torch_axes()]

    def _torch_to_kernel_perm(self) -> List[int]:
        """``tf.transpose`` permutation from `_torch_shape` back to the kernel layout."""
        axes = self._torch_axes()
        return [axes.index(i) for i in range(len(axes))]

    def _to_matrix(self, kernel: Any) -> Any:
        """Kernel (array, tensor or variable) -> what `nf4.quantize` reads (lazily for tensors)."""
        layout = self._linear_layout()
        if layout is None:
            return kernel
        if isinstance(kernel, np.ndarray):
            return np.transpose(kernel, layout[0]).reshape(self._matrix_shape())
        return _MatrixView(kernel, layout[0], layout[1])

    def _from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of `_to_matrix` for NumPy arrays."""
        layout = self._linear_layout()
        if layout is None:
            return matrix
        perm = layout[0]
        return np.transpose(np.reshape(matrix, [self.kernel_shape[i] for i in perm]), np.argsort(perm))

    def _fake_quant(self, kernel: tf.Tensor) -> tf.Tensor:
        """`nf4.fake_quant` of a Keras-layout kernel tensor with this layer's groups."""
        cfg, layout = self.quantization, self._linear_layout()
        if layout is None:
            return nf4.fake_quant(kernel, cfg.group_size, cfg.double_quant)
        perm = list(layout[0])
        matrix = tf.reshape(tf.transpose(kernel, perm), self._matrix_shape())
        matrix = nf4.fake_quant(matrix, cfg.group_size, cfg.double_quant)
        return tf.transpose(tf.reshape(matrix, [self.kernel_shape[i] for i in perm]), np.argsort(perm).tolist())

    # -- the stored kernel ----------------------------------------------------
    def storage_variables(self) -> List[keras.Variable]:
        """The variables holding the frozen base kernel (4-bit codes and scales)."""
        if self.fake_quant:
            return [self.kernel]
        names = ("codes", "absmax") + (("nested_scale", "offset") if self.quantization.double_quant else ())
        return [getattr(self, f"nf4_{name}") for name in names]

    def base_parameter_count(self) -> int:
        """Number of base kernel parameters `storage_variables` represent."""
        return math.prod(self.kernel_shape)

    def nf4_tensor(self) -> nf4.NF4Tensor:
        """The stored 4-bit kernel as an `nf4.NF4Tensor` of NumPy arrays: of the kernel, or for
        `QLoRAEinsumDense` of its (in_features, out_features) matrix (see the module docstring)."""
        if self.fake_quant:
            raise NotImplementedError(f"Layer '{self.name}' uses fake_quant: it stores a float kernel, not NF4 codes.")
        arrays = {v.name[len("nf4_"):]: ops.convert_to_numpy(v) for v in self.storage_variables()}
        cfg = self.quantization
        return nf4.NF4Tensor.from_dict(
            {**arrays, "shape": self._matrix_shape(), "group_size": cfg.group_size, "double_quant": cfg.double_quant}
        )

    def _store_base(self, kernel: np.ndarray) -> None:
        self._set_base_kernel(kernel, self.name)

    def _quant_dequant(self, kernel: np.ndarray) -> np.ndarray:
        """``dequantize(quantize(kernel))`` with this layer's NF4 settings (LoftQ alternates with it)."""
        cfg = self.quantization
        q = nf4.quantize(self._to_matrix(kernel), cfg.group_size, cfg.double_quant, name=self.name)
        return self._from_matrix(ops.convert_to_numpy(nf4.dequantize(q)))

    def base_kernel_value(self) -> np.ndarray:
        """The base kernel the layer computes with, float32 NumPy in Keras layout."""
        if not self.fake_quant:
            return self._from_matrix(ops.convert_to_numpy(nf4.dequantize(self.nf4_tensor())))
        kernel = ops.convert_to_numpy(self.kernel).astype(np.float32)
        if self.merged:
            return kernel
        return ops.convert_to_numpy(self._fake_quant(kernel))

    def _set_base_kernel(self, kernel: Any, source_name: str) -> None:
        """`kernel`: an array, tensor or variable (`nf4.quantize` reads it a slice at a time)."""
        if not self.fake_quant:
            cfg = self.quantization
            q = nf4.quantize(self._to_matrix(kernel), cfg.group_size, cfg.double_quant, name=source_name)
            for var in self.storage_variables():
                var.assign(q.arrays[var.name[len("nf4_"):]])
            return
        kernel = np.asarray(kernel)
        if kernel.dtype.kind == "f" and not np.isfinite(kernel).all():
            raise ValueError(
                f"Cannot quantize the kernel of layer '{source_name}': it contains "
                f"{int(kernel.size - np.isfinite(kernel).sum())} NaN or Inf values."
            )
        self.kernel.assign(kernel)

    def _copy_base_weights(self, layer) -> None:
        # The variable itself, not a NumPy copy: quantizing reads it a slice at a time.
        self._set_base_kernel(layer.kernel, layer.name)
        if self.bias is not None:
            self.bias.assign(ops.convert_to_numpy(layer.bias))

    # -- merge -----------------------------------------------------------
    def _no_merge(self, what: str) -> None:
        if not self.fake_quant:
            raise NotImplementedError(
                f"Cannot {what} layer '{self.name}': its base kernel is stored in NF4 (4 bits), "
                "which cannot hold the LoRA update exactly. Use `tf_lora.merge(model)` for a plain "
                "float model with the dequantized kernel plus the LoRA update (or "
                "QLoRAConfig(fake_quant=True), whose float kernel can be merged in place)."
            )

    def merge(self) -> None:
        """Folds the LoRA update into the kernel: only in `fake_quant` mode.

        The merged kernel is ``fake_quant(kernel) + scaling * lora_a @ lora_b`` and is used
        as is (not quantized again); `unmerge` leaves the fake-quantized kernel, which with
        double quantization does not give the pre-merge outputs exactly (see `unmerge`).

        Raises:
            NotImplementedError: with 4-bit storage; use `tf_lora.merge(model)` instead.
        """
        self._no_merge("merge")
        super().merge()

    def unmerge(self) -> None:
        """Takes the LoRA update out of a merged `fake_quant` kernel; exact only without double quantization.

        The float kernel afterwards is ``fake_quant(W)`` (up to float32 rounding), not
        the original `W`, and the forward pass fake-quantizes it again. Without double
        quantization NF4 is idempotent, so the outputs are restored up to float32
        rounding. With it (the default) they are not: the group scales are quantized
        to 8 bits a second time, around a new mean, so each element of the kernel the
        layer computes with moves by at most half a step of the 8-bit scale code,
        ``0.5 * max(diff(nf4.DYNAMIC_MAP)) * nested_scale`` (about 0.007 times the
        nested scale of its block of 256 groups), per merge/unmerge cycle. That is a
        worst case; typically the move is ~1e-4 of the group's scale, but it repeats
        in the same direction, so cycles accumulate. To switch adapters without this
        drift, do not merge in place; use `tf_lora.merge(model)` for a merged copy.

        Raises:
            NotImplementedError: with 4-bit storage (nothing to unmerge).
        """
        self._no_merge("unmerge")
        super().unmerge()

    def get_config(self) -> dict:
        config = super().get_config()
        config["quantization"] = self.quantization.to_dict()
        return config


class _EinsumLinearLayout:
    """`QLoRAEinsumDense`'s choice of layout (``nf4_layout``, see the module docstring)."""

    def __init__(self, equation: str, output_shape: Any, *args, nf4_layout: str = "linear", **kwargs):
        if nf4_layout not in NF4_LAYOUTS:
            raise ValueError(_invalid("nf4_layout", f"one of {NF4_LAYOUTS}", nf4_layout))
        super().__init__(equation, output_shape, *args, **kwargs)
        self.nf4_layout = nf4_layout

    def _linear_layout(self):
        if self.nf4_layout != "linear":
            return None
        k_sub = self._k_sub
        return tuple(k_sub.index(c) for c in self._in_axes + self._out_axes), len(self._in_axes)

    def get_config(self) -> dict:
        return {**super().get_config(), "nf4_layout": self.nf4_layout}

    @classmethod
    def from_config(cls, config: dict):
        # A config without `nf4_layout` was saved before the linear layout existed.
        return super().from_config({"nf4_layout": "last_axis_first", **config})
