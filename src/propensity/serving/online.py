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
from typing import Protocol

import numpy as np

from propensity.features.online import MatrixReader, OnlineRows
from propensity.features.tiles import STREAMING_NAMES

__all__ = ["OnlineReader"]

#: ``fn(columns: dict[str, ndarray], now: float) -> ndarray``: one request-time feature.
Derived = Callable[[dict[str, np.ndarray], float], np.ndarray]


class StreamingRead(Protocol):
    """The streaming state's read (:func:`~propensity.features.online.tile_store`)."""

    def read(self, customer_ids: Sequence[str], clock_us: int) -> np.ndarray: ...


_FRESH = STREAMING_NAMES.index("minutes_since_last_event")


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
    streaming : StreamingRead, optional
        The streaming features, merged from their tiles at the request clock
        into their columns (those of ``rows.feature_names``); a customer with a
        streamed event in the last 24 h is not ``stale``.

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
        streaming: StreamingRead | None = None,
    ) -> None:
        self.rows = rows
        self.streaming = streaming
        self._streamed = [
            (j, STREAMING_NAMES.index(name))
            for j, name in enumerate(rows.feature_names)
            if name in STREAMING_NAMES
        ]
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
        if self.streaming is not None and len(matrix):
            values = self.streaming.read(customer_ids, round(now * 1e6))
            for column, source in self._streamed:
                matrix[:, column] = values[:, source]
            # Fresh streaming state makes the answer current whatever the batch row's age.
            np.logical_and(got.stale, np.isnan(values[:, _FRESH]), out=got.stale)
        return got
