"""The serving fast paths give the same answers as the reference code they replace.

Compiled uplift vs ``NBAModel.action_uplift``, vectorized arbitration vs
``arbitration.decide``, LightGBM's single-row C path vs ``Booster.predict``,
chunked multi-core prediction vs one call, numpy value decoding vs the
per-value decoder, and a batch vs the same customers scored one by one.
"""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from project import REPO_ROOT, Project, fit_model, fit_nba
from pydantic_core import to_json

from propensity.config import Serving
from propensity.features.online import SqliteReader
from propensity.features.online._codec import decode_value, decode_values
from propensity.models._lightgbm import SingleRowPredictor
from propensity.models.arbitration import decide, load_catalog
from propensity.models.nba import NBAModel
from propensity.serving.encoding import batch_json
from propensity.serving.policy import ArbitrationPolicy
from propensity.serving.runtime import Runtime, online_reader
from propensity.serving.scorer import PURCHASE_24H, BoosterBundle, Scorer, predict_rows

pytestmark = pytest.mark.slow

CATALOG = load_catalog(REPO_ROOT / "models" / "actions.yaml")
CONTACT = ["exposures_7d", "exposures_30d", "days_since_last_exposure"]
RULES = ["discounts_30d", "tenure_days", "adoption_breadth", "cart_abandonment_rate_30d"]
MODEL_FEATURES = ["sessions_7d", "orders_30d", "revenue_30d", "tenure_days", "adoption_breadth"]


def _nba(learner: str, seed: int = 0) -> NBAModel:
    rng = np.random.default_rng(seed)
    n = 900
    X = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n, len(MODEL_FEATURES))), columns=MODEL_FEATURES)
    X.iloc[rng.random(n) < 0.1, 0] = np.nan
    arms = rng.choice([*CATALOG.names, CATALOG.control], size=n)
    lift = np.isin(arms, ["discount", "onboarding_email"]) * (X.iloc[:, 1].to_numpy() > 5) * 0.3
    outcomes = {
        "purchase": (rng.random(n) < 0.2 + lift).astype(int),
        "retention": (rng.random(n) < 0.5 + lift).astype(int),
    }
    params = {"n_estimators": 12, "min_child_samples": 30}
    return NBAModel(CATALOG, learner=learner, params=params, random_state=seed).fit(
        X, arms, outcomes
    )


def _features(names: list[str], n: int, seed: int) -> np.ndarray:
    """Random features that hit every arbitration branch: caps, cooldowns, rules, NaN."""
    rng = np.random.default_rng(seed)
    X = rng.gamma(2.0, 3.0, size=(n, len(names)))
    X[rng.random(X.shape) < 0.08] = np.nan
    col = {name: j for j, name in enumerate(names)}
    X[:, col["exposures_7d"]] = rng.choice([0, 0, 0, 1, 2, np.nan], n)
    X[:, col["exposures_30d"]] = rng.choice([0, 1, 3, 6, 7, np.nan], n)
    X[:, col["days_since_last_exposure"]] = rng.choice([0.5, 1.25, 3.0, 40.0, np.nan], n)
    X[:, col["discounts_30d"]] = rng.choice([0, 0, 1, np.nan], n)
    X[:, col["tenure_days"]] = rng.choice([10.0, 59.0, 60.0, 400.0, np.nan], n)
    X[:, col["adoption_breadth"]] = rng.choice([0.1, 0.5, 0.9, np.nan], n)
    X[:, col["cart_abandonment_rate_30d"]] = rng.choice([0.0, 0.0, 0.5, np.nan], n)
    return X


def _reference(policy: ArbitrationPolicy, ids: list[str], X: np.ndarray) -> pd.DataFrame:
    """The frame wrapper of the same kernel, over the model's pandas uplift path."""
    frame = pd.DataFrame(X, columns=policy.feature_names)
    frame.insert(0, "customer_id", ids)
    return decide(frame, policy.model, policy.catalog)


@pytest.mark.parametrize("learner", ["t", "x", "dr"])
def test_uplift_matrix_equals_the_frame_path(learner: str) -> None:
    model = _nba(learner)
    rules = [r for r in RULES if r not in MODEL_FEATURES]
    X = _features(MODEL_FEATURES + CONTACT + rules, 300, seed=1)[:, :5]
    expected = model.action_uplift(pd.DataFrame(X, columns=MODEL_FEATURES)).to_numpy()
    np.testing.assert_allclose(model.uplift_matrix(X, num_threads=1), expected, atol=1e-12)
    chunked = predict_rows(model.uplift_matrix, X, num_threads=0)
    np.testing.assert_allclose(chunked, expected, atol=1e-12)
    one_by_one = np.vstack([model.uplift_matrix(X[k : k + 1]) for k in range(20)])
    np.testing.assert_allclose(one_by_one, expected[:20], atol=1e-12)
    # The predictor is rebuilt after a pickle round trip (the registry stores models so).
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_allclose(again.uplift_matrix(X[:1]), expected[:1], atol=1e-12)


