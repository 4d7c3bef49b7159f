"""QLoRA (NF4 base) versions of the embedding and conv adapters, on qlora.py's `_NF4Base`.

Conv: the kernel (k..., in, out) is stored in `qlora_storage`'s default layout (groups over
the kernel with its last axis moved first, (out, k..., in)); `call` dequantizes it and
moves the output axis back (one transpose per step) before the convolution.

Embedding: the table (vocab, dim) is stored row-major, i.e. in the layout
bitsandbytes' ``Embedding4bit`` and torch's ``nn.Embedding`` use (`_NF4Base` gets
the transposed table as its "kernel", whose torch layout is the table itself).
The lookup dequantizes only the looked-up rows (gathers of their codes and group
scales, equal to the full dequantization's values), so no float table exists in
a step; the tied ``reverse=True`` projection of `QLoRAReversibleEmbedding` needs
the whole table and dequantizes it, as `QLoRADense` does its kernel.
``QLoRAConfig(fake_quant=True)`` is not supported for embeddings (NotImplementedError).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lora import nf4
from tf_lora.layers.conv import LoRAConv1D, LoRAConv2D, LoRAConv3D
from tf_lora.layers.embedding import LoRAEmbedding, LoRAReversibleEmbedding
from tf_lora.layers.qlora import _CODEBOOK, _DYNAMIC_MAP, _NF4Base


class _QLoRAConv(_NF4Base):
    """NF4 storage for the conv adapters."""

    def _base_call(self, inputs):
        kernel, torch_layout = self._base_kernel()
        if torch_layout:  # (out, k..., in) -> the conv layout (k..., in, out)
            kernel = tf.transpose(kernel, [*range(1, len(self.kernel_shape)), 0])
        return self._cast_out(self._conv(self._cast_in(inputs), kernel))


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRAConv1D(_QLoRAConv, LoRAConv1D):
    """`LoRAConv1D` whose frozen kernel is stored in NF4."""


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRAConv2D(_QLoRAConv, LoRAConv2D):
    """`LoRAConv2D` whose frozen kernel is stored in NF4.

    Example:
        >>> conv = keras.layers.Conv2D(8, 3); conv.build((None, 8, 8, 4))
        >>> layer = QLoRAConv2D.from_layer(conv, rank=2)
        >>> layer(np.ones((1, 8, 8, 4), "float32")).shape
        (1, 6, 6, 8)
    """


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRAConv3D(_QLoRAConv, LoRAConv3D):
    """`LoRAConv3D` whose frozen kernel is stored in NF4."""


class _QLoRATable(_NF4Base):
    """NF4 storage for the embedding adapters: the table row-major, rows dequantized on lookup."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.quantization.fake_quant:
            raise NotImplementedError(
                f"Received QLoRAConfig(fake_quant=True) for embedding layer '{self.name}': fake-quant "
                "mode is supported for Dense, EinsumDense and conv layers, not embeddings."
            )

    def _build_kernel(self, table_shape) -> None:
        vocab, dim = table_shape
        super()._build_kernel((dim, vocab))  # its torch layout (vocab, dim) is the table, row-major

    @property
    def embeddings(self) -> tf.Tensor:
        """The dequantized (vocab, dim) table, float32 (a tensor, not a variable)."""
        return self._dequantize()

    def _lookup(self, ids):
        """The table's rows for `ids`, dequantized from their codes and group scales only."""
        cfg, dim = self.quantization, self.output_dim
        idx = tf.cast(ids, tf.int64)[..., None] * dim + tf.range(dim, dtype=tf.int64)
        byte = tf.cast(tf.gather(tf.convert_to_tensor(self.nf4_codes), idx // 2), tf.int32)
        code = tf.where(idx % 2 == 0, tf.bitwise.right_shift(byte, 4), tf.bitwise.bitwise_and(byte, 15))
        values = tf.gather(tf.constant(_CODEBOOK), code)
        group = idx // cfg.group_size
        if cfg.double_quant:
            centered = tf.gather(tf.constant(_DYNAMIC_MAP), tf.cast(tf.gather(tf.convert_to_tensor(self.nf4_absmax), group), tf.int32))
            nested = tf.gather(tf.convert_to_tensor(self.nf4_nested_scale), group // nf4.NESTED_GROUP_SIZE)
            scale = centered * nested + tf.convert_to_tensor(self.nf4_offset)
        else:
            scale = tf.gather(tf.convert_to_tensor(self.nf4_absmax), group)
        return tf.stop_gradient(values * scale)

    def _reverse_table(self):
        return tf.transpose(tf.stop_gradient(self._dequantize()))

    def base_kernel_value(self) -> np.ndarray:
        """The (vocab, dim) table the layer computes with, float32 NumPy."""
        return np.ascontiguousarray(super().base_kernel_value().T)

    def _regularized_kernel(self) -> tf.Tensor:
        return self._dequantize()

    def _copy_base_weights(self, layer) -> None:
        self._set_base_kernel(ops.convert_to_numpy(layer.embeddings).T, layer.name)
        if getattr(self, "reverse_embeddings", None) is not None:
            self.reverse_embeddings.assign(ops.convert_to_numpy(layer.reverse_embeddings))


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRAEmbedding(_QLoRATable, LoRAEmbedding):
    """`LoRAEmbedding` whose frozen table is stored in NF4 (rows dequantized on lookup).

    Example:
        >>> emb = keras.layers.Embedding(100, 8); emb.build()
        >>> layer = QLoRAEmbedding.from_layer(emb, rank=2)
        >>> layer(np.array([[1, 2]])).shape
        (1, 2, 8)
    """


@keras.saving.register_keras_serializable(package="tf_lora")
class QLoRAReversibleEmbedding(_QLoRATable, LoRAReversibleEmbedding):
    """`LoRAReversibleEmbedding` whose frozen table is stored in NF4 (an untied
    `reverse_embeddings` kernel stays float32)."""
