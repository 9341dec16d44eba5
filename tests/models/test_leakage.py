"""Post-treatment columns of a campaign table are named; honest features are not."""

from __future__ import annotations

import numpy as np
import pytest

from propensity.events.campaign_table import simulate_campaign_table
from propensity.models.leakage import post_treatment_columns

PRE = ["recency", "history", "mens", "womens", "newbie", "channel", "noise"]


@pytest.mark.parametrize("heterogeneous", [True, False])
def test_campaign_outcomes_are_flagged_and_pre_treatment_columns_are_not(
    heterogeneous: bool,
) -> None:
    table, _ = simulate_campaign_table(10_000, seed=3, heterogeneous=heterogeneous)
    found = post_treatment_columns(table, [*PRE, "conversion", "spend"], "arm", "visit")
    assert sorted(f.column for f in found) == ["conversion", "spend"]
    text = found[0].describe()
    assert "post-treatment" in text and "p = " in text and "--exclude" in text


def test_a_column_that_moves_with_the_arm_fails_the_chi2_test() -> None:
    table, _ = simulate_campaign_table(5_000, seed=4)
    rng = np.random.default_rng(0)
    # An e-mail open: only the e-mailed arms can have one.
    table["opened"] = ((table["arm"] != "control") & (rng.random(len(table)) < 0.3)).astype(int)
    (finding,) = post_treatment_columns(table, [*PRE, "opened"], "arm", "visit")
    assert finding.column == "opened" and finding.test == "chi2"
    assert finding.statistic > 100 and finding.p_value < 1e-6


def test_random_pre_treatment_columns_raise_few_false_alarms() -> None:
    # Independent of the arm by construction (randomized): any finding is a false alarm,
    # whose family-wise rate is 1% per table. Over 100 tables, about one; five or more
    # has probability 0.3%, and the seeds are fixed, so the check is reproducible.
    rng = np.random.default_rng(5)
    alarms = []
    for seed in range(100):
        table, _ = simulate_campaign_table(int(rng.integers(200, 3_000)), seed=seed)
        alarms += [f.column for f in post_treatment_columns(table, PRE, "arm", "visit")]
    assert len(alarms) <= 4, alarms