def test_uplift_matrix_rejects_a_matrix_of_the_wrong_width() -> None:
    learner = _nba("t").learners_["purchase"]
    with pytest.raises(ValueError, match=r"expected \(n, 5\) columns"):
        learner.uplift_matrix(np.zeros((2, 4)))


@pytest.mark.parametrize("holdout_share", [0.05, 0.3])
def test_policy_decisions_cover_every_branch(holdout_share: float) -> None:
    catalog = CATALOG.model_copy(update={"holdout_share": holdout_share})
    policy = ArbitrationPolicy(_nba("x", seed=2), "1", catalog=catalog)
    n = 400
    X = _features(policy.feature_names, n, seed=3)
    ids = [f"C{i:07d}" for i in range(n)]
    expected = _reference(policy, ids, X)
    got = policy.decide(ids, X)
    assert [d["action"] for d in got] == expected["action"].tolist()
    assert [d["reason"] for d in got] == expected["reason"].tolist()
    # Every branch was exercised: actions, no_action for all three reasons, blocked rows.
    reasons = {r.split(":")[0] for r in expected["reason"]}
    assert {"hold-out", "no eligible action", "no eligible action pays"} <= reasons
    assert {"contact cap", "cooldown", "ineligible"} <= {
        a["reason"].split(":")[0] for d in got for a in d["alternatives"] if not a["eligible"]
    }
    assert (expected["action"] != "no_action").any()
    actions, values = policy.best_actions(ids, X)
    assert actions.tolist() == expected["action"].tolist()
    np.testing.assert_allclose(values, expected["expected_value"].to_numpy(), atol=1e-9)


def test_policy_falls_back_to_the_frame_path_without_uplift_matrix() -> None:
    model = _nba("t", seed=4)

    class Wrapped:  # same answers, but only the frame interface
        feature_names_ = model.feature_names_
        catalog = CATALOG

        def action_uplift(self, X: pd.DataFrame) -> pd.DataFrame:
            return model.action_uplift(X)

    policy = ArbitrationPolicy(Wrapped(), "1")
    X = _features(policy.feature_names, 120, seed=5)
    ids = [f"C{i}" for i in range(120)]
    fast = ArbitrationPolicy(model, "1")
    assert [d["action"] for d in policy.decide(ids, X)] == [
        d["action"] for d in fast.decide(ids, X)
    ]


def test_single_row_predictor_matches_booster_predict() -> None:
    rng = np.random.default_rng(6)
    X = rng.normal(size=(400, 6))
    X[rng.random(X.shape) < 0.1] = np.nan
    y = (np.nan_to_num(X[:, 0]) + rng.normal(size=400) > 0).astype(int)
    clf = lgb.LGBMClassifier(n_estimators=15, num_leaves=7, verbose=-1).fit(X, y)
    booster = clf.booster_
    rows = X[:50]
    fast = SingleRowPredictor(booster)
    contrib = SingleRowPredictor(booster, output="contrib")
    leaf = SingleRowPredictor(booster, num_iteration=10, output="leaf")
    np.testing.assert_array_equal(
        np.concatenate([fast(r) for r in rows]), booster.predict(rows, num_threads=1)
    )
    np.testing.assert_array_equal(
        np.vstack([contrib(r) for r in rows]),
        booster.predict(rows, pred_contrib=True, num_threads=1),
    )
    np.testing.assert_array_equal(
        np.vstack([leaf(r) for r in rows]),
        booster.predict(rows, pred_leaf=True, num_iteration=10, num_threads=1),
    )
    with pytest.raises(ValueError, match="expects 6"):
        fast(rows[0, :5])
    # Each thread has its own prepared config: concurrent calls stay correct.
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = np.concatenate([fast(r) for r in rows for _ in range(5)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = np.repeat(booster.predict(rows, num_threads=1), 5)
    for k in range(4):
        np.testing.assert_array_equal(results[k], expected)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_decode_values_matches_the_per_value_decoder() -> None:
    import struct

    blobs = [
        b"\x29" + struct.pack("<d", 1.5),
        b"",
        b"\x35" + struct.pack("<f", 2.25),
        b"\x20\x96\x01",  # int64 150
        b"\x29" + struct.pack("<d", -7.0),
        b"\x20" + _varint(2**49),  # int64, nine bytes long like a double
        b"\x20" + _varint(2**64 - 1),  # int64 -1
    ]
    names = [f"f{k}" for k in range(len(blobs))]
    expected = [decode_value(b, n) for b, n in zip(blobs, names, strict=True)]
    np.testing.assert_array_equal(decode_values(blobs, names), expected)
    assert len(blobs[5]) == 9 and expected[5:] == [2.0**49, -1.0]
    with pytest.raises(ValueError, match="'bad'"):
        decode_values([b"\x12\x01a"], ["bad"])


def test_reader_of_a_feature_subset_equals_feast(project: Project) -> None:
    from propensity.features.store import FeatureStoreAdapter

    adapter = FeatureStoreAdapter(project.settings)
    names = ["sessions_7d", "orders_30d", "days_since_last_seen", "tenure_days"]
    fast = online_reader(adapter, names)
    slow = online_reader(adapter, names, direct=False)
    assert isinstance(fast.rows, SqliteReader)
    fast.clock = slow.clock = lambda: 1_790_000_000.0  # type: ignore[attr-defined]
    ids = [*project.customers[:40], "nobody", project.customers[3]]
    a, b = fast.read(ids), slow.read(ids)
    assert a.matrix.shape == (len(ids), len(fast.feature_names))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.found, b.found)
    np.testing.assert_array_equal(a.stale, b.stale)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)


