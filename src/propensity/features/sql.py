"""SQL generation for the behavioral features.

The query is shaped so that no event is ever joined to a snapshot:

1. events are pre-aggregated to **customer-days** (plus order-days, cart
   sessions and feature-use coverage changes, each on a single UTC day);
2. every snapshot ``T`` of a customer becomes a *marker* row in the same
   per-customer stream, ordered by ``ord = 2 * day + 1`` for data rows and
   ``ord = 2 * T_day`` for markers, so a marker sorts before the events of its
   own day (those are ``>= T``);
3. a ``W``-day window is a standard ``RANGE BETWEEN 2W-1 PRECEDING AND CURRENT
   ROW`` frame over ``ord`` (exactly the days ``[T-W, T-1]``) and a lifetime
   value is ``ROWS UNBOUNDED PRECEDING``; only marker rows are kept.

Point-in-time correctness follows from the frames: a marker at ``T`` only
reaches rows of days before ``T``. Orders and sessions are grouped per UTC day,
so no part of one lies after ``T`` while another part is counted.

Distinct features used in the last ``W`` days are not additive; each use on
day ``d`` makes the feature count for snapshots ``T`` in ``[d+1, d+W]``, so the
count is a running sum of +1 where such a coverage run starts and -1 where it
ends, which needs only the previous and next use day of the same feature.

The SQL is standard (CTEs, window frames, ``REGR_SLOPE``); the three dialect
specific expressions live in :data:`DIALECTS` ("duckdb" and "spark").
"""

from __future__ import annotations

from .definitions import FEATURES, Feature

__all__ = ["DIALECTS", "AGGREGATES", "feature_sql"]

DIALECTS: dict[str, dict[str, str]] = {
    "duckdb": {
        "epoch": "(epoch_us({x}) / 1000000.0)",
        "last": "last_value({x} IGNORE NULLS)",
        "timestamp": "make_timestamptz(CAST({x} AS BIGINT) * 1000000)",
    },
    "spark": {
        "epoch": "(unix_micros({x}) / 1000000.0)",
        "last": "last_value({x}, true)",
        "timestamp": "timestamp_seconds({x})",
    },
}

# name -> (aggregate, stream column, window in days or None for the whole past)
AGGREGATES: dict[str, tuple[str, str, int | None]] = {
    "sessions_7d": ("SUM", "n_sessions", 7),
    "sessions_14d": ("SUM", "n_sessions", 14),
    "sessions_30d": ("SUM", "n_sessions", 30),
    "sessions_35d": ("SUM", "n_sessions", 35),
    "sessions_90d": ("SUM", "n_sessions", 90),
    "last_session_epoch": ("MAX", "session_epoch", None),
    "events_30d": ("SUM", "n_events", 30),
    "active_days_30d": ("SUM", "active", 30),
    "orders_30d": ("SUM", "n_orders", 30),
    "orders_90d": ("SUM", "n_orders", 90),
    "revenue_30d": ("SUM", "revenue", 30),
    "revenue_90d": ("SUM", "revenue", 90),
    "order_value_slope_last5": ("LAST", "value_slope", None),
    "items_per_basket_slope_last5": ("LAST", "items_slope", None),
    "last_purchase_epoch": ("MAX", "purchase_epoch", None),
    "cart_sessions_30d": ("SUM", "cart_sessions", 30),
    "abandoned_sessions_30d": ("SUM", "abandoned_sessions", 30),
    "features_used_ever": ("SUM", "new_features", None),
    "features_new_30d": ("SUM", "new_features", 30),
    "features_used_30d": ("SUM", "coverage_delta", None),
    "feature_uses_30d": ("SUM", "feature_uses", 30),
    "first_feature_epoch": ("MIN", "first_feature_epoch", None),
    "last_feature_epoch": ("MAX", "last_feature_epoch", None),
    "email_opens_30d": ("SUM", "email_opens", 30),
    "email_clicks_30d": ("SUM", "email_clicks", 30),
    "support_tickets_30d": ("SUM", "support_tickets", 30),
    "support_tickets_90d": ("SUM", "support_tickets", 90),
    "first_event_epoch": ("MIN", "first_epoch", None),
    "last_event_epoch": ("MAX", "last_epoch", None),
    "lifetime_orders": ("SUM", "n_orders", None),
    "lifetime_revenue": ("SUM", "revenue", None),
    "exposures_7d": ("SUM", "exposures", 7),
    "exposures_30d": ("SUM", "exposures", 30),
    "discounts_30d": ("SUM", "discounts", 30),
    "last_exposure_epoch": ("MAX", "exposure_epoch", None),
}

