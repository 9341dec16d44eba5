"""The feature registry: every behavioral feature, defined once.

Each :class:`Feature` names its feature view (theme), the SQL expression that
computes it from window aggregates (see :mod:`propensity.features.sql`), its
window, how missing values are filled, and a description. The SQL, the Feast
schemas in ``feature_repo/`` and :func:`feature_reference_markdown` are all
generated from :data:`FEATURES`, so they cannot drift apart.

Dtype contract: every feature is a float64 (Feast ``Float64``). Counts of
nothing are ``0.0``; quantities that do not exist yet (days since an event that
never happened, a rate over zero occurrences, a slope over fewer than two
orders) are ``NULL`` and reach pandas as ``NaN``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "PROJECT",
    "Feature",
    "FEATURES",
    "VIEWS",
    "ON_DEMAND_FEATURES",
    "SERVICES",
    "ENTITY",
    "features_of",
    "service_views",
    "batch_views",
    "feature_reference_markdown",
    "request_features",
    "StreamingFeature",
    "STREAMING_VIEW",
    "STREAMING_FEATURES",
    "streaming_reference_markdown",
]

ENTITY = "customer_id"
#: The Feast project name: table prefix in SQLite, key suffix in Redis. Here, not in the
#: Feast adapter, so live-event processing can name its tables without importing Feast
#: (seconds of start-up for ``propensity stream``).
PROJECT = "propensity"

VIEWS: dict[str, str] = {
    "session": "Visit frequency, recency and depth.",
    "basket": "Orders, revenue, basket trends and cart abandonment.",
    "adoption": "Product feature adoption.",
    "engagement": "Email engagement and support friction.",
    "lifecycle": "Tenure and lifetime value (RFM).",
    "exposure": "Recent campaign exposures (contact-pressure rules of next-best-action).",
    "activity_shift": "Recent sessions against the customer's own usual rate: how overdue the next "
    "visit is and how sharply visits fell off.",
}


@dataclass(frozen=True)
class Feature:
    """One feature of the registry.

    Attributes
    ----------
    name : str
        Column name, snake_case, unique across views.
    view : str
        Feature view (theme) the feature belongs to, a key of :data:`VIEWS`.
    sql : str
        SQL expression over the window aggregates of ``features.sql``.
    description : str
        What the value means, for the README's feature reference.
    window : int or None
        Look-back window in days (``None`` for lifetime or recency values).
    missing : {"zero", "null"}
        ``"zero"``: a count that is 0 when nothing happened; ``"null"``: the
        value is undefined (NaN) when its events never happened.
    """

    name: str
    view: str
    sql: str
    description: str
    window: int | None = None
    missing: Literal["zero", "null"] = "zero"
    dtype: str = "float64"


def _ratio(num: str, den: str) -> str:
    # NULL (not 0, not inf) when the denominator has no occurrences.
    return f"CASE WHEN ({den}) > 0 THEN CAST(({num}) AS DOUBLE) / ({den}) END"


def _days_since(epoch_col: str) -> str:
    return f"(snapshot_epoch - {epoch_col}) / 86400.0"


def _observed_days(window: int) -> str:
    # The part of the window since the customer's first event (at least a day): a rate over
    # the whole window would read a newcomer, or a history cut by the lake's start, as a slowdown.
    return f"LEAST({window}.0, GREATEST({_days_since('first_event_epoch')}, 1.0))"


# session_drop_score: the windows (days before T) scanned for a fall of the session rate, the
# window whose earlier days give the baseline rate, and the fewest baseline days it needs.
_DROP_WINDOWS = (1, 3, 7, 14, 28)
_DROP_BASELINE = 90
_DROP_MIN_DAYS = 14


def _session_drop_score() -> str:
    """SQL of ``session_drop_score``: a Poisson scan for a fall of the session rate.

    The baseline rate ``b`` is the customer's sessions per day in the observed days
    ``[T - 90, T - 28)``. For each window of ``k`` days before ``T`` with ``n``
    sessions against ``mu = b * k`` expected, the log-likelihood ratio of "the rate
    fell to ``n / k``" against "it stayed ``b``" is ``mu - n + n * ln(n / mu)``,
    counted only when ``n < mu``; the score is the largest over the windows. It is a
    product and a ratio of counts, which trees cannot form from the counts alone.
    """
    longest = max(_DROP_WINDOWS)
    base_days = f"({_observed_days(_DROP_BASELINE)} - {longest}.0)"
    rate = f"((sessions_{_DROP_BASELINE}d - sessions_{longest}d) / {base_days})"
    terms = []
    for k in _DROP_WINDOWS:
        n, mu = f"sessions_{k}d", f"({rate} * {k})"
        # the inner CASE guards LN: n > 0 there, and mu > n >= 0 in the outer branch
        terms.append(
            f"CASE WHEN {n} < {mu} THEN {mu} - {n} "
            f"+ CASE WHEN {n} > 0 THEN {n} * LN({n} / {mu}) ELSE 0 END ELSE 0 END"
        )
    return f"CASE WHEN {base_days} >= {_DROP_MIN_DAYS} THEN GREATEST({', '.join(terms)}) END"


_F = Feature
FEATURES: tuple[Feature, ...] = (
    # -- session frequency ------------------------------------------------------------------
    _F("sessions_7d", "session", "sessions_7d", "Sessions started in the last 7 days.", 7),
    _F("sessions_14d", "session", "sessions_14d", "Sessions started in the last 14 days.", 14),
    _F("sessions_30d", "session", "sessions_30d", "Sessions started in the last 30 days.", 30),
    _F("sessions_90d", "session", "sessions_90d", "Sessions started in the last 90 days.", 90),
    _F(
        "session_trend_7d_28d",
        "session",
        _ratio("sessions_7d / 7.0", "(sessions_35d - sessions_7d) / 28.0"),
        "Daily session rate of the last 7 days divided by that of the 28 days before "
        "(NaN when there was no session in those 28 days).",
        35,
        "null",
    ),
    _F(
        "days_since_last_session",
        "session",
        _days_since("last_session_epoch"),
        "Days (fractional) since the last session start; NaN if none.",
        None,
        "null",
    ),
    _F(
        "events_per_session_30d",
        "session",
        _ratio("events_30d", "sessions_30d"),
        "Events of any type per session in the last 30 days; NaN without sessions.",
        30,
        "null",
    ),
    _F(
        "active_days_30d",
        "session",
        "active_days_30d",
        "Days with any event in the last 30 days.",
        30,
    ),
    # -- basket -----------------------------------------------------------------------------
    _F("orders_30d", "basket", "orders_30d", "Orders in the last 30 days.", 30),
    _F("orders_90d", "basket", "orders_90d", "Orders in the last 90 days.", 90),
    _F(
        "revenue_30d",
        "basket",
        "revenue_30d",
        "Revenue (price × quantity) in the last 30 days.",
        30,
    ),
    _F("revenue_90d", "basket", "revenue_90d", "Revenue in the last 90 days.", 90),
    _F(
        "avg_order_value_90d",
        "basket",
        _ratio("revenue_90d", "orders_90d"),
        "Mean order value over the last 90 days; NaN without orders.",
        90,
        "null",
    ),
    _F(
        "basket_value_recent_vs_older",
        "basket",
        "CASE WHEN orders_30d > 0 AND orders_90d - orders_30d > 0 AND revenue_90d > revenue_30d "
        "THEN (revenue_30d / orders_30d) "
        "/ ((revenue_90d - revenue_30d) / (orders_90d - orders_30d)) "
        "END",
        "Mean order value of the last 30 days divided by that of days 30–90 before; NaN unless "
        "both periods have orders.",
        90,
        "null",
    ),
    _F(
        "order_value_slope_last5",
        "basket",
        "order_value_slope_last5",
        "Least-squares slope of order value against order rank over the last 5 orders "
        "(REGR_SLOPE); NaN with fewer than 2 orders.",
        None,
        "null",
    ),
    _F(
        "items_per_basket_slope_last5",
        "basket",
        "items_per_basket_slope_last5",
        "Slope of units per order over the last 5 orders; NaN with fewer than 2 orders.",
        None,
        "null",
    ),
    _F(
        "days_since_last_purchase",
        "basket",
        _days_since("last_purchase_epoch"),
        "Days since the last purchase (RFM recency); NaN if none.",
        None,
        "null",
    ),
    _F(
        "cart_sessions_30d",
        "basket",
        "cart_sessions_30d",
        "Sessions with an add_to_cart or checkout_start in the last 30 days.",
        30,
    ),
    _F(
        "cart_abandonment_rate_30d",
        "basket",
        _ratio("abandoned_sessions_30d", "cart_sessions_30d"),
        "Share of those cart sessions without a purchase in the same session; NaN without any.",
        30,
        "null",
    ),
    # -- adoption ---------------------------------------------------------------------------
    _F(
        "features_used_ever",
        "adoption",
        "features_used_ever",
        "Distinct product features ever used.",
    ),
    _F(
        "features_used_30d",
        "adoption",
        "features_used_30d",
        "Distinct product features used in the last 30 days.",
        30,
    ),
    _F(
        "features_newly_adopted_30d",
        "adoption",
        "features_new_30d",
        "Distinct features used for the first time in the last 30 days.",
        30,
    ),
    _F("feature_uses_30d", "adoption", "feature_uses_30d", "feature_use events in 30 days.", 30),
    _F(
        "adoption_breadth",
        "adoption",
        _ratio("features_used_ever", "catalog_size"),
        "Share of the feature catalog ever used; the catalog is every feature_name seen in the "
        "lake before the snapshot (NaN while it is empty).",
        None,
        "null",
    ),
    _F(
        "days_since_first_feature_use",
        "adoption",
        _days_since("first_feature_epoch"),
        "Days since the first feature use; NaN if none.",
        None,
        "null",
    ),
    _F(
        "days_since_last_feature_use",
        "adoption",
        _days_since("last_feature_epoch"),
        "Days since the last feature use; NaN if none.",
        None,
        "null",
    ),
    # -- engagement / friction --------------------------------------------------------------
    _F("email_opens_30d", "engagement", "email_opens_30d", "Emails opened in 30 days.", 30),
    _F("email_clicks_30d", "engagement", "email_clicks_30d", "Email clicks in 30 days.", 30),
    _F(
        "email_open_rate_30d",
        "engagement",
        _ratio("email_opens_30d", "exposures_30d"),
        "Email opens per campaign exposure in the last 30 days (can exceed 1); NaN without "
        "exposures.",
        30,
        "null",
    ),
    _F(
        "email_click_rate_30d",
        "engagement",
        _ratio("email_clicks_30d", "email_opens_30d"),
        "Email clicks per email open in the last 30 days; NaN without opens.",
        30,
        "null",
    ),
    _F(
        "support_tickets_30d",
        "engagement",
        "support_tickets_30d",
        "Support tickets opened in 30 days.",
        30,
    ),
    _F(
        "support_tickets_90d",
        "engagement",
        "support_tickets_90d",
        "Support tickets opened in 90 days.",
        90,
    ),
    # -- lifecycle --------------------------------------------------------------------------
    _F(
        "tenure_days",
        "lifecycle",
        _days_since("first_event_epoch"),
        "Days since the customer's first event.",
    ),
    _F("lifetime_orders", "lifecycle", "lifetime_orders", "Orders ever (RFM frequency)."),
    _F("lifetime_revenue", "lifecycle", "lifetime_revenue", "Revenue ever (RFM monetary)."),
    _F(
        "days_since_last_event",
        "lifecycle",
        _days_since("last_event_epoch"),
        "Days since the last event of any type.",
    ),
    _F(
        "last_event_epoch",
        "lifecycle",
        "last_event_epoch",
        "Time of the last event before the snapshot, in seconds since 1970-01-01 UTC (input of "
        "the on-demand days_since_last_seen).",
    ),
    # -- campaign exposure ------------------------------------------------------------------
    _F("exposures_7d", "exposure", "exposures_7d", "Campaign exposures in 7 days.", 7),
    _F("exposures_30d", "exposure", "exposures_30d", "Campaign exposures in 30 days.", 30),
    _F(
        "discounts_30d",
        "exposure",
        "discounts_30d",
        "Exposures with action 'discount' in 30 days.",
        30,
    ),
    _F(
        "days_since_last_exposure",
        "exposure",
        _days_since("last_exposure_epoch"),
        "Days since the last campaign exposure (any action, control included); NaN if none.",
        None,
        "null",
    ),
    # -- activity shift (churn_v2) ------------------------------------------------------------
    _F(
        "session_rate_90d",
        "activity_shift",
        f"sessions_90d / {_observed_days(90)}",
        "Sessions per day over the last 90 days, counting only the days since the first event "
        "(at least one): the customer's usual visit rate.",
        90,
    ),
    _F(
        "session_overdue",
        "activity_shift",
        f"{_days_since('last_session_epoch')} * sessions_90d / {_observed_days(90)}",
        "Days since the last session times session_rate_90d: the sessions the usual rate would "
        "have brought since then; NaN if no session.",
        90,
        "null",
    ),
    _F(
        "session_drop_score",
        "activity_shift",
        _session_drop_score(),
        "Largest Poisson log-likelihood ratio, over the last "
        f"{', '.join(map(str, _DROP_WINDOWS[:-1]))} and {_DROP_WINDOWS[-1]} days, that the "
        "session rate fell below the customer's rate in the observed days "
        f"{max(_DROP_WINDOWS)}–{_DROP_BASELINE} days before the snapshot (0 if it did not "
        f"fall); NaN with fewer than {_DROP_MIN_DAYS} such days.",
        _DROP_BASELINE,
        "null",
    ),
)

#: Computed at request time by the on-demand feature view ``request_features``.
ON_DEMAND_FEATURES: dict[str, str] = {
    "days_since_last_seen": "Days between the request time (``request_time``, epoch seconds) "
    "and ``last_event_epoch``; offline the request time is the row's event_timestamp.",
}

#: Feature view (and Feast push source ``streaming_push``) of the streaming features.
STREAMING_VIEW = "streaming"

#: Versioned feature services: a change of feature set is a new version, never an edit.
#: Those with ``STREAMING_VIEW`` add the streaming features to an earlier version's.
SERVICES: dict[str, tuple[str, ...]] = {
    "churn_v1": ("session", "basket", "adoption", "engagement", "lifecycle", "request_features"),
    "churn_v2": (
        "session",
        "basket",
        "adoption",
        "engagement",
        "lifecycle",
        "activity_shift",
        "request_features",
    ),
    "purchase_v1": ("session", "basket", "engagement", "lifecycle", "request_features"),
    "nba_v1": (
        "session",
        "basket",
        "adoption",
        "engagement",
        "lifecycle",
        "exposure",
        "request_features",
    ),
}
# The streaming versions: an earlier version's views plus the streaming view.
SERVICES.update(
    {
        new: (*SERVICES[old][:-1], STREAMING_VIEW, SERVICES[old][-1])
        for new, old in (("churn_v3", "churn_v2"), ("purchase_v2", "purchase_v1"))
    }
)


def features_of(view: str) -> list[Feature]:
    """Return the features of one view, in registry order.

    Examples
    --------
    >>> [f.name for f in features_of("exposure")][:2]
    ['exposures_7d', 'exposures_30d']
    """
    if view not in VIEWS:
        raise KeyError(f"unknown feature view {view!r}; known: {sorted(VIEWS)}")
    return [f for f in FEATURES if f.view == view]


def service_views(service: str) -> tuple[str, ...]:
    """Return the views (batch, streaming and on-demand) a feature service reads."""
    if service not in SERVICES:
        raise KeyError(f"unknown feature service {service!r}; known: {sorted(SERVICES)}")
    return SERVICES[service]


def batch_views(service: str) -> list[str]:
    """The batch views (snapshot tables) of a feature service, in service order.

    Examples
    --------
    >>> batch_views("purchase_v2")
    ['session', 'basket', 'engagement', 'lifecycle']
    """
    return [view for view in service_views(service) if view in VIEWS]


def feature_reference_markdown() -> str:
    """Render the registry as Markdown tables, one per view (used for the README).

    Examples
    --------
    >>> feature_reference_markdown().splitlines()[0]
    '### session'
    """
    out: list[str] = []
    for view, text in VIEWS.items():
        out += [f"### {view}", "", text, "", "| feature | window | if missing | meaning |"]
        out.append("| --- | --- | --- | --- |")
        for f in features_of(view):
            window = f"{f.window} d" if f.window else "lifetime"
            missing = "0" if f.missing == "zero" else "NaN"
            out.append(f"| `{f.name}` | {window} | {missing} | {f.description} |")
        out.append("")
    out += ["### request_features (on demand)", "", "| feature | meaning |", "| --- | --- |"]
    out += [f"| `{name}` | {text} |" for name, text in ON_DEMAND_FEATURES.items()]
    out.append("")
    out += ["### feature services", "", "| service | views |", "| --- | --- |"]
    out += [f"| `{s}` | {', '.join(v)} |" for s, v in SERVICES.items()]
    return "\n".join(out)


@dataclass(frozen=True)
class StreamingFeature:
    """One streaming feature: computed from per-customer minute tiles, merged at read time.

    Attributes
    ----------
    name : str
        Column name, unique across batch and streaming features.
    description : str
        What the value means at the request clock ``t`` (see :mod:`propensity.features.tiles`).
    window_minutes : int or None
        Length of the window in minutes; ``None`` for "today" (project time zone)
        or the current session.
    missing : {"zero", "null"}
        Value when nothing happened in the window: ``0`` or NaN.
    """

    name: str
    description: str
    window_minutes: int | None
    missing: Literal["zero", "null"] = "zero"


_COUNTED = {
    "events": "Events of any type",
    "sessions": "Sessions started (``session_start`` events)",
    "product_views": "Product views (``product_view`` events)",
    "cart_adds": "Cart adds (``add_to_cart`` events)",
}
_WINDOWS = {"30m": 30, "1h": 60, "24h": 1440}

STREAMING_FEATURES: tuple[StreamingFeature, ...] = (
    *(
        StreamingFeature(f"{kind}_{label}", f"{text} in the last {label}.", minutes)
        for kind, text in _COUNTED.items()
        for label, minutes in _WINDOWS.items()
    ),
    StreamingFeature(
        "cart_open_24h",
        "1 when the last cart add of the last 24h came after the last purchase of that "
        "window (an open, abandoned cart), else 0.",
        1440,
    ),
    StreamingFeature(
        "minutes_since_last_cart_add",
        "Minutes from the last cart add of the last 24h to the request clock; NaN if none.",
        1440,
        "null",
    ),
    StreamingFeature(
        "minutes_since_last_event",
        "Minutes from the last event of the last 24h to the request clock; NaN if none.",
        1440,
        "null",
    ),
    StreamingFeature(
        "session_product_views",
        "Product views in the current session: the session of the customer's latest event "
        "with a ``session_id``, when that event is within the last 30m; else 0.",
        None,
    ),
    StreamingFeature(
        "purchases_today",
        "Purchase events since midnight of the request clock's day, in the project time zone.",
        None,
    ),
)


def streaming_reference_markdown() -> str:
    """Render the streaming features as a Markdown table (used for the README).

    Examples
    --------
    >>> streaming_reference_markdown().splitlines()[0]
    '| feature | window | if missing | meaning |'
    """
    out = ["| feature | window | if missing | meaning |", "| --- | --- | --- | --- |"]
    for f in STREAMING_FEATURES:
        window = f"{f.window_minutes} min" if f.window_minutes else "today / session"
        missing = "0" if f.missing == "zero" else "NaN"
        out.append(f"| `{f.name}` | {window} | {missing} | {f.description} |")
    return "\n".join(out)


def _check_registry() -> None:
    names = [f.name for f in FEATURES] + [f.name for f in STREAMING_FEATURES]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"feature names defined twice: {sorted(dupes)}")
    for f in FEATURES:
        if f.view not in VIEWS:
            raise ValueError(f"feature {f.name!r}: unknown view {f.view!r}")
    known = {*VIEWS, STREAMING_VIEW, "request_features"}
    for service, views in SERVICES.items():
        if set(views) - known:
            raise ValueError(f"service {service!r}: unknown views {sorted(set(views) - known)}")


_check_registry()


def request_features(inputs: dict[str, Any]) -> dict[str, Any]:
    """Transformation of the on-demand view ``request_features`` (Feast python mode).

    Batch form: every value is a list, one item per entity row. Kept here, in
    plain Python, so it is importable wherever Feast deserializes the view.

    Examples
    --------
    >>> request_features({"request_time": [86400.0 * 3], "last_event_epoch": [86400.0]})
    {'days_since_last_seen': [2.0]}
    """
    now, last = inputs["request_time"], inputs["last_event_epoch"]
    return {
        "days_since_last_seen": [
            None if r is None or s is None or r != r or s != s else (r - s) / 86400.0
            for r, s in zip(now, last, strict=True)
        ]
    }
