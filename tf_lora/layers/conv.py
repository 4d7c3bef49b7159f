"""LoRA for convolutions (`Conv1D`, `Conv2D`, `Conv3D`), as PEFT's `Conv*d` layers do it.

``y = activation(conv(x, W) + b + scaling * conv1x1(conv(dropout(x), lora_a), lora_b))``:
`lora_a` is a convolution with the base layer's kernel size, strides, padding and
dilation from the input channels to r, `lora_b` a 1x1 convolution (a matmul over
the channel axis) from r to the output channels. Both are linear in their
kernels and `lora_b` acts pointwise, so the pair equals one convolution with the
kernel ``scaling * tensordot(lora_a, lora_b)``: `merge()` adds exactly that to W.

Layout, as for Dense, in the kernel's own axis order: W is (k..., in, out),
`lora_a` (k..., in, r), `lora_b` (r, out) (PEFT stores (r, in, k...) and
(out, r, 1...)). The dilation is applied to `lora_a` too; PEFT's `Conv2d` omits it
(``peft/tuners/lora/layer.py``, `_Conv.update_layer` passes kernel size, stride
and padding only), so its dilated LoRA conv does not equal its own merge.

``groups > 1`` (grouped / depthwise convolutions) raises `NotImplementedError`.
``data_format="channels_first"`` is supported (the 1x1 step contracts axis 1).
"""

from __future__ import annotations

from typing import Any, Tuple

import keras
from keras import ops

from tf_lora.layers.base import LoRALayer, _invalid

_PADDINGS = ("valid", "same")


def _tuple(name: str, value: Any, n: int) -> Tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(_invalid(name, f"a positive integer or a tuple of {n} positive integers", value))
    return values


