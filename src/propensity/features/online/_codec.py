"""The one codec of Feast's online storage format: entity keys and ``ValueProto`` bytes.

Feast's SQLite and Redis stores keep each value as a serialized
``feast.types.Value`` and each entity as ``serialize_entity_key`` bytes.
Building those one protobuf object at a time costs about 5 µs a value, more
than the rest of a bulk write or read, so this module produces and parses
*the same bytes* with numpy and plain byte concatenation (a double is the tag
byte ``0x29`` and 8 little-endian bytes; integers are varints). Rare types and
composite keys go through Feast's own converters, imported lazily: this module
imports no Feast at import time, so the scoring service's readers stay light.

Feast's value types are compared by their protobuf enum number
(``ValueType.DOUBLE.value == 5``), which is part of Feast's wire format.
"""

from __future__ import annotations

import itertools
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "decode_value",
    "decode_values",
    "encode_entity_keys",
    "DOUBLE_RECORD",
    "DOUBLE_TAG",
    "NAN_DOUBLE_HEX",
    "encode_matrix",
    "encode_values",
    "entity_key",
    "entity_keys",
    "redis_field",
    "micros",
    "sqlite_epochs",
    "texts",
    "timestamp_protos",
]

# feast.value_type.ValueType numbers (the enum of feast/types/Value.proto).
STRING, INT32, INT64, DOUBLE, FLOAT, BOOL = 2, 3, 4, 5, 6, 7
_BULK_TYPES = {DOUBLE, FLOAT, INT64, INT32, BOOL, STRING}

# Protobuf tags of feast.types.Value fields: (field number << 3) | wire type.
_TAG_STRING = 0x12  # string_val = 2, length-delimited
_TAG_INT32 = 0x18  # int32_val = 3, varint
_TAG_INT64 = 0x20  # int64_val = 4, varint
_TAG_DOUBLE = 0x29  # double_val = 5, fixed64
_TAG_FLOAT = 0x35  # float_val = 6, fixed32
_TAG_BOOL = 0x38  # bool_val = 7, varint


def _kind(value_type: Any) -> int:
    """The enum number of a ``ValueType`` (or an int already)."""
    return int(getattr(value_type, "value", value_type))


def _feast_type(value_type: Any) -> Any:
    from feast.value_type import ValueType

    return ValueType(_kind(value_type))


def redis_field(view: str, feature: str) -> bytes:
    """The hash field Feast's Redis store keeps a feature's value under.

    Feast has no public function for it; ``_mmh3`` is the one it uses, so this
    is the single place the private helper is imported.
    """
    from feast.infra.online_stores.helpers import _mmh3

    return bytes(_mmh3(f"{view}:{feature}"))


