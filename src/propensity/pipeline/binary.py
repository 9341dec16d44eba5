"""Train, evaluate, log and promote a propensity model (churn, purchase).

``spec → dataset (cutoffs → entity frame → Feast features → time split;
:func:`~propensity.pipeline.dataset.propensity_dataset`) → select (early-stopping
rounds and calibration on the purged split) → evaluate (model, logistic,
RFM-LightGBM, BG/NBD, recency, oracle) → refit on every labelled cutoff → MLflow
run of the refit model → registered version → gates on the selection model's test
metrics → the one promotion rule`` (:func:`~propensity.pipeline.gates.settle`).
Every step is a function of the lake, the feature store and the spec, so a run is
reproducible from what MLflow records.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from propensity import evaluation as ev
from propensity import registry
from propensity.config import Settings
from propensity.events.lake import MANIFEST_NAME, EventLake
from propensity.models.baselines import LogisticBaseline, RecencyRule
from propensity.models.clv import CLV_FEATURES
from propensity.models.pipeline import CalibratedBooster
from propensity.models.spec import ModelSpec, load_spec
from propensity.pipeline.dataset import KEYS, SAMPLE_WEIGHT, TimeSplit, propensity_dataset
from propensity.pipeline.gates import GateResult, propensity_checks, settle
from propensity.pipeline.rfm import RFM_FEATURES, clv_features, rfm_frame
from propensity.progress import ProgressCallback, report

__all__ = ["TrainingResult", "train_model"]

_STAGES = 9
#: The specialist baselines the model is compared with, difference and interval.
_COMPARED = ("rfm_lightgbm", "bgnbd")
_METRIC_NAMES = {"roc_auc": "AUC", "log_loss": "log loss"}


@dataclass
class TrainingResult:
    """What one training run produced.

    ``metrics`` maps ``model``, ``logistic``, ``recency`` (test window) and
    ``oracle`` (when a truth dir was given) to metric dicts; ``model_validation``
    holds the model's validation metrics. ``comparisons`` holds, per specialist
    baseline (``rfm_lightgbm``, and ``bgnbd`` for purchase models), the model's
    test AUC and log loss minus the baseline's with a 90% paired bootstrap interval.
    """

    model: str
    run_id: str
    version: int | None
    promoted: bool
    gates: GateResult
    split: TimeSplit
    rows: dict[str, int]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    comparisons: dict[str, dict[str, tuple[float, float, float]]] = field(default_factory=dict)
    calibration: str = ""
    best_iteration: int = 0
    feature_names: list[str] = field(default_factory=list)
    horizon_days: int = 0
    #: Early stopping never stopped: the selection fit used every ``n_estimators`` tree.
    hit_cap: bool = False
    #: Service features missing on every labelled row, left out of the model.
    features_all_missing: list[str] = field(default_factory=list)
    #: The selection model (the one ``metrics`` measured; the registered one is the
    #: refit), kept in memory for notebooks: it is not logged.
    selection_model: Any = field(default=None, repr=False)

    def __rich__(self) -> str:
        return self.summary()

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """A short human-readable summary (what the CLI prints)."""
        m = self.metrics
        rows = self.rows
        lines = [
            f"{self.model} v{self.version} (run {self.run_id[:8]}): "
            f"{'promoted to champion' if self.promoted else 'not promoted'}",
            *self.split.describe(self.horizon_days),
            f"  rows selection train/val/test = {rows['train']}/{rows['validation']}/"
            f"{rows['test']}; refit {rows.get('refit', 0)} (calibrated on "
            f"{rows.get('refit_calibration', 0)} held-out customers)",
            f"  calibration {self.calibration}; {self.best_iteration} trees"
            + (
                " — early stopping never stopped: the n_estimators cap was hit"
                if self.hit_cap
                else " (early stopping)"
            ),
        ]
        if self.features_all_missing:
            lines.append(
                f"  left out (missing on every row): {', '.join(self.features_all_missing)}"
            )
        lines.append("  test metrics of the selection model and the baselines:")
        for name in ("model", "logistic", "rfm_lightgbm", "bgnbd", "recency", "oracle"):
            if name in m:
                lines.append(
                    f"  {name:<12} AUC {m[name]['roc_auc']:.4f}  PR-AUC {m[name]['pr_auc']:.4f}"
                    + (f"  log loss {m[name]['log_loss']:.4f}" if "log_loss" in m[name] else "")
                    + (f"  ECE {m[name]['ece']:.4f}" if "ece" in m[name] else "")
                )
        for name, diffs in self.comparisons.items():
            lines.append(
                f"  model - {name}: "
                + ", ".join(
                    f"{_METRIC_NAMES[k]} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                    for k, (d, lo, hi) in diffs.items()
                )
                + " (90% paired bootstrap)"
            )
        lines.append("  gates (on the selection model's test metrics):")
        lines += [f"  gate: {c}" for c in self.gates.checks]
        return "\n".join(lines)


def _resolve_spec(settings: Settings, spec: ModelSpec | str) -> ModelSpec:
    return (
        spec if isinstance(spec, ModelSpec) else load_spec(spec, settings.path(settings.models_dir))
    )


def _fingerprint(frame: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


def _oracle(
    truth_dir: Path, spec: ModelSpec, test: pd.DataFrame
) -> tuple[dict[str, float] | None, str]:
    """Score the test rows with the simulator's true probabilities, if comparable."""
    sim_file = truth_dir / "simulation.json"
    daily = truth_dir / "truth" / "customer_daily.parquet"
    if not daily.exists():
        return None, f"no truth table at {daily}"
    column = "p_churn" if spec.label.kind == "churn" else "p_purchase"
    key = "churn_days" if spec.label.kind == "churn" else "purchase_days"
    if sim_file.exists():
        horizon = _find_key(json.loads(sim_file.read_text()), key)
        if horizon is not None and int(horizon) != spec.label.horizon_days:
            return None, f"truth is for a {horizon}-day horizon, not {spec.label.horizon_days}"
    truth = pq.read_table(daily, columns=["customer_id", "date", column]).to_pandas()
    truth["date"] = pd.to_datetime(truth["date"]).dt.tz_localize("UTC")
    keep = [
        "customer_id",
        "event_timestamp",
        "label",
        *([SAMPLE_WEIGHT] if SAMPLE_WEIGHT in test else []),
    ]
    rows = test[keep].merge(
        truth, left_on=["customer_id", "event_timestamp"], right_on=["customer_id", "date"]
    )
    if len(rows) < len(test):
        return None, f"truth covers {len(rows)} of {len(test)} test rows"
    metrics = ev.binary_metrics(
        rows["label"].to_numpy(), rows[column].to_numpy(), sample_weight=_weight(rows)
    )
    return metrics, "ok"


