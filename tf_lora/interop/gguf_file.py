"""Reading a GGUF file: its metadata and tensor table, validated before anything large is allocated.

The header (metadata and tensor table) is walked here with bounds checks on every length and
count, because `gguf.GGUFReader` loops forever on some forged headers (an array count past the end
of the file makes it read empty slices without advancing) and takes seconds on a 49k-token
vocabulary. Tensor bytes are memory-mapped, and `gguf.quants.dequantize` turns them into float32:
no dequantizer is written here. tests/test_gguf.py checks this reader against `gguf.GGUFReader` on
the real file (every field, every tensor's bytes).

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic ``GGUF``, version
(2 or 3), tensor count, metadata count (uint64 each), the metadata (key string, value type,
value), the tensor table (name, dimensions innermost first, type, offset), padding to
``general.alignment`` (32 by default), then the tensor data.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Dict, Tuple

import numpy as np

GGUF_MAGIC = b"GGUF"
_MAX_DIMS = 4
_MAX_NESTING = 4
# Metadata value types (gguf.GGUFValueType): id -> struct format ("" for string / array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Tensor types read here: everything `gguf.quants.dequantize` turns into float32 that llama.cpp
# writes for these models' weights.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading a GGUF file needs the `gguf` package: pip install 'tf_lora[gguf]' (or pip install gguf)."
        ) from err
    return gguf


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    Attributes:
        name: The tensor's GGUF name (``blk.0.attn_q.weight``).
        shape: NumPy (row-major) shape: GGUF's dimensions reversed, so ``(out, in)`` for a weight.
        type_name: The ggml type (``"Q4_1"``).
        offset: Byte offset of its data in the file.
        nbytes: Size of its data in bytes.
    """

    name: str
    shape: Tuple[int, ...]
    type_name: str
    offset: int
    nbytes: int