def test_batch_equals_one_by_one_with_next_best_action(project: Project) -> None:
    runtime = Runtime(project.settings, Serving())
    runtime.reload()
    base = runtime.scorer
    assert base is not None
    from propensity.features.store import FeatureStoreAdapter

    nba_features = FeatureStoreAdapter(project.settings).service_features("nba_v1")
    policy = ArbitrationPolicy(fit_nba(nba_features, seed=7, n_rows=1500), "9")
    names = base.churn.feature_names + base.purchase.feature_names + policy.feature_names
    reader = online_reader(runtime.store, list(dict.fromkeys(names)))
    scorer = Scorer(reader, base.churn, base.purchase, policy)
    ids = [*project.customers[:100], "nobody"]  # 100 rows: the multi-core batch path
    batch = scorer.score(ids)
    single = [scorer.score([c])[0] for c in ids]
    assert batch[-1] is None and single[-1] is None
    for a, b in zip(batch[:-1], single[:-1], strict=True):
        assert a is not None and b is not None
        assert a["churn_probability"] == pytest.approx(b["churn_probability"], abs=1e-12)
        assert a["purchase_propensity"] == pytest.approx(b["purchase_propensity"], abs=1e-12)
        assert a["next_best_action"]["action"] == b["next_best_action"]["action"]
        assert [r["feature"] for r in a["reasons"]["churn"]] == [
            r["feature"] for r in b["reasons"]["churn"]
        ]
        assert a["missing_features"] == b["missing_features"]
        assert a["features_timestamp"] == b["features_timestamp"]
        assert a["purchase_24h_probability"] is None  # no champion: null
    # The batch route's JSON, encoded from the arrays, is these dicts encoded; with a
    # 24-hour purchase model too, its own scores and reasons.
    short = BoosterBundle(PURCHASE_24H, "4", fit_model(base.purchase.feature_names, seed=13))
    with_short = Scorer(reader, base.churn, base.purchase, policy, short)
    for served in (scorer, with_short):
        for reasons in (True, False):
            scored = served.score_columns(ids, reasons)  # once: streaming features decay
            encoded = json.loads(batch_json(scored, served.fields))
            dicts = served.as_dicts(scored)
            expected = {"results": [r for r in dicts if r is not None], "unknown": ["nobody"]}
            assert encoded == json.loads(to_json(expected, inf_nan_mode="null"))
    assert any(r["missing_features"] for r in encoded["results"])  # null values covered
    rows = with_short.score(ids[:-1])
    X = reader.read(ids[:-1]).matrix[
        :, [reader.feature_names.index(f) for f in short.feature_names]
    ]
    np.testing.assert_allclose(
        [r["purchase_24h_probability"] for r in rows if r], short.predict_proba(X), atol=1e-12
    )
    assert all(r and len(r["reasons"][PURCHASE_24H]) == 3 for r in rows)
    assert with_short.versions[PURCHASE_24H] == "4"
    lean = scorer.score(ids[:10], reasons=False)
    assert all(r is not None and r["reasons"] == {} for r in lean)
    # Without reasons the probability comes from LightGBM's own sum of the same leaves.
    assert [r["churn_probability"] for r in lean if r] == pytest.approx(
        [r["churn_probability"] for r in batch[:10] if r], abs=1e-12
    )


