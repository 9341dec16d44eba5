"""The trigger runner on real components: SQLite tiles, Feast, MLflow champions, Redis.

A small served project (random features, real champions, a next-best-action
model) takes live events through the event processor; the runner, with a
clock the tests move, turns them into decisions on the outbound stream.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from propensity.activation.runner import TriggerRunner
from propensity.activation.state import ActivationState
from propensity.config import Settings, load_settings
from propensity.features.online import tile_store
from propensity.features.online.redis_client import connect
from propensity.features.store import FeatureStoreAdapter
from propensity.serving.process import stop, wait_ready
from propensity.streaming.processor import EventProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from project import REPO_ROOT, build_project, fit_nba, register, start_service  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "localhost:6379")

TRIGGERS = {
    "triggers": {
        "browsing": {
            "description": "Any activity in the last half hour.",
            "when": [{"feature": "events_30m", "op": ">", "value": 0}],
            "action": "next_best_action",
            "window_hours": 24,
            "holdout_share": 0.25,
        },
        "abandoned_cart": {
            "description": "A cart left open for half an hour.",
            "when": [
                {"feature": "cart_open_24h", "op": ">", "value": 0},
                {"feature": "minutes_since_last_cart_add", "op": ">=", "value": 30},
            ],
            "delay_minutes": 30,
            "action": "cart_recovery",
            "segment": "recovering",
            "window_hours": 24,
            "holdout_share": 0.0,
        },
    },
    "segments": {
        "browsing_now": {"when": [{"feature": "events_30m", "op": ">", "value": 0}]},
        "recovering": {"description": "Sent a cart recovery.", "ttl_hours": 1},
    },
}


def _redis_or_skip() -> None:
    try:
        connect(REDIS_URL, timeout=1).ping()
    except Exception:
        if "REDIS_URL" in os.environ:
            pytest.fail(f"REDIS_URL is set but no redis-server answers at {REDIS_URL}")
        pytest.skip(f"no redis-server at {REDIS_URL}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with churn, purchase and next-best-action champions (built once)."""
    _redis_or_skip()
    root = tmp_path_factory.mktemp("activation") / "project"
    project = build_project(root, n_customers=120)
    # The random features count about six contacts a week: a contact policy loose
    # enough that the arbitration, not the caps, decides who gets an action.
    model = fit_nba(FeatureStoreAdapter(project.settings).service_features("nba_v1"), seed=3)
    policy = model.catalog.contact_policy.model_copy(
        update={"max_contacts_7d": 1000, "max_contacts_30d": 1000, "cooldown_days": 0}
    )
    model.catalog = model.catalog.model_copy(update={"contact_policy": policy})
    register(project.settings, "next_best_action", model)
    return root


