"""Tile semantics of the streaming features: minute buckets per customer, merged at read time.

An event updates one *tile*: the customer's bucket of the UTC minute it happened
in (``minute = floor(event_timestamp / 60 s)``), which holds counts (events,
session starts, product views, cart adds, purchases) and the latest times of
an event, a cart add and a purchase. A session table keeps, per customer and
``session_id``, the latest event time and the product views of that session.

At a request clock ``t`` (minute ``K = floor(t / 60 s)``) a window of ``n``
minutes is the tiles ``K - n < minute <= K``: the current, partial minute and
the ``n - 1`` whole minutes before it. Windows are therefore exact on tile
boundaries: an event at minute ``m`` counts in the 30-minute window from its
arrival until the clock reaches minute ``m + 30``, so a count falls to zero
at most 30 minutes after the last event, with no new event needed. "Today"
is the tiles from the minute of the latest midnight (project time zone) to
``K``. Offline, the same merge runs over tiles built from the lake's events
with ``event_timestamp <= t``; online the tiles hold what was applied, which
equals that whenever the applied events are not later than the clock (events
beyond the future tolerance are rejected at the door).

This module is pure (numpy, pyarrow): :func:`tile_rows` and
:func:`session_rows` aggregate events, :func:`merge` turns tiles into the
values of :data:`~propensity.features.definitions.STREAMING_FEATURES`. The
online store and the offline computation both call it, so both read the same
values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from propensity.features.definitions import STREAMING_FEATURES

__all__ = [
    "TILE_US",
    "NONE_US",
    "READ_SPAN_MINUTES",
    "TILE_COLUMNS",
    "STREAMING_NAMES",
    "Tiles",
    "Sessions",
    "tile_rows",
    "session_rows",
    "today_start_minutes",
    "merge",
    "clock_micros",
]

TILE_US = 60_000_000
#: "No such event" in the latest-time columns: below every real time, so ``max`` merges it away.
NONE_US = -(1 << 62)
#: Minutes of tiles a read needs: 24 h windows, and "today" on a 25-hour DST day.
READ_SPAN_MINUTES = 25 * 60 + 1
_SESSION_MINUTES = 30
_DAY_MINUTES = 1440
#: Columns of a tile after ``customer_id`` and ``minute``: counts, then latest times (µs).
TILE_COLUMNS: tuple[str, ...] = (
    "events",
    "sessions",
    "product_views",
    "cart_adds",
    "purchases",
    "last_event_us",
    "last_cart_us",
    "last_purchase_us",
)
_COUNTS = TILE_COLUMNS[:5]
STREAMING_NAMES: tuple[str, ...] = tuple(f.name for f in STREAMING_FEATURES)


@dataclass
class Tiles:
    """Tile rows, each belonging to a request row ``row`` (an index into the clocks)."""

    row: np.ndarray
    minute: np.ndarray
    values: dict[str, np.ndarray]

    @classmethod
    def empty(cls) -> Tiles:
        e = np.zeros(0, np.int64)
        return cls(e, e, {c: e for c in TILE_COLUMNS})


@dataclass
class Sessions:
    """Session rows (latest event time in µs, product views), each of a request row."""

    row: np.ndarray
    last_us: np.ndarray
    views: np.ndarray

    @classmethod
    def empty(cls) -> Sessions:
        e = np.zeros(0, np.int64)
        return cls(e, e, e)


def clock_micros(clock: datetime) -> int:
    """Microseconds since 1970 UTC of an aware datetime, exactly (no float rounding)."""
    if clock.tzinfo is None:
        raise ValueError("the request clock must be timezone-aware")
    return (clock - datetime(1970, 1, 1, tzinfo=UTC)) // _ONE_US


_ONE_US = timedelta(microseconds=1)


def _micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    us = pc.cast(column, pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return np.asarray(us.to_numpy(zero_copy_only=False), np.int64)


def _groups(
    ids: pa.ChunkedArray | pa.Array, second: np.ndarray
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Groups of (id, ``second``): each group's id and ``second``, and each row's group.

    numpy instead of Arrow's ``group_by``: on the few hundred rows of a live
    batch, Acero's fixed cost per call was most of the aggregation.
    """
    encoded = pc.dictionary_encode(
        ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    )
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)
    low = int(second.min()) if second.size else 0
    span = int(second.max()) - low + 1 if second.size else 1
    if len(encoded.dictionary) * span < (1 << 62):
        key = codes * span + (second - low)
        unique, inverse = np.unique(key, return_inverse=True)
        first_code, first_second = unique // span, unique % span + low
    else:  # keys too wide for one int64: a lexicographic sort instead
        pairs = np.column_stack([codes, second])
        unique2, inverse = np.unique(pairs, axis=0, return_inverse=True)
        first_code, first_second = unique2[:, 0], unique2[:, 1]
    return encoded.dictionary.take(pa.array(first_code)), first_second, inverse.reshape(-1)