def _varint_matrix(u: np.ndarray, tag: int) -> tuple[np.ndarray, np.ndarray]:
    """Tag byte + protobuf varint of each uint64, as a (n, 11) matrix and lengths."""
    n = len(u)
    mat = np.zeros((n, 11), dtype=np.uint8)
    mat[:, 0] = tag
    nbytes = np.ones(n, dtype=np.int64)
    for k in range(1, 10):
        nbytes += (u >> np.uint64(7 * k)) != 0
    for k in range(10):
        byte = ((u >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (k < nbytes - 1).astype(np.uint8) << 7
        mat[:, 1 + k] = byte | more
    return mat, nbytes + 1


def _rows_to_bytes(mat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """Slice row ``i`` of ``mat`` to ``lengths[i]`` bytes, all in C."""
    n, width = mat.shape
    mask = np.arange(width) < lengths[:, None]
    data = np.ascontiguousarray(mat[mask])
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arr = pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    return arr.to_pylist()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _little_endian(a: np.ndarray) -> np.ndarray:
    return a if sys.byteorder == "little" else a.byteswap()


def encode_values(array: pa.Array | pa.ChunkedArray, value_type: Any) -> list[bytes]:
    """Serialize a column to Feast ``ValueProto`` bytes, in bulk.

    Produces exactly ``ValueProto(...).SerializeToString()`` as Feast's
    materialization does: nulls (and NaN floats, which Feast also treats as
    missing) become the empty message ``b""``.

    Parameters
    ----------
    array : pyarrow.Array
        The column values.
    value_type : feast.value_type.ValueType or int
        The Feast type of the feature (``field.dtype.to_value_type()``).

    Returns
    -------
    list of bytes

    Examples
    --------
    >>> import pyarrow as pa
    >>> encode_values(pa.array([1.5, None]), DOUBLE)
    [b')\\x00\\x00\\x00\\x00\\x00\\x00\\xf8?', b'']
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if len(array) == 0:
        return []
    encoded = encode_matrix(array, value_type)
    if encoded is not None:
        return _rows_to_bytes(*encoded)
    if _kind(value_type) == STRING:
        prefix = bytes([_TAG_STRING])
        out: list[bytes] = []
        for s in array.cast(pa.string()).to_pylist():
            if s is None:
                out.append(b"")
            else:
                raw = s.encode("utf8")
                out.append(prefix + _varint(len(raw)) + raw)
        return out
    # Rare types go through Feast's own converter: slower, but the same bytes.
    return [p.SerializeToString() for p in _protos(array, value_type)]


def encode_matrix(array: pa.Array, value_type: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Fixed-width types as a (n, width) byte matrix plus each row's length (0 = missing)."""
    n = len(array)
    kind = _kind(value_type)
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if kind in (DOUBLE, FLOAT):
        np_type, width, tag = ("<f8", 8, _TAG_DOUBLE) if kind == DOUBLE else ("<f4", 4, _TAG_FLOAT)
        a = array.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np_type)
        valid &= ~np.isnan(a)
        mat = np.empty((n, width + 1), dtype=np.uint8)
        mat[:, 0] = tag
        mat[:, 1:] = _little_endian(a).view(np.uint8).reshape(n, width)
        return mat, np.where(valid, width + 1, 0)
    if kind in (INT64, INT32, BOOL):
        filled = pc.fill_null(array.cast(pa.int64()), 0)
        u = filled.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        tag = {INT64: _TAG_INT64, INT32: _TAG_INT32}.get(kind, _TAG_BOOL)
        mat, lengths = _varint_matrix(u, tag)
        return mat, np.where(valid, lengths, 0)
    return None


def _python_values(array: pa.Array, value_type: Any) -> list[Any]:
    """The Python value Feast reads back from the proto (None when missing)."""
    if _kind(value_type) in (DOUBLE, FLOAT):
        a = array.cast(pa.float64()).to_numpy(zero_copy_only=False)
        if _kind(value_type) == FLOAT:
            a = a.astype(np.float32).astype(np.float64)
        values: list[Any] = a.tolist()
        return [None if v != v else v for v in values]  # NaN is missing, like nulls
    return array.to_pylist()


def texts(array: pa.Array, value_type: Any) -> list[str | None]:
    """The ``value_text`` column Feast's SQLite store writes next to each value."""
    if _kind(value_type) in _BULK_TYPES:
        return [None if v is None else str(v) for v in _python_values(array, value_type)]
    from feast.infra.online_stores.helpers import extract_text_and_num

    return [extract_text_and_num(p, False)[0] for p in _protos(array, value_type)]


def _protos(array: pa.Array, value_type: Any) -> list[Any]:
    from feast.type_map import python_values_to_proto_values

    return list(python_values_to_proto_values(array.to_pylist(), _feast_type(value_type)))


def encode_entity_keys(
    columns: Mapping[str, pa.Array | pa.ChunkedArray],
    value_types: Mapping[str, Any],
    serialization_version: int = 3,
) -> list[bytes]:
    """Serialize entity keys exactly as Feast's ``serialize_entity_key`` does.

    A single string or int64 join key (the common case) is encoded with plain
    byte concatenation; anything else goes through Feast's function.

    Parameters
    ----------
    columns : mapping of str to pyarrow.Array
        Join key columns.
    value_types : mapping of str to ValueType
        Feast type of each join key.
    serialization_version : int
        The repo's ``entity_key_serialization_version``.

    Returns
    -------
    list of bytes

    Examples
    --------
    >>> import pyarrow as pa
    >>> encode_entity_keys({"customer_id": pa.array(["C1"])}, {"customer_id": STRING})
    [b'\\x01\\x00\\x00\\x00\\x02\\x00\\x00\\x00\\x0b\\x00\\x00\\x00customer_id\\x02\\x00\\x00\\x00\\x02\\x00\\x00\\x00C1']
    """
    names = list(columns)
    if len(names) == 1 and serialization_version >= 3:
        name = names[0]
        vtype = _kind(value_types[name])
        array = columns[name]
        if array.null_count:
            row = int(np.flatnonzero(~array.is_valid().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"row {row}: join key {name!r} is null; every row needs an entity")
        key = name.encode("utf8")
        if vtype == STRING:
            return entity_keys(array.cast(pa.string()).to_pylist(), name)
        head = struct.pack("<III", 1, STRING, len(key)) + key
        if vtype == INT64:
            head += struct.pack("<II", INT64, 8)
            return [head + struct.pack("<q", v) for v in array.cast(pa.int64()).to_pylist()]
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto

    protos = {name: _protos(pa.array(columns[name]), value_types[name]) for name in names}
    return [
        serialize_entity_key(
            EntityKeyProto(join_keys=names, entity_values=[protos[k][i] for k in names]),
            entity_key_serialization_version=serialization_version,
        )
        for i in range(len(columns[names[0]]))
    ]


def micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch (UTC; naive means UTC)."""
    if not pa.types.is_timestamp(column.type):
        raise ValueError(f"timestamp column must be an Arrow timestamp, got {column.type}")
    column = column.cast(pa.timestamp("us", tz=column.type.tz), safe=False)
    return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def sqlite_epochs(micros: np.ndarray) -> list[int]:
    """Feast stores ``event_ts`` through its sqlite3 adapter: ``int(naive_utc.timestamp())``.

    A naive datetime's ``timestamp()`` reads it as local time, so the stored
    integer depends on the local zone; replicate it per distinct value.
    """
    uniques, inverse = np.unique(micros, return_inverse=True)
    mapped = np.array(
        [
            int(datetime.fromtimestamp(int(u) / 1e6, tz=UTC).replace(tzinfo=None).timestamp())
            for u in uniques
        ],
        dtype=np.int64,
    )
    return mapped[inverse].tolist()


def timestamp_protos(micros: np.ndarray) -> list[bytes]:
    """``google.protobuf.Timestamp`` bytes, as Feast's Redis store writes under ``_ts:view``."""
    from google.protobuf.timestamp_pb2 import Timestamp

    uniques, inverse = np.unique(micros, return_inverse=True)
    encoded = []
    for u in uniques.tolist():
        seconds, micro = divmod(int(u), 1_000_000)
        encoded.append(Timestamp(seconds=seconds, nanos=micro * 1000).SerializeToString())
    return [encoded[i] for i in inverse.tolist()]


def entity_key(value: str, name: str = "customer_id") -> bytes:
    """Feast's serialized entity key (version 3) of one string join key.

    Examples
    --------
    >>> entity_key("C1")[:4]
    b'\\x01\\x00\\x00\\x00'
    """
    return entity_keys([value], name)[0]


def entity_keys(values: Sequence[str], name: str = "customer_id") -> list[bytes]:
    """:func:`entity_key` of many string ids (the head is built once)."""
    # Layout: key count, then per key (type STRING=2, length, name), then per value
    # (type STRING=2, length, bytes); all little-endian uint32.
    key = name.encode("utf8")
    head = struct.pack("<III", 1, STRING, len(key)) + key
    tag = struct.Struct("<II")
    out = []
    for value in values:
        raw = value.encode("utf8")
        out.append(head + tag.pack(STRING, len(raw)) + raw)
    return out


_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")


def decode_value(blob: bytes, feature: str) -> float:
    """A Feast ``ValueProto`` holding one number, without protobuf."""
    if not blob:
        return math.nan  # the empty message: a null (or NaN) value
    tag = blob[0]
    if tag == _TAG_DOUBLE and len(blob) == 9:
        return float(_DOUBLE.unpack_from(blob, 1)[0])
    if tag == _TAG_FLOAT and len(blob) == 5:
        return float(_FLOAT.unpack_from(blob, 1)[0])
    if tag in (_TAG_INT32, _TAG_INT64, _TAG_BOOL):  # varints
        result, shift = 0, 0
        for byte in blob[1:]:
            result |= (byte & 0x7F) << shift
            shift += 7
        if result >= 1 << 63:
            result -= 1 << 64
        return float(result)
    raise ValueError(f"feature {feature!r}: online value of protobuf tag {tag:#x} is not numeric")


#: A ``ValueProto`` holding a double, as a numpy record (tag byte, value).
DOUBLE_RECORD = np.dtype([("tag", "u1"), ("value", "<f8")])
#: The tag byte of a ``ValueProto`` double (the ``tag`` of a :data:`DOUBLE_RECORD`).
DOUBLE_TAG = _TAG_DOUBLE
#: The ``ValueProto`` of a NaN double, as SQL hex (stands for an empty, null value).
NAN_DOUBLE_HEX = "29" + struct.pack("<d", math.nan).hex().upper()


def decode_values(blobs: Sequence[bytes], features: Sequence[str]) -> np.ndarray:
    """Decode many ``ValueProto`` blobs; doubles (the common case) in one numpy pass."""
    count = len(blobs)
    lengths = np.fromiter(map(len, blobs), dtype=np.intp, count=count)
    doubles = lengths == 9
    values = np.full(count, np.nan)
    if doubles.any():
        packed = b"".join(itertools.compress(blobs, doubles.tolist()))
        records = np.frombuffer(packed, dtype=DOUBLE_RECORD)
        values[doubles] = records["value"]
        doubles[np.flatnonzero(doubles)[records["tag"] != _TAG_DOUBLE]] = False
    # Everything else (nulls, floats, ints, a 9-byte varint) takes the general decoder.
    for k in np.flatnonzero(~doubles).tolist():
        values[k] = decode_value(blobs[k], features[k])
    return values
