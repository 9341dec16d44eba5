"""The end-to-end job on embedded defaults: simulate → ingest → features → models → scores.

The last stage also posts a few live events (a session, product views, a cart add)
for one customer to ``POST /events`` and scores that customer before and after:
the streaming features move at once and the answer is ``"stale": false``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from propensity.config import Settings
from propensity.progress import ProgressCallback

__all__ = ["run_quickstart", "demo_events", "SIMULATION_DIR"]

#: Where the quickstart writes the simulated events and their ground truth.
SIMULATION_DIR = Path("data/simulated")


def run_quickstart(
    settings: Settings,
    *,
    customers: int = 20_000,
    days: int = 180,
    seed: int = 42,
    port: int = 3000,
    progress: ProgressCallback | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every stage of the pipeline on a simulated data set.

    Parameters
    ----------
    settings : Settings
        The project; its data folders are created as needed.
    customers, days, seed : int
        Size and seed of the simulated data set.
    port : int
        Port of the scoring API started at the end (and stopped again).
    progress : callable, optional
        Progress callback, see :mod:`propensity.progress`.
    console : rich.console.Console, optional
        Where stage summaries are printed.

    Returns
    -------
    dict
        A summary per stage (counts, metrics, scores).

    Examples
    --------
    >>> from propensity.config import load_settings
    >>> run_quickstart(load_settings(), customers=2_000, days=120)  # doctest: +SKIP
    """
    out = console or Console()
    summary: dict[str, Any] = {}
    sim_dir = settings.path(SIMULATION_DIR)

    out.rule("1/6 simulate")
    summary["events"] = _simulate(sim_dir, customers, days, seed, progress)
    out.print(f"{summary['events']:,} events for {customers:,} customers × {days} days → {sim_dir}")

    out.rule("2/6 ingest")
    summary["ingest"] = _ingest(settings, sim_dir, progress)
    out.print(summary["ingest"].to_rich())

    out.rule("3/6 features")
    summary["features"] = _features(settings, progress)
    out.print(summary["features"])

    from propensity.pipeline.train import train

    for title, names in (
        ("4/6 churn and purchase models", ("churn", "purchase_propensity", "purchase_24h")),
        ("5/6 next-best-action", ("next_best_action",)),
    ):
        out.rule(title)
        for name in names:
            summary[name] = train(settings, name, truth_dir=sim_dir, progress=progress)
            out.print(summary[name].summary())

    out.rule("6/6 scoring API")
    summary["scores"] = _score_over_http(settings, port, out)
    return summary


def _simulate(
    sim_dir: Path, customers: int, days: int, seed: int, progress: ProgressCallback | None
) -> int:
    from propensity.events.simulator import SimulationConfig, simulate_to

    meta = simulate_to(
        SimulationConfig(customers=customers, days=days, seed=seed),
        sim_dir,
        progress=None
        if progress is None
        else lambda done, total: progress("simulate", done, total),
    )
    return int(meta["events"])


def _ingest(settings: Settings, sim_dir: Path, progress: ProgressCallback | None) -> Any:
    from propensity.events.ingest import ingest
    from propensity.events.lake import EventLake
    from propensity.events.suppression import SuppressionList

    return ingest(
        sorted((sim_dir / "events").glob("*.parquet")),
        EventLake(settings.path(settings.lake_dir)),
        settings.path(settings.quarantine_dir),
        suppression=SuppressionList.of(settings),
        timezone=settings.timezone,
        progress=progress,
    )


def _features(settings: Settings, progress: ProgressCallback | None) -> str:
    from propensity.features.snapshots import build_features
    from propensity.pipeline.dataset import feature_adapter

    report = build_features(settings)
    adapter = feature_adapter(settings)
    written = adapter.materialize(progress=progress)
    customers = max((w.entities_written for w in written), default=0)
    seconds = max((w.seconds for w in written), default=0.0)
    return (
        f"{report.rows:,} feature rows over {len(report.snapshots)} snapshots; feast repo applied; "
        f"{customers:,} customers × {len(written)} views materialized in {seconds:.1f} s"
    )


def _score_over_http(settings: Settings, port: int, out: Console) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from propensity.features.snapshots import feature_table_path
    from propensity.serving.process import stop, wait_ready
    from propensity.serving.service import serve

    table = pq.read_table(
        feature_table_path(settings.path(settings.features_dir), "session"),
        columns=["customer_id"],
    )
    customers = sorted(set(table["customer_id"].to_pylist()))[:3]
    server = serve(settings, port=port, wait=False)
    answers = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, server)
        with httpx.Client(base_url=base, timeout=10) as client:
            for customer in customers:
                response = client.post("/score", json={"customer_id": customer})
                response.raise_for_status()
                answers.append(response.json())
                out.print(f"POST /score {{customer_id: {customer}}} →")
                out.print_json(json.dumps(response.json()))
            live = _events_demo(client, customers[0], out) if customers else None
            decision = _trigger_demo(settings, client, out)
    finally:
        stop(server)
    stale = [a for a in answers if a.get("stale")]
    if stale:
        out.print(
            f'"stale": true: the simulated snapshot ({stale[0]["features_timestamp"]}) is older '
            "than its feature views' TTL; scores still use its values, as in "
            "training. A store materialized daily answers false."
        )
    if live is not None:
        answers.append({**live, "trigger_decision": decision})
    return answers


