"""Each trigger's incremental outcome: its treated firings against its hold-out, from the lake.

Every firing reaches the event lake as a ``campaign_exposure`` event
(``campaign_id`` the trigger, ``action`` the action sent, or the catalog's
control for a hold-out; see :meth:`~propensity.activation.runner.TriggerRunner.drain_exposures`).
A firing's outcome is whether the customer has an ``outcome`` event (a
purchase by default) in the ``hours`` after it. The hold-out is drawn at random
among the customers the trigger fired for, so the difference of the two arms'
rates estimates the trigger's effect on the customers it fires for; its interval
is Newcombe's (hybrid Wilson score), sound at small counts and rates near 0 or 1,
widened by each arm's design effect: the hold-out is drawn per customer, so the
firings of one customer share an arm and their outcomes are correlated.

Only firings whose outcome window has closed by ``as_of`` (default: the latest
event in the lake) count; the others are reported as pending. A customer fired
for in several windows counts in each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from propensity.events.lake import EventLake, duckdb_connection

from .spec import NO_TRIGGER_ACTION

if TYPE_CHECKING:
    from propensity.config import Settings

    from .spec import TriggerFile

__all__ = [
    "TriggerOutcome",
    "design_effect",
    "difference_interval",
    "measure_triggers",
    "outcomes_table",
    "trigger_outcomes",
]

#: The default outcome event.
PURCHASE = "purchase"


@dataclass(frozen=True)
class TriggerOutcome:
    """Treated against hold-out for one trigger (rates are shares of firings)."""

    trigger: str
    outcome: str
    hours: float
    treated: int
    held_out: int
    treated_rate: float
    held_out_rate: float
    uplift: float
    low: float
    high: float
    pending: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return {
            k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()
        }


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` (possibly effective) trials."""
    scale = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / scale
    return center - half, center + half


def difference_interval(
    k1: float,
    n1: float,
    k0: float,
    n0: float,
    level: float = 0.95,
    *,
    design_effects: tuple[float, float] = (1.0, 1.0),
) -> tuple[float, float, float]:
    """``p1 - p0`` of two independent proportions with Newcombe's hybrid score interval.

    ``design_effects`` widen each arm's Wilson interval for correlated trials
    (its trials count as ``n / design_effect`` independent ones). NaN when
    either arm is empty.

    Examples
    --------
    >>> d, low, high = difference_interval(30, 100, 20, 100)
    >>> round(d, 2), round(low, 3), round(high, 3)
    (0.1, -0.02, 0.217)
    """
    if n1 == 0 or n0 == 0:
        return (np.nan, np.nan, np.nan)
    z = float(norm.ppf(0.5 + level / 2))
    p1, p0 = k1 / n1, k0 / n0
    l1, u1 = _wilson(p1, n1 / design_effects[0], z)
    l0, u0 = _wilson(p0, n0 / design_effects[1], z)
    diff = p1 - p0
    low = diff - float(np.hypot(p1 - l1, u0 - p0))
    high = diff + float(np.hypot(u1 - p1, p0 - l0))
    return (diff, low, high)


def design_effect(customers: np.ndarray, converted: np.ndarray) -> float:
    """How much firings of the same customer widen an arm's rate's variance (at least 1).

    The hold-out is drawn per customer, so a customer's firings share an arm and
    their outcomes are correlated: the cluster-robust variance of the ratio
    estimator (customers as clusters) over the binomial one.

    Examples
    --------
    >>> design_effect(np.array(["a", "b", "c", "d"]), np.array([1, 0, 1, 0]))
    1.0
    >>> design_effect(np.array(["a", "a", "b", "b"]), np.array([1, 1, 0, 0]))
    2.0
    """
    n = len(customers)
    rate = float(np.mean(converted)) if n else 0.0
    if n == 0 or rate in (0.0, 1.0):
        return 1.0
    _, cluster, firings = np.unique(customers, return_inverse=True, return_counts=True)
    wins = np.bincount(cluster, weights=np.asarray(converted, dtype=float))
    robust = float(np.sum((wins - rate * firings) ** 2)) / (n * n)
    return max(1.0, robust / (rate * (1 - rate) / n))


def trigger_outcomes(
    firings: pd.DataFrame,
    *,
    trigger: str,
    outcome: str,
    hours: float,
    as_of: pd.Timestamp,
    level: float = 0.95,
) -> TriggerOutcome:
    """One trigger's report from its firings.

    Parameters
    ----------
    firings : DataFrame
        One row per firing of the trigger: ``customer_id``, ``fired_at`` (UTC),
        ``held_out`` (bool) and ``converted`` (bool: an ``outcome`` event in the
        ``hours`` after ``fired_at``).
    as_of : Timestamp
        Firings whose window ends after it are pending.
    """
    closed = firings[firings["fired_at"] + pd.Timedelta(hours=hours) <= as_of]
    held = closed["held_out"].to_numpy(bool)
    won = closed["converted"].to_numpy(bool)
    who = closed["customer_id"].to_numpy(str)
    n1, n0 = int((~held).sum()), int(held.sum())
    k1, k0 = int(won[~held].sum()), int(won[held].sum())
    effects = (design_effect(who[~held], won[~held]), design_effect(who[held], won[held]))
    uplift, low, high = difference_interval(k1, n1, k0, n0, level, design_effects=effects)
    return TriggerOutcome(
        trigger=trigger,
        outcome=outcome,
        hours=hours,
        treated=n1,
        held_out=n0,
        treated_rate=k1 / n1 if n1 else np.nan,
        held_out_rate=k0 / n0 if n0 else np.nan,
        uplift=uplift,
        low=low,
        high=high,
        pending=len(firings) - len(closed),
        level=level,
    )


