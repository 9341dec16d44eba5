"""The one module that imports numba: small loops numpy has no vectorized form for.

Each is compiled on first use and cached on disk (numba's ``cache=True``), and
releases the GIL, so row chunks run in parallel threads. Each exists because
a measurement says so (the figures are in its docstring).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["mark_row_cells", "sum_credits"]


@numba.njit(nogil=True, cache=True)
def sum_credits(
    leaves: np.ndarray,
    offsets: np.ndarray,
    indptr: np.ndarray,
    features: np.ndarray,
    credits: np.ndarray,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled; its callers are tested
    """Add to ``out[i]`` the credits of the table rows of every leaf row ``i`` reaches.

    Leaf ``leaves[i, t]`` of tree ``t`` is table row ``k = leaves[i, t] + offsets[t]``,
    whose entries are ``indptr[k]:indptr[k + 1]``. Path attribution's
    contributions of 1,000 rows of a 600-tree model: 12 ms on one thread,
    where scipy's sparse product (CSR ``@`` and ``toarray``) took 25 ms.
    """
    for i in range(leaves.shape[0]):
        row = out[i]
        for t in range(leaves.shape[1]):
            k = leaves[i, t] + offsets[t]
            for e in range(indptr[k], indptr[k + 1]):
                row[features[e]] += credits[e]


@numba.njit(nogil=True, cache=True)
def mark_row_cells(
    bits: np.ndarray, cells: np.ndarray, missing: np.int64, low_word: np.int64
) -> bool:  # pragma: no cover - compiled; its callers are tested
    """Copy one row's float64 bit patterns into a compiled model's input cells.

    A NaN becomes the ``missing`` marker; returns False (cells unusable) when a
    present value's low 32 bits equal ``low_word``, which the compiled code
    would take for missing. One call instead of five numpy ones: a 250-tree
    model's one-row prediction 11.2 -> 5.5 µs, of which 3 µs is the trees.
    """
    for j in range(bits.shape[0]):
        b = bits[j]
        if (b & 0x7FF0000000000000) == 0x7FF0000000000000 and (b & 0x000FFFFFFFFFFFFF) != 0:
            cells[j] = missing  # NaN: exponent all ones, mantissa not zero
        elif (b & 0xFFFFFFFF) == low_word:
            return False
        else:
            cells[j] = b
    return True
