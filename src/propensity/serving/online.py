"""The scoring service's online reader: a store's vectorized read plus request-time features.

The read itself (customer ids to a float64 matrix, oldest timestamps,
staleness) belongs to the online-store plugins of
:mod:`propensity.features.online`, opened by
:meth:`~propensity.features.store.FeatureStoreAdapter.reader`; this module
adds what only serving knows: the clock and the features computed at request
time from the others (on-demand features), and hands the scorer a
:class:`~propensity.features.online.OnlineRows`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from propensity.features.online import MatrixReader, OnlineRows

__all__ = ["OnlineReader"]

#: ``fn(columns: dict[str, ndarray], now: float) -> ndarray``: one request-time feature.
Derived = Callable[[dict[str, np.ndarray], float], np.ndarray]


class OnlineReader:
    """Implements :class:`~propensity.serving.scorer.FeatureReader` over a store's read.

    Parameters
    ----------
    rows : propensity.features.online.MatrixReader
        The store's vectorized read; its ``feature_names`` are the matrix
        columns, request-time ones included (left NaN by the store).
    derived : mapping of name to callable, optional
        Request-time features, filled into their column from the others.
    clock : callable
        Returns the current epoch seconds (injectable for tests).

    Examples
    --------
    >>> reader = OnlineReader(adapter.reader(["session:sessions_7d"]))  # doctest: +SKIP
    >>> reader.read(["C0000001"]).matrix.shape  # doctest: +SKIP
    (1, 1)
    """

    def __init__(
        self,
        rows: MatrixReader,
        derived: Mapping[str, Derived] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rows = rows
        self.derived = dict(derived or {})
        self.clock = clock
        self.feature_names = rows.feature_names
        self._column = {name: j for j, name in enumerate(self.feature_names)}
        missing = [name for name in self.derived if name not in self._column]
        if missing:
            raise ValueError(f"request-time feature(s) {missing} have no column in the read")

    def read(self, customer_ids: Sequence[str]) -> OnlineRows:
        now = self.clock()
        got = self.rows.read(customer_ids, now)
        matrix = got.matrix  # the read's own array: request-time columns are filled in place
        if self.derived and len(matrix):
            columns = {name: matrix[:, j] for name, j in self._column.items()}
            for name, fn in self.derived.items():
                matrix[:, self._column[name]] = fn(columns, now)
        return got