# Stream columns holding counts (0 on rows that carry nothing) vs. extremes (NULL).
_COUNT_COLS = [
    "n_events",
    "active",
    "n_sessions",
    "n_orders",
    "revenue",
    "cart_sessions",
    "abandoned_sessions",
    "new_features",
    "coverage_delta",
    "feature_uses",
    "email_opens",
    "email_clicks",
    "support_tickets",
    "exposures",
    "discounts",
]
_VALUE_COLS = [
    "session_epoch",
    "purchase_epoch",
    "value_slope",
    "items_slope",
    "first_feature_epoch",
    "last_feature_epoch",
    "first_epoch",
    "last_epoch",
    "exposure_epoch",
]
_STREAM_COLS = _COUNT_COLS + _VALUE_COLS
# Window of features_used_30d (distinct features), see the module docstring.
_COVERAGE_DAYS = 30


def _stream_select(values: dict[str, str], head: str) -> str:
    cols = [head]
    for c in _STREAM_COLS:
        default = "0" if c in _COUNT_COLS else "CAST(NULL AS DOUBLE)"
        cols.append(f"CAST({values.get(c, default)} AS DOUBLE) AS {c}")
    return ",\n    ".join(cols)


def feature_sql(events: str, snapshots: str = "snapshots", dialect: str = "duckdb") -> str:
    """Return the SQL computing every feature of the registry at every snapshot.

    Parameters
    ----------
    events : str
        Table expression of canonical events (a table name or, in DuckDB,
        ``read_parquet([...])``).
    snapshots : str
        Table with one column ``snapshot_day`` (BIGINT, days since 1970-01-01):
        the snapshot ``T`` is that day's midnight UTC.
    dialect : {"duckdb", "spark"}
        Which spelling of epoch conversion and ``last_value ... IGNORE NULLS``.

    Returns
    -------
    str
        A query with columns ``customer_id``, ``event_timestamp`` (the snapshot
        time, UTC) and one DOUBLE column per feature, one row per customer and
        snapshot for customers with an event before the snapshot.

    Examples
    --------
    >>> sql = feature_sql("events")
    >>> "REGR_SLOPE" in sql and "sessions_7d" in sql
    True
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect {dialect!r} is not one of {sorted(DIALECTS)}")
    d = DIALECTS[dialect]
    epoch = d["epoch"].format(x="event_timestamp")
    w = _COVERAGE_DAYS
    frames = sorted({win for _, _, win in AGGREGATES.values() if win is not None})
    window_defs = [
        f"w{win} AS (PARTITION BY customer_id ORDER BY ord "
        f"RANGE BETWEEN {2 * win - 1} PRECEDING AND CURRENT ROW)"
        for win in frames
    ]
    window_defs.append("wall AS (PARTITION BY customer_id ORDER BY ord ROWS UNBOUNDED PRECEDING)")
    windows = ",\n  ".join(window_defs)
    aggs = []
    for name, (fn, col, win) in AGGREGATES.items():
        frame = f"w{win}" if win is not None else "wall"
        call = d["last"].format(x=col) if fn == "LAST" else f"{fn}({col})"
        aggs.append(f"{call} OVER {frame} AS {name}")
    agg_list = ",\n  ".join(aggs)
    features = ",\n  ".join(f"CAST({_feature_expr(f)} AS DOUBLE) AS {f.name}" for f in FEATURES)
    day_rows = _stream_select(
        {
            "n_events": "c.n_events",
            "active": "1",
            "n_sessions": "c.n_sessions",
            "n_orders": "COALESCE(o.n_orders, 0)",
            "revenue": "c.revenue",
            "cart_sessions": "COALESCE(s.cart_sessions, 0)",
            "abandoned_sessions": "COALESCE(s.abandoned_sessions, 0)",
            "new_features": "c.new_features",
            "feature_uses": "c.feature_uses",
            "email_opens": "c.email_opens",
            "email_clicks": "c.email_clicks",
            "support_tickets": "c.support_tickets",
            "exposures": "c.exposures",
            "discounts": "c.discounts",
            "session_epoch": "c.session_epoch",
            "purchase_epoch": "c.purchase_epoch",
            "value_slope": "o.value_slope",
            "items_slope": "o.items_slope",
            "first_feature_epoch": "c.first_feature_epoch",
            "last_feature_epoch": "c.last_feature_epoch",
            "first_epoch": "c.first_epoch",
            "last_epoch": "c.last_epoch",
            "exposure_epoch": "c.exposure_epoch",
        },
        "c.customer_id, 2 * c.day + 1 AS ord, 0 AS is_marker",
    )
    cov_rows = _stream_select(
        {"coverage_delta": "delta"}, "customer_id, 2 * day + 1 AS ord, 0 AS is_marker"
    )
    marker_rows = _stream_select({}, "m.customer_id, 2 * m.snapshot_day AS ord, 1 AS is_marker")
    ts = d["timestamp"].format(x="snapshot_day * 86400")
    return f"""
