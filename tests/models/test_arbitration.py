"""Arbitration: argmax of value, eligibility, contact caps, cooldowns, hold-out, no_action."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from propensity.models.arbitration import (
    NO_ACTION,
    ActionCatalog,
    ContactState,
    arbitrate,
    best_eligible,
    choose,
    decide,
    eligibility,
    in_holdout,
    load_catalog,
)

REPO = Path(__file__).resolve().parents[2]


def _catalog(holdout: float = 0.0) -> ActionCatalog:
    return ActionCatalog.model_validate(
        {
            "holdout_share": holdout,
            "contact_policy": {"max_contacts_7d": 2, "max_contacts_30d": 4, "cooldown_days": 3},
            "actions": {
                "discount": {
                    "cost": 2.0,
                    "value": 40.0,
                    "outcome": "purchase",
                    "cooldown_days": 14,
                    "eligibility": [{"feature": "discounts_30d", "op": "==", "value": 0}],
                },
                "onboarding_email": {
                    "cost": 0.5,
                    "value": 100.0,
                    "outcome": "retention",
                    "eligibility": [{"feature": "tenure_days", "op": "<", "value": 60}],
                },
            },
        }
    )


def _features(n: int = 4, **overrides) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "customer_id": [f"C{i:07d}" for i in range(n)],
            "discounts_30d": 0.0,
            "tenure_days": 30.0,
            "exposures_7d": 0.0,
            "exposures_30d": 0.0,
            "days_since_last_exposure": np.nan,
        }
    )
    for column, values in overrides.items():
        frame[column] = values
    return frame


def test_picks_argmax_of_incremental_value() -> None:
    uplift = pd.DataFrame({"discount": [0.06, 0.01, 0.0], "onboarding_email": [0.01, 0.02, 0.0]})
    out = choose(uplift, _features(3), _catalog())
    # 0.06*40-2 = 0.40 vs 0.01*100-0.5 = 0.50 -> onboarding; 0.01*40-2 < 0 vs 1.5 -> onboarding
    assert out["action"].tolist() == ["onboarding_email", "onboarding_email", NO_ACTION]
    assert out["expected_value"].tolist() == pytest.approx([0.5, 1.5, 0.0])
    assert out.loc[0, "alternatives"][1]["reason"] == (
        "eligible; uplift 0.060 x value 40 - cost 2 = 0.40"
    )
    assert [a["action"] for a in out.loc[0, "alternatives"]] == ["onboarding_email", "discount"]
    assert out.loc[2, "reason"].startswith("no eligible action pays")
    assert out["value_discount"].tolist() == pytest.approx([0.4, -1.6, -2.0])


def test_eligibility_rules_block_actions() -> None:
    uplift = pd.DataFrame({"discount": [0.2, 0.2], "onboarding_email": [0.05, 0.05]})
    features = _features(2, discounts_30d=[1.0, 0.0], tenure_days=[30.0, 400.0])
    out = choose(uplift, features, _catalog())
    # Row 0 already got a discount: onboarding (4.5) wins though discount would pay 6.
    assert out["action"].tolist() == ["onboarding_email", "discount"]
    assert np.isnan(out.loc[0, "value_discount"])
    blocked = [a for a in out.loc[1, "alternatives"] if not a["eligible"]]
    assert blocked[0]["reason"] == "ineligible: tenure_days < 60.0 fails (tenure_days=400.0)"


def test_missing_feature_value_is_ineligible_and_missing_column_is_an_error() -> None:
    mask, why = eligibility(_features(1, tenure_days=[np.nan]), _catalog())
    assert not mask.loc[0, "onboarding_email"]
    assert "fails" in why.loc[0, "onboarding_email"]
    with pytest.raises(ValueError, match="'onboarding_email'.*tenure_days"):
        eligibility(_features(1).drop(columns="tenure_days"), _catalog())


def test_contact_caps_and_cooldown_from_features() -> None:
    uplift = pd.DataFrame({"discount": [0.2] * 4, "onboarding_email": [0.0] * 4})
    features = _features(
        4,
        exposures_7d=[2.0, 0.0, 0.0, 1.0],
        exposures_30d=[2.0, 4.0, 1.0, 1.0],
        days_since_last_exposure=[1.0, 10.0, 1.5, 5.0],
    )
    out = choose(uplift, features, _catalog())
    assert out["action"].tolist() == [NO_ACTION, NO_ACTION, NO_ACTION, "discount"]
    assert "contact cap: 2 contacts in 7 days" in out.loc[0, "reason"]
    assert "contact cap: 4 contacts in 30 days" in out.loc[1, "reason"]
    assert "cooldown: last contact 1.5 days ago < 3" in out.loc[2, "reason"]


def test_per_action_cooldown_from_history() -> None:
    as_of = pd.Timestamp("2024-03-01", tz="UTC")
    history = pd.DataFrame(
        {
            "customer_id": ["C0000000", "C0000001", "C0000001"],
            "action": ["discount", "control", "onboarding_email"],
            "exposure_timestamp": as_of - pd.to_timedelta([10, 1, 40], unit="D"),
        }
    )
    uplift = pd.DataFrame({"discount": [0.2, 0.2], "onboarding_email": [0.01, 0.01]})
    features = _features(2).drop(
        columns=["exposures_7d", "exposures_30d", "days_since_last_exposure"]
    )
    out = choose(uplift, features, _catalog(), history=history, as_of=as_of)
    # C0: discount 10 days ago < 14-day cooldown -> onboarding;
    # C1: a control exposure is not a contact.
    assert out["action"].tolist() == ["onboarding_email", "discount"]
    assert any(
        a["reason"] == "cooldown: discount 10.0 days ago < 14" for a in out.loc[0, "alternatives"]
    )
    # A future exposure never counts.
    later = history.assign(exposure_timestamp=as_of + pd.Timedelta(days=1))
    assert choose(uplift, features, _catalog(), history=later, as_of=as_of)["action"].tolist() == [
        "discount",
        "discount",
    ]


def test_holdout_is_deterministic_and_sized() -> None:
    ids = [f"C{i:07d}" for i in range(20_000)]
    held = in_holdout(ids, 0.1)
    assert held.mean() == pytest.approx(0.1, abs=0.01)
    np.testing.assert_array_equal(held, in_holdout(list(reversed(ids)), 0.1)[::-1])
    features = _features(2000)
    uplift = pd.DataFrame({"discount": np.full(2000, 0.5), "onboarding_email": 0.0})
    out = choose(uplift, features, _catalog(holdout=0.1))
    assert (out.loc[out["holdout"], "action"] == NO_ACTION).all()
    assert (out.loc[~out["holdout"], "action"] == "discount").all()
    assert out["holdout"].tolist() == in_holdout(features["customer_id"], 0.1).tolist()
    assert out.loc[out["holdout"].idxmax(), "reason"].startswith("hold-out")


def test_decide_uses_model_uplift() -> None:
    class Fixed:
        def action_uplift(self, X: pd.DataFrame) -> pd.DataFrame:
            return pd.DataFrame({"discount": X["tenure_days"] / 1000, "onboarding_email": 0.0})

    out = decide(_features(2, tenure_days=[10.0, 500.0]), Fixed(), _catalog())
    assert out["action"].tolist() == [NO_ACTION, "discount"]


def test_repo_catalog_loads_and_rejects_unknown_fields(tmp_path: Path) -> None:
    catalog = load_catalog(REPO / "models" / "actions.yaml")
    assert catalog.names == [
        "discount",
        "loyalty_points",
        "onboarding_email",
        "feature_tutorial",
        "cart_recovery",
    ]
    bad = tmp_path / "actions.yaml"
    bad.write_text("actions:\n  discount: {cost: 1, value: 2, outcome: purchase, colour: red}\n")
    with pytest.raises(ValueError, match="actions.discount.colour"):
        load_catalog(bad)
    bad.write_text("actions:\n  control: {cost: 1, value: 2, outcome: purchase}\n")
    with pytest.raises(ValueError, match="reserved"):
        load_catalog(bad)


def test_kernel_on_small_arrays_with_hand_computed_answers() -> None:
    """The array kernel alone: values, masks, contact policy, argmax and reasons by hand."""
    catalog = _catalog()
    # discount: 40 × uplift − 2; onboarding_email: 100 × uplift − 0.5.
    uplift = np.array([[0.10, 0.01], [0.10, 0.05], [0.01, 0.004], [0.2, 0.2]])
    columns = {
        "discounts_30d": np.array([0.0, 1.0, 0.0, 0.0]),
        "tenure_days": np.array([10.0, 10.0, 10.0, np.nan]),
        "exposures_7d": np.array([0.0, 0.0, np.nan, 2.0]),
        "exposures_30d": np.array([0.0, 0.0, 0.0, 2.0]),
        "days_since_last_exposure": np.array([np.nan, 5.0, 10.0, 1.0]),
    }
    contacts = ContactState.from_features(columns, catalog.contact_policy)
    ids = ["a", "b", "c", "d"]
    result = arbitrate(uplift, columns, ids, catalog, contacts=contacts)
    # Row 0: discount 40×0.1−2 = 2.0 beats email 100×0.01−0.5 = 0.5.
    # Row 1: discount ineligible (discounts_30d=1.0), email 100×0.05−0.5 = 4.5.
    # Row 2: discount −1.6, email −0.1: nothing pays. Row 3: 2 contacts in 7 days hit the cap.
    np.testing.assert_allclose(result.values[0], [2.0, 0.5])
    assert result.action.tolist() == ["discount", "onboarding_email", NO_ACTION, NO_ACTION]
    np.testing.assert_allclose(result.expected_value, [2.0, 4.5, 0.0, 0.0])
    assert result.eligible.tolist() == [[True, True], [False, True], [True, True], [False, False]]
    assert result.blocked[1, 0] == "ineligible: discounts_30d == 0.0 fails (discounts_30d=1.0)"
    assert result.blocked[3, 1] == "contact cap: 2 contacts in 7 days >= max 2"
    reasons = [d["reason"] for d in result.decisions()]
    assert reasons[0] == "eligible; uplift 0.100 x value 40 - cost 2 = 2.00"
    assert reasons[2] == "no eligible action pays: best uplift 0.004 x value 100 - cost 0.5 = -0.10"
    assert reasons[3].startswith("no eligible action: contact cap: 2 contacts in 7 days")
    # Without reasons (bulk scoring) the same answers, no text.
    lean = arbitrate(uplift, columns, ids, catalog, contacts=contacts, reasons=False)
    assert lean.action.tolist() == result.action.tolist() and lean.blocked.shape == (0, 2)
    # Without a contact policy row 3 gets discount, 40×0.2−2 = 6.0: email's rule
    # tenure_days < 60 fails on a missing value, though its value (19.5) is higher.
    free = arbitrate(uplift, columns, ids, catalog, contacts=None)
    assert free.action[3] == "discount" and free.expected_value[3] == pytest.approx(6.0)
    best, value = best_eligible(result.values, result.eligible)
    assert best.tolist()[:2] == [0, 1] and value[3] == -np.inf


def test_kernel_rejects_uplift_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"expected \(n, 2\)"):
        arbitrate(np.zeros((1, 3)), {}, ["a"], _catalog(), contacts=None)


def test_offered_actions_and_a_campaign_that_named_its_action() -> None:
    """A trigger's choice: only its actions, and, when it named one, whatever its value."""
    catalog = _catalog()
    uplift = np.array([[0.10, 0.01], [0.01, 0.004], [0.10, 0.05]])
    columns = {
        "discounts_30d": np.array([0.0, 0.0, 1.0]),
        "tenure_days": np.array([10.0, 10.0, 10.0]),
    }
    ids = ["a", "b", "c"]
    # Row 0 prefers discount (2.0); offered only the e-mail it takes that (0.5).
    only = arbitrate(uplift, columns, ids, catalog, contacts=None, offered=["onboarding_email"])
    assert only.action.tolist() == ["onboarding_email", NO_ACTION, "onboarding_email"]
    assert only.blocked[0, 0] == "not offered here"
    assert only.decisions()[1]["reason"].startswith("no eligible action pays")
    # Named by the campaign: sent where eligible though it does not pay (row 1: -1.6),
    # still never where ineligible (row 2: discounts_30d=1.0).
    named = arbitrate(
        uplift, columns, ids, catalog, contacts=None, offered=["discount"], must_pay=False
    )
    assert named.action.tolist() == ["discount", "discount", NO_ACTION]
    assert named.expected_value[1] == pytest.approx(-1.6)
    assert [d["action"] for d in named.decisions()] == named.action.tolist()
    with pytest.raises(ValueError, match="not in the catalog"):
        arbitrate(uplift, columns, ids, catalog, contacts=None, offered=["teleport"])
