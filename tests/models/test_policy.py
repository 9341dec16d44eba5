"""IPS and DR estimates are unbiased on a synthetic bandit with known values."""

from __future__ import annotations

import numpy as np
import pytest

from propensity.models.policy import evaluate_policies, incremental_scores, policy_matrix

ACTIONS = ["a", "b"]
COST = np.array([0.5, 1.0])
VALUE = np.array([10.0, 20.0])


def _bandit(n: int, seed: int):
    """Logged campaign with feature-dependent assignment and known outcome probabilities."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    base = 0.2 + 0.1 * x
    p_arm = np.column_stack([base, base + 0.1 * (x > 0), base + 0.08 * (x < 0)])
    # Assignment depends on x: IPS must correct for it.
    logits = np.column_stack([np.zeros(n), 0.8 * x, -0.8 * x])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pick = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    arms = np.array(["control", *ACTIONS])[pick]
    propensity = probs[np.arange(n), pick]
    y = (rng.random(n) < p_arm[np.arange(n), pick]).astype(float)
    outcome = y[:, None] * VALUE[None, :]
    true = (p_arm[:, 1:] - p_arm[:, [0]]) * VALUE[None, :] - COST[None, :]
    mu_control = np.repeat(p_arm[:, [0]], 2, axis=1) * VALUE[None, :]
    mu_action = p_arm[:, 1:] * VALUE[None, :]
    return x, arms, propensity, outcome, true, mu_action, mu_control


def test_incremental_scores_small_example() -> None:
    scores = incremental_scores(["a", "control"], [0.5, 0.5], ["a"], [[1.0], [0.0]], [0.1])
    np.testing.assert_allclose(scores, [[1.9], [-0.1]])


def test_ips_and_dr_cover_true_values() -> None:
    x, arms, p, outcome, true, mu_a, mu_c = _bandit(40_000, seed=3)
    ips = incremental_scores(arms, p, ACTIONS, outcome, COST)
    # A deliberately wrong outcome model: DR stays unbiased because propensities are right.
    dr = incremental_scores(
        arms, p, ACTIONS, outcome, COST, mu_action=mu_a * 0.7, mu_control=mu_c * 1.2
    )
    oracle_choice = np.where(true.max(axis=1) > 0, np.array(ACTIONS)[true.argmax(axis=1)], "none")
    policies = {
        "oracle": policy_matrix(oracle_choice, ACTIONS),
        "all_a": policy_matrix(np.full(len(x), "a"), ACTIONS),
        "random": np.full((len(x), 2), 1 / 3),
        "no_action": np.zeros((len(x), 2)),
    }
    table = evaluate_policies(
        policies,
        ips_scores=ips,
        dr_scores=dr,
        true_scores=true,
        baseline="all_a",
        n_boot=200,
        level=0.95,
    )
    for name in policies:
        row = table.loc[name]
        assert row["ips_low"] <= row["true"] <= row["ips_high"], (name, row.to_dict())
        assert row["dr_low"] <= row["true"] <= row["dr_high"], (name, row.to_dict())
    assert table.loc["no_action", "dr"] == 0.0
    assert table.loc["oracle", "true"] > table.loc["all_a", "true"]
    assert table.loc["oracle", "dr_diff_low"] > 0
    assert table.loc["all_a", "dr_diff"] == 0.0


def test_ips_bias_without_correction_is_detected() -> None:
    """Sanity: ignoring the propensities (pretending uniform) biases IPS away from the truth."""
    x, arms, p, outcome, true, _, _ = _bandit(40_000, seed=2)
    pi = np.zeros((len(x), 2))
    pi[:, 0] = 1.0
    right = (pi * incremental_scores(arms, p, ACTIONS, outcome, COST)).sum(axis=1).mean()
    wrong = (
        (pi * incremental_scores(arms, np.full(len(x), 1 / 3), ACTIONS, outcome, COST))
        .sum(axis=1)
        .mean()
    )
    truth = true[:, 0].mean()
    assert abs(right - truth) < abs(wrong - truth)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="row 1: propensity"):
        incremental_scores(["a", "a"], [0.5, 0.0], ["a"], [[1.0], [1.0]], [0.0])
    with pytest.raises(ValueError, match="both"):
        incremental_scores(["a"], [0.5], ["a"], [[1.0]], [0.0], mu_action=[[1.0]])
    with pytest.raises(ValueError, match="baseline"):
        evaluate_policies({"p": np.ones((1, 1))}, ips_scores=np.ones((1, 1)), baseline="q")


def test_point_estimates_without_bootstrap() -> None:
    # A champion is re-evaluated with n_boot=0: the same means, NaN bounds, no error.
    x, arms, propensity, outcome, true, mu_action, mu_control = _bandit(2_000, 3)
    ips = incremental_scores(arms, propensity, ACTIONS, outcome, COST)
    policies = policy_matrix(np.array(["a", "b"] * 1_000), ACTIONS)
    point = evaluate_policies({"mixed": policies}, ips_scores=ips, n_boot=0)
    full = evaluate_policies({"mixed": policies}, ips_scores=ips, n_boot=50)
    assert point.loc["mixed", "ips"] == pytest.approx(full.loc["mixed", "ips"])
    assert np.isnan(point.loc["mixed", "ips_low"]) and np.isnan(point.loc["mixed", "ips_high"])