class LoRAConv(LoRALayer):
    """The shared part of `LoRAConv1D` / `LoRAConv2D` / `LoRAConv3D` (`spatial_rank` spatial axes)."""

    spatial_rank = 2
    base_type = keras.layers.Conv2D

    def __init__(self, filters: int, kernel_size: Any, strides: Any = 1, padding: str = "valid",
                 data_format: Any = None, dilation_rate: Any = 1, groups: int = 1, activation: Any = None,
                 use_bias: bool = True, kernel_initializer: Any = "glorot_uniform",
                 bias_initializer: Any = "zeros", **kwargs):
        super().__init__(activation=activation, **kwargs)
        n = self.spatial_rank
        if not isinstance(filters, int) or isinstance(filters, bool) or filters <= 0:
            raise ValueError(_invalid("filters", "a positive integer", filters))
        if groups != 1:
            raise NotImplementedError(
                f"Received groups={groups!r} for layer '{self.name}': tf_lora's LoRA conv supports "
                "groups=1 only (grouped and depthwise convolutions are not supported)."
            )
        self.filters = filters
        self.groups = 1
        self.kernel_size = _tuple("kernel_size", kernel_size, n)
        self.strides = _tuple("strides", strides, n)
        self.dilation_rate = _tuple("dilation_rate", dilation_rate, n)
        paddings = _PADDINGS + (("causal",) if n == 1 else ())
        if not isinstance(padding, str) or padding.lower() not in paddings:
            raise ValueError(_invalid("padding", f"one of {paddings}", padding))
        self.padding = padding.lower()
        data_format = keras.config.image_data_format() if data_format is None else data_format
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(_invalid("data_format", "'channels_last' or 'channels_first'", data_format))
        self.data_format = data_format
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.bias = None
        self.in_channels = None

    @property
    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _build_kernel(self, kernel_shape) -> None:
        """Creates the frozen base kernel (QLoRA layers store it in NF4 instead)."""
        self.kernel = self.add_weight(
            name="kernel", shape=tuple(kernel_shape), initializer=self.kernel_initializer,
            constraint=self.kernel_constraint, trainable=False,
        )

    def build(self, input_shape):
        if len(input_shape) != self.spatial_rank + 2:
            raise ValueError(
                f"Received an input of rank {len(input_shape)} for layer '{self.name}', expected rank "
                f"{self.spatial_rank + 2} (batch, spatial axes, channels). Received: input_shape={input_shape}"
            )
        self.in_channels = int(input_shape[self._channel_axis])
        self._build_kernel(self.kernel_size + (self.in_channels, self.filters))
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer,
                constraint=self.bias_constraint, trainable=False,
            )
        self._build_lora(self.kernel_size + (self.in_channels,), (self.filters,))
        self.input_spec = keras.InputSpec(ndim=self.spatial_rank + 2, axes={self._channel_axis: self.in_channels})

    # -- forward ---------------------------------------------------------------
    def _conv(self, inputs, kernel):
        """The base layer's convolution (strides, padding, dilation) of `inputs` with `kernel`."""
        padding = self.padding
        if padding == "causal":  # as Conv1D: pad on the left, then a valid convolution
            pad = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            spatial = [[pad, 0]]
            widths = [[0, 0]] + spatial + [[0, 0]] if self.data_format == "channels_last" else [[0, 0], [0, 0]] + spatial
            inputs = ops.pad(inputs, widths)
            padding = "valid"
        return ops.conv(inputs, kernel, strides=list(self.strides), padding=padding,
                        dilation_rate=self.dilation_rate, data_format=self.data_format)

    def _base_call(self, inputs):
        return self._conv(inputs, self.kernel)

    def _lora_apply(self, inputs, lora_a, lora_b, scaling):
        hidden = self._conv(inputs, lora_a) * scaling  # (..., r): the rank-r feature map
        if self.data_format == "channels_last":
            return ops.matmul(hidden, lora_b)
        return ops.moveaxis(ops.matmul(ops.moveaxis(hidden, 1, -1), lora_b), -1, 1)

    def _add_bias(self, outputs):
        if self.data_format == "channels_last":
            return outputs + self.bias
        return outputs + ops.reshape(self.bias, (1, self.filters) + (1,) * self.spatial_rank)

    def compute_output_shape(self, input_shape):
        spatial = input_shape[1:-1] if self.data_format == "channels_last" else input_shape[2:]
        out = []
        for d, k, s, r in zip(spatial, self.kernel_size, self.strides, self.dilation_rate):
            if d is None:
                out.append(None)
            elif self.padding == "valid":
                out.append((d - r * (k - 1) - 1) // s + 1)
            else:  # same, causal
                out.append(-(-d // s))
        if self.data_format == "channels_last":
            return (input_shape[0], *out, self.filters)
        return (input_shape[0], self.filters, *out)

    # -- conversion ------------------------------------------------------------
    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=list(self.kernel_size), strides=list(self.strides),
            padding=self.padding, data_format=self.data_format, dilation_rate=list(self.dilation_rate),
            groups=self.groups, use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config

    @classmethod
    def from_layer(cls, layer, rank: int = 8, alpha: float = 32.0, dropout: float = 0.0,
                   use_rslora: bool = False, lora_init: str = "he_uniform", **kwargs) -> "LoRAConv":
        """A built adapter carrying `layer`'s name, dtype policy, weights, regularizers and
        constraints (`kwargs` may override them). `layer` is not modified, except inside
        `adopting_base_weights(layer)`, where its kernel and bias variables are adopted (frozen).

        Raises:
            NotImplementedError: ``layer.groups > 1``.
        """
        cls._check_source(layer, cls.base_type, cls.base_type.__name__)
        cls.check_groups(layer)
        new = cls(
            filters=layer.filters, kernel_size=layer.kernel_size, strides=layer.strides,
            padding=layer.padding, data_format=layer.data_format, dilation_rate=layer.dilation_rate,
            activation=layer.activation, use_bias=layer.use_bias,
            kernel_initializer=layer.kernel_initializer, bias_initializer=layer.bias_initializer,
            rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, lora_init=lora_init,
            name=layer.name, dtype=layer.dtype_policy, **cls._weight_options_of(layer, kwargs),
        )
        with new._adopting(layer):  # in place: `layer`'s own kernel and bias (adopting_base_weights)
            new.build(cls.source_input_shape(layer))
        new._copy_base_weights(layer)
        return new

    @staticmethod
    def check_groups(layer) -> None:
        if getattr(layer, "groups", 1) != 1:
            raise NotImplementedError(
                f"Layer '{layer.name}' is a grouped convolution (groups={layer.groups}); tf_lora's LoRA "
                "conv supports groups=1 only. Exclude it from `target_modules`."
            )

    @classmethod
    def source_input_shape(cls, layer) -> tuple:
        channels = int(layer.kernel.shape[-2]) * int(getattr(layer, "groups", 1))
        spatial = (None,) * len(layer.kernel_size)
        if layer.data_format == "channels_last":
            return (None, *spatial, channels)
        return (None, channels, *spatial)

    def _built_input_shape(self) -> tuple:
        spatial = (None,) * self.spatial_rank
        if self.data_format == "channels_last":
            return (None, *spatial, self.in_channels)
        return (None, self.in_channels, *spatial)

    def _copy_base_weights(self, layer) -> None:
        self._copy_weight(self.kernel, layer.kernel)
        if self.use_bias:
            self._copy_weight(self.bias, layer.bias)

    def to_base_layer(self):
        """A plain built Keras conv layer with the merged kernel, regularizers and constraints."""
        conv = self.base_type(
            filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            data_format=self.data_format, dilation_rate=self.dilation_rate, activation=self.activation,
            use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer, name=self.name, dtype=self.dtype_policy,
            **self._weight_options(),
        )
        conv.build(self._built_input_shape())
        conv.kernel.assign(self.merged_kernel())
        if self.use_bias:
            conv.bias.assign(ops.convert_to_numpy(self.bias))
        return conv


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAConv1D(LoRAConv):
    """`keras.layers.Conv1D` with a frozen kernel and a trainable LoRA update (see `LoRAConv`).

    Example:
        >>> layer = LoRAConv1D(4, 3, rank=2, padding="causal", dilation_rate=2)
        >>> layer(np.ones((1, 10, 3), "float32")).shape
        (1, 10, 4)
    """

    spatial_rank = 1
    base_type = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAConv2D(LoRAConv):
    """`keras.layers.Conv2D` with a frozen kernel and a trainable LoRA update: `lora_a`
    (kh, kw, in, r) is a conv like the base one, `lora_b` (r, out) a 1x1 conv.

    Example:
        >>> layer = LoRAConv2D(8, 3, rank=2, strides=2, padding="same")
        >>> layer(np.ones((1, 16, 16, 3), "float32")).shape
        (1, 8, 8, 8)
    """

    spatial_rank = 2
    base_type = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAConv3D(LoRAConv):
    """`keras.layers.Conv3D` with a frozen kernel and a trainable LoRA update (see `LoRAConv`).

    Example:
        >>> layer = LoRAConv3D(4, 3, rank=2)
        >>> layer(np.ones((1, 5, 5, 5, 2), "float32")).shape
        (1, 3, 3, 3, 4)
    """

    spatial_rank = 3
    base_type = keras.layers.Conv3D
