"""BG/NBD and Gamma-Gamma, and the repeat-purchase summaries they read from the lake.

The summaries and the BG/NBD outputs are point-in-time correct (planted future
purchases change nothing at a cutoff); BG/NBD's P(purchase) ranks and calibrates
on a seeded simulation better than chance and than a constant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from propensity import evaluation as ev
from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA
from propensity.events.simulator import SimulationConfig, simulate
from propensity.labels import LabelSpec, entity_frame
from propensity.models.clv import CLV_FEATURES, BGNBDBaseline
from propensity.pipeline.rfm import clv_features, rfm_frame

CUTOFF = pd.Timestamp("2026-04-06", tz="UTC")


@pytest.fixture(scope="module")
def orders() -> pa.Table:
    sim = simulate(SimulationConfig(customers=1500, days=150, seed=11))
    return sim.events.filter(pc.equal(sim.events["event_type"], "purchase"))


def _lake(tmp_path: Path, table: pa.Table) -> EventLake:
    lake = EventLake(tmp_path / "lake")
    lake.append(table)
    return lake


def test_summary_matches_a_hand_count(tmp_path: Path) -> None:
    rows = [
        ("A", "2026-03-01 10:00", 10.0),
        ("A", "2026-03-01 12:00", 5.0),  # same day: one purchase day, two orders
        ("A", "2026-03-11 09:00", 20.0),
        ("A", "2026-03-21 09:00", 40.0),
        ("B", "2026-03-30 09:00", 7.0),
        ("A", "2026-04-10 09:00", 99.0),  # after the cutoff: never counted
    ]
    table = pa.table(
        {
            "customer_id": [r[0] for r in rows],
            "event_id": [f"e{i}" for i in range(len(rows))],
            "event_timestamp": pa.array(
                pd.to_datetime([r[1] for r in rows]).tz_localize("UTC"), pa.timestamp("us", "UTC")
            ),
            "event_type": ["purchase"] * len(rows),
            "price": [r[2] for r in rows],
            "quantity": [1.0] * len(rows),
        }
    )
    rfm = rfm_frame(_lake(tmp_path, _align(table, ARROW_SCHEMA)), [CUTOFF])
    rfm = rfm.set_index("customer_id")
    a, b = rfm.loc["A"], rfm.loc["B"]
    assert (a["frequency"], a["recency"], a["T"]) == (2.0, 20.0, 36.0)
    assert a["monetary"] == pytest.approx(30.0)  # repeat days 20 and 40
    assert (a["orders"], a["revenue"], a["days_since_purchase"]) == (4.0, 75.0, 16.0)
    assert (b["frequency"], b["recency"], b["T"], b["monetary"]) == (0.0, 0.0, 7.0, 0.0)


def test_planted_future_purchases_change_nothing_at_the_cutoff(tmp_path: Path, orders) -> None:
    stamp = pa.scalar(CUTOFF, orders["event_timestamp"].type)
    past = orders.filter(pc.less(orders["event_timestamp"], stamp))
    ids = pc.unique(past["customer_id"]).to_pylist()[:200]
    n = len(ids) * 5
    planted = pa.table(
        {
            "customer_id": [c for c in ids for _ in range(5)],
            "event_id": [f"future{i}" for i in range(n)],
            "event_timestamp": pa.array(
                [CUTOFF + pd.Timedelta(hours=1 + 30 * (i % 5)) for i in range(n)],
                pa.timestamp("us", "UTC"),
            ),
            "event_type": ["purchase"] * n,
            "price": [500.0] * n,
            "quantity": [1.0] * n,
        }
    )
    clean = rfm_frame(_lake(tmp_path / "clean", past), [CUTOFF])
    both = pa.concat_tables([past, _align(planted, past.schema)])
    mixed = rfm_frame(_lake(tmp_path / "mixed", both), [CUTOFF])
    pd.testing.assert_frame_equal(clean, mixed)
    f_clean, _ = clv_features(clean, 30)
    f_mixed, _ = clv_features(mixed, 30)
    pd.testing.assert_frame_equal(f_clean, f_mixed)


def _align(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in the lake's schema: missing optional columns are nulls."""
    columns = {}
    for field in schema:
        if field.name in table.column_names:
            columns[field.name] = table[field.name].cast(field.type)
        else:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
    return pa.table(columns, schema=schema)