def test_grouped_batch_read_equals_per_value_read(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import sqlite3
    import struct

    from propensity.features.online import _read
    from propensity.features.online import entity_key as key_of
    from propensity.features.store import FeatureStoreAdapter

    source = project.settings.path(project.settings.online_store.sqlite_path)
    copy = tmp_path / "online.db"
    shutil.copy(source, copy)
    # One value stored as a float32, one as an int64 as long as a double, and one
    # as a null: the grouped read cannot decode the first two, so those customers
    # are re-read value by value.
    with sqlite3.connect(copy) as conn:
        conn.execute(
            "UPDATE propensity_session SET value = ? WHERE entity_key = ? AND feature_name = ?",
            (b"\x35" + struct.pack("<f", 2.5), key_of("C0000002"),
             "sessions_7d"),
        )  # fmt: skip
        conn.execute(
            "UPDATE propensity_basket SET value = x'' WHERE entity_key = ? AND feature_name = ?",
            (key_of("C0000003"), "orders_30d"),
        )
        conn.execute(
            "UPDATE propensity_basket SET value = ? WHERE entity_key = ? AND feature_name = ?",
            (b"\x20" + _varint(2**49), key_of("C0000004"),
             "revenue_30d"),
        )  # fmt: skip
        # Timestamps that differ between customers of one view (read per customer):
        # one older snapshot, one missing, and a retired feature's stale row that
        # served features must not inherit.
        conn.execute(
            "UPDATE propensity_session SET event_ts = event_ts - 86400 * 30 WHERE entity_key = ?",
            (key_of("C0000005"),),
        )
        conn.execute(
            "UPDATE propensity_lifecycle SET event_ts = NULL WHERE entity_key = ?",
            (key_of("C0000006"),),
        )
        conn.execute(
            "INSERT INTO propensity_basket (entity_key, feature_name, value, event_ts) "
            "VALUES (?, 'retired_feature', ?, 0)",
            (key_of("C0000007"), b"\x29" + struct.pack("<d", 1.0)),
        )
    settings = project.settings.model_copy(
        update={
            "online_store": project.settings.online_store.model_copy(update={"sqlite_path": copy})
        }
    )
    names = ["sessions_7d", "orders_30d", "revenue_30d", "days_since_last_seen", "tenure_days"]
    reader = online_reader(FeatureStoreAdapter(settings), names)
    assert isinstance(reader.rows, SqliteReader)
    reader.clock = lambda: 1_790_000_000.0
    ids = [*project.customers[:60], "nobody", project.customers[1]]
    grouped = reader.read(ids)
    assert len(ids) >= _read.GROUPED_ROWS
    per_value = [reader.read([c]) for c in ids]  # single ids take the per-value path
    np.testing.assert_array_equal(grouped.matrix, np.vstack([b.matrix for b in per_value]))
    for field in ("found", "stale", "timestamps"):
        np.testing.assert_array_equal(
            getattr(grouped, field), np.concatenate([getattr(b, field) for b in per_value])
        )
    col = {n: j for j, n in enumerate(reader.feature_names)}
    assert grouped.matrix[1, col["sessions_7d"]] == 2.5
    assert np.isnan(grouped.matrix[2, col["orders_30d"]])
    assert grouped.matrix[3, col["revenue_30d"]] == 2.0**49
    assert grouped.found.tolist().count(False) == 1
    stamps = grouped.timestamps
    assert stamps[4] == stamps[0] - 86400 * 30 and stamps[6] == stamps[0]
    # Batches over SQLite's parameter limit are read in chunks, with the same answer.
    monkeypatch.setattr(_read, "_KEYS_PER_QUERY", 7)
    chunked = reader.read(ids)
    for field in ("matrix", "found", "stale", "timestamps"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(grouped, field))


def test_shap_reasons_method_serves_treeshap(project: Project) -> None:
    config = Serving(reasons_method="shap")
    runtime = Runtime(project.settings, config)
    runtime.reload()
    scorer = runtime.scorer
    assert scorer is not None
    ids = project.customers[:80]  # more than 64 rows: the multi-core path
    X = scorer._model_input("churn", scorer.reader.read(ids).matrix)
    model = scorer.churn.model
    shap = model.contributions(X, num_threads=1)
    np.testing.assert_allclose(scorer.churn.contributions(X), shap, atol=1e-12)
    np.testing.assert_allclose(scorer.churn.contributions(X[:1]), shap[:1], atol=1e-12)
    proba, contributions = scorer.churn.predict_with_contributions(X)
    np.testing.assert_allclose(proba, model.predict_proba(X, num_threads=1)[:, 1], atol=1e-12)
    top = scorer.score(ids[:1])[0]
    assert top is not None
    expected = np.argsort(-np.abs(shap[0, :-1]), kind="stable")[:3]
    names = [scorer.churn.feature_names[j] for j in expected]
    assert [r["feature"] for r in top["reasons"]["churn"]] == names