class _Cursor:
    """Reads little- or big-endian values from a byte buffer, never past its end."""

    def __init__(self, data, path: str, order: str):
        self.data, self.path, self.order, self.pos = data, path, order, 0

    def fail(self, what: str) -> "ValueError":
        return ValueError(f"GGUF file '{self.path}' is truncated or corrupt: {what} (at byte {self.pos}).")

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise self.fail(f"it ends inside a value of {size} bytes")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.take("Q")
        if length > len(self.data) - self.pos:
            raise self.fail(f"{what} has a length of {length} bytes, past the end of the file")
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not valid UTF-8 ({err.reason})") from None

    def value(self, kind: int, key: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(f"the string value of '{key}'")
        if kind != _ARRAY:
            raise self.fail(f"metadata '{key}' has an unknown value type {kind}")
        if depth >= _MAX_NESTING:
            raise self.fail(f"metadata '{key}' nests arrays more than {_MAX_NESTING} deep")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            if count * size > len(self.data) - self.pos:
                raise self.fail(f"metadata '{key}' claims {count} items, past the end of the file")
            dtype = np.dtype(_SCALARS[item] if item != 7 else "?").newbyteorder(self.order)
            values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * size
            return values.tolist()
        # Strings and arrays take at least 8 bytes each: a count beyond that cannot be real.
        if count > (len(self.data) - self.pos) // 8:
            raise self.fail(f"metadata '{key}' claims {count} items, past the end of the file")
        return [self.value(item, key, depth + 1) for _ in range(count)]


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> Python value) and `tensors` (name -> `TensorInfo`).

    Opening reads and checks only the header: magic, version, every metadata length, the tensor
    table (types, dimensions, offsets, alignment) and that every tensor's bytes lie inside the
    file. Tensor data stays on disk (memory-mapped) until `read` dequantizes one tensor.

    Args:
        path: Path of the ``.gguf`` file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a GGUF file, or a truncated or corrupt one (the message names the file,
            what is wrong and where).
        NotImplementedError: A GGUF version this reader does not know.
    """

    def __init__(self, path: "str | os.PathLike"):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No GGUF file at '{self.path}'.")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if os.path.getsize(self.path) else b""
        if bytes(self._data[:4]) != GGUF_MAGIC:
            raise ValueError(
                f"'{self.path}' is not a GGUF file: it starts with {bytes(self._data[:4])!r}, "
                f"expected the magic {GGUF_MAGIC!r}."
            )
        cursor = _Cursor(self._data, self.path, "<")
        cursor.pos = 4
        version = cursor.take("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            raise NotImplementedError(
                f"GGUF file '{self.path}' is big-endian; tf_lora reads little-endian GGUF files only."
            )
        if version not in (2, 3):
            raise NotImplementedError(
                f"GGUF file '{self.path}' has version {version}; tf_lora reads versions 2 and 3."
            )
        self.version = version
        n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
        remaining = len(self._data) - cursor.pos
        # A metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor entry 8 + 4 + 4 + 8.
        if n_kv > remaining // 13 or n_tensors > remaining // 24:
            raise cursor.fail(f"it claims {n_kv} metadata entries and {n_tensors} tensors, more than fit")
        self.metadata: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string("a metadata key")
            kind = cursor.take("I")
            if key in self.metadata:
                raise cursor.fail(f"metadata key '{key}' appears twice")
            self.metadata[key] = cursor.value(kind, key)
        table = [self._tensor_entry(cursor) for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment must be a power of two, got {alignment!r}")
        start = -(-cursor.pos // alignment) * alignment
        self.tensors: Dict[str, TensorInfo] = {}
        for name, shape, type_name, offset, nbytes in table:
            if name in self.tensors:
                raise ValueError(f"GGUF file '{self.path}' lists tensor '{name}' twice.")
            begin = start + offset
            if offset % alignment or begin + nbytes > len(self._data):
                raise ValueError(
                    f"GGUF file '{self.path}' is truncated or corrupt: tensor '{name}' ({nbytes} bytes at "
                    f"byte {begin}) does not lie inside the file of {len(self._data)} bytes"
                    f"{' (misaligned)' if offset % alignment else ''}."
                )
            self.tensors[name] = TensorInfo(name, shape, type_name, begin, nbytes)

    def _tensor_entry(self, cursor: _Cursor):
        gguf = _gguf()
        name = cursor.string("a tensor name")
        n_dims = cursor.take("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cursor.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = [cursor.take("Q") for _ in range(n_dims)]
        kind = cursor.take("I")
        offset = cursor.take("Q")
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise cursor.fail(f"tensor '{name}' has an unknown type id {kind}") from None
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims, dtype=object))
        if not all(0 < d < 2**40 for d in dims) or dims[0] % block:
            raise cursor.fail(f"tensor '{name}' has dimensions {dims}, invalid for type {qtype.name} "
                              f"(blocks of {block})")
        return name, tuple(reversed(dims)), qtype.name, offset, count // block * size

    def read(self, name: str) -> np.ndarray:
        """Dequantizes one tensor to a float32 array of its NumPy shape.

        Raises:
            KeyError: No tensor of that name.
            NotImplementedError: A tensor type outside `SUPPORTED_TYPES`.
        """
        gguf = _gguf()
        info = self.tensors[name]
        if info.type_name not in SUPPORTED_TYPES:
            raise NotImplementedError(
                f"GGUF file '{self.path}': tensor '{name}' has type {info.type_name}, which tf_lora does not "
                f"read. Supported: {', '.join(SUPPORTED_TYPES)}."
            )
        qtype = gguf.GGMLQuantizationType[info.type_name]
        raw = np.asarray(self._data[info.offset:info.offset + info.nbytes])
        if info.type_name == "F32":
            return raw.view(np.float32).reshape(info.shape).astype(np.float32, copy=True)
        if info.type_name == "F16":
            return raw.view(np.float16).reshape(info.shape).astype(np.float32)
        raw = raw.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, qtype))
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(info.shape)