def test_bgnbd_ranks_and_calibrates_future_purchases(tmp_path: Path, orders) -> None:
    lake = _lake(tmp_path, orders)
    rfm = rfm_frame(lake, [CUTOFF])
    features, params = clv_features(rfm, 30)
    assert list(features.columns) == ["customer_id", "event_timestamp", *CLV_FEATURES]
    assert set(params) == {"2026-04-06"} and params["2026-04-06"]["r"] > 0
    labels = entity_frame(lake, [CUTOFF], LabelSpec(kind="purchase", horizon_days=30), "known")
    rows = labels.merge(features, on=["customer_id", "event_timestamp"])
    assert len(rows) == len(labels)
    y, p = rows["label"].to_numpy(), rows["bgnbd_p_purchase"].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    m = ev.binary_metrics(y, p)
    constant = ev.binary_metrics(y, np.full_like(p, y.mean()))
    assert m["roc_auc"] > 0.6 and m["log_loss"] < constant["log_loss"]
    # more expected purchases, more often a purchase: the outputs agree with each other
    assert np.corrcoef(rows["bgnbd_expected_purchases"], p)[0, 1] > 0.8
    assert (rows["bgnbd_p_alive"] >= p - 1e-12).all()
    spend = rows["gg_spend"].dropna()
    assert len(spend) == len(rows) and (spend > 0).all()


def test_expected_purchases_are_finite_when_b_is_below_one() -> None:
    """lifetimes answers NaN for customers without repeat purchases when a + b < 1."""
    from scipy import integrate, stats

    model = BGNBDBaseline()
    model.params_ = {"r": 2.12, "alpha": 81.2, "a": 0.089, "b": 0.78}
    rfm = pd.DataFrame(
        {"frequency": [0, 0, 1, 3], "recency": [0, 0, 30, 60], "T": [40, 200, 90, 100]}
    )
    got = model._expected_purchases(rfm, 30.0)
    # Eq. 10 as an integral: P(alive) E[(1 - E[exp(-lambda p h)]) / p], p ~ Beta(a, b + x).
    r, alpha, a, b = (model.params_[k] for k in ("r", "alpha", "a", "b"))
    p_alive, _, _ = model._posterior(rfm)
    for (x, _, T), alive, value in zip(rfm.to_numpy(float), p_alive, got, strict=True):

        def integrand(p: float, x: float = x, T: float = T) -> float:
            kept = ((alpha + T) / (alpha + T + p * 30.0)) ** (r + x)
            return (1 - kept) / p * stats.beta.pdf(p, a, b + x)

        assert value == pytest.approx(
            alive * integrate.quad(integrand, 0, 1, limit=200)[0], rel=1e-6
        )


def test_summary_without_a_column_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['T'\]"):
        BGNBDBaseline().fit(pd.DataFrame({"frequency": [1.0], "recency": [1.0]}))


def test_gamma_gamma_converges_where_the_currency_unit_stops_it_short() -> None:
    """Seen on a 91-day purchase model: lifetimes' Gamma-Gamma fit on order values in
    the shop's currency ended in ConvergenceError ("precision loss"). The fixture is
    that cutoff's repeat-purchase summary (simulator seed 7, orders only), in the
    order and to the last bit it was fitted: the optimizer's path depends on both, and
    DuckDB's parallel sums differ in the last bit from run to run."""
    from lifetimes import GammaGammaFitter
    from lifetimes.utils import ConvergenceError

    rows = pd.DataFrame(
        dict(np.load(Path(__file__).parent / "fixtures/gamma_gamma_stops_short.npz"))
    )
    f, m = rows["frequency"].to_numpy(), rows["monetary"].to_numpy()
    buyers = (f > 0) & (m > 0)
    with pytest.raises(ConvergenceError):
        GammaGammaFitter(penalizer_coef=0.001).fit(f[buyers], m[buyers])

    model = BGNBDBaseline().fit(rows)
    sp = model.spend_params_
    assert set(sp) == {"p", "q", "v"} and sp["q"] > 1  # a finite mean order value
    spend = model.features(rows, 91)["gg_spend"].to_numpy()[buyers]
    # Gamma-Gamma shrinks each buyer's mean towards the population's: same scale as theirs
    assert 0.8 < spend.mean() / m[buyers].mean() < 1.25
    assert np.corrcoef(spend, m[buyers])[0, 1] > 0.8
