"""A small but real project for the serving tests and benchmark.

Random feature tables for every feature view (two weekly snapshots), the
real Feast repo applied to them with the latest snapshot written online, and
real calibrated LightGBM models registered in MLflow on SQLite with the
``champion`` alias set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from propensity.config import Settings, load_settings
from propensity.features.definitions import FEATURES, VIEWS
from propensity.features.snapshots import feature_table_path
from propensity.models.pipeline import CalibratedBooster
from propensity.models.spec import LightGBMParams, load_spec
from propensity.registry import log_run, set_champion

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The feature service each served model reads, as in the repo's model specs.
SERVICES = {
    name: load_spec(REPO_ROOT / "models" / f"{name}.yaml").feature_service
    for name in ("churn", "purchase_propensity")
}
SNAPSHOT = pd.Timestamp("2026-06-01", tz="UTC")
#: Customers present offline but never written online (unknown to /score).
OFFLINE_ONLY = 5


@dataclass
class Project:
    settings: Settings
    customers: list[str]
    churn_features: list[str]
    purchase_features: list[str]
    versions: dict[str, list[int]]


def customer_ids(n: int) -> list[str]:
    return [f"C{i:07d}" for i in range(1, n + 1)]


def _feature_frame(ids: list[str], when: pd.Timestamp, rng: np.random.Generator) -> pd.DataFrame:
    n = len(ids)
    frame = pd.DataFrame({"customer_id": ids, "event_timestamp": when})
    for f in FEATURES:
        values = rng.gamma(2.0, 3.0, size=n)
        if f.name == "last_event_epoch":
            values = when.timestamp() - rng.uniform(0, 30 * 86400, size=n)
        if f.missing == "null":
            values[rng.random(n) < 0.1] = np.nan
        frame[f.name] = values
    return frame


def write_feature_tables(settings: Settings, n: int, seed: int = 0) -> list[str]:
    """Two snapshots a week apart for ``n`` customers; returns the ids."""
    rng = np.random.default_rng(seed)
    ids = customer_ids(n)
    frames = [
        _feature_frame(ids, SNAPSHOT - timedelta(days=7), rng),
        _feature_frame(ids, SNAPSHOT, rng),
    ]
    full = pd.concat(frames, ignore_index=True)
    features_dir = settings.path(settings.features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    for view in VIEWS:
        names = [f.name for f in FEATURES if f.view == view]
        full[["customer_id", "event_timestamp", *names]].to_parquet(
            feature_table_path(features_dir, view), index=False
        )
    return ids


def publish_online(settings: Settings, n_online: int) -> None:
    """Apply the Feast repo and write the latest snapshot of the first ``n_online`` ids."""
    import pyarrow.parquet as pq

    from propensity.features.online import write_many
    from propensity.features.store import FeatureStoreAdapter

    adapter = FeatureStoreAdapter(settings)
    adapter.apply()
    keep = set(customer_ids(n_online))
    sources = {}
    for view in VIEWS:
        table = pq.read_table(feature_table_path(settings.path(settings.features_dir), view))
        frame = table.to_pandas()
        frame = frame[(frame["event_timestamp"] == SNAPSHOT) & frame["customer_id"].isin(keep)]
        import pyarrow as pa

        sources[view] = pa.Table.from_pandas(frame, preserve_index=False)
    write_many(adapter.store, sources, end=SNAPSHOT.to_pydatetime() + timedelta(seconds=1))


def fit_model(
    features: list[str],
    seed: int,
    n_rows: int = 3000,
    n_estimators: int = 40,
    early_stopping_rounds: int | None = 10,
) -> CalibratedBooster:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n_rows, len(features))), columns=features)
    X.iloc[rng.random(n_rows) < 0.05, 0] = np.nan
    logit = (X.iloc[:, 1] - 6) / 3 - (X.iloc[:, 2] - 6) / 4 + rng.normal(size=n_rows)
    y = (logit > 0).astype(int).to_numpy()
    split = int(n_rows * 0.75)
    params = LightGBMParams(n_estimators=n_estimators, num_leaves=15, min_child_samples=20)
    if not early_stopping_rounds:  # every tree kept: the quickstart's slow rate keeps them useful
        params = params.model_copy(update={"learning_rate": 0.03})
    model = CalibratedBooster(
        params,
        early_stopping_rounds=early_stopping_rounds,
        calibration="sigmoid",
        seed=seed,
    )
    return model.fit(X[:split], y[:split], eval_set=(X[split:], y[split:]))


def register(settings: Settings, name: str, model: Any, champion: bool = True) -> int:
    example = pd.DataFrame(np.ones((2, len(model.feature_names_))), columns=model.feature_names_)
    run = log_run(
        settings.tracking_uri, name, estimator=model, input_example=example, register_as=name
    )
    assert run.version is not None
    if champion:
        set_champion(settings.tracking_uri, name, run.version)
    return run.version


def fit_nba(
    features: list[str], seed: int, n_rows: int = 4000, learner: str = "x", n_estimators: int = 40
) -> Any:
    """A real next-best-action model (uplift per catalog action) on random logged campaigns."""
    from propensity.models.arbitration import load_catalog
    from propensity.models.nba import NBAModel

    catalog = load_catalog(REPO_ROOT / "models" / "actions.yaml")
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n_rows, len(features))), columns=features)
    arms = rng.choice([*catalog.names, catalog.control], size=n_rows)
    lift = np.isin(arms, ["discount", "loyalty_points"]) * (X.iloc[:, 1].to_numpy() > 6) * 0.2
    outcomes = {
        "purchase": (rng.random(n_rows) < 0.2 + lift).astype(int),
        "retention": (rng.random(n_rows) < 0.6).astype(int),
    }
    params = {"n_estimators": n_estimators, "min_child_samples": 50}
    return NBAModel(catalog, learner=learner, params=params, random_state=seed).fit(
        X, arms, outcomes
    )


#: Trees of the quickstart's champions (churn 581, purchase 251, uplift learners 100 each).
FULL_SIZE_TREES = {"churn": 600, "purchase_propensity": 250, "next_best_action": 100}


def build_project(
    root: Path, n_customers: int = 300, nba: bool = False, full_size: bool = False
) -> Project:
    """Everything the service needs, under ``root``.

    ``nba`` adds a next-best-action champion; ``full_size`` fits models as
    large as the quickstart's (for benchmarks) instead of small ones.
    """
    from propensity.features.store import FeatureStoreAdapter

    root.mkdir(parents=True, exist_ok=True)
    (root / "propensity.yaml").write_text(
        f"feature_repo: {REPO_ROOT / 'feature_repo'}\nmlflow_tracking_uri: sqlite:///data/mlflow.db\n"
    )
    settings = load_settings(root, environ={})
    ids = write_feature_tables(settings, n_customers)
    publish_online(settings, n_customers - OFFLINE_ONLY)
    adapter = FeatureStoreAdapter(settings)
    churn_features = adapter.service_features(SERVICES["churn"])
    purchase_features = adapter.service_features(SERVICES["purchase_propensity"])
    size: dict[str, Any] = {}
    if full_size:
        size = {"n_rows": 6000, "early_stopping_rounds": None}
    versions = {}
    for seed, (name, features) in enumerate(
        (("churn", churn_features), ("purchase_propensity", purchase_features)), start=1
    ):
        trees = FULL_SIZE_TREES[name] if full_size else 40
        model = fit_model(features, seed=seed, n_estimators=trees, **size)
        versions[name] = [register(settings, name, model)]
    if nba:
        trees = FULL_SIZE_TREES["next_best_action"] if full_size else 40
        model = fit_nba(adapter.service_features("nba_v1"), seed=3, n_estimators=trees)
        versions["next_best_action"] = [register(settings, "next_best_action", model)]
    return Project(settings, ids, churn_features, purchase_features, versions)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(
    project: Project, log: Path, bentoml_home: Path, **env: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """``bentoml serve`` the project's service in a subprocess; its URL and process.

    ``env`` adds ``PROPENSITY_*`` (or other) variables; the caller's own
    ``PROPENSITY_*`` variables are dropped so only the project file and ``env`` count.
    """
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    environ.update(
        PROPENSITY_CONFIG=str(project.settings.root / "propensity.yaml"),
        BENTOML_HOME=str(bentoml_home),
        **env,
    )
    command = [
        sys.executable, "-m", "bentoml", "serve", "propensity.serving.service:Scoring",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=environ, stdout=out, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", process
