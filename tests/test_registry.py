"""MLflow registry round-trip on a real SQLite tracking store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from propensity import registry
from propensity.models.pipeline import CalibratedBooster
from propensity.models.spec import LightGBMParams


@pytest.fixture(scope="module")
def fitted() -> tuple[CalibratedBooster, pd.DataFrame]:
    rng = np.random.default_rng(11)
    X = pd.DataFrame(rng.normal(size=(3000, 4)), columns=["a", "b", "c", "d"])
    X.loc[rng.uniform(size=3000) < 0.1, "c"] = np.nan
    y = (X["a"] - X["b"] + rng.normal(size=3000) > 1).astype(int)
    params = LightGBMParams(n_estimators=50, num_threads=1)
    model = CalibratedBooster(params, early_stopping_rounds=10).fit(
        X[:2000], y[:2000], eval_set=(X[2000:], y[2000:])
    )
    return model, X


def test_log_register_alias_and_load(tmp_path, fitted):
    model, X = fitted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = registry.log_run(
        uri,
        "churn",
        estimator=model,
        input_example=X.head(3),
        params={"seed": 42},
        metrics={"test_roc_auc": 0.8, "undefined": float("nan")},
        tags={"feature_service": "churn_v1"},
        register_as="churn",
    )
    assert run.version == 1
    # artifacts live next to the database, never in the working directory
    assert (tmp_path / "mlartifacts").is_dir()
    assert registry.champion_version(uri, "churn") is None
    with pytest.raises(registry.RegistryError, match="champion"):
        registry.load_estimator(uri, "churn")

    registry.set_champion(uri, "churn", 1)
    assert registry.champion_version(uri, "churn") == 1
    info = registry.version_info(uri, "churn")
    assert info["run_id"] == run.run_id and info["aliases"] == ["champion"]
    assert info["metrics"]["test_roc_auc"] == 0.8
    assert info["tags"]["metrics_not_finite"] == "undefined"
    assert info["tags"]["feature_service"] == "churn_v1"

    # JSON-like float64 input (NaN included) is accepted and yields probabilities
    pyfunc = _pyfunc(uri, "models:/churn@champion")
    sample = X.head(200).astype("float64")
    proba = np.asarray(pyfunc.predict(sample))
    assert proba.shape == (200,) and proba.dtype == np.float64
    assert ((proba >= 0) & (proba <= 1)).all()
    assert len(np.unique(proba)) > 2  # probabilities, not labels
    np.testing.assert_allclose(proba, model.predict_proba(sample)[:, 1])

    # the raw estimator for serving: booster, calibrator, one-thread predict_proba, contributions
    estimator = registry.load_estimator(uri, "churn")
    assert estimator.registry_version_ == 1
    one_thread = estimator.predict_proba(sample.to_numpy(), num_threads=1)[:, 1]
    np.testing.assert_allclose(one_thread, proba)
    contrib = estimator.contributions(sample.head(5), num_threads=1)
    assert contrib.shape == (5, 5)
    raw = estimator.booster_.predict(sample.head(5).to_numpy(), raw_score=True)
    np.testing.assert_allclose(contrib.sum(axis=1), raw, rtol=1e-6)


def test_second_version_and_manual_promotion(tmp_path, fitted):
    model, X = fitted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):
        registry.log_run(
            uri,
            "purchase_propensity",
            estimator=model,
            input_example=X.head(2),
            register_as="purchase_propensity",
        )
    registry.set_champion(uri, "purchase_propensity", 2)
    assert registry.champion_version(uri, "purchase_propensity") == 2
    registry.set_champion(uri, "purchase_propensity", 1)
    assert registry.version_info(uri, "purchase_propensity", 2)["aliases"] == []
    with pytest.raises(registry.RegistryError, match="has no version or alias 7"):
        registry.set_champion(uri, "purchase_propensity", 7)


def test_version_status_from_pending_to_a_decision(tmp_path, fitted):
    import subprocess
    import sys

    model, X = fitted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def log() -> int:
        run = registry.log_run(uri, "churn", estimator=model, input_example=X.head(3),
                               register_as="churn")  # fmt: skip
        assert run.version is not None
        return run.version

    first, second, third = log(), log(), log()
    assert registry.version_status(uri, "churn", first) == registry.PENDING
    registry.set_champion(uri, "churn", first)
    registry.set_status(uri, "churn", second, "rejected", "FAIL: roc_auc 0.5 >= 0.6")
    assert registry.version_status(uri, "churn", first) == "champion"
    assert registry.version_status(uri, "churn", second) == "rejected"
    # A pending version whose registering process is gone is abandoned.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_model_version_tag("churn", str(third), "registered_by_pid", str(gone.pid))
    assert registry.abandon_pending(uri, ["churn", "never_registered"]) == [("churn", third)]
    assert registry.version_status(uri, "churn", third) == "abandoned"
    assert registry.abandon_pending(uri, ["churn"]) == []


def _pyfunc(uri: str, ref: str):  # type: ignore[no-untyped-def]
    """The registered version as MLflow's pyfunc flavor, as an MLflow user loads it."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(ref)


def test_a_missing_champion_says_why_and_how_to_promote(tmp_path, fitted):
    model, X = fitted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(registry.RegistryError, match="no version is registered yet"):
        registry.load_estimator(uri, "churn")
    assert "no version is registered yet" in registry.why_no_champion(uri, "churn")
    run = registry.log_run(uri, "churn", estimator=model, input_example=X.head(3),
                           register_as="churn")  # fmt: skip
    assert run.version is not None
    registry.set_status(uri, "churn", run.version, "rejected", "fail: AUC 0.61 >= 0.65")
    message = f"version {run.version} is rejected \\(fail: AUC 0.61 >= 0.65\\)"
    with pytest.raises(registry.RegistryError, match=message):
        registry.load_estimator(uri, "churn")
    with pytest.raises(
        registry.RegistryError, match=f"propensity promote churn --version {run.version}"
    ):
        registry.version_info(uri, "churn")
