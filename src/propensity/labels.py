"""Cutoffs, horizons, label windows and entity frames.

Conventions (shared with the features): a cutoff ``T`` is a midnight UTC; features
at ``T`` see only events with ``event_timestamp < T``; a label with horizon ``H``
looks at ``T <= event_timestamp < T + H days``. Every label window must close at or
before the data end (the lake's latest event), otherwise the label would count a
customer as "did nothing" merely because the data stops.

* churn: active (a ``session_start`` or ``purchase``) in ``[T - L, T)`` and neither
  in ``[T, T + H)``; population = customers active in ``[T - L, T)``.
* purchase: at least one ``purchase`` in ``[T, T + H)``; population = every customer
  whose first event is before ``T``. Only purchase events are needed, so an
  orders-only transaction log is enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import duckdb
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from propensity.events.lake import EventLake

__all__ = [
    "LabelSpec",
    "SplitSpec",
    "LabelWindowError",
    "DataWindow",
    "data_window",
    "to_cutoff",
    "check_label_window",
    "check_label_windows",
    "data_runs_to",
    "choose_cutoffs",
    "latest_cutoff",
    "entity_frame",
    "label_sql",
    "cutoff_table",
    "population_frame",
    "ACTIVITY_EVENTS",
]

#: Event types that make a customer "active" for the churn label.
ACTIVITY_EVENTS: tuple[str, ...] = ("session_start", "purchase")
_EPOCH_MONDAY = pd.Timestamp("1970-01-05", tz="UTC")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelSpec(_Strict):
    """The outcome and its horizon.

    ``churn``: active (session_start or purchase) in ``[T - activity_lookback_days, T)``
    and neither in ``[T, T + horizon_days)``. ``purchase``: at least one purchase in
    ``[T, T + horizon_days)``.
    """

    kind: Literal["churn", "purchase"]
    horizon_days: int = Field(gt=0)
    activity_lookback_days: int = Field(default=30, gt=0)


class SplitSpec(_Strict):
    """Weekly cutoffs and the time-based split into train / validation / test."""

    cutoff_step_days: int = Field(default=7, gt=0)
    n_cutoffs: int = Field(default=12, ge=3)
    validation_cutoffs: int = Field(default=1, ge=1)
    test_cutoffs: int = Field(default=1, ge=1)
    #: Days of history a customer base needs before the first cutoff is useful.
    min_history_days: int = Field(default=28, ge=0)
    #: Keep only train and validation cutoffs whose label window closes by the first
    #: test cutoff, as it would in production on the test date.
    purge: bool = True
    #: Share of customers (chosen by a hash of the id) held out of fitting: the
    #: validation rows are theirs, so early stopping and calibration never score a
    #: customer whose overlapping label window the booster has already learned.
    validation_customers: float = Field(default=0.25, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _enough_train(self) -> SplitSpec:
        if self.validation_cutoffs + self.test_cutoffs >= self.n_cutoffs:
            raise ValueError(
                f"n_cutoffs={self.n_cutoffs} leaves no train cutoff after "
                f"validation_cutoffs={self.validation_cutoffs} and test_cutoffs={self.test_cutoffs}"
            )
        return self


class LabelWindowError(ValueError):
    """A label window would extend past the end of the data."""


@dataclass(frozen=True)
class DataWindow:
    """First and last event timestamps in the lake (UTC)."""

    start: pd.Timestamp
    end: pd.Timestamp


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    # Day boundaries of the label windows are UTC midnights whatever the machine's zone.
    con.execute("SET TimeZone = 'UTC'")
    return con


def to_cutoff(value: str | pd.Timestamp | object) -> pd.Timestamp:
    """Parse a date into a cutoff: midnight UTC of that date.

    Naive values are read as UTC; a value that is not a midnight is an error, since
    features exist only at midnight snapshots.

    Examples
    --------
    >>> to_cutoff("2024-03-04")
    Timestamp('2024-03-04 00:00:00+0000', tz='UTC')
    """
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    if ts != ts.normalize():
        raise ValueError(f"cutoff {value!r} is not a midnight UTC; pass a date such as 2024-03-04")
    return ts


def data_window(lake: EventLake) -> DataWindow:
    """The first and last event timestamps committed to ``lake``.

    Examples
    --------
    >>> data_window(EventLake("data/lake")).end  # doctest: +SKIP
    Timestamp('2024-06-28 23:58:11+0000', tz='UTC')
    """
    con = _connect()
    start, end = con.execute(
        f"SELECT min(event_timestamp), max(event_timestamp) FROM {lake.duckdb_scan()}"
    ).fetchone() or (None, None)
    if start is None or end is None:
        raise LabelWindowError(f"the event lake at {lake.root} holds no timestamped events")
    return DataWindow(pd.Timestamp(start).tz_convert("UTC"), pd.Timestamp(end).tz_convert("UTC"))


def data_runs_to(data_end: pd.Timestamp) -> pd.Timestamp:
    """The midnight after the lake's last event: its last day is taken as complete.

    Examples
    --------
    >>> data_runs_to(pd.Timestamp("2024-06-29 23:58", tz="UTC")).date()
    datetime.date(2024, 6, 30)
    """
    return data_end.floor("D") + pd.Timedelta(days=1)


def check_label_window(cutoff: pd.Timestamp, horizon_days: int, data_end: pd.Timestamp) -> None:
    """Raise :class:`LabelWindowError` unless ``[cutoff, cutoff + horizon)`` closes by the data end.

    The last day holding events counts as complete (:func:`data_runs_to`).

    Examples
    --------
    >>> end = pd.Timestamp("2024-06-30", tz="UTC")
    >>> check_label_window(pd.Timestamp("2024-05-31", tz="UTC"), 30, end)
    """
    closes = cutoff + pd.Timedelta(days=horizon_days)
    if closes > data_runs_to(data_end):
        raise LabelWindowError(
            f"cutoff {cutoff.date()} with horizon {horizon_days} days needs events until "
            f"{closes.date()}, but the data ends at {data_end.isoformat()}; the latest "
            f"--as-of (the date the data runs to) is {data_runs_to(data_end).date()}"
        )


def latest_cutoff(window: DataWindow, horizon_days: int, as_of: object = None) -> pd.Timestamp:
    """The latest labelled cutoff when the data runs to ``as_of``: ``as_of - horizon``.

    ``as_of`` is the date the data runs to (the same meaning for ``train``, ``score``
    and the retrain job): events before it count, so every label window
    ``[T, T + horizon)`` with ``T <= as_of - horizon`` has closed. It defaults to the
    midnight after the lake's last day (:func:`data_runs_to`). A date after the data
    end is an error; so is one leaving no room for a label window, with a hint for a
    date given in the old meaning (the latest labelled cutoff itself).

    Examples
    --------
    >>> w = DataWindow(pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-06-29", tz="UTC"))
    >>> latest_cutoff(w, 30, "2024-05-31").date()
    datetime.date(2024, 5, 1)
    """
    horizon = pd.Timedelta(days=horizon_days)
    if as_of is None:
        return data_runs_to(window.end) - horizon
    date = to_cutoff(as_of)
    if date > data_runs_to(window.end):
        raise LabelWindowError(
            f"--as-of {date.date()} is after the data ends ({window.end.isoformat()}): as-of is "
            f"the date the data runs to; use {data_runs_to(window.end).date()} or earlier"
        )
    last = date - horizon
    if last < window.start.floor("D"):
        raise LabelWindowError(
            f"--as-of {date.date()} minus the {horizon_days}-day horizon is {last.date()}, "
            f"before the first event ({window.start.date()}): no label window fits. as-of is "
            "the date the data runs to (the latest labelled cutoff is as-of minus the horizon); "
            f"for the latest labelled cutoff {date.date()} pass --as-of {(date + horizon).date()}"
        )
    return last


def choose_cutoffs(
    window: DataWindow,
    horizon_days: int,
    split: SplitSpec,
    *,
    as_of: str | pd.Timestamp | None = None,
    weekday: int = 0,
) -> list[pd.Timestamp]:
    """Weekly cutoffs whose label windows all close by ``as_of``, oldest first.

    Parameters
    ----------
    window : DataWindow
        The lake's first and last event times.
    horizon_days : int
        Label horizon.
    split : SplitSpec
        ``n_cutoffs``, ``cutoff_step_days`` and ``min_history_days``.
    as_of : date, optional
        The date the data runs to (see :func:`latest_cutoff`): the latest cutoff is
        ``as_of - horizon_days``. By default the data end, and the latest cutoff is
        aligned to the weekly grid (the ``weekday`` of every week, Monday = 0, the
        feature snapshots' grid).
    weekday : int
        Weekday of the default grid.

    Returns
    -------
    list of pandas.Timestamp
        Midnights UTC, ascending, at most ``split.n_cutoffs``, none earlier than
        ``min_history_days`` after the first event.

    Examples
    --------
    >>> w = DataWindow(pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-06-29", tz="UTC"))
    >>> cuts = choose_cutoffs(w, 30, SplitSpec(n_cutoffs=4))
    >>> [str(c.date()) for c in cuts]
    ['2024-05-06', '2024-05-13', '2024-05-20', '2024-05-27']
    >>> [str(c.date()) for c in choose_cutoffs(w, 30, SplitSpec(n_cutoffs=3), as_of="2024-06-29")]
    ['2024-05-16', '2024-05-23', '2024-05-30']
    """
    last = latest_cutoff(window, horizon_days, as_of)
    if as_of is None:
        offset = (last - _EPOCH_MONDAY).days - weekday
        last = last - pd.Timedelta(days=offset % 7)
    check_label_window(last, horizon_days, window.end)
    first_allowed = window.start.floor("D") + pd.Timedelta(days=split.min_history_days)
    cutoffs = [last - pd.Timedelta(days=k * split.cutoff_step_days) for k in range(split.n_cutoffs)]
    cutoffs = sorted(c for c in cutoffs if c >= first_allowed)
    if not cutoffs:
        raise LabelWindowError(
            f"no cutoff fits: the latest possible cutoff {last.date()} is earlier than "
            f"{split.min_history_days} days after the first event ({window.start.date()})"
        )
    return cutoffs


def cutoff_table(cutoffs: Sequence[pd.Timestamp]) -> pd.DataFrame:
    """The cutoffs as a one-column table of dates (``cutoff``), as the label SQL joins them."""
    dates = [to_cutoff(c).date() for c in cutoffs]
    return pd.DataFrame({"cutoff": pd.to_datetime(dates).date})


def entity_frame(
    lake: EventLake, cutoffs: Sequence[pd.Timestamp], label: LabelSpec, population: str
) -> pd.DataFrame:
    """Labelled entity rows: one per eligible customer and cutoff, computed in DuckDB.

    Parameters
    ----------
    lake : EventLake
    cutoffs : sequence of Timestamp
        Midnights UTC; every label window must close by the lake's data end.
    label : LabelSpec
        Kind, horizon and activity lookback.
    population : {"active", "known"}
        ``active``: a session_start or purchase in the lookback before the cutoff;
        ``known``: any event before the cutoff.

    Returns
    -------
    DataFrame
        ``customer_id`` (str), ``event_timestamp`` (the cutoff, UTC), ``label``
        (int8) and ``days_since_last`` (days from the last activity — for purchase
        labels the last purchase — to the cutoff; NaN when there was none), sorted by
        cutoff then customer.

    Examples
    --------
    >>> spec = LabelSpec(kind="churn", horizon_days=30)  # doctest: +SKIP
    >>> entity_frame(lake, [pd.Timestamp("2024-05-06", tz="UTC")], spec, "active")  # doctest: +SKIP
    """
    check_label_windows(lake, cutoffs, label.horizon_days)
    con = _connect()
    con.register("cuts", cutoff_table(cutoffs))
    frame = con.execute(label_sql(lake.duckdb_scan(), "cuts", label, population)).df()
    return pd.DataFrame(
        {
            "customer_id": frame["customer_id"].astype(str),
            "event_timestamp": pd.to_datetime(frame["event_timestamp"]).dt.tz_localize("UTC"),
            "label": frame["label"].astype("int8"),
            "days_since_last": frame["days_since_last"].astype("float64"),
        }
    )


def check_label_windows(
    lake: EventLake, cutoffs: Sequence[pd.Timestamp], horizon_days: int
) -> None:
    """Refuse no cutoffs, or any cutoff whose label window the lake's data does not close."""
    if not cutoffs:
        raise ValueError("entity_frame needs at least one cutoff")
    end = data_window(lake).end
    for cutoff in cutoffs:
        check_label_window(to_cutoff(cutoff), horizon_days, end)


def label_sql(
    events: str, cuts: str, label: LabelSpec, population: str, dialect: str = "duckdb"
) -> str:
    """The SQL of :func:`entity_frame` in DuckDB's or Spark's dialect (one definition).

    ``events`` is the lake (a table expression), ``cuts`` a table of one DATE
    column ``cutoff``. The query returns ``customer_id``, ``event_timestamp`` (the
    cutoff), ``label`` (0/1) and ``days_since_last``; DuckDB's rows are sorted by
    cutoff then customer, Spark's are not (a global sort would cost a shuffle).

    Examples
    --------
    >>> spec = LabelSpec(kind="purchase", horizon_days=30)
    >>> "ASOF" in label_sql("events", "cuts", spec, "known")
    True
    >>> "ASOF" in label_sql("events", "cuts", spec, "known", dialect="spark")
    False
    """
    from propensity.features.sql import DIALECTS

    if population not in ("active", "known"):
        raise ValueError(f"population {population!r} is not one of 'active', 'known'")
    if dialect not in DIALECTS:
        raise ValueError(f"dialect {dialect!r} is not one of {sorted(DIALECTS)}")
    d = DIALECTS[dialect]
    activity = ", ".join(f"'{e}'" for e in ACTIVITY_EVENTS)
    positive = "n_purchase" if label.kind == "purchase" else "n_active"
    lookback = d["days_before"].format(x="cutoff", n=label.activity_lookback_days)
    horizon_end = d["days_after"].format(x="cutoff", n=label.horizon_days)
    eligible = (
        f"SELECT customer_id, cutoff FROM days JOIN {cuts} "
        f"ON day >= {lookback} AND day < cutoff "
        "WHERE n_active > 0 GROUP BY customer_id, cutoff"
        if population == "active"
        else f"SELECT customer_id, cutoff FROM firsts JOIN {cuts} ON first_day < cutoff"
    )
    # The latest day with the label's activity before the cutoff: DuckDB's ASOF join;
    # Spark has none, so there it is a range join and a max.
    recency = (
        "ASOF LEFT JOIN recent r ON e.customer_id = r.customer_id AND e.cutoff > r.day"
        if dialect == "duckdb"
        else "LEFT JOIN (SELECT e.customer_id, e.cutoff, max(r.day) AS day FROM eligible e "
        "JOIN recent r ON r.customer_id = e.customer_id AND r.day < e.cutoff "
        "GROUP BY e.customer_id, e.cutoff) r "
        "ON r.customer_id = e.customer_id AND r.cutoff = e.cutoff"
    )
    # churn is the absence of activity; purchase is its presence
    has, has_not = ("1", "0") if label.kind == "purchase" else ("0", "1")
    return f"""
    WITH days AS (
        -- customer-days first: every window below is a range over this small table
        SELECT customer_id, CAST(event_timestamp AS DATE) AS day,
               sum(CASE WHEN event_type IN ({activity}) THEN 1 ELSE 0 END) AS n_active,
               sum(CASE WHEN event_type = 'purchase' THEN 1 ELSE 0 END) AS n_purchase
        FROM {events}
        GROUP BY customer_id, CAST(event_timestamp AS DATE)
    ),
    firsts AS (SELECT customer_id, min(day) AS first_day FROM days GROUP BY customer_id),
    eligible AS ({eligible}),
    outcome AS (
        SELECT customer_id, cutoff, sum({positive}) AS n
        FROM days JOIN {cuts} ON day >= cutoff AND day < {horizon_end}
        WHERE {positive} > 0
        GROUP BY customer_id, cutoff
    ),
    recent AS (SELECT customer_id, day FROM days WHERE {positive} > 0)
    SELECT e.customer_id, CAST(e.cutoff AS TIMESTAMP) AS event_timestamp,
           CASE WHEN coalesce(o.n, 0) > 0 THEN {has} ELSE {has_not} END AS label,
           {d["days_between"].format(x="e.cutoff", y="r.day")} AS days_since_last
    FROM eligible e
    LEFT JOIN outcome o ON o.customer_id = e.customer_id AND o.cutoff = e.cutoff
    {recency}
    {"ORDER BY event_timestamp, customer_id" if dialect == "duckdb" else ""}
    """


def population_frame(lake: EventLake, as_of: pd.Timestamp) -> pd.DataFrame:
    """Every customer whose first event is before ``as_of``: the rows to score at that date.

    Returns
    -------
    DataFrame
        ``customer_id`` and ``event_timestamp`` (= ``as_of``), sorted by customer.

    Examples
    --------
    >>> population_frame(lake, pd.Timestamp("2024-06-01", tz="UTC"))  # doctest: +SKIP
    """
    cutoff = to_cutoff(as_of)
    con = _connect()
    ids = con.execute(
        f"SELECT DISTINCT customer_id FROM {lake.duckdb_scan()} "
        "WHERE event_timestamp < ? ORDER BY customer_id",
        [cutoff.to_pydatetime()],
    ).df()["customer_id"]
    return pd.DataFrame({"customer_id": ids.astype(str), "event_timestamp": cutoff})
