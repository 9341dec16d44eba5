"""Benchmark: training end to end on ~1M rows × ~40 features.

Stages timed: Feast historical retrieval (point-in-time join of 1M entity rows),
LightGBM fit with early stopping and calibration, baselines, evaluation + plots,
MLflow logging + registration. Feature tables are synthetic (the registry's real
feature views and names, random values with a planted signal), so the benchmark
does not depend on the simulator's speed. A plain ``lightgbm.LGBMClassifier`` fit
with the same number of trees runs in the same process as the baseline.

Usage: python benchmarks/bench_train.py [--customers 100000] [--snapshots 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import psutil

from propensity import evaluation as ev
from propensity import registry
from propensity.config import Settings
from propensity.features.definitions import VIEWS, features_of
from propensity.features.snapshots import feature_table_path
from propensity.features.store import FeatureStoreAdapter
from propensity.models.baselines import LogisticBaseline
from propensity.models.pipeline import CalibratedBooster
from propensity.models.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


class _Timings(dict):  # type: ignore[type-arg]
    """Stage timings, printed as each stage ends so a slow run shows where it is."""

    def __setitem__(self, stage: str, seconds: float) -> None:
        super().__setitem__(stage, seconds)
        print(f"  {stage:<48} {seconds:8.1f} s  (peak RSS {_peak_gb():.2f} GB)", flush=True)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _feature_tables(settings: Settings, customers: int, snapshots: list[pd.Timestamp]) -> None:
    rng = np.random.default_rng(0)
    ids = np.array([f"C{i:07d}" for i in range(customers)])
    n = customers * len(snapshots)
    base = pd.DataFrame(
        {
            "customer_id": np.tile(ids, len(snapshots)),
            "event_timestamp": np.repeat(np.array(snapshots), customers),
        }
    )
    for view in VIEWS:
        frame = base.copy()
        for feature in features_of(view):
            values = rng.gamma(2.0, 3.0, size=n)
            if feature.name == "last_event_epoch":
                values = frame["event_timestamp"].astype("int64").to_numpy() / 1e9 - values * 86400
            frame[feature.name] = values
        frame.to_parquet(feature_table_path(settings.path(settings.features_dir), view))


def _signal(frame: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    z = (
        0.25 * frame["days_since_last_session"]
        - 0.2 * frame["sessions_30d"]
        + 0.1 * np.minimum(frame["support_tickets_30d"], 6)
        - 1.5
    )
    return (rng.uniform(size=len(frame)) < 1 / (1 + np.exp(-z))).astype("int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--snapshots", type=int, default=10)
    args = parser.parse_args()
    timings: dict[str, float] = _Timings()
    spec = load_spec("churn", REPO / "models")
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(root=Path(tmp), feature_repo=REPO / "feature_repo")
        settings.path(settings.features_dir).mkdir(parents=True)
        snapshots = list(pd.date_range("2024-01-01", periods=args.snapshots, freq="7D", tz="UTC"))
        t = time.perf_counter()
        _feature_tables(settings, args.customers, snapshots)
        timings["setup: synthetic feature tables"] = time.perf_counter() - t

        t = time.perf_counter()
        adapter = FeatureStoreAdapter(settings)
        adapter.apply()
        timings["setup: feast apply"] = time.perf_counter() - t

        ids = [f"C{i:07d}" for i in range(args.customers)]
        entity = pd.DataFrame(
            {
                "customer_id": np.tile(ids, len(snapshots)),
                "event_timestamp": np.repeat(np.array(snapshots), len(ids)),
            }
        )
        t = time.perf_counter()
        frame = adapter.historical(entity, spec.feature_service)
        timings["retrieval (feast get_historical_features)"] = time.perf_counter() - t
        names = [
            n
            for n in adapter.service_features(spec.feature_service)
            if n not in spec.exclude_features
        ]
        frame[names] = frame[names].astype("float64")
        frame["label"] = _signal(frame, np.random.default_rng(1))
        train = frame[frame["event_timestamp"] < snapshots[-2]]
        val = frame[frame["event_timestamp"] == snapshots[-2]]
        test = frame[frame["event_timestamp"] == snapshots[-1]]

        t = time.perf_counter()
        model = CalibratedBooster(spec.lightgbm, spec.early_stopping_rounds, spec.calibration)
        model.fit(train[names], train["label"], eval_set=(val[names], val["label"]))
        timings["fit (lightgbm + early stopping + calibration)"] = time.perf_counter() - t

        t = time.perf_counter()
        plain = lgb.LGBMClassifier(
            n_estimators=model.best_iteration_ + spec.early_stopping_rounds,
            learning_rate=spec.lightgbm.learning_rate,
            num_leaves=spec.lightgbm.num_leaves,
            verbose=-1,
        )
        plain.fit(train[names], train["label"])
        timings["baseline: plain LGBMClassifier, same trees"] = time.perf_counter() - t

        t = time.perf_counter()
        logistic = LogisticBaseline().fit(train[names], train["label"])
        timings["baselines (logistic)"] = time.perf_counter() - t

        t = time.perf_counter()
        y = test["label"].to_numpy()
        scores = {
            "model": model.predict_proba(test[names])[:, 1],
            "logistic": logistic.predict_proba(test[names])[:, 1],
        }
        metrics = {k: ev.binary_metrics(y, v) for k, v in scores.items()}
        plots = Path(tmp) / "artifacts" / "plots"
        ev.save_figure(ev.roc_figure(y, scores), plots / "roc.png")
        ev.save_figure(ev.pr_figure(y, scores), plots / "pr.png")
        ev.save_figure(ev.calibration_figure(y, scores), plots / "calibration.png")
        ev.save_figure(ev.gain_figure(y, scores), plots / "gain.png")
        ev.save_figure(ev.importance_figure(model.feature_importance()), plots / "importance.png")
        timings["evaluate + plots"] = time.perf_counter() - t

        t = time.perf_counter()
        run = registry.log_run(
            settings.tracking_uri,
            spec.name,
            estimator=model,
            input_example=test[names].head(5),
            metrics={f"test_{k}": v for k, v in metrics["model"].items()},
            params={"rows": len(frame)},
            artifacts_dir=Path(tmp) / "artifacts",
            register_as=spec.name,
        )
        timings["log + register (mlflow)"] = time.perf_counter() - t

    end_to_end = sum(v for k, v in timings.items() if not k.startswith(("setup", "baseline:")))
    print(f"rows: {len(frame):,} total, {len(train):,} train; features: {len(names)}")
    print(f"cores: {psutil.cpu_count()}; trees: {model.best_iteration_}; version {run.version}")
    print(f"end to end (retrieval + fit + baselines + evaluate + log): {end_to_end:.1f} s")
    fit = timings["fit (lightgbm + early stopping + calibration)"]
    plain_fit = timings["baseline: plain LGBMClassifier, same trees"]
    print(f"fit / plain LGBMClassifier: {fit / plain_fit:.2f}x")
    print(f"peak RSS: {_peak_gb():.2f} GB")
    print(json.dumps({"test_auc": round(metrics["model"]["roc_auc"], 4)}))


if __name__ == "__main__":
    main()
