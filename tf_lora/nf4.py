"""NF4 (4-bit NormalFloat) quantization, bit-compatible with bitsandbytes. Pure functions.

A Keras kernel (..., out) is viewed in torch layout (out, ...), flattened row-major, cut
into groups of `group_size` (a group may cross rows; the last may be partial). Each group
is multiplied by `1/absmax`, clamped to [-1, 1], rounded to the nearest NF4 code by
midpoints (ties go to the lower code) and packed two per byte, first in the high nibble
(an odd count is padded with a 0.0, code 0b0111, as bitsandbytes pads). Double
quantization stores absmax minus its mean (`offset`) as codes of bitsandbytes' signed
dynamic 8-bit map in blocks of 256. `quantize` runs once in NumPy; `dequantize_tensors`
and `fake_quant` (straight-through gradient) are TensorFlow ops, XLA included.
`to_bitsandbytes` / `from_bitsandbytes` (bitsandbytes' state dicts) live in `nf4_bitsandbytes`.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

import numpy as np
import tensorflow as tf

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA
# paper, Dettmers et al. 2023, arXiv:2305.14314), verbatim from bitsandbytes
# `functional.get_4bit_type("nf4")` (`create_normal_map(offset=0.9677083)`); float32.
CODEBOOK: tuple = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NESTED_GROUP_SIZE = 256  # bitsandbytes' block size for the double-quantized absmax.
_TINY = np.finfo(np.float32).tiny  # Floor of absmax in 1/absmax: zeros -> code of 0.0.
_ZERO_CODE = 7  # CODEBOOK index of 0.0.


def _create_dynamic_map() -> np.ndarray:
    """bitsandbytes `functional.create_dynamic_map(signed=True)` (8 bits), in NumPy.

    Means of neighbours of `torch.linspace(0.1, 1, 2**i + 1)` times 10**(i - 6), i < 7,
    both signs, plus 0 and 1. torch's vectorised CPU linspace rounds `start + step * k`
    once (fused multiply-add): emulated exactly in float64, then rounded to float32.
    """
    f32, values = np.float32, [0.0, 1.0]
    for i in range(7):
        steps, start, end = 2**i + 1, f32(0.1), f32(1.0)
        step, k = f32((end - start) / f32(steps - 1)), np.arange(2**i + 1, dtype=np.float64)
        bounds = np.where(
            k < steps // 2,
            np.float64(start) + np.float64(step) * k,
            np.float64(end) - np.float64(step) * (steps - 1 - k),
        ).astype(f32)
        means = (bounds[:-1] + bounds[1:]) / f32(2.0)
        values += list(f32(10.0 ** (i - 6)) * means) + list(-f32(10.0 ** (i - 6)) * means)
    return np.sort(np.asarray(values, f32))


def _frozen(array: Any) -> np.ndarray:
    array = np.array(array)  # A private copy, then read-only.
    array.setflags(write=False)
    return array


_CODEBOOK = _frozen(np.asarray(CODEBOOK, np.float32))
_MIDPOINTS = _frozen((_CODEBOOK[:-1] + _CODEBOOK[1:]) / np.float32(2.0))
# bitsandbytes' signed dynamic 8-bit map (256 sorted float32 values), for nested absmax.
DYNAMIC_MAP = _frozen(_create_dynamic_map())
_DYNAMIC_MIDPOINTS = _frozen((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / np.float32(2.0))


def _bad(arg: str, expected: str, received: Any, exc: type = ValueError) -> None:
    kind = "type" if exc is TypeError else "value"
    raise exc(
        f"Received an invalid {kind} for `{arg}`, expected {expected}. Received: {arg}={received!r}"
    )


def _check_array(arg: str, value: Any, dtype: type, size: int) -> np.ndarray:
    array = None if value is None else np.asarray(value)
    if array is None or array.dtype != dtype or array.size != size:
        got = None if array is None else f"array of dtype {array.dtype} and shape {array.shape}"
        _bad(arg, f"{np.dtype(dtype).name} values, {size} in all", got)
    return array


def _check_group_size(group_size: Any, arg: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        _bad(arg, "a positive integer", group_size, TypeError)
    if group_size <= 0:
        _bad(arg, "a positive integer", group_size)
    return int(group_size)


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A kernel quantized to NF4: the arrays a layer stores plus static metadata.

    Attributes:
        codes: uint8 (ceil(n/2),), two 4-bit codes per byte, first in the high nibble.
        absmax: float32 (groups,) scales, or with `double_quant` uint8 codes into
            `DYNAMIC_MAP`.
        nested_scale: float32 (ceil(groups/256),) scales of the absmax codes, or None.
        offset: float32 scalar added to the dequantized absmax, or None.
        shape: the Keras kernel shape (..., out).
        group_size: elements per group (bitsandbytes `blocksize`).
        double_quant: whether `absmax` is itself quantized.

    Example:
        >>> q = quantize(np.ones((128, 4), "float32"))
        >>> q.codes.shape, q.absmax.dtype.name, sorted(q.arrays)
        ((256,), 'uint8', ['absmax', 'codes', 'nested_scale', 'offset'])
    """

    codes: np.ndarray
    absmax: np.ndarray
    nested_scale: Optional[np.ndarray]
    offset: Optional[np.ndarray]
    shape: tuple
    group_size: int
    double_quant: bool

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("shape", tuple(int(d) for d in self.shape))
        set_("group_size", _check_group_size(self.group_size))
        if not self.shape or min(self.shape) <= 0:
            _bad("shape", "a non-empty tuple of positive integers", self.shape)
        codes = _check_array("codes", self.codes, np.uint8, (self.size + 1) // 2)
        set_("codes", _frozen(codes.reshape(-1)))
        if self.double_quant:
            absmax = _check_array("absmax", self.absmax, np.uint8, self.num_groups)
            nested_size = -(-self.num_groups // NESTED_GROUP_SIZE)
            nested = _check_array("nested_scale", self.nested_scale, np.float32, nested_size)
            set_("nested_scale", _frozen(nested.reshape(-1)))
            set_("offset", _frozen(_check_array("offset", self.offset, np.float32, 1).reshape(())))
        else:
            if self.nested_scale is not None or self.offset is not None:
                _bad("nested_scale", "None when double_quant=False", "an array")
            absmax = _check_array("absmax", self.absmax, np.float32, self.num_groups)
        set_("absmax", _frozen(absmax.reshape(-1)))

    @property
    def size(self) -> int:  # Number of kernel elements.
        return math.prod(self.shape)

    @property
    def num_groups(self) -> int:  # The last group may be partial.
        return -(-self.size // self.group_size)

    @property
    def arrays(self) -> dict:
        """The stored arrays by name: what a layer keeps as non-trainable variables."""
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.double_quant:
            out.update(nested_scale=self.nested_scale, offset=self.offset)
        return out

    def to_dict(self) -> dict:
        """`arrays` plus the metadata `shape`, `group_size`, `double_quant`."""
        meta = {"shape": self.shape, "group_size": self.group_size, "double_quant": self.double_quant}
        return {**self.arrays, **meta}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "NF4Tensor":
        """Inverse of `to_dict`; arrays may be anything `np.asarray` accepts (variables)."""
        dq = bool(config["double_quant"])
        get = lambda k: np.asarray(config[k]) if dq or k in ("codes", "absmax") else None  # noqa: E731
        arrays = [get(k) for k in ("codes", "absmax", "nested_scale", "offset")]
        return cls(*arrays, tuple(config["shape"]), config["group_size"], dq)


def _blockwise(flat: np.ndarray, group_size: int, midpoints: np.ndarray):
    """absmax per group, and nearest-level indices of clip(x * (1 / absmax), -1, 1)."""
    groups = -(-flat.size // group_size)
    blocks = np.pad(flat, (0, groups * group_size - flat.size)).reshape(groups, group_size)
    absmax = np.abs(blocks).max(axis=1)
    scaled = np.clip(blocks * (np.float32(1.0) / np.maximum(absmax, _TINY))[:, None], -1, 1)
    # Nearest level = number of midpoints strictly below (a tie goes to the lower level).
    idx = np.searchsorted(midpoints, scaled.reshape(-1), side="left").astype(np.uint8)
    return idx[: flat.size], absmax


# Elements quantized at a time: a kernel is read and converted in slices of about this
# many elements, so quantizing never holds a second full-size float copy of it.
_CHUNK = 2**18


def _slicer(kernel: Any):
    """``(shape, dtype, read)`` of `kernel`; ``read(o0, o1)`` is ``kernel[..., o0:o1]`` as NumPy.

    Tensors and variables are read one slice at a time (converting a whole one copies it);
    other array-likes are converted to one NumPy array first.
    """
    if not isinstance(kernel, np.ndarray) and hasattr(kernel, "shape") and hasattr(kernel, "__getitem__"):
        shape = tuple(int(d) for d in kernel.shape)
        if shape and min(shape) > 0:
            dtype = np.asarray(kernel[(0,) * len(shape)]).dtype
            return shape, dtype, lambda o0, o1: np.asarray(kernel[..., o0:o1])
    array = np.asarray(kernel)
    return array.shape, array.dtype, lambda o0, o1: array[..., o0:o1]


def quantize(
    kernel: Any, group_size: int = 64, double_quant: bool = True, name: Optional[str] = None
) -> NF4Tensor:
    """Quantizes a kernel to NF4 exactly as bitsandbytes' `quantize_4bit(quant_type="nf4")`.

    The kernel is processed a slice of output units at a time (a few MiB of temporaries,
    however large the kernel), reading tensors and variables slice by slice.

    Args:
        kernel: float array-like (NumPy, tensor, variable) of shape (in, out) or (..., out).
        group_size: elements per group of the torch-layout flattened weight.
        double_quant: also quantize the absmax values (about 4.127 instead of 4.5 bits).
        name: the layer's name, for error messages.

    Returns:
        An `NF4Tensor` of NumPy arrays.

    Raises:
        TypeError: a non-float `kernel`, a non-int `group_size`, a non-bool `double_quant`.
        ValueError: `group_size <= 0`, an empty kernel, or NaN / Inf in the kernel.

    Example:
        >>> q = quantize(np.random.randn(1024, 64).astype("float32"), group_size=64)
        >>> round(bits_per_parameter(q), 3)
        4.127
    """
    group_size = _check_group_size(group_size)
    if not isinstance(double_quant, (bool, np.bool_)):
        _bad("double_quant", "a bool", double_quant, TypeError)
    shape, dtype, read = _slicer(kernel)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        _bad("kernel", "a floating-point array", f"array of dtype {dtype}", TypeError)
    if len(shape) == 0 or math.prod(shape) == 0:
        _bad("kernel", "a non-empty array of rank >= 1", f"array of shape {shape}")
    n, units = math.prod(shape), shape[-1]
    row = n // units  # elements per output unit: one row of the torch layout (out, ...)
    # Slices of whole rows that start on a group boundary and an even element (a byte).
    step = math.lcm(group_size, 2) // math.gcd(row, math.lcm(group_size, 2))
    step *= max(1, _CHUNK // (step * row))
    codes = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(-(-n // group_size), np.float32)
    bad = 0
    for o0 in range(0, units, step):
        o1 = min(o0 + step, units)
        flat = np.ascontiguousarray(np.moveaxis(read(o0, o1), -1, 0), dtype=np.float32).reshape(-1)
        bad += flat.size - int(np.count_nonzero(np.isfinite(flat)))
        if bad:
            continue  # counted to the end for the message; nothing more to compute
        idx, scales = _blockwise(flat, group_size, _MIDPOINTS)
        start = o0 * row
        absmax[start // group_size : start // group_size + scales.size] = scales
        idx = np.pad(idx, (0, idx.size % 2), constant_values=_ZERO_CODE)  # odd n: the last slice
        codes[start // 2 : start // 2 + idx.size // 2] = (idx[0::2] << 4) | idx[1::2]
    if bad:
        where = f"of layer '{name}'" if name else "(no layer name given)"
        raise ValueError(f"Cannot quantize the kernel {where}: it contains {bad} NaN or Inf values.")
    nested_scale = offset = None
    if double_quant:
        offset = np.float32(np.mean(absmax, dtype=np.float64))
        absmax, nested_scale = _blockwise(absmax - offset, NESTED_GROUP_SIZE, _DYNAMIC_MIDPOINTS)
    return NF4Tensor(codes, absmax, nested_scale, offset, shape, group_size, bool(double_quant))


def _per_group(values: tf.Tensor, scales: tf.Tensor, group_size: int, n: int) -> tf.Tensor:
    """values[i] * scales[i // group_size] for the first n values (static sizes)."""
    groups = -(-n // group_size)
    values = tf.pad(values[:n], [[0, groups * group_size - n]])
    return tf.reshape(tf.reshape(values, [groups, group_size]) * scales[:, None], [-1])[:n]


def _from_torch_layout(flat: tf.Tensor, shape: tuple) -> tf.Tensor:
    """Flat row-major (out, ...) -> Keras (..., out)."""
    return tf.transpose(tf.reshape(flat, [shape[-1], *shape[:-1]]), [*range(1, len(shape)), 0])


def dequantize_tensors(
    codes: Any, absmax: Any, nested_scale: Any = None, offset: Any = None, *, shape: tuple,
    group_size: int, double_quant: bool, dtype: Union[str, tf.DType] = "float32",
) -> tf.Tensor:  # fmt: skip
    """Rebuilds a kernel from stored NF4 arrays with TensorFlow ops (`jit_compile` safe).

    bitsandbytes' float32 arithmetic: `CODEBOOK[code] * absmax`, where with double
    quantization `absmax = DYNAMIC_MAP[absmax_code] * nested_scale + offset` (XLA may fuse
    this multiply-add into one rounding: then 1 ulp from the eager result).

    Args:
        codes, absmax, nested_scale, offset: `NF4Tensor.arrays` as tensors, variables or
            arrays (the last two only with `double_quant`).
        shape, group_size, double_quant: the `NF4Tensor` metadata (static).
        dtype: dtype of the result, a tensor of shape `shape`.

    Example:
        >>> q = quantize(np.ones((64, 2), "float32"))
        >>> w = dequantize_tensors(**q.arrays, shape=q.shape, group_size=64, double_quant=True)
        >>> float(tf.reduce_max(tf.abs(w - 1.0)))
        0.0
    """
    n = math.prod(shape)
    codes = tf.cast(tf.reshape(codes, [-1]), tf.int32)
    nibbles = tf.stack([tf.bitwise.right_shift(codes, 4), tf.bitwise.bitwise_and(codes, 15)], -1)
    values = tf.gather(tf.constant(_CODEBOOK), tf.reshape(nibbles, [-1]))
    if double_quant:
        groups = -(-n // group_size)
        centered = tf.gather(tf.constant(DYNAMIC_MAP), tf.cast(tf.reshape(absmax, [-1]), tf.int32))
        nested = tf.cast(tf.reshape(nested_scale, [-1]), tf.float32)
        offset = tf.reshape(tf.cast(offset, tf.float32), [])
        absmax = _per_group(centered, nested, NESTED_GROUP_SIZE, groups) + offset
    scales = tf.cast(tf.reshape(absmax, [-1]), tf.float32)
    return tf.cast(_from_torch_layout(_per_group(values, scales, group_size, n), shape), dtype)


def dequantize(q: NF4Tensor, dtype: Union[str, tf.DType] = "float32") -> tf.Tensor:
    """Dequantizes an `NF4Tensor` to a TensorFlow tensor of the kernel's shape.

    Example:
        >>> dequantize(quantize(np.random.randn(64, 4).astype("float32"))).shape
        TensorShape([64, 4])
    """
    meta = {"shape": q.shape, "group_size": q.group_size, "double_quant": q.double_quant}
    return dequantize_tensors(**{k: tf.constant(a) for k, a in q.arrays.items()}, **meta, dtype=dtype)


def _roundtrip_tf(flat: tf.Tensor, group_size: int, levels: np.ndarray, midpoints: np.ndarray):
    """TF `_blockwise` followed by the level lookup: returns (levels[idx], absmax)."""
    n = flat.shape[0]
    groups = -(-n // group_size)
    blocks = tf.reshape(tf.pad(flat, [[0, groups * group_size - n]]), [groups, group_size])
    absmax = tf.reduce_max(tf.abs(blocks), axis=1)
    scaled = tf.clip_by_value(blocks * (1.0 / tf.maximum(absmax, _TINY))[:, None], -1.0, 1.0)
    scaled, table = tf.reshape(scaled, [-1]), tf.constant(midpoints)
    # Branchless binary search for the number of midpoints strictly below (ties -> lower).
    idx, step = tf.zeros_like(scaled, dtype=tf.int32), (midpoints.size + 1) // 2
    while step:
        idx = tf.where(tf.gather(table, idx + step - 1) < scaled, idx + step, idx)
        step //= 2
    return tf.gather(tf.constant(levels), idx), absmax


def _fake_quant_forward(x: tf.Tensor, group_size: int, double_quant: bool) -> tf.Tensor:
    shape, rank = tuple(x.shape), len(x.shape)
    flat = tf.reshape(tf.transpose(tf.cast(x, tf.float32), [rank - 1, *range(rank - 1)]), [-1])
    values, absmax = _roundtrip_tf(flat, group_size, _CODEBOOK, _MIDPOINTS)
    if double_quant:
        groups = absmax.shape[0]
        offset = tf.cast(tf.reduce_sum(tf.cast(absmax, tf.float64)) / groups, tf.float32)
        centered, nested = _roundtrip_tf(
            absmax - offset, NESTED_GROUP_SIZE, DYNAMIC_MAP, _DYNAMIC_MIDPOINTS
        )
        absmax = _per_group(centered, nested, NESTED_GROUP_SIZE, groups) + offset
    out = _from_torch_layout(_per_group(values, absmax, group_size, flat.shape[0]), shape)
    return tf.cast(out, x.dtype)


def fake_quant(kernel: Any, group_size: int = 64, double_quant: bool = True) -> tf.Tensor:
    """`dequantize(quantize(kernel))` in TensorFlow, with a straight-through gradient.

    For training steps (eager, `tf.function`, XLA): the forward value equals NumPy
    `quantize` then `dequantize`, the gradient is the upstream gradient unchanged. The
    kernel's shape must be static; NaN / Inf are not checked here (they propagate).

    Example:
        >>> w = tf.Variable(tf.random.normal((128, 8)))
        >>> with tf.GradientTape() as tape:
        ...     loss = tf.reduce_sum(fake_quant(w) * 3.0)
        >>> float(tf.reduce_max(tf.abs(tape.gradient(loss, w) - 3.0)))
        0.0
    """
    group_size = _check_group_size(group_size)
    if not isinstance(double_quant, (bool, np.bool_)):
        _bad("double_quant", "a bool", double_quant, TypeError)
    x = tf.convert_to_tensor(kernel)
    if not x.dtype.is_floating:
        _bad("kernel", "a floating-point tensor", f"tensor of dtype {x.dtype.name}", TypeError)
    if not x.shape.is_fully_defined() or x.shape.rank == 0 or x.shape.num_elements() == 0:
        _bad("kernel", "a tensor of static, non-empty shape and rank >= 1", x.shape)

    @tf.custom_gradient
    def _straight_through(value):
        return _fake_quant_forward(value, group_size, bool(double_quant)), lambda dy: dy

    return _straight_through(x)


def bits_per_parameter(q: NF4Tensor) -> float:
    """Storage cost measured from the stored arrays: their bits / kernel elements.

    Example:
        >>> bits_per_parameter(quantize(np.ones((1024, 64), "float32"), double_quant=False))
        4.5
    """
    return sum(a.nbytes for a in q.arrays.values()) * 8 / q.size


# bitsandbytes' state dicts (`QuantState.as_dict()`) in and out: tf_lora/nf4_bitsandbytes.py.
from tf_lora.nf4_bitsandbytes import from_bitsandbytes, to_bitsandbytes  # noqa: E402,F401