def _sum(inverse: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(inverse, weights=weights, minlength=n).astype(np.int64)


def _max(inverse: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, NONE_US, np.int64)
    np.maximum.at(out, inverse, values)
    return out


def tile_rows(events: pa.Table) -> pa.Table:
    """Aggregate canonical events into tiles: one row per customer and minute.

    Parameters
    ----------
    events : pa.Table
        ``customer_id``, ``event_timestamp`` and ``event_type`` at least.

    Returns
    -------
    pa.Table
        ``customer_id``, ``minute`` and :data:`TILE_COLUMNS` (int64), sorted by
        customer and minute.

    Examples
    --------
    >>> t = pa.table({"customer_id": ["C1", "C1"], "event_type": ["add_to_cart", "purchase"],
    ...     "event_timestamp": pa.array([60_000_000, 61_000_000], pa.timestamp("us", tz="UTC"))})
    >>> tile_rows(t).column("cart_adds").to_pylist()
    [1]
    """
    us = _micros(events.column("event_timestamp"))
    kind = events.column("event_type")
    customers, minutes, inverse = _groups(
        events.column("customer_id"), np.floor_divide(us, TILE_US)
    )
    n = len(minutes)

    def flag(name: str) -> np.ndarray:
        return np.asarray(pc.equal(kind, name).to_numpy(zero_copy_only=False), bool)

    def when(name: str) -> np.ndarray:
        return _max(inverse, np.where(flag(name), us, NONE_US), n)

    columns = {
        "customer_id": customers,
        "minute": minutes,
        "events": np.bincount(inverse, minlength=n).astype(np.int64),
        "sessions": _sum(inverse, flag("session_start"), n),
        "product_views": _sum(inverse, flag("product_view"), n),
        "cart_adds": _sum(inverse, flag("add_to_cart"), n),
        "purchases": _sum(inverse, flag("purchase"), n),
        "last_event_us": _max(inverse, us, n),
        "last_cart_us": when("add_to_cart"),
        "last_purchase_us": when("purchase"),
    }
    return pa.table(columns)


def session_rows(events: pa.Table) -> pa.Table:
    """Aggregate events with a ``session_id`` per customer and session.

    Returns
    -------
    pa.Table
        ``customer_id``, ``session_id``, ``last_us`` (latest event time, µs) and
        ``views`` (product views), int64.
    """
    sub = events.filter(pc.is_valid(events.column("session_id")))
    # Sessions are keyed by customer and session: encode the pair as one text key.
    sessions = pc.dictionary_encode(sub.column("session_id").combine_chunks())
    codes = np.asarray(sessions.indices.to_numpy(zero_copy_only=False), np.int64)
    customers, session_codes, inverse = _groups(sub.column("customer_id"), codes)
    n = len(session_codes)
    views = pc.equal(sub.column("event_type"), "product_view").to_numpy(zero_copy_only=False)
    return pa.table(
        {
            "customer_id": customers,
            "session_id": sessions.dictionary.take(pa.array(session_codes)),
            "last_us": _max(inverse, _micros(sub.column("event_timestamp")), n),
            "views": _sum(inverse, np.asarray(views, bool), n),
        }
    )


def today_start_minutes(clock_us: np.ndarray, timezone: str) -> np.ndarray:
    """Minute index of the latest local midnight (``timezone``) at or before each clock."""
    clock = np.asarray(clock_us, np.int64)
    if clock.size and (clock == clock.flat[0]).all():
        # One request clock (every online read): a midnight falls on a minute boundary,
        # so the answer is the clock's minute's, cached (pandas' time zone conversion
        # costs about as much as the rest of a one-customer read).
        return np.full(clock.shape, _today_start(int(clock.flat[0]) // TILE_US, timezone))
    return _local_midnights(clock, timezone)


@functools.lru_cache(maxsize=4096)
def _today_start(minute: int, timezone: str) -> int:
    return int(_local_midnights(np.array([minute * TILE_US], np.int64), timezone)[0])


def _local_midnights(clock_us: np.ndarray, timezone: str) -> np.ndarray:
    clock = pd.DatetimeIndex(pd.to_datetime(clock_us, unit="us", utc=True))
    wall = clock.tz_convert(timezone).tz_localize(None).floor("D")
    # A midnight that happened twice (a DST fall-back at 00:00) is its first
    # occurrence; one that never happened starts the day at the next valid time.
    local = wall.tz_localize(
        timezone, ambiguous=np.ones(len(wall), bool), nonexistent="shift_forward"
    )
    ns = local.tz_convert("UTC").as_unit("ns").asi8
    return np.floor_divide(ns, TILE_US * 1000)


def _window_sum(tiles: Tiles, column: str, lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    inside = (tiles.minute > lo[tiles.row]) & (tiles.minute <= hi[tiles.row])
    weights = tiles.values[column][inside].astype(np.float64)
    return np.bincount(tiles.row[inside], weights=weights, minlength=n)


def _window_max(tiles: Tiles, column: str, lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    inside = (tiles.minute > lo[tiles.row]) & (tiles.minute <= hi[tiles.row])
    out = np.full(n, NONE_US, np.int64)
    np.maximum.at(out, tiles.row[inside], tiles.values[column][inside].astype(np.int64))
    return out


def _minutes_since(clock_us: np.ndarray, last: np.ndarray) -> np.ndarray:
    found = last > NONE_US
    out = np.full(clock_us.shape, np.nan)
    out[found] = (clock_us[found] - last[found]) / 60e6
    return out


def _session_views(sessions: Sessions, k: np.ndarray, n: int) -> np.ndarray:
    minute = np.floor_divide(sessions.last_us, TILE_US)
    live = (minute > k[sessions.row] - _SESSION_MINUTES) & (minute <= k[sessions.row])
    row, last, views = sessions.row[live], sessions.last_us[live], sessions.views[live]
    out = np.zeros(n)
    if not row.size:
        return out
    # Per request row, the session with the latest event (ties: more views) wins.
    order = np.lexsort((views, last, row))
    row, views = row[order], views[order]
    final = np.r_[row[1:] != row[:-1], True]
    out[row[final]] = views[final]
    return out


@functools.cache
def _stateless() -> np.ndarray:
    """:func:`merge`'s row for a customer without tiles or sessions (the same at every clock)."""
    zero = np.zeros(1, np.int64)
    row = _merged(Tiles.empty(), Sessions.empty(), zero, zero)[0]
    row.flags.writeable = False
    return row


def merge(
    tiles: Tiles, sessions: Sessions, clock_us: np.ndarray, today_start: np.ndarray
) -> np.ndarray:
    """Streaming feature values at each request clock, from its tiles and sessions.

    Parameters
    ----------
    tiles, sessions : Tiles, Sessions
        Rows tagged with the request row they belong to.
    clock_us : np.ndarray
        Request clocks, µs since 1970 UTC (int64), one per request row.
    today_start : np.ndarray
        :func:`today_start_minutes` of the clocks.

    Returns
    -------
    np.ndarray
        ``(len(clock_us), len(STREAMING_NAMES))`` float64, columns in
        :data:`STREAMING_NAMES` order.
    """
    clock_us = np.asarray(clock_us, np.int64)
    n = clock_us.size
    if not tiles.row.size and not sessions.row.size:
        # No state at all (most customers at any moment): the values at any clock.
        return np.tile(_stateless(), (n, 1))
    return _merged(tiles, sessions, clock_us, today_start)


def _merged(
    tiles: Tiles, sessions: Sessions, clock_us: np.ndarray, today_start: np.ndarray
) -> np.ndarray:
    n = clock_us.size
    k = np.floor_divide(clock_us, TILE_US)
    out: dict[str, np.ndarray] = {}
    kinds = {
        "events": "events",
        "sessions": "sessions",
        "product_views": "product_views",
        "cart_adds": "cart_adds",
    }
    for prefix, column in kinds.items():
        for label, minutes in (("30m", 30), ("1h", 60), ("24h", _DAY_MINUTES)):
            out[f"{prefix}_{label}"] = _window_sum(tiles, column, k - minutes, k, n)
    day = k - _DAY_MINUTES
    last_event = _window_max(tiles, "last_event_us", day, k, n)
    last_cart = _window_max(tiles, "last_cart_us", day, k, n)
    last_purchase = _window_max(tiles, "last_purchase_us", day, k, n)
    out["cart_open_24h"] = ((last_cart > NONE_US) & (last_cart > last_purchase)).astype(np.float64)
    out["minutes_since_last_cart_add"] = _minutes_since(clock_us, last_cart)
    out["minutes_since_last_event"] = _minutes_since(clock_us, last_event)
    out["session_product_views"] = _session_views(sessions, k, n)
    out["purchases_today"] = _window_sum(tiles, "purchases", today_start - 1, k, n)
    return (
        np.column_stack([out[name] for name in STREAMING_NAMES])
        if n
        else np.zeros((0, len(STREAMING_NAMES)))
    )
