"""The scoring core in-process: readers, reasons, next-best-action, audiences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from project import Project

from propensity.config import Serving
from propensity.features.online import SqliteReader, entity_key
from propensity.features.store import FeatureStoreAdapter
from propensity.features.tiles import STREAMING_NAMES
from propensity.models.arbitration import decide, load_catalog
from propensity.models.nba import NBAModel
from propensity.serving.audience import select_audience
from propensity.serving.policy import ArbitrationPolicy
from propensity.serving.runtime import Runtime, freeze_heap, online_reader
from propensity.serving.schemas import AudienceRequest
from propensity.serving.scorer import Scorer

pytestmark = pytest.mark.slow


def test_entity_key_bytes_match_feast_encoding() -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    ids = ["C0000001", "Ünïcode-42", ""]
    expected = [
        serialize_entity_key(
            EntityKey(join_keys=["customer_id"], entity_values=[Value(string_val=c)]),
            entity_key_serialization_version=3,
        )
        for c in ids
    ]
    assert [entity_key(c) for c in ids] == expected


def test_sqlite_reader_equals_feast_reader(project: Project) -> None:
    runtime = Runtime(project.settings, Serving())
    runtime.reload()
    assert runtime.scorer is not None
    fast = runtime.scorer.reader
    names = fast.feature_names
    # Both over the runtime's streaming read: the batch readers are what is compared.
    slow = online_reader(
        FeatureStoreAdapter(project.settings), names, direct=False, streaming=runtime.streaming
    )
    fast.clock = slow.clock = lambda: 1_790_000_000.0  # type: ignore[attr-defined]
    ids = [project.customers[0], "unknown", project.customers[7], project.customers[0]]
    a, b = fast.read(ids), slow.read(ids)
    assert isinstance(fast.rows, SqliteReader)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.found, [True, False, True, True])
    np.testing.assert_array_equal(a.found, b.found)
    np.testing.assert_array_equal(a.stale, b.stale)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    # An unknown customer has no batch row (its streaming columns are the no-event values).
    batch = [j for j, name in enumerate(names) if name not in STREAMING_NAMES]
    assert np.isnan(a.matrix[1, batch]).all()


def test_swap_hook_runs_once_per_new_scorer(project: Project) -> None:
    import gc

    swapped: list[object] = []
    runtime = Runtime(
        project.settings,
        Serving(),
        on_swap=lambda: swapped.append(runtime.scorer),
    )
    assert runtime.reload() and swapped == [runtime.scorer]
    assert not runtime.reload() and len(swapped) == 1  # no alias moved: nothing swapped
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0  # the loaded models are out of the collector's walks
    finally:
        gc.unfreeze()


def test_scorer_with_next_best_action(project: Project) -> None:
    runtime = Runtime(project.settings, Serving())
    runtime.reload()
    assert runtime.scorer is not None
    from project import REPO_ROOT

    catalog = load_catalog(REPO_ROOT / "models" / "actions.yaml")
    rng = np.random.default_rng(3)
    features = project.churn_features[:6]
    n = 800
    X = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n, len(features))), columns=features)
    arms = rng.choice([*catalog.names, catalog.control], size=n)
    outcomes = {"purchase": rng.integers(0, 2, n), "retention": rng.integers(0, 2, n)}
    model = NBAModel(catalog, learner="t", params={"n_estimators": 10}).fit(X, arms, outcomes)
    policy = ArbitrationPolicy(model, "5")
    base = runtime.scorer
    scorer = Scorer(online_reader(runtime.store, list(dict.fromkeys(
        base.churn.feature_names + base.purchase.feature_names + policy.feature_names
    ))), base.churn, base.purchase, policy)  # fmt: skip
    ids = project.customers[:20]
    results = scorer.score(ids)
    matrix = scorer.reader.read(ids).matrix[:, scorer._columns["next_best_action"]]
    frame = pd.DataFrame(matrix, columns=policy.feature_names)
    frame.insert(0, "customer_id", ids)
    expected = decide(frame, model, catalog)  # the frame wrapper, over the model's pandas path
    for result, (_, row) in zip(results, expected.iterrows(), strict=True):
        assert result is not None
        nba = result["next_best_action"]
        assert nba["action"] == row["action"]
        assert nba["expected_value"] == pytest.approx(row["expected_value"])
        assert [a["action"] for a in nba["alternatives"]] == [
            a["action"] for a in row["alternatives"]
        ]
    assert results[0]["model_versions"]["next_best_action"] == "5"


def test_select_audience_filters_sorts_and_counts() -> None:
    table = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c", "d", "e"],
            "churn": [0.9, 0.7, 0.65, 0.2, 0.8],
            "purchase_propensity": [0.1, 0.5, 0.4, 0.9, 0.3],
            "action": ["discount", "discount", "no_action", "discount", "discount"],
            "expected_value": [1.0, 2.0, 0.0, 3.0, np.nan],
        }
    )
    scores = {"table": table, "snapshot": "s", "model_versions": {}}
    request = AudienceRequest.model_validate(
        {
            "score": "purchase_propensity",
            "k": 2,
            "filters": [
                {"field": "churn_probability", "op": ">=", "value": 0.6},
                {"field": "next_best_action.action", "op": "==", "value": "discount"},
            ],
        }
    )
    out = select_audience(scores, request)
    assert out["matched"] == 3
    assert [m["customer_id"] for m in out["customers"]] == ["b", "e"]
    assert out["customers"][0] == {
        "customer_id": "b",
        "churn_probability": 0.7,
        "purchase_propensity": 0.5,
        "next_best_action": {"action": "discount", "expected_value": 2.0},
    }
    assert out["customers"][1]["next_best_action"]["expected_value"] is None  # NaN
    by_value = AudienceRequest(score="next_best_action.expected_value", k=5)
    ranked = [m["customer_id"] for m in select_audience(scores, by_value)["customers"]]
    assert ranked == ["d", "b", "a", "c", "e"]  # NaN last


def test_select_audience_deprecated_names_select_the_same_customers() -> None:
    table = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c"],
            "churn": [0.9, 0.7, 0.2],
            "purchase_propensity": [0.1, 0.5, 0.4],
            "action": ["discount", "no_action", "discount"],
            "expected_value": [1.0, 0.0, 3.0],
        }
    )
    scores = {"table": table, "snapshot": "s", "model_versions": {}}
    pairs = [("churn", "churn_probability"), ("expected_value", "next_best_action.expected_value")]
    for old, new in pairs:
        rule = {"field": "action", "op": "==", "value": "discount"}
        legacy = AudienceRequest.model_validate({"score": old, "filters": [rule]})
        current = AudienceRequest.model_validate(
            {"score": new, "filters": [{**rule, "field": "next_best_action.action"}]}
        )
        assert legacy.deprecated_names() == [old, "action"]
        assert current.deprecated_names() == []
        a, b = select_audience(scores, legacy), select_audience(scores, current)
        assert [m["customer_id"] for m in a["customers"]] == [
            m["customer_id"] for m in b["customers"]
        ]
        # Old clients still find their fields; new answers carry only the new ones.
        first = a["customers"][0]
        assert first["churn"] == first["churn_probability"]
        assert first["action"] == first["next_best_action"]["action"]
        assert first["expected_value"] == first["next_best_action"]["expected_value"]
        assert set(b["customers"][0]) == {
            "customer_id",
            "churn_probability",
            "purchase_propensity",
            "next_best_action",
        }


def test_serving_settings_come_from_the_one_settings_tree(tmp_path) -> None:
    from propensity.config import ConfigError, load_settings

    env = {"PROPENSITY_SERVING__API_KEY": "s3cr3t-v", "PROPENSITY_SERVING__BATCH_LIMIT": "7"}
    config = load_settings(tmp_path, environ=env).serving
    assert config.batch_limit == 7 and config.reload_seconds == 30
    assert "s3cr3t-v" not in repr(config)  # the key is a SecretStr
    with pytest.raises(ConfigError, match="reload_seconds"):
        load_settings(tmp_path, environ={"PROPENSITY_SERVING__RELOAD_SECONDS": "0"})
    assert config.reasons_method == "path"
    shap = load_settings(tmp_path, environ={"PROPENSITY_SERVING__REASONS_METHOD": "shap"})
    assert shap.serving.reasons_method == "shap"
    with pytest.raises(ConfigError, match="reasons_method"):
        load_settings(tmp_path, environ={"PROPENSITY_SERVING__REASONS_METHOD": "lime"})
    # The names of the previous release still work, with a warning.
    with pytest.warns(DeprecationWarning, match="PROPENSITY_SERVING__BATCH_LIMIT"):
        old = load_settings(tmp_path, environ={"PROPENSITY_BATCH_LIMIT": "9"})
    assert old.serving.batch_limit == 9
    (tmp_path / "propensity.yaml").write_text("api_key: from-file\nserving:\n  batch_limit: 3\n")
    with pytest.warns(DeprecationWarning, match="belong under 'serving:'"):
        both = load_settings(tmp_path, environ={"PROPENSITY_SERVING__RELOAD_SECONDS": "5"})
    assert both.serving.api_key is not None
    assert both.serving.api_key.get_secret_value() == "from-file"
    assert (both.serving.batch_limit, both.serving.reload_seconds) == (3, 5)
