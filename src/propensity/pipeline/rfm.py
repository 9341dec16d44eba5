"""Repeat-purchase summaries (RFM) per customer and cutoff, from the lake; the BG/NBD outputs.

The summary of :mod:`propensity.models.clv` in days, computed in DuckDB from
purchases strictly before each cutoff, so it is point-in-time correct like the
Feast features: ``frequency`` (purchase days after the first), ``recency`` (first
to last purchase day), ``T`` (first purchase day, or first event day for a
customer who never bought, to the cutoff), ``monetary`` (mean revenue of the
repeat purchase days), plus ``orders`` and ``revenue`` (all purchase lines and
their revenue) and ``days_since_purchase``: the inputs of the RFM baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import pandas as pd

from propensity.events.lake import EventLake
from propensity.labels import to_cutoff
from propensity.models.clv import CLV_FEATURES, BGNBDBaseline

__all__ = ["RFM_FEATURES", "clv_features", "rfm_frame"]

#: The RFM baseline's features (recency, frequency, monetary, tenure).
RFM_FEATURES = ["days_since_purchase", "frequency", "orders", "revenue", "monetary", "T"]


def rfm_frame(lake: EventLake, cutoffs: Sequence[pd.Timestamp]) -> pd.DataFrame:
    """One row per customer known before each cutoff: the repeat-purchase summary.

    Examples
    --------
    >>> rfm_frame(EventLake("data/lake"), [pd.Timestamp("2024-05-06", tz="UTC")])  # doctest: +SKIP
    """
    cuts = pd.DataFrame({"cutoff": pd.to_datetime([to_cutoff(c).date() for c in cutoffs]).date})
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("cuts", cuts)
        frame = con.execute(
            f"""
            WITH days AS (
                SELECT customer_id, CAST(event_timestamp AS DATE) AS day,
                       count(*) FILTER (WHERE event_type = 'purchase') AS n,
                       coalesce(sum(coalesce(price, 0) * coalesce(quantity, 1))
                                FILTER (WHERE event_type = 'purchase'), 0) AS value
                FROM {lake.duckdb_scan()} GROUP BY ALL
            ),
            firsts AS (SELECT customer_id, min(day) AS first_day FROM days GROUP BY ALL),
            buys AS (
                SELECT d.customer_id, c.cutoff, min(d.day) AS first_buy, max(d.day) AS last_buy,
                       count(*) AS buy_days, sum(d.n) AS orders, sum(d.value) AS revenue,
                       sum(d.value) - arg_min(d.value, d.day) AS repeat_value
                FROM days d JOIN cuts c ON d.day < c.cutoff
                WHERE d.n > 0 GROUP BY ALL
            )
            SELECT f.customer_id, CAST(c.cutoff AS TIMESTAMP) AS cutoff,
                   coalesce(b.buy_days - 1, 0) AS frequency,
                   coalesce(CAST(b.last_buy - b.first_buy AS DOUBLE), 0) AS recency,
                   CAST(c.cutoff - coalesce(b.first_buy, f.first_day) AS DOUBLE) AS "T",
                   CASE WHEN b.buy_days > 1 THEN b.repeat_value / (b.buy_days - 1) ELSE 0 END
                       AS monetary,
                   coalesce(b.orders, 0) AS orders, coalesce(b.revenue, 0) AS revenue,
                   CAST(c.cutoff - b.last_buy AS DOUBLE) AS days_since_purchase
            FROM firsts f JOIN cuts c ON f.first_day < c.cutoff
            LEFT JOIN buys b ON b.customer_id = f.customer_id AND b.cutoff = c.cutoff
            ORDER BY cutoff, customer_id
            """
        ).df()
    finally:
        con.close()
    frame.insert(0, "customer_id", frame.pop("customer_id").astype(str))
    frame.insert(
        1,
        "event_timestamp",
        pd.to_datetime(frame.pop("cutoff")).dt.tz_localize("UTC").astype("datetime64[ns, UTC]"),
    )
    numeric = [c for c in frame.columns if c not in ("customer_id", "event_timestamp")]
    frame[numeric] = frame[numeric].astype("float64")
    return frame


def clv_features(rfm: pd.DataFrame, horizon_days: int) -> tuple[pd.DataFrame, dict[str, dict]]:
    """BG/NBD (and Gamma-Gamma) outputs at each cutoff, each fitted on that cutoff's rows only.

    A cutoff's summary uses only purchases before it, so a model fitted on it knows
    nothing later: the outputs are point-in-time correct features.

    Returns
    -------
    features : DataFrame
        ``customer_id``, ``event_timestamp`` and ``CLV_FEATURES``.
    params : dict
        The fitted parameters per cutoff (ISO date), for logging.
    """
    parts, params = [], {}
    for cutoff, rows in rfm.groupby("event_timestamp", sort=True):
        model = BGNBDBaseline().fit(rows)
        out = model.features(rows, horizon_days)
        out.insert(0, "customer_id", rows["customer_id"].to_numpy())
        out.insert(1, "event_timestamp", cutoff)
        parts.append(out)
        params[str(pd.Timestamp(cutoff).date())] = {**model.params_, **model.spend_params_}
    columns = ["customer_id", "event_timestamp", *CLV_FEATURES]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return frame[columns], params
