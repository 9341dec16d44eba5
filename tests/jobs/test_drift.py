"""PSI: zero for the same distribution, large for a shift, sensitive to missing values."""

from __future__ import annotations

import numpy as np

from propensity.jobs.drift import DriftReport, psi


def test_same_distribution_is_stable():
    rng = np.random.default_rng(0)
    assert psi(rng.normal(size=20_000), rng.normal(size=20_000)) < 0.01
    x = rng.gamma(2.0, 3.0, size=5000)
    assert psi(x, x) == 0.0


def test_shift_and_scale_are_drift():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=20_000)
    small = psi(ref, rng.normal(0.1, 1.0, size=20_000))
    large = psi(ref, rng.normal(1.0, 1.0, size=20_000))
    assert 0.0 < small < 0.1 < 0.25 < large
    assert psi(ref, rng.normal(0.0, 2.0, size=20_000)) > 0.25


def test_missing_values_count_as_drift():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=10_000)
    cur = rng.normal(size=10_000)
    cur[:3_000] = np.nan
    assert psi(ref, cur) > 0.25


def test_discrete_and_constant_features_do_not_break():
    ref = np.zeros(1000)
    assert psi(ref, np.zeros(500)) == 0.0
    assert psi(ref, np.ones(500)) > 1.0
    counts = np.random.default_rng(3).poisson(1.0, size=5000).astype(float)
    assert psi(counts, counts[::-1]) < 1e-9
    assert np.isnan(psi([], [1.0]))


def test_report_flags_what_crosses_the_threshold():
    report = DriftReport(
        reference=["2026-03-02"],
        current="2026-04-30",
        features={"a": 0.01, "b": 0.4},
        scores={"churn": 0.3},
        threshold=0.25,
    )
    assert report.drifted == ["b", "score:churn"]
    assert report.max_psi == 0.4
    assert "drifted: b, score:churn" in report.summary()
    assert report.to_dict()["max_psi"] == 0.4