def _weight(rows: pd.DataFrame) -> np.ndarray | None:
    """The rows' sampling weights (a Spark engine's stratified sample), else None."""
    return rows[SAMPLE_WEIGHT].to_numpy(np.float64) if SAMPLE_WEIGHT in rows else None


def _find_key(data: Any, key: str) -> Any:
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _champion_auc(
    settings: Settings, name: str, test: pd.DataFrame, horizon_days: int
) -> tuple[int | None, float | None]:
    version = registry.champion_version(settings.tracking_uri, name)
    if version is None:
        return None, None
    champion = registry.load_estimator(settings.tracking_uri, name, version)
    info = registry.version_info(settings.tracking_uri, name, version)
    missing = [c for c in champion.feature_names_ if c not in test.columns]
    # a refit champion trained on labels of these test rows' window would score them in
    # sample; like a champion on another feature service, it is judged by its logged AUC
    seen = [
        pd.Timestamp(c, tz="UTC") for c in info["params"].get("refit_cutoffs", "").split(",") if c
    ]
    first = pd.Timestamp(test["event_timestamp"].min())
    if missing or any(c + pd.Timedelta(days=horizon_days) > first for c in seen):
        return version, info["metrics"].get("test_roc_auc")
    score = champion.predict_proba(test[champion.feature_names_])[:, 1]
    auc = ev.ranking_metrics(test["label"].to_numpy(), score, _weight(test))["roc_auc"]
    return version, auc


