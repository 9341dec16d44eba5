"""The campaign-table generator: seeded, randomized, and its truth matches its outcomes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from propensity.events.campaign_table import ARMS, simulate_campaign_table


def test_seeded_randomized_and_truthful() -> None:
    table, truth = simulate_campaign_table(30_000, seed=5)
    again, _ = simulate_campaign_table(30_000, seed=5)
    pd.testing.assert_frame_equal(table, again)
    assert set(table["arm"]) == set(ARMS)
    # The observed visit rate per arm matches the true probabilities of that arm's rows.
    for arm in ARMS:
        rows = table["arm"] == arm
        expected = truth.loc[rows, f"p_purchase_{arm}"].mean()
        assert abs(table.loc[rows, "visit"].mean() - expected) < 0.012
    # Spend and conversion only follow a visit.
    assert (table.loc[table["visit"] == 0, ["conversion", "spend"]] == 0).all().all()


def test_null_variant_has_one_effect_per_arm() -> None:
    _, truth = simulate_campaign_table(2_000, seed=6, heterogeneous=False)
    base = truth["p_purchase_control"]
    inside = (base > 0.05) & (base < 0.9)  # away from the clip
    for arm in ARMS[1:]:
        lift = (truth[f"p_purchase_{arm}"] - base)[inside]
        assert np.ptp(lift) < 1e-9
    _, hetero = simulate_campaign_table(2_000, seed=6)
    assert np.ptp(hetero["p_purchase_mens_email"] - hetero["p_purchase_control"]) > 0.05
