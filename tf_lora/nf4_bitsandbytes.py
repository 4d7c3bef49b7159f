"""NF4 tensors to and from bitsandbytes' state (packed `weight` + `QuantState.as_dict()` fields).

Part of `tf_lora.nf4` (which re-exports `to_bitsandbytes` and `from_bitsandbytes`): the
conversion of an `nf4.NF4Tensor` to the arrays bitsandbytes keeps for a ``Linear4bit`` weight
and back, without requantizing. Pure NumPy; bitsandbytes itself is not imported.
"""

import math
from typing import Any, Mapping

import numpy as np

from tf_lora.nf4 import _CODEBOOK, DYNAMIC_MAP, NESTED_GROUP_SIZE, NF4Tensor, _bad, _check_array
from tf_lora.nf4 import quantize  # noqa: F401  (the doctests' namespace)


def to_bitsandbytes(q: NF4Tensor, dtype: str = "float32") -> dict:
    """Converts to a bitsandbytes NF4 state: `weight` plus the `QuantState.as_dict()` fields.

    Keys: `weight` (uint8 (ceil(n/2), 1)), `absmax`, `quant_map`, `blocksize`, `shape`
    (torch layout (out, ...)), `dtype` (the original weight dtype), `quant_type`; with
    double quantization also `nested_absmax`, `nested_quant_map`, `nested_blocksize`,
    `nested_dtype` and `nested_offset` (bitsandbytes' name for the offset). Arrays are
    NumPy; after `torch.from_numpy`, all but `weight` feed `QuantState.from_dict`.

    Example:
        >>> state = to_bitsandbytes(quantize(np.ones((64, 3), "float32")))
        >>> state["shape"], state["weight"].shape
        ((3, 64), (96, 1))
    """
    state = dict(weight=np.array(q.codes).reshape(-1, 1), absmax=np.array(q.absmax),
                 quant_map=np.array(_CODEBOOK), blocksize=q.group_size,
                 shape=(q.shape[-1], *q.shape[:-1]), dtype=str(dtype), quant_type="nf4")
    if q.double_quant:
        state.update(nested_absmax=np.array(q.nested_scale), nested_dtype="float32",
                     nested_quant_map=np.array(DYNAMIC_MAP), nested_blocksize=NESTED_GROUP_SIZE,
                     nested_offset=float(q.offset))
    return state  # fmt: skip


def _field(state: Mapping[str, Any], key: str, alias: str = "") -> np.ndarray:
    value = state.get(key, state.get(alias))
    if value is None:
        _bad(key, "a value (the field is missing)", None)
    return np.asarray(value)


def _positive_int(state: Mapping[str, Any], key: str) -> int:
    value = _field(state, key)
    if value.size != 1 or value.dtype.kind not in "iu" or int(value) <= 0:
        _bad(key, "a positive integer", value.tolist())
    return int(value)


def _float_array(state: Mapping[str, Any], key: str, size: int, alias: str = "") -> np.ndarray:
    value = _field(state, key, alias)
    if value.dtype.kind != "f" or value.size != size:
        _bad(key, f"{size} float values", f"array of dtype {value.dtype} and shape {value.shape}")
    return value.astype(np.float32)


def from_bitsandbytes(state: Mapping[str, Any]) -> NF4Tensor:
    """Builds an `NF4Tensor` from a bitsandbytes NF4 state, without requantizing.

    Args:
        state: `weight` (packed uint8) and the `QuantState.as_dict()` fields as NumPy arrays
            or Python values (see `to_bitsandbytes`); `offset` may stand for `nested_offset`.

    Returns:
        The same quantized kernel in Keras layout (torch (out, in) becomes (in, out)).

    Raises:
        ValueError: a missing field or one inconsistent with `shape` and `blocksize` (the
            message names it), an unknown `quant_type` or `dtype`.
        NotImplementedError: `quant_type="fp4"`.

    Example:
        >>> q = quantize(np.random.randn(64, 3).astype("float32"))
        >>> from_bitsandbytes(to_bitsandbytes(q)).shape
        (64, 3)
    """
    quant_type = str(state.get("quant_type", "nf4"))
    if quant_type == "fp4":
        raise NotImplementedError("Only quant_type='nf4' is supported. Received: quant_type='fp4'")
    if quant_type != "nf4":
        _bad("quant_type", "'nf4'", quant_type)
    dtype = str(state.get("dtype", "float32")).replace("torch.", "")
    if dtype not in ("float32", "float16", "bfloat16"):
        _bad("dtype", "one of 'float32', 'float16', 'bfloat16'", dtype)
    torch_shape = _field(state, "shape")
    if torch_shape.ndim != 1 or not torch_shape.size or torch_shape.dtype.kind not in "iu":
        _bad("shape", "a non-empty sequence of positive integers", torch_shape.tolist())
    if torch_shape.min() <= 0:
        _bad("shape", "a non-empty sequence of positive integers", torch_shape.tolist())
    torch_shape, blocksize = tuple(int(d) for d in torch_shape), _positive_int(state, "blocksize")
    n = math.prod(torch_shape)
    groups = -(-n // blocksize)
    quant_map = state.get("quant_map")
    if quant_map is not None and not np.array_equal(np.asarray(quant_map, np.float32), _CODEBOOK):
        _bad("quant_map", "the NF4 codebook (nf4.CODEBOOK)", np.asarray(quant_map).tolist())
    weight = _check_array("weight", _field(state, "weight"), np.uint8, (n + 1) // 2)
    double_quant = state.get("nested_absmax") is not None
    nested_scale = offset = None
    if double_quant:
        absmax = _check_array("absmax", _field(state, "absmax"), np.uint8, groups)
        if _positive_int(state, "nested_blocksize") != NESTED_GROUP_SIZE:
            _bad("nested_blocksize", str(NESTED_GROUP_SIZE), state["nested_blocksize"])
        nested_map = np.asarray(state.get("nested_quant_map", DYNAMIC_MAP), np.float32)
        # Its last bits depend on the CPU torch ran on (see _create_dynamic_map): rtol 1e-6.
        if nested_map.shape != (256,) or not np.allclose(nested_map, DYNAMIC_MAP, rtol=1e-6, atol=0):
            _bad("nested_quant_map", "bitsandbytes' signed dynamic map (DYNAMIC_MAP)", "other")
        nested_scale = _float_array(state, "nested_absmax", -(-groups // NESTED_GROUP_SIZE))
        offset = _float_array(state, "nested_offset", 1, alias="offset").reshape(())
    else:
        absmax = _float_array(state, "absmax", groups)
    shape = (*torch_shape[1:], torch_shape[0])
    return NF4Tensor(weight, absmax, nested_scale, offset, shape, blocksize, double_quant)