def _plots(
    out: Path,
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    model: CalibratedBooster,
    X_test: pd.DataFrame,
    spec: ModelSpec,
) -> None:
    probs = {k: v for k, v in scores.items() if k != "recency"}
    ev.save_figure(ev.roc_figure(y, scores), out / "roc.png")
    ev.save_figure(ev.pr_figure(y, scores), out / "pr.png")
    ev.save_figure(ev.calibration_figure(y, probs), out / "calibration.png")
    ev.save_figure(ev.gain_figure(y, scores), out / "gain.png")
    ev.save_figure(ev.importance_figure(model.feature_importance()), out / "importance.png")
    if spec.shap_sample:
        import shap

        sample = X_test.sample(min(spec.shap_sample, len(X_test)), random_state=spec.seed)
        with warnings.catch_warnings():
            # shap warns that its LightGBM output format changed; both formats are handled
            warnings.simplefilter("ignore", UserWarning)
            values = shap.TreeExplainer(model.booster_).shap_values(sample)
        values = values[1] if isinstance(values, list) else values
        ev.save_figure(ev.shap_figure(np.asarray(values), sample), out / "shap_summary.png")


def _flat(prefix: str, data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        out.update(_flat(name + ".", value) if isinstance(value, dict) else {name: value})
    return out


def train_model(
    settings: Settings,
    spec: ModelSpec | str,
    *,
    as_of: str | pd.Timestamp | None = None,
    horizon_days: int | None = None,
    truth_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    promote: bool = True,
) -> TrainingResult:
    """Train one propensity model end to end and log it to MLflow.

    Parameters
    ----------
    settings : Settings
        Project settings (lake, features, feature repo, models dir, MLflow URI).
    spec : ModelSpec or str
        A spec, or a model name (``churn``, ``purchase``) read from ``models_dir``.
    as_of : date, optional
        The date the data runs to (default: the data end). The latest labelled
        cutoff is ``as_of - horizon``; the model is selected on the time split of
        the labelled cutoffs and refit on all of them (see the module docstring).
    horizon_days : int, optional
        Overrides the spec's label horizon.
    truth_dir : path, optional
        A simulator output folder: the test rows are also scored with the true
        probabilities (the oracle) and the gap is reported.
    progress : callable, optional
        ``progress(description, completed, total)`` after each stage.
    promote : bool
        Move the ``champion`` alias when the gates pass (see
        :func:`~propensity.pipeline.gates.settle`); otherwise a passing version stays
        ``pending`` for the caller to decide.

    Returns
    -------
    TrainingResult

    Examples
    --------
    >>> result = train_model(load_settings(), "churn")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    """
    spec = _resolve_spec(settings, spec).with_horizon(horizon_days)
    horizon = spec.label.horizon_days
    step = iter(range(1, _STAGES + 1))
    report(progress, f"{spec.name}: labels", next(step), _STAGES)
    report(progress, f"{spec.name}: features", next(step), _STAGES)
    data = propensity_dataset(settings, spec, as_of)
    split = data.split
    assert data.refit is not None and data.refit_calibration is not None
    rfm = rfm_frame(EventLake(settings.path(settings.lake_dir)), list(split.refit))
    parts = [data.train, data.validation, data.test, data.refit, data.refit_calibration]
    parts = [p.merge(rfm, on=list(KEYS), how="left", suffixes=("", "_rfm")) for p in parts]
    clv_params: dict[str, dict] = {}
    if spec.clv_features or spec.label.kind == "purchase":
        # the BG/NBD baseline needs only the test cutoffs; as features, every cutoff
        at = rfm if spec.clv_features else rfm[rfm["event_timestamp"].isin(list(split.test))]
        clv, clv_params = clv_features(at, horizon)
        parts = [p.merge(clv, on=list(KEYS), how="left") for p in parts]
    train, val, test, refit, refit_cal = parts
    features = list(data.features) + (list(CLV_FEATURES) if spec.clv_features else [])
    # a feature missing on every labelled row (session counts of an orders-only log)
    # carries nothing, and its all-NaN column only makes plots and imputers warn
    empty = [f for f in features if refit[f].isna().all() and test[f].isna().all()]
    features = [f for f in features if f not in set(empty)]
    rows = {**data.rows}

    report(progress, f"{spec.name}: fit", next(step), _STAGES)
    model = CalibratedBooster(
        spec.lightgbm, spec.early_stopping_rounds, spec.calibration, seed=spec.seed
    ).fit(
        train[features],
        train["label"],
        eval_set=(val[features], val["label"]),
        sample_weight=_weight(train),
        eval_sample_weight=_weight(val),
    )
    hit_cap = model.best_iteration_ >= spec.lightgbm.n_estimators

    report(progress, f"{spec.name}: baselines", next(step), _STAGES)
    logistic = LogisticBaseline(seed=spec.seed).fit(
        train[features], train["label"], sample_weight=_weight(train)
    )
    recency = RecencyRule(higher_is_positive=spec.label.kind == "churn").fit(train)
    rfm_model = CalibratedBooster(
        spec.lightgbm, spec.early_stopping_rounds, spec.calibration, seed=spec.seed
    ).fit(
        train[RFM_FEATURES],
        train["label"],
        eval_set=(val[RFM_FEATURES], val["label"]),
        sample_weight=_weight(train),
        eval_sample_weight=_weight(val),
    )

    report(progress, f"{spec.name}: evaluate", next(step), _STAGES)
    y_test = test["label"].to_numpy()
    scores = {
        "model": model.predict_proba(test[features])[:, 1],
        "logistic": logistic.predict_proba(test[features])[:, 1],
        "rfm_lightgbm": rfm_model.predict_proba(test[RFM_FEATURES])[:, 1],
        "recency": recency.predict(test),
    }
    if spec.label.kind == "purchase":
        # BG/NBD fitted at the test cutoff on the purchases before it
        scores["bgnbd"] = test["bgnbd_p_purchase"].to_numpy(np.float64)
    w_test = _weight(test)
    metrics = {
        name: ev.ranking_metrics(y_test, s, w_test)
        if name == "recency"
        else ev.binary_metrics(y_test, s, sample_weight=w_test)
        for name, s in scores.items()
    }
    comparisons = {
        name: {
            k: ev.paired_difference(
                y_test, scores["model"], scores[name], k, w_test, seed=spec.seed
            )
            for k in _METRIC_NAMES
        }
        for name in _COMPARED
        if name in scores
    }
    metrics["model_validation"] = ev.binary_metrics(
        val["label"].to_numpy(),
        model.predict_proba(val[features])[:, 1],
        sample_weight=_weight(val),
    )
    oracle_note = "no truth dir given"
    if truth_dir is not None:
        oracle, oracle_note = _oracle(Path(truth_dir), spec, test)
        if oracle is not None:
            metrics["oracle"] = oracle
            metrics["model"]["oracle_auc_gap"] = oracle["roc_auc"] - metrics["model"]["roc_auc"]

    report(progress, f"{spec.name}: refit", next(step), _STAGES)
    # the final model: the selected trees and calibration, fitted on every labelled
    # cutoff; its calibrator on the held-out customers of the latest one
    final = CalibratedBooster(
        spec.lightgbm.model_copy(update={"n_estimators": model.best_iteration_}),
        None,
        model.calibration_,  # type: ignore[arg-type]
        seed=spec.seed,
    ).fit(
        refit[features],
        refit["label"],
        eval_set=(refit_cal[features], refit_cal["label"]),
        sample_weight=_weight(refit),
        eval_sample_weight=_weight(refit_cal),
    )

    report(progress, f"{spec.name}: gates", next(step), _STAGES)
    champion, champion_auc = _champion_auc(settings, spec.name, test, horizon)
    gates = GateResult(
        propensity_checks(metrics["model"], spec.gates, champion_auc), champion, champion_auc
    )
    passed = gates.passed

    report(progress, f"{spec.name}: log to MLflow", next(step), _STAGES)
    manifest = settings.path(settings.lake_dir) / MANIFEST_NAME
    lineage = {
        "feature_service": spec.feature_service,
        "label": f"{spec.label.kind}_{horizon}d",
        "data_fingerprint": _fingerprint(data.frame),
        "lake_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        if manifest.exists()
        else "none",
        "git_commit": registry.git_commit(settings.root) or "none",
        "seed": str(spec.seed),
        "cutoffs": json.dumps(split.as_dict()),
        "snapshots_built": ",".join(str(c.date()) for c in data.built),
        "gates_passed": str(passed),
        "gates_judge": "the selection model's test metrics",
        "oracle": oracle_note,
        "features_all_missing": ",".join(empty) or "none",
        "early_stopping": "hit the n_estimators cap" if hit_cap else "stopped",
        "engine": settings.engine,
        # every fit and metric applies the sample's weights when the frame was sampled
        "sampling": json.dumps(data.sampling) if data.sampling else "none (every labelled row)",
        "mlflow.note.content": f"{spec.description or spec.name} ({spec.label.kind}, "
        f"next {horizon} days; data to {split.refit[-1] + pd.Timedelta(days=horizon):%Y-%m-%d})",
    }
    logged_metrics: dict[str, float] = {
        f"{'test' if part == 'model' else part}_{k}": v
        for part, values in metrics.items()
        for k, v in values.items()
    }
    logged_metrics.update({f"rows_{k}": float(v) for k, v in rows.items()})
    for name, diffs in comparisons.items():
        for k, (diff, low, high) in diffs.items():
            key = f"model_minus_{name}_{k}"
            logged_metrics.update({key: diff, f"{key}_low": low, f"{key}_high": high})
    logged_metrics["best_iteration"] = float(model.best_iteration_)
    logged_metrics["refit_trees"] = float(final.best_iteration_)
    if data.sampling:
        logged_metrics["rows_before_sampling"] = float(data.sampling["rows_full"])
    params = _flat("", spec.model_dump(mode="json"))
    params["calibration_chosen"] = model.calibration_
    params["refit_cutoffs"] = ",".join(str(c.date()) for c in split.refit)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _plots(out / "plots", y_test, scores, model, test[features], spec)
        if clv_params:
            (out / "report").mkdir(exist_ok=True)
            (out / "report" / "bgnbd_params.json").write_text(json.dumps(clv_params, indent=2))
        (out / "report").mkdir(exist_ok=True)
        (out / "report" / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "report" / "spec.json").write_text(spec.model_dump_json(indent=2))
        (out / "report" / "gates.json").write_text(
            json.dumps({"passed": passed, "checks": [str(c) for c in gates.checks]})
        )
        logged = registry.log_run(
            settings.tracking_uri,
            spec.name,
            estimator=final,
            input_example=test[features].head(5),
            params=params,
            metrics=logged_metrics,
            tags=lineage,
            artifacts_dir=out,
            register_as=spec.name,
            run_name=f"{spec.name}-{split.test[-1].date()}",
        )

    report(progress, f"{spec.name}: promote", next(step), _STAGES)
    promoted = settle(settings, spec.name, logged.version, gates.checks, promote=promote)
    return TrainingResult(
        model=spec.name,
        run_id=logged.run_id,
        version=logged.version,
        promoted=promoted,
        gates=gates,
        split=split,
        rows=rows,
        metrics=metrics,
        comparisons=comparisons,
        calibration=model.calibration_,
        best_iteration=model.best_iteration_,
        feature_names=features,
        horizon_days=horizon,
        hit_cap=hit_cap,
        features_all_missing=empty,
        selection_model=model,
    )