def measure_triggers(
    settings: Settings,
    spec: TriggerFile,
    *,
    outcome: str = PURCHASE,
    hours: float | None = None,
    as_of: datetime | None = None,
    names: Iterable[str] | None = None,
    level: float = 0.95,
) -> list[TriggerOutcome]:
    """Each trigger's incremental ``outcome`` rate, from the project's event lake.

    Parameters
    ----------
    settings : Settings
    spec : TriggerFile
        The triggers (and so their names and windows).
    outcome : str
        The event type that counts as the outcome.
    hours : float, optional
        The outcome window after each firing (default: each trigger's ``window_hours``).
    as_of : datetime, optional
        The date the data runs to (default: the lake's latest event).
    names : iterable of str, optional
        Only these triggers (default: every trigger of ``spec`` that sends an
        action; one with ``action: none`` only records, so has nothing to measure).
    level : float
        Of the intervals.

    Returns
    -------
    list of TriggerOutcome

    Raises
    ------
    EmptyLakeError
        Nothing has been ingested.
    ValueError
        A name that ``spec`` does not declare.
    """
    chosen = (
        [n for n, t in spec.triggers.items() if t.action != NO_TRIGGER_ACTION]
        if names is None
        else list(names)
    )
    unknown = sorted(set(chosen) - set(spec.triggers))
    if unknown:
        raise ValueError(
            f"unknown trigger {', '.join(map(repr, unknown))}; declared: "
            f"{', '.join(spec.triggers) or 'none'}"
        )
    lake = EventLake(settings.path(settings.lake_dir))
    end = pd.Timestamp(as_of) if as_of is not None else lake.max_timestamp()
    if end is None:
        end = pd.Timestamp.now(tz="UTC")
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    windows = {
        name: hours if hours is not None else spec.triggers[name].window_hours for name in chosen
    }
    frame = _firings(lake, windows, outcome, _control(settings))
    out = []
    for name in chosen:
        mine = frame[frame["trigger"] == name]
        out.append(
            trigger_outcomes(
                mine, trigger=name, outcome=outcome, hours=windows[name], as_of=end, level=level
            )
        )
    return out


def outcomes_table(rows: Iterable[TriggerOutcome]) -> object:
    """The report as a ``rich.table.Table`` for terminal display."""
    from rich.table import Table

    def rate(x: float) -> str:
        return "—" if x != x else f"{x:.1%}"

    table = Table(title="trigger outcomes: treated against hold-out")
    for name in ("trigger", "outcome", "treated", "held out", "rate treated", "rate held out"):
        table.add_column(name, justify="left" if name in ("trigger", "outcome") else "right")
    table.add_column("uplift [interval]", justify="right")
    table.add_column("pending", justify="right")
    level = None
    for r in rows:
        level = r.level
        uplift = "—" if r.uplift != r.uplift else f"{r.uplift:+.1%} [{r.low:+.1%}, {r.high:+.1%}]"
        table.add_row(
            r.trigger,
            f"{r.outcome} in {r.hours:g} h",
            f"{r.treated:,}",
            f"{r.held_out:,}",
            rate(r.treated_rate),
            rate(r.held_out_rate),
            uplift,
            f"{r.pending:,}",
        )
    if level is not None:
        table.caption = (
            f"{level:.0%} intervals (Newcombe); pending: firings whose outcome window is still open"
        )
    return table


def _firings(
    lake: EventLake, windows: dict[str, float], outcome: str, control: str
) -> pd.DataFrame:
    """One row per firing: customer_id, trigger, fired_at, held_out, converted."""
    if not windows:
        return pd.DataFrame(columns=["customer_id", "trigger", "fired_at", "held_out", "converted"])
    scan = lake.duckdb_scan()
    with duckdb_connection() as con:
        con.register(
            "windows",
            pd.DataFrame({"trigger": list(windows), "hours": [float(h) for h in windows.values()]}),
        )
        # A firing converted when the customer has an outcome event after it and within
        # its window; the exposure event itself is never the outcome.
        return con.execute(
            f"""
            WITH events AS (SELECT * FROM {scan}),
            fired AS (
                SELECT e.event_id, e.customer_id, e.campaign_id AS trigger,
                       e.event_timestamp AS fired_at, e.action = ? AS held_out, w.hours
                FROM events e JOIN windows w ON e.campaign_id = w.trigger
                WHERE e.event_type = 'campaign_exposure' AND e.event_id LIKE 'exposure:%'
            )
            SELECT f.customer_id, f.trigger, f.fired_at, f.held_out,
                   count(o.event_id) > 0 AS converted
            FROM fired f LEFT JOIN events o
              ON o.customer_id = f.customer_id AND o.event_type = ?
             AND o.event_timestamp > f.fired_at
             AND o.event_timestamp <= f.fired_at + to_microseconds(
                   CAST(f.hours * 3600000000 AS BIGINT))
            GROUP BY f.event_id, f.customer_id, f.trigger, f.fired_at, f.held_out
            """,
            [control, outcome],
        ).df()


def _control(settings: Settings) -> str:
    """The catalog's control action: what a hold-out's exposure names."""
    from propensity.models.arbitration import load_catalog

    path = settings.path(settings.models_dir) / "actions.yaml"
    return str(load_catalog(path).control) if path.exists() else "control"