WITH ev AS (
  SELECT customer_id, event_type, session_id, order_id, event_id, feature_name, action,
    CAST(price AS DOUBLE) AS price, CAST(quantity AS DOUBLE) AS quantity,
    {epoch} AS epoch,
    CAST(FLOOR({epoch} / 86400) AS BIGINT) AS day
  FROM {events}
  WHERE {epoch} < (SELECT MAX(snapshot_day) * 86400 FROM {snapshots})
),
day_totals AS (
  SELECT customer_id, day,
    COUNT(*) AS n_events,
    SUM(CASE WHEN event_type = 'session_start' THEN 1 ELSE 0 END) AS n_sessions,
    MAX(CASE WHEN event_type = 'session_start' THEN epoch END) AS session_epoch,
    SUM(CASE WHEN event_type = 'purchase' THEN COALESCE(price * quantity, 0) ELSE 0 END)
      AS revenue,
    MAX(CASE WHEN event_type = 'purchase' THEN epoch END) AS purchase_epoch,
    SUM(CASE WHEN event_type = 'feature_use' THEN 1 ELSE 0 END) AS feature_uses,
    MIN(CASE WHEN event_type = 'feature_use' THEN epoch END) AS first_feature_epoch,
    MAX(CASE WHEN event_type = 'feature_use' THEN epoch END) AS last_feature_epoch,
    SUM(CASE WHEN event_type = 'email_open' THEN 1 ELSE 0 END) AS email_opens,
    SUM(CASE WHEN event_type = 'email_click' THEN 1 ELSE 0 END) AS email_clicks,
    SUM(CASE WHEN event_type = 'support_ticket' THEN 1 ELSE 0 END) AS support_tickets,
    SUM(CASE WHEN event_type = 'campaign_exposure' THEN 1 ELSE 0 END) AS exposures,
    SUM(CASE WHEN event_type = 'campaign_exposure' AND action = 'discount' THEN 1 ELSE 0 END)
      AS discounts,
    MAX(CASE WHEN event_type = 'campaign_exposure' THEN epoch END) AS exposure_epoch,
    MIN(epoch) AS first_epoch,
    MAX(epoch) AS last_epoch
  FROM ev
  GROUP BY customer_id, day
),
orders AS (
  -- An order is the purchase lines sharing an order_id on one UTC day (a line without
  -- order_id is its own order), so no order straddles a snapshot.
  SELECT customer_id, day, COALESCE(order_id, event_id) AS order_key,
    SUM(COALESCE(price * quantity, 0)) AS order_value,
    SUM(COALESCE(quantity, 0)) AS order_items,
    MAX(epoch) AS order_epoch
  FROM ev WHERE event_type = 'purchase'
  GROUP BY customer_id, day, COALESCE(order_id, event_id)
),
order_seq AS (
  SELECT customer_id, day,
    REGR_SLOPE(order_value, seq) OVER last5 AS value_slope,
    REGR_SLOPE(order_items, seq) OVER last5 AS items_slope,
    ROW_NUMBER() OVER (PARTITION BY customer_id, day ORDER BY seq DESC) AS rank_in_day
  FROM (
    SELECT o.*, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY order_epoch, order_key)
      AS seq
    FROM orders o
  ) numbered
  WINDOW last5 AS (PARTITION BY customer_id ORDER BY seq ROWS BETWEEN 4 PRECEDING AND CURRENT ROW)
),
order_days AS (
  SELECT o.customer_id, o.day, n.n_orders, o.value_slope, o.items_slope
  FROM order_seq o
  JOIN (SELECT customer_id, day, COUNT(*) AS n_orders FROM orders GROUP BY customer_id, day) n
    ON n.customer_id = o.customer_id AND n.day = o.day
  WHERE o.rank_in_day = 1
),
cart_days AS (
  -- Events without a session_id on one day count as one session.
  SELECT customer_id, day,
    SUM(has_cart) AS cart_sessions,
    SUM(CASE WHEN has_cart = 1 AND has_purchase = 0 THEN 1 ELSE 0 END) AS abandoned_sessions
  FROM (
    SELECT customer_id, day,
      MAX(CASE WHEN event_type IN ('add_to_cart', 'checkout_start') THEN 1 ELSE 0 END)
        AS has_cart,
      MAX(CASE WHEN event_type = 'purchase' THEN 1 ELSE 0 END) AS has_purchase
    FROM ev
    GROUP BY customer_id, day, COALESCE(session_id, '')
  ) per_session
  GROUP BY customer_id, day
),
feature_days AS (
  SELECT customer_id, feature_name, day,
    LAG(day) OVER (PARTITION BY customer_id, feature_name ORDER BY day) AS prev_day,
    LEAD(day) OVER (PARTITION BY customer_id, feature_name ORDER BY day) AS next_day
  FROM (
    SELECT DISTINCT customer_id, feature_name, day FROM ev
    WHERE event_type = 'feature_use' AND feature_name IS NOT NULL
  ) used
),
new_feature_days AS (
  SELECT customer_id, day, COUNT(*) AS new_features
  FROM feature_days WHERE prev_day IS NULL GROUP BY customer_id, day
),
coverage AS (
  SELECT customer_id, day, 1 AS delta FROM feature_days
  WHERE prev_day IS NULL OR day > prev_day + {w}
  UNION ALL
  SELECT customer_id, day + {w} AS day, -1 AS delta FROM feature_days
  WHERE next_day IS NULL OR next_day > day + {w}
),
catalog AS (
  SELECT s.snapshot_day, COUNT(f.feature_name) AS catalog_size
  FROM {snapshots} s
  LEFT JOIN (
    SELECT feature_name, MIN(day) AS first_day FROM ev
    WHERE event_type = 'feature_use' AND feature_name IS NOT NULL GROUP BY feature_name
  ) f ON f.first_day < s.snapshot_day
  GROUP BY s.snapshot_day
),
markers AS (
  SELECT c.customer_id, s.snapshot_day
  FROM (SELECT customer_id, MIN(day) AS first_day FROM day_totals GROUP BY customer_id) c
  JOIN {snapshots} s ON c.first_day < s.snapshot_day
),
stream AS (
  SELECT {day_rows}
  FROM (
    SELECT t.*, COALESCE(nf.new_features, 0) AS new_features
    FROM day_totals t
    LEFT JOIN new_feature_days nf ON nf.customer_id = t.customer_id AND nf.day = t.day
  ) c
  LEFT JOIN order_days o ON o.customer_id = c.customer_id AND o.day = c.day
  LEFT JOIN cart_days s ON s.customer_id = c.customer_id AND s.day = c.day
  UNION ALL
  SELECT {cov_rows}
  FROM coverage
  UNION ALL
  SELECT {marker_rows}
  FROM markers m
),
windowed AS (
  SELECT customer_id, ord, is_marker,
  {agg_list}
  FROM stream
  WINDOW {windows}
),
snap AS (
  SELECT w.*, CAST(w.ord / 2 AS BIGINT) AS snapshot_day, k.catalog_size,
    CAST(w.ord / 2 AS BIGINT) * 86400.0 AS snapshot_epoch
  FROM windowed w
  JOIN catalog k ON k.snapshot_day = CAST(w.ord / 2 AS BIGINT)
  WHERE w.is_marker = 1
)
SELECT customer_id,
  {ts} AS event_timestamp,
  {features}
FROM snap
"""


def _feature_expr(f: Feature) -> str:
    return f.sql
