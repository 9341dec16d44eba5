"""Fast construction of Arrow string columns from integer codes.

Building millions of Python strings is the slow part of a simulator; these
helpers write fixed-width identifiers straight into an Arrow buffer and map
small vocabularies through ``take``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_DIGITS = {
    w: np.array([[ord(c) for c in f"{i:0{w}d}"] for i in range(10**w)], dtype=np.uint8)
    for w in (1, 2, 3, 4)
}


def fixed_width_ids(
    prefix: str, numbers: np.ndarray, digits: int, valid: np.ndarray | None = None
) -> pa.Array:
    """``prefix`` + zero-padded ``numbers`` as an Arrow string array (null where not ``valid``)."""
    n = int(numbers.size)
    head = prefix.encode()
    width = len(head) + digits
    data = np.empty((n, width), dtype=np.uint8)
    data[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    rest = np.maximum(numbers.astype(np.int64), 0)
    # Four digits per division: a quarter of the integer divisions of a digit loop.
    pos = width
    while pos > len(head):
        take = min(4, pos - len(head))
        rest, chunk = np.divmod(rest, 10**take)
        data[:, pos - take : pos] = _DIGITS[take][chunk]
        pos -= take
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    validity = None
    if valid is not None and not bool(valid.all()):
        validity = pa.py_buffer(np.packbits(valid.astype(bool), bitorder="little"))
    return pa.Array.from_buffers(
        pa.large_string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
    ).cast(pa.string())


def coded_strings(codes: np.ndarray, values: list[str] | tuple[str, ...]) -> pa.Array:
    """Map integer ``codes`` onto ``values``; negative codes become nulls."""
    indices = pa.array(codes.astype(np.int32), mask=codes < 0)
    return pc.take(pa.array(list(values), pa.string()), indices)


def nullable_floats(values: np.ndarray) -> pa.Array:
    """Float64 array with NaN stored as null."""
    return pa.array(values.astype(np.float64), mask=np.isnan(values))
