"""Trigger measurement: treated firings against the hold-out, from the lake's exposures."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from propensity.activation.measure import design_effect, difference_interval, measure_triggers
from propensity.activation.runner import load_project_triggers
from propensity.cli import app
from propensity.config import Settings, load_settings
from propensity.streaming import EventProcessor

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)


def test_the_interval_is_newcombes() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, example (a), method 10: 56/70 - 48/80.
    diff, low, high = difference_interval(56, 70, 48, 80)
    assert (round(diff, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    assert all(np.isnan(difference_interval(3, 10, 0, 0)))


def test_the_interval_covers_the_true_difference_at_its_level() -> None:
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(1000):
        k1, k0 = rng.binomial(150, 0.12), rng.binomial(60, 0.05)
        _, low, high = difference_interval(int(k1), 150, int(k0), 60)
        covered += low <= 0.07 <= high
    assert 0.93 <= covered / 1000 <= 0.975


def test_firings_of_one_customer_widen_the_interval_to_its_level() -> None:
    # A/A: customers with their own rate fire 1-8 times each, all in one arm.
    rng = np.random.default_rng(11)
    covered = naive = 0
    for _ in range(600):
        arms = []
        for _ in range(2):
            firings = rng.integers(1, 9, size=150)
            who = np.repeat(np.arange(150), firings)
            won = rng.random(who.size) < rng.beta(1, 3, size=150)[who]
            arms.append((int(won.sum()), who.size, design_effect(who, won)))
        (k1, n1, d1), (k0, n0, d0) = arms
        _, low, high = difference_interval(k1, n1, k0, n0, design_effects=(d1, d0))
        covered += low <= 0 <= high
        _, low, high = difference_interval(k1, n1, k0, n0)
        naive += low <= 0 <= high
    assert 0.93 <= covered / 600 <= 0.975
    assert naive / 600 < 0.85  # firings taken as independent: far too narrow


def _project(root: Path) -> Settings:
    (root / "models").mkdir(parents=True)
    for name in ("triggers.yaml", "actions.yaml"):
        shutil.copy(REPO / "models" / name, root / "models" / name)
    return load_settings(root, environ={})


def _exposure(i: int, customer: str, at: datetime, action: str) -> dict:
    return {
        "event_id": f"exposure:abandoned_cart:{customer}:{i}",
        "customer_id": customer,
        "event_type": "campaign_exposure",
        "event_timestamp": at.isoformat(),
        "campaign_id": "abandoned_cart",
        "action": action,
    }


def _purchase(customer: str, at: datetime) -> dict:
    return {
        "event_id": f"buy-{customer}-{at.timestamp()}",
        "customer_id": customer,
        "event_type": "purchase",
        "event_timestamp": at.isoformat(),
        "price": 10.0,
        "order_id": f"o-{customer}-{at.timestamp()}",
    }


@pytest.fixture()
def measured(tmp_path: Path) -> Settings:
    """Exposures two days before NOW, purchases placed around each window's edges."""
    settings = _project(tmp_path)
    fired = NOW - timedelta(days=2)
    events = []
    # Treated: T0-T9, converted by purchases inside (0, 24 h]: T0-T5 (T5 at 24 h exactly).
    for i in range(10):
        events.append(_exposure(i, f"T{i}", fired, "cart_recovery"))
    for i, hours in enumerate([0.5, 2, 6, 12, 23, 24]):
        events.append(_purchase(f"T{i}", fired + timedelta(hours=hours)))
    events.append(_purchase("T6", fired + timedelta(hours=25)))  # after the window
    events.append(_purchase("T7", fired - timedelta(hours=1)))  # before the firing
    events.append(_purchase("T0", fired + timedelta(hours=3)))  # a second one counts once
    # Held out: H0-H7 (the catalog's control), H0-H1 converted.
    for i in range(8):
        events.append(_exposure(i, f"H{i}", fired, "control"))
    for i in range(2):
        events.append(_purchase(f"H{i}", fired + timedelta(hours=1)))
    # Fired 12 h before NOW: the 24-hour window is still open.
    events.append(_exposure(99, "P0", NOW - timedelta(hours=12), "cart_recovery"))
    # Another campaign's exposure of a treated customer is not a firing.
    events.append(
        {**_exposure(7, "T8", fired, "discount"), "event_id": "wave-1", "campaign_id": "w"}
    )
    processor = EventProcessor(settings)
    result = processor.process(events, received_at=NOW)
    assert not result.rejected, result.rejected
    processor.close()
    return settings


def test_each_firing_counts_once_within_its_window(measured: Settings) -> None:
    spec = load_project_triggers(measured)
    row, churn = measure_triggers(measured, spec, as_of=NOW)
    assert (row.trigger, churn.trigger) == ("abandoned_cart", "churn_risk")
    assert (churn.treated, churn.held_out, churn.pending) == (0, 0, 0)  # never fired
    assert np.isnan(churn.uplift)
    assert (row.treated, row.held_out, row.pending) == (10, 8, 1)
    assert (row.treated_rate, row.held_out_rate) == (0.6, 0.25)
    assert row.uplift == pytest.approx(0.35)
    assert row.low < row.uplift < row.high
    # A shorter window: T3-T5 (12, 23, 24 h) no longer convert; the pending one has closed.
    [short] = measure_triggers(measured, spec, hours=6, as_of=NOW, names=["abandoned_cart"])
    assert (short.treated, short.pending, short.treated_rate) == (11, 0, 3 / 11)


def test_the_cli_reports_and_names_bad_options(measured: Settings) -> None:
    runner = CliRunner()
    base = ["triggers", "report", "--config", str(measured.root)]
    out = runner.invoke(app, [*base, "abandoned_cart", "--json", "--as-of", NOW.isoformat()])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output)
    assert (row["treated"], row["held_out"], row["pending"]) == (10, 8, 1)
    table = runner.invoke(app, [*base, "--as-of", "2026-06-10T12:00:00Z"])
    assert table.exit_code == 0 and "+35.0%" in table.output, table.output
    for args, message in [
        (["nobody"], "unknown trigger 'nobody'; declared: abandoned_cart, churn_risk"),
        (["--outcome", "purchases"], "--outcome 'purchases' is not an event type"),
        (["--as-of", "next tuesday"], "--as-of 'next tuesday' is not a date"),
    ]:
        bad = runner.invoke(app, [*base, *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert "Traceback" not in bad.output


def test_an_empty_lake_is_one_line_with_a_hint(tmp_path: Path) -> None:
    settings = _project(tmp_path)
    out = CliRunner().invoke(app, ["triggers", "report", "--config", str(settings.root)])
    assert out.exit_code == 2 and "empty" in out.output and "Traceback" not in out.output


def test_on_the_simulator_the_interval_covers_the_true_effect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from bench_trigger_measurement import closed_loop

    for boost in (2.0, 1.0):  # the simulator's recovery boost, then an A/A (no effect)
        m, truth, _ = closed_loop(1, customers=4000, days=30, holdout=0.5, boost=boost)
        assert m.treated > 1000 and m.held_out > 1000
        assert m.low <= truth <= m.high, (m, truth)
        assert (m.low > 0) == (boost > 1)  # the effect is found, and none where there is none