def _trigger_demo(settings: Settings, client: httpx.Client, out: Console) -> dict[str, Any] | None:
    """Abandon carts over ``/events``, run the triggers, print the first decision delivered.

    The carts are stamped 35 minutes ago and the runner's clock is moved 31
    minutes ahead, so the 30-minute timer of ``abandoned_cart`` falls due now.
    """
    import pyarrow.parquet as pq

    from propensity.activation.runner import TriggerRunner
    from propensity.features.online.redis_client import connect
    from propensity.features.snapshots import feature_table_path
    from propensity.jobs.redis_stream import TransportError

    if not settings.path(settings.activation.triggers_file).exists():
        out.print(f"triggers: skipped, no {settings.activation.triggers_file} in the project")
        return None
    try:
        connect(settings.activation_url, timeout=2).ping()
    except TransportError:
        out.print(
            f"triggers: skipped, no Redis at {settings.activation_url} (redis-server starts it)"
        )
        return None
    table = pq.read_table(
        feature_table_path(settings.path(settings.features_dir), "basket"),
        columns=["customer_id", "event_timestamp", "cart_abandonment_rate_30d"],
    ).to_pandas()
    latest = table[table["event_timestamp"] == table["event_timestamp"].max()]
    # Customers the cart-recovery action is open to (it asks for an abandonment history).
    open_to = latest[latest["cart_abandonment_rate_30d"] > 0]["customer_id"].tolist()
    now = datetime.now(UTC)
    clock = {"now": now}
    runner = TriggerRunner(settings, clock=lambda: clock["now"])
    trigger = runner.spec.triggers.get("abandoned_cart")
    if trigger is None:
        runner.close()
        out.print("triggers: skipped, the triggers file has no abandoned_cart trigger")
        return None
    # Not those an earlier quickstart run fired for in this window (once per window).
    window = trigger.window_key(int((now + timedelta(minutes=31)).timestamp() * 1_000_000))
    fired = runner.state.fired("abandoned_cart", window, open_to)
    chosen = [c for c, done in zip(open_to, fired.tolist(), strict=True) if not done][:20]
    stamp = now.strftime("%Y%m%dT%H%M%S")
    carts = [
        {
            "event_id": f"cart-{customer}-{stamp}",
            "customer_id": customer,
            "event_type": "add_to_cart",
            "event_timestamp": (now - timedelta(minutes=35)).isoformat(),
            "session_id": f"cart-{customer}-{stamp}",
            "product_id": "P0002",
        }
        for customer in chosen
    ]
    try:
        if carts:
            client.post("/events", json={"events": carts}).raise_for_status()
        while runner.step():  # arms a 30-minute timer per cart
            pass
        clock["now"] += timedelta(minutes=31)
        while runner.step():  # the timers are due: still open carts fire
            pass
        rows = runner.state.client.xrevrange(settings.activation.outbound_key, count=200)
    finally:
        runner.close()
    decisions = [json.loads(fields[b"decision"]) for _, fields in rows]
    mine = [d for d in decisions if d["trigger"] == "abandoned_cart" and d["customer_id"] in chosen]
    out.print(
        f"triggers: {len(carts)} carts abandoned 35 minutes ago → {runner.stats.line()}; "
        f"outbound stream {settings.activation.outbound_key}:"
    )
    if mine:
        out.print_json(json.dumps(mine[-1]))
    return mine[-1] if mine else None


def demo_events(customer: str, now: datetime) -> list[dict[str, Any]]:
    """A short live session of one customer, ending just before ``now``: views and a cart add.

    Examples
    --------
    >>> events = demo_events("C0000001", datetime(2026, 6, 1, 12, tzinfo=UTC))
    >>> [e["event_type"] for e in events]
    ['session_start', 'product_view', 'product_view', 'add_to_cart']
    """
    kinds = ("session_start", "product_view", "product_view", "add_to_cart")
    stamp = now.strftime("%Y%m%dT%H%M%S")
    session = f"live-{customer}-{stamp}"
    return [
        {
            # Ids from the clock: a second run of the quickstart adds a new session.
            "event_id": f"{session}-{i}",
            "customer_id": customer,
            "event_type": kind,
            "event_timestamp": (now - timedelta(seconds=40 - 10 * i)).isoformat(),
            "session_id": session,
            "product_id": None if kind == "session_start" else "P0001",
        }
        for i, kind in enumerate(kinds)
    ]


def _events_demo(client: httpx.Client, customer: str, out: Console) -> dict[str, Any]:
    """Score one customer, post a few live events for them, score again; print both."""
    before = client.post("/score", json={"customer_id": customer})
    before.raise_for_status()
    events = demo_events(customer, datetime.now(UTC))
    posted = client.post("/events", json={"events": events})
    posted.raise_for_status()
    after = client.post("/score", json={"customer_id": customer})
    after.raise_for_status()
    out.print(f"POST /events: {len(events)} live events for {customer} → {posted.json()}")
    keys = (
        "churn_probability",
        "purchase_propensity",
        "purchase_24h_probability",
        "stale",
        "features_timestamp",
    )
    for label, answer in (("before", before.json()), ("after", after.json())):
        shown = {k: answer.get(k) for k in keys if k in answer}
        out.print(f"/score {customer} {label} the events:")
        out.print_json(json.dumps(shown))
    return {"customer_id": customer, "events": posted.json(), "before": before.json(),
            "after": after.json()}  # fmt: skip