@pytest.fixture
def settings(served: Path) -> Iterator[Settings]:
    """The project with activation keys of this test's own (the shared Redis is not flushed)."""
    prefix = f"test-act-{uuid.uuid4().hex[:10]}"
    (served / "models").mkdir(exist_ok=True)
    (served / "models" / "triggers.yaml").write_text(yaml.safe_dump(TRIGGERS))
    shutil.copy(REPO_ROOT / "models" / "actions.yaml", served / "models" / "actions.yaml")
    env = {
        "PROPENSITY_ACTIVATION__URL": REDIS_URL,
        "PROPENSITY_ACTIVATION__PREFIX": prefix,
        "PROPENSITY_ACTIVATION__OUTBOUND_KEY": f"{prefix}:out",
    }
    settings = load_settings(served, environ=env)
    runner = TriggerRunner(settings)
    runner.tiles.clean(runner.tiles.dirty(1_000_000))  # what earlier tests changed
    runner.close()
    yield settings
    client = connect(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


def _event(i: str, customer: str, kind: str, at: datetime) -> dict[str, Any]:
    event = {
        "event_id": i,
        "customer_id": customer,
        "event_type": kind,
        "event_timestamp": at.isoformat().replace("+00:00", "Z"),
        "session_id": f"{customer}-s",
    }
    if kind in ("add_to_cart", "purchase"):
        event["product_id"] = "P1"
    if kind == "purchase":
        event |= {"price": 10.0, "quantity": 1.0}
    return event


def _drain(runner: TriggerRunner) -> None:
    while runner.step():
        pass


def _outbound(settings: Settings) -> list[dict[str, Any]]:
    client = connect(settings.activation_url)
    rows = client.xrange(settings.activation.outbound_key)
    return [json.loads(fields[b"decision"]) for _, fields in rows]


def test_an_immediate_trigger_fires_once_per_customer_and_window(settings: Settings) -> None:
    now = datetime.now(UTC)
    customers = [f"C{i:07d}" for i in range(1, 81)]
    EventProcessor(settings).process(
        [_event(f"view-{c}", c, "page_view", now - timedelta(minutes=2)) for c in customers]
    )
    runner = TriggerRunner(settings, clock=lambda: now)
    _drain(runner)
    sent = _outbound(settings)
    stats = runner.stats
    assert stats.fired > 0 and stats.fired == stats.delivered + stats.held_out
    # Each customer evaluated once: the exposures written for the firings are no change.
    assert stats.evaluated == len(customers) and stats.exposures == stats.fired
    assert len(sent) == stats.delivered
    assert {d["trigger"] for d in sent} == {"browsing"}
    assert len({d["customer_id"] for d in sent}) == len(sent)  # once per customer
    assert all(not d["holdout"] and d["action"] for d in sent)
    held = stats.held_out / stats.fired
    assert 0.05 < held < 0.5  # the trigger's 25 % share (and the catalog's 5 %)
    # Live segment: every customer with an event in the last half hour.
    members, size = runner.state.segment_members("browsing_now", limit=1000)
    assert set(customers) <= set(members) and size == len(members)
    assert runner.state.customer_segments(customers[0]) == ["browsing_now"]
    # More events in the same window: evaluated again, nothing fires twice.
    EventProcessor(settings).process(
        [_event(f"again-{c}", c, "page_view", now - timedelta(minutes=1)) for c in customers]
    )
    fired_before = stats.fired
    _drain(runner)
    assert len(_outbound(settings)) == len(sent)
    assert runner.stats.fired == fired_before
    assert runner.stats.repeats == fired_before  # each fired customer, skipped by its mark
    # Every firing, held out or not, is in the lake as a campaign exposure.
    lake = runner.processor
    lake.flush()
    exposures = lake.lake.read(["event_type", "campaign_id", "action"])
    mine = exposures[(exposures["event_type"] == "campaign_exposure")]
    assert (mine["campaign_id"] == "browsing").sum() >= runner.stats.fired
    runner.close()


def test_a_delayed_trigger_fires_after_the_delay_only_if_it_still_holds(
    settings: Settings,
) -> None:
    now = datetime.now(UTC)
    left, bought = ["C0000090", "C0000091", "C0000092"], ["C0000093", "C0000094"]
    events = [
        _event(f"cart-{c}", c, "add_to_cart", now - timedelta(minutes=40)) for c in left + bought
    ]
    events += [_event(f"buy-{c}", c, "purchase", now - timedelta(minutes=35)) for c in bought]
    EventProcessor(settings).process(events)
    clock = {"now": now}
    runner = TriggerRunner(settings, clock=lambda: clock["now"])
    _drain(runner)
    assert runner.state.pending_timers() >= 5
    assert not [d for d in _outbound(settings) if d["trigger"] == "abandoned_cart"]
    clock["now"] = now + timedelta(minutes=29)
    _drain(runner)
    assert not [d for d in _outbound(settings) if d["trigger"] == "abandoned_cart"]
    clock["now"] = now + timedelta(minutes=31)
    _drain(runner)
    carts = [d for d in _outbound(settings) if d["trigger"] == "abandoned_cart"]
    assert sorted(d["customer_id"] for d in carts) == left
    assert {d["action"] for d in carts} == {"cart_recovery"}
    # The exposures written for those firings are in the lake but are no change: they
    # arm no timer, and only the segment's lapse is pending.
    assert runner.stats.exposures == 3 and runner.state.pending_timers() == 3
    clock["now"] = now + timedelta(minutes=70)
    _drain(runner)
    assert len([d for d in _outbound(settings) if d["trigger"] == "abandoned_cart"]) == 3
    # The firing put them in the trigger-fed segment, for its ttl of an hour.
    assert runner.state.segment_members("recovering")[0] == left
    assert runner.state.pending_timers() == 3  # their lapse, due at +91 minutes
    clock["now"] = now + timedelta(minutes=95)
    _drain(runner)
    assert runner.state.segment_members("recovering") == ([], 0)
    assert runner.state.customer_segments(left[0]) == []
    assert runner.state.pending_timers() == 0
    runner.close()


def test_forget_removes_timers_and_segment_memberships(settings: Settings) -> None:
    now = datetime.now(UTC)
    EventProcessor(settings).process(
        [_event("cart-forget", "C0000100", "add_to_cart", now - timedelta(minutes=1))]
    )
    runner = TriggerRunner(settings, clock=lambda: now)
    _drain(runner)
    assert runner.state.customer_segments("C0000100") == ["browsing_now"]
    assert runner.state.pending_timers() >= 1
    # Decisions naming customers: delivered, and given up on by the webhook.
    client = connect(settings.activation_url)
    dead = f"{settings.activation.prefix}:webhook-dead"
    for customer in ("C0000100", "C0000101"):
        decision = json.dumps({"decision_id": f"x:{customer}", "customer_id": customer})
        client.xadd(
            settings.activation.outbound_key, {"key": f"x:{customer}", "decision": decision}
        )
        client.xadd(dead, {"message_id": "1-0", "rule": "http_410", "payload": decision})
    state = ActivationState(
        settings.activation_url,
        settings.activation.prefix,
        settings.activation.outbound_key,
        dead_letter_key=dead,
    )
    assert state.forget(["C0000100"], runner.spec.triggers) > 0
    assert runner.state.customer_segments("C0000100") == []
    assert "C0000100" not in runner.state.segment_members("browsing_now", limit=1000)[0]
    assert runner.state.pending_timers() == 0
    for key, field in ((settings.activation.outbound_key, b"decision"), (dead, b"payload")):
        left = [json.loads(f[field])["customer_id"] for _, f in client.xrange(key)]
        assert "C0000100" not in left and "C0000101" in left
    runner.close()


def _runner_process(settings: Settings, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    environ.update(env)
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "propensity.cli",
                "triggers",
                "run",
                "--config",
                str(settings.root),
            ],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_a_runner_killed_at_random_points_fires_each_decision_exactly_once(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL mid-way, again and again: every decision sent once, none lost."""
    now = datetime.now(UTC)
    customers = [f"C{i:07d}" for i in range(1, 101)]
    # The reference: an uninterrupted runner in this process, on keys of its own.
    EventProcessor(settings).process(
        [_event(f"ref-{c}", c, "page_view", now - timedelta(minutes=3)) for c in customers]
    )
    reference = TriggerRunner(
        settings.model_copy(
            update={
                "activation": settings.activation.model_copy(
                    update={
                        "prefix": f"{settings.activation.prefix}:ref",
                        "outbound_key": f"{settings.activation.prefix}:ref:out",
                    }
                )
            }
        )
    )
    _drain(reference)
    client = connect(settings.activation_url)
    ref_out = [
        json.loads(f[b"decision"])
        for _, f in client.xrange(reference.settings.activation.outbound_key)
    ]
    expected = {d["customer_id"] for d in ref_out if d["trigger"] == "browsing"}
    reference.close()
    assert len(expected) > 10
    # The same customers again (new events): a runner process killed at random points.
    EventProcessor(settings).process(
        [_event(f"kill-{c}", c, "page_view", now - timedelta(minutes=2)) for c in customers]
    )
    env = {
        "PROPENSITY_ACTIVATION__URL": settings.activation_url,
        "PROPENSITY_ACTIVATION__PREFIX": settings.activation.prefix,
        "PROPENSITY_ACTIVATION__OUTBOUND_KEY": settings.activation.outbound_key,
    }
    rng = random.Random(7)
    log = tmp_path / "runner.log"
    tiles = tile_store(settings)
    outbox = f"{settings.activation.prefix}:exposures"
    for _ in range(4):  # killed at random points: starting, scoring, firing, draining
        process = _runner_process(settings, env, log)
        time.sleep(rng.uniform(1.0, 12.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    process = _runner_process(settings, env, log)  # then one left to finish the work
    deadline = time.monotonic() + 180
    while (tiles.dirty(1) or client.xlen(outbox)) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert not tiles.dirty(1), log.read_text()[-3000:]
    sent = [d for d in _outbound(settings) if d["trigger"] == "browsing"]
    ids = [d["customer_id"] for d in sent]
    assert len(ids) == len(set(ids))  # never twice
    assert set(ids) == expected  # none lost: what the uninterrupted runner sent
    # The lake holds one exposure per firing of this run, held-out ones included.
    lake = EventProcessor(settings)
    lake.flush()
    frame = lake.lake.read(["event_id", "event_type"])
    kill_exposures = frame["event_id"].str.startswith("exposure:browsing:").sum()
    assert kill_exposures >= len(ids)


def test_the_api_pages_live_segments_and_names_a_customers_segments(
    settings: Settings, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    customers = [f"C{i:07d}" for i in range(1, 26)]
    EventProcessor(settings).process(
        [_event(f"seg-{c}", c, "page_view", now - timedelta(minutes=1)) for c in customers]
    )
    runner = TriggerRunner(settings, clock=lambda: now)
    _drain(runner)
    runner.close()
    env = {
        "PROPENSITY_ACTIVATION__URL": settings.activation_url,
        "PROPENSITY_ACTIVATION__PREFIX": settings.activation.prefix,
        "PROPENSITY_ACTIVATION__OUTBOUND_KEY": settings.activation.outbound_key,
    }
    url, process = start_service(
        SimpleNamespace(settings=settings), tmp_path / "server.log", tmp_path / "home", **env
    )
    try:
        wait_ready(url, process, timeout=120)
        members: list[str] = []
        after = None
        while True:  # pages of 10, in id order, until next_after is null
            params = {"limit": 10, **({"after": after} if after else {})}
            page = httpx.get(f"{url}/segments/browsing_now", params=params, timeout=30).json()
            members += page["members"]
            after = page["next_after"]
            if after is None:
                break
        assert members == sorted(members) and set(customers) <= set(members)
        assert page["size"] == len(members)
        mine = httpx.get(f"{url}/customers/{customers[0]}/segments", timeout=30).json()
        assert mine == {"customer_id": customers[0], "segments": ["browsing_now"]}
        unknown = httpx.get(f"{url}/segments/nobody", timeout=30)
        assert unknown.status_code == 404 and "browsing_now" in unknown.json()["error"]
        bad = httpx.get(f"{url}/segments/browsing_now", params={"limit": 0}, timeout=30)
        assert bad.status_code == 422 and bad.json()["field"] == "limit"
        # One metrics series per route, not per segment or customer.
        text = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'endpoint="/segments/{name}"' in text and "/segments/nobody" not in text
        assert customers[0] not in text
        # Each live segment's size, as GET /segments/{name} counts it.
        sizes = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("propensity_segment_members{")
        }
        assert sizes == {"browsing_now": len(members), "recovering": 0.0}, sizes
    finally:
        stop(process)
