"""SQL generation for the behavioral features.

The query never joins an event to a snapshot, and never runs a sliding window
frame over events (DuckDB evaluates each framed aggregate separately, which
costs about a second per aggregate per million rows). Instead:

0. customers get an integer key ``ck`` (their rank by ``customer_id``) before
   anything else, so every grouping, window and join hashes or sorts numbers;
   the string id comes back only in the final join;
1. events are pre-aggregated once to **customer-days** (counts per event type,
   revenue, orders, cart sessions, features first used that day, first/last
   times), each on a single UTC day, so no order or session straddles a
   snapshot;
2. **short windowed values** (``W`` <= 35 days) come from ONE range join of the
   snapshots with the narrow customer-days (only the columns those windows
   read) of ``[T - 35, T)``, grouped by customer and snapshot, with one
   conditional ``SUM(CASE WHEN day >= T - W ...)`` per aggregate: the join is
   small because there are few snapshots per day;
3. **lifetime values** (tenure, lifetime orders and revenue, last and first
   times, distinct features ever, the last-5-orders slopes) are aggregated per
   customer and *bucket* (the days between two consecutive points), then
   accumulated over the customer's point rows with one ``ROWS UNBOUNDED
   PRECEDING`` frame: that window runs over customers x points rows, not over
   events. The points are the snapshots and, for each **long window**
   (``W`` > 35 days, the 90-day sums), every snapshot minus ``W``;
4. a long window's sum is the running sum at ``T`` minus the running sum at
   ``T - W`` (a self join of the accumulated rows), which keeps the range join
   of step 2 at 35 days instead of 90. Counts are exact; a revenue difference
   may differ from the direct sum in the last bits (about 1e-12).

Point-in-time correctness follows from the filters: the range join only
reaches days ``< T`` and a bucket ending at a point ``P`` only holds days ``< P``.

Distinct features used in the last ``W`` days are not additive; each use on
day ``d`` makes the feature count for snapshots ``T`` in ``[d+1, d+W]``, so the
count is a running sum of +1 where such a coverage run starts and -1 where it
ends, which needs only the previous and next use day of the same feature.

The SQL is standard (CTEs, inequality joins, window frames, ``REGR_SLOPE``);
the dialect specific expressions live in :data:`DIALECTS` ("duckdb" and
"spark"). The integer key of step 0 is DuckDB's: in Spark a window ordered over
every customer would run in one task, so Spark keys on ``customer_id`` itself.
"""

from __future__ import annotations

from .definitions import FEATURES, Feature

__all__ = ["DIALECTS", "AGGREGATES", "feature_sql", "feature_steps"]

DIALECTS: dict[str, dict[str, str]] = {
    "duckdb": {
        "epoch": "(epoch_us({x}) / 1000000.0)",
        "last": "last_value({x} IGNORE NULLS)",
        "timestamp": "make_timestamptz(CAST({x} AS BIGINT) * 1000000)",
        "key": "ROW_NUMBER() OVER (ORDER BY customer_id)",
        "days_before": "({x} - {n})",
        "days_after": "({x} + {n})",
        "days_between": "CAST(({x} - {y}) AS DOUBLE)",
    },
    "spark": {
        # 1000000D: a DOUBLE literal (1000000.0 is a DECIMAL in Spark, so would the epoch be).
        "epoch": "(unix_micros({x}) / 1000000D)",
        "last": "last_value({x}, true)",
        "timestamp": "timestamp_seconds({x})",
        "key": "customer_id",
        "days_before": "date_sub({x}, {n})",
        "days_after": "date_add({x}, {n})",
        "days_between": "CAST(datediff({x}, {y}) AS DOUBLE)",
    },
}

# name -> (aggregate, stream column, window in days or None for the whole past)
AGGREGATES: dict[str, tuple[str, str, int | None]] = {
    "sessions_1d": ("SUM", "n_sessions", 1),
    "sessions_3d": ("SUM", "n_sessions", 3),
    "sessions_7d": ("SUM", "n_sessions", 7),
    "sessions_14d": ("SUM", "n_sessions", 14),
    "sessions_28d": ("SUM", "n_sessions", 28),
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

# Columns of the customer-day table read by windowed aggregates (all DOUBLE, 0 when
# nothing happened that day).
_DAY_COUNTS = [
    "n_events",
    "active",
    "n_sessions",
    "n_orders",
    "revenue",
    "cart_sessions",
    "abandoned_sessions",
    "new_features",
    "feature_uses",
    "email_opens",
    "email_clicks",
    "support_tickets",
    "exposures",
    "discounts",
]
# Lifetime stream columns and the source rows that carry them (others are 0 / NULL).
_LIFE_FROM_DAYS = [
    "n_orders",
    "revenue",
    "new_features",
    "session_epoch",
    "purchase_epoch",
    "first_feature_epoch",
    "last_feature_epoch",
    "first_epoch",
    "last_epoch",
    "exposure_epoch",
]
_LIFE_FROM_ORDERS = ["value_slope", "items_slope"]
# Windows longer than this are differences of running sums (see the module docstring), so
# the range join of snapshots x customer-days only spans this many days.
_JOIN_DAYS = 35
_LIFE_FROM_COVERAGE = ["coverage_delta"]
# Window of features_used_30d (distinct features), see the module docstring.
_COVERAGE_DAYS = 30


def _long_windows() -> dict[str, tuple[str, int]]:
    """Aggregate name -> (day-table column, window) of the windows beyond the join."""
    return {
        name: (col, win)
        for name, (_, col, win) in AGGREGATES.items()
        if win is not None and win > _JOIN_DAYS
    }


def _lifetime_columns() -> dict[str, str]:
    """Stream column -> aggregate of the running (lifetime and long window) aggregates."""
    cols: dict[str, str] = {}
    for fn, col, win in AGGREGATES.values():
        if win is None and fn != "MIN":
            cols.setdefault(col, fn)
    for col, _ in _long_windows().values():
        cols.setdefault(col, "SUM")
    return cols


def _first_times() -> dict[str, str]:
    """Aggregate name -> day-table epoch column of the lifetime ``MIN`` aggregates.

    The earliest time before ``T`` is the customer's earliest time overall when
    that is before ``T`` (else there is none), so it needs no running window.
    """
    return {name: col for name, (fn, col, win) in AGGREGATES.items() if win is None and fn == "MIN"}


def _life_rows(source: str, carried: list[str], life: dict[str, str]) -> str:
    cols = ["ck", "bucket_day"]
    for col, fn in life.items():
        if col in carried:
            cols.append(f"CAST({col} AS DOUBLE) AS {col}")
        else:
            cols.append(f"{'0' if fn == 'SUM' else 'CAST(NULL AS DOUBLE)'} AS {col}")
    return f"SELECT {', '.join(cols)} FROM {source}"


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
    epoch = d["epoch"].format(x="e.event_timestamp")
    w = _COVERAGE_DAYS
    windowed = {name: spec for name, spec in AGGREGATES.items() if spec[2] is not None}
    if any(fn != "SUM" for fn, _, _ in windowed.values()):
        raise ValueError("windowed aggregates must be SUMs (they come from the range join)")
    long_windows = _long_windows()
    joined = {name: spec for name, spec in windowed.items() if name not in long_windows}
    join_days = max(win for _, _, win in joined.values() if win is not None)
    join_cols = sorted({col for _, col, _ in joined.values()})
    window_aggs = ",\n    ".join(
        f"SUM(CASE WHEN d.day >= s.snapshot_day - {win} THEN d.{col} ELSE 0 END) AS {name}"
        for name, (_, col, win) in joined.items()
    )
    life = _lifetime_columns()
    life_stream = "\n  UNION ALL\n  ".join(
        [
            _life_rows(
                "day_buckets", _LIFE_FROM_DAYS + [c for c, _ in long_windows.values()], life
            ),
            _life_rows("order_buckets", _LIFE_FROM_ORDERS, life),
            _life_rows("coverage_buckets", _LIFE_FROM_COVERAGE, life),
        ]
    )
    # At most one slope row per (customer, bucket), so MAX picks it.
    bucket_aggs = ",\n    ".join(
        f"{'MAX' if fn == 'LAST' else fn}({col}) AS {col}" for col, fn in life.items()
    )
    firsts = _first_times()
    first_cols = "".join(f", MIN({col}) AS {col}" for col in sorted(set(firsts.values())))
    running = [
        f"CASE WHEN m.{col} < m.snapshot_day * 86400.0 THEN m.{col} END AS {name}"
        for name, col in firsts.items()
    ]
    for name, (fn, col, win) in AGGREGATES.items():
        if win is None and fn != "MIN":
            call = d["last"].format(x=f"l.{col}") if fn == "LAST" else f"{fn}(l.{col})"
            running.append(f"{call} OVER wall AS {name}")
    for col in sorted({col for col, _ in long_windows.values()}):
        running.append(f"SUM(l.{col}) OVER wall AS run_{col}")
    running_list = ",\n    ".join(running)
    # A long window's sum is the running sum at T minus the one at T - W: the snapshots
    # gain a "point" at every T - W, so the buckets split there.
    spans = sorted({win for _, win in long_windows.values()})
    shadow_points = "".join(
        f"\n  UNION\n  SELECT snapshot_day - {win} AS snapshot_day FROM {snapshots}"
        for win in spans
    )
    back_joins = "".join(
        f"\n  LEFT JOIN cumulative b{win} ON b{win}.ck = c.ck"
        f" AND b{win}.snapshot_day = c.snapshot_day - {win}"
        for win in spans
    )
    snap_parts = []
    for name, (_, col, win) in AGGREGATES.items():
        if name in long_windows:
            # No row at T - W: the customer had no day before it, so the running sum is 0.
            snap_parts.append(f"COALESCE(c.run_{col}, 0) - COALESCE(b{win}.run_{col}, 0) AS {name}")
        elif win is not None:
            snap_parts.append(f"COALESCE(w.{name}, 0) AS {name}")
        else:
            snap_parts.append(f"c.{name}")
    snap_cols = ",\n    ".join(snap_parts)
    features = ",\n  ".join(f"CAST({_feature_expr(f)} AS DOUBLE) AS {f.name}" for f in FEATURES)
    ts = d["timestamp"].format(x="snapshot_day * 86400")
    return f"""
WITH ids AS (
  -- An integer key from the start: every GROUP BY, window and join below hashes or
  -- sorts numbers, not strings; the ids keep the customer_id order.
  SELECT customer_id, {d["key"]} AS ck
  FROM (SELECT DISTINCT customer_id FROM {events}) u
),
ev AS (
  SELECT i.ck, e.event_type, e.session_id, e.order_id, e.event_id, e.feature_name, e.action,
    CAST(e.price AS DOUBLE) AS price, CAST(e.quantity AS DOUBLE) AS quantity,
    {epoch} AS epoch,
    CAST(FLOOR({epoch} / 86400) AS BIGINT) AS day
  FROM {events} e
  JOIN ids i ON i.customer_id = e.customer_id
  WHERE {epoch}
    < (SELECT MAX(snapshot_day) * 86400 FROM {snapshots})
),
day_totals AS (
  SELECT ck, day,
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
  GROUP BY ck, day
),
points AS (
  -- The snapshots and, for the long windows, each snapshot minus the window.
  SELECT snapshot_day FROM {snapshots}{shadow_points}
),
bucket_of AS (
  -- Each day's bucket is the first point after it: a few hundred rows.
  SELECT x.day, MIN(p.snapshot_day) AS bucket_day
  FROM (
    SELECT DISTINCT day FROM day_totals
    UNION
    SELECT DISTINCT day + {w} AS day FROM day_totals
  ) x
  JOIN points p ON p.snapshot_day > x.day
  GROUP BY x.day
),
orders AS (
  -- An order is the purchase lines sharing an order_id on one UTC day (a line without
  -- order_id is its own order), so no order straddles a snapshot.
  SELECT ck, day, COALESCE(order_id, event_id) AS order_key,
    SUM(COALESCE(price * quantity, 0)) AS order_value,
    SUM(COALESCE(quantity, 0)) AS order_items,
    MAX(epoch) AS order_epoch
  FROM ev WHERE event_type = 'purchase'
  GROUP BY ck, day, COALESCE(order_id, event_id)
),
order_seq AS (
  SELECT ck, day,
    REGR_SLOPE(order_value, seq) OVER last5 AS value_slope,
    REGR_SLOPE(order_items, seq) OVER last5 AS items_slope,
    seq
  FROM (
    SELECT o.*, ROW_NUMBER() OVER (PARTITION BY ck ORDER BY order_epoch, order_key) AS seq
    FROM orders o
  ) numbered
  WINDOW last5 AS (PARTITION BY ck ORDER BY seq ROWS BETWEEN 4 PRECEDING AND CURRENT ROW)
),
order_buckets AS (
  -- The slopes as of a snapshot are those at the last order of the latest bucket.
  SELECT ck, bucket_day, value_slope, items_slope
  FROM (
    SELECT o.ck, b.bucket_day, o.value_slope, o.items_slope,
      ROW_NUMBER() OVER (PARTITION BY o.ck, b.bucket_day ORDER BY o.seq DESC) AS rn
    FROM order_seq o JOIN bucket_of b ON b.day = o.day
  ) ranked
  WHERE rn = 1
),
order_days AS (
  SELECT ck, day, COUNT(*) AS n_orders FROM orders GROUP BY ck, day
),
cart_days AS (
  -- Events without a session_id on one day count as one session.
  SELECT ck, day,
    SUM(has_cart) AS cart_sessions,
    SUM(CASE WHEN has_cart = 1 AND has_purchase = 0 THEN 1 ELSE 0 END) AS abandoned_sessions
  FROM (
    SELECT ck, day,
      MAX(CASE WHEN event_type IN ('add_to_cart', 'checkout_start') THEN 1 ELSE 0 END)
        AS has_cart,
      MAX(CASE WHEN event_type = 'purchase' THEN 1 ELSE 0 END) AS has_purchase
    FROM ev
    WHERE event_type IN ('add_to_cart', 'checkout_start', 'purchase')
    GROUP BY ck, day, COALESCE(session_id, '')
  ) per_session
  GROUP BY ck, day
),
feature_days AS (
  SELECT ck, feature_name, day,
    LAG(day) OVER (PARTITION BY ck, feature_name ORDER BY day) AS prev_day,
    LEAD(day) OVER (PARTITION BY ck, feature_name ORDER BY day) AS next_day
  FROM (
    SELECT DISTINCT ck, feature_name, day FROM ev
    WHERE event_type = 'feature_use' AND feature_name IS NOT NULL
  ) used
),
new_feature_days AS (
  SELECT ck, day, COUNT(*) AS new_features
  FROM feature_days WHERE prev_day IS NULL GROUP BY ck, day
),
coverage_buckets AS (
  SELECT c.ck, b.bucket_day, SUM(c.delta) AS coverage_delta
  FROM (
    SELECT ck, day, 1 AS delta FROM feature_days
    WHERE prev_day IS NULL OR day > prev_day + {w}
    UNION ALL
    SELECT ck, day + {w} AS day, -1 AS delta FROM feature_days
    WHERE next_day IS NULL OR next_day > day + {w}
  ) c
  JOIN bucket_of b ON b.day = c.day
  GROUP BY c.ck, b.bucket_day
),
days AS (
  SELECT t.ck, t.day,
    CAST(t.n_events AS DOUBLE) AS n_events,
    CAST(1 AS DOUBLE) AS active,
    CAST(t.n_sessions AS DOUBLE) AS n_sessions,
    CAST(COALESCE(o.n_orders, 0) AS DOUBLE) AS n_orders,
    CAST(t.revenue AS DOUBLE) AS revenue,
    CAST(COALESCE(s.cart_sessions, 0) AS DOUBLE) AS cart_sessions,
    CAST(COALESCE(s.abandoned_sessions, 0) AS DOUBLE) AS abandoned_sessions,
    CAST(COALESCE(nf.new_features, 0) AS DOUBLE) AS new_features,
    CAST(t.feature_uses AS DOUBLE) AS feature_uses,
    CAST(t.email_opens AS DOUBLE) AS email_opens,
    CAST(t.email_clicks AS DOUBLE) AS email_clicks,
    CAST(t.support_tickets AS DOUBLE) AS support_tickets,
    CAST(t.exposures AS DOUBLE) AS exposures,
    CAST(t.discounts AS DOUBLE) AS discounts,
    t.session_epoch, t.purchase_epoch, t.first_feature_epoch, t.last_feature_epoch,
    t.first_epoch, t.last_epoch, t.exposure_epoch
  FROM day_totals t
  LEFT JOIN order_days o ON o.ck = t.ck AND o.day = t.day
  LEFT JOIN cart_days s ON s.ck = t.ck AND s.day = t.day
  LEFT JOIN new_feature_days nf ON nf.ck = t.ck AND nf.day = t.day
),
day_buckets AS (
  SELECT d.*, b.bucket_day FROM days d JOIN bucket_of b ON b.day = d.day
),
life AS (
  SELECT ck, bucket_day,
    {bucket_aggs}
  FROM (
  {life_stream}
  ) stream
  GROUP BY ck, bucket_day
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
customers AS (
  SELECT ck, MIN(day) AS first_day{first_cols} FROM day_totals GROUP BY ck
),
markers AS (
  SELECT c.*, p.snapshot_day
  FROM customers c
  JOIN points p ON c.first_day < p.snapshot_day
),
cumulative AS (
  SELECT m.ck, m.snapshot_day,
    {running_list}
  FROM markers m
  LEFT JOIN life l ON l.ck = m.ck AND l.bucket_day = m.snapshot_day
  WINDOW wall AS (PARTITION BY m.ck ORDER BY m.snapshot_day ROWS UNBOUNDED PRECEDING)
),
windows AS (
  -- Only the short windows' columns go through the join of snapshots x customer-days.
  SELECT d.ck, s.snapshot_day,
    {window_aggs}
  FROM {snapshots} s
  JOIN (SELECT ck, day, {", ".join(join_cols)} FROM days) d
    ON d.day < s.snapshot_day AND d.day >= s.snapshot_day - {join_days}
  GROUP BY d.ck, s.snapshot_day
),
snap AS (
  SELECT i.customer_id, c.snapshot_day, k.catalog_size,
    c.snapshot_day * 86400.0 AS snapshot_epoch,
    {snap_cols}
  FROM cumulative c
  JOIN catalog k ON k.snapshot_day = c.snapshot_day
  JOIN ids i ON i.ck = c.ck
  LEFT JOIN windows w ON w.ck = c.ck AND w.snapshot_day = c.snapshot_day{back_joins}
)
SELECT customer_id,
  {ts} AS event_timestamp,
  {features}
FROM snap
"""


def _feature_expr(f: Feature) -> str:
    return f.sql


def feature_steps(
    events: str, snapshots: str = "snapshots", dialect: str = "duckdb"
) -> tuple[list[tuple[str, str]], str]:
    """The query of :func:`feature_sql` cut into its named steps and its final ``SELECT``.

    An engine that recomputes a ``WITH`` step at each reference (Spark inlines
    them) can run the steps one by one and keep the shared ones; the text is the
    same single definition, only cut at the step boundaries.

    Returns
    -------
    steps : list of (name, query)
        In dependency order; each query reads earlier steps by name.
    final : str
        The final query, reading the steps by name.

    Examples
    --------
    >>> steps, final = feature_steps("events")
    >>> steps[0][0], final.lstrip().startswith("SELECT")
    ('ids', True)
    """
    sql = feature_sql(events, snapshots, dialect)
    body = sql.strip()
    if not body.startswith("WITH "):
        raise AssertionError("feature_sql must start with WITH")
    lines = body[len("WITH ") :].splitlines()
    steps: list[tuple[str, str]] = []
    name: str | None = None
    current: list[str] = []
    for i, line in enumerate(lines):
        if name is None:
            head = line.split(" AS (")
            if len(head) == 2 and head[1] == "" and head[0].isidentifier():
                name, current = head[0], []
                continue
            return steps, "\n".join(lines[i:])
        # A step closes at a ")" in the first column: the generator indents everything inside.
        if line in ("),", ")"):
            steps.append((name, "\n".join(current)))
            name = None
        else:
            current.append(line)
    raise AssertionError("feature_sql has no final SELECT")
