"""Train, evaluate, log and promote a propensity model (churn, purchase).

``spec → cutoffs → entity frame → training frame (Feast) → time split → fit →
evaluate (model, baselines, oracle) → MLflow run → registered version → gates →
champion alias``. Every step is a function of the lake, the feature store and the
spec, so a run is reproducible from what MLflow records.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Sequence
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
from propensity.labels import choose_cutoffs, data_window, entity_frame
from propensity.models.baselines import LogisticBaseline, RecencyRule
from propensity.models.pipeline import CalibratedBooster
from propensity.models.spec import Gates, ModelSpec, SplitSpec, load_spec
from propensity.progress import ProgressCallback, report

__all__ = [
    "GateDecision",
    "TimeSplit",
    "TrainingResult",
    "evaluate_gates",
    "split_cutoffs",
    "train_model",
    "train_all",
    "promote",
    "KEYS",
    "ensure_snapshots",
    "feature_adapter",
    "training_frame",
]

#: Identify a training row: the customer and the cutoff.
KEYS = ("customer_id", "event_timestamp")
_STAGES = 8


@dataclass(frozen=True)
class TimeSplit:
    """Cutoffs of each part of a time-based split (``purged`` were left out)."""

    train: tuple[pd.Timestamp, ...]
    validation: tuple[pd.Timestamp, ...]
    test: tuple[pd.Timestamp, ...]
    purged: tuple[pd.Timestamp, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        """ISO dates of every part, for logging."""
        parts = {"train": self.train, "validation": self.validation, "test": self.test}
        parts["purged"] = self.purged
        return {k: [str(c.date()) for c in v] for k, v in parts.items()}


@dataclass(frozen=True)
class GateDecision:
    """Whether a challenger may become champion, and why."""

    passed: bool
    reasons: tuple[str, ...]
    champion_version: int | None = None
    champion_auc: float | None = None


@dataclass
class TrainingResult:
    """What one training run produced.

    ``metrics`` maps ``model``, ``logistic``, ``recency`` (test window) and
    ``oracle`` (when a truth dir was given) to metric dicts; ``model_validation``
    holds the model's validation metrics.
    """

    model: str
    run_id: str
    version: int | None
    promoted: bool
    gates: GateDecision
    split: TimeSplit
    rows: dict[str, int]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: str = ""
    best_iteration: int = 0
    feature_names: list[str] = field(default_factory=list)

    def __rich__(self) -> str:
        return self.summary()

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """A short human-readable summary (what the CLI prints)."""
        m = self.metrics
        lines = [
            f"{self.model} v{self.version} (run {self.run_id[:8]}): "
            f"{'promoted to champion' if self.promoted else 'not promoted'}",
            f"  rows train/val/test = {self.rows['train']}/{self.rows['validation']}/"
            f"{self.rows['test']}; calibration {self.calibration}; "
            f"{self.best_iteration} trees",
        ]
        for name in ("model", "logistic", "recency", "oracle"):
            if name in m:
                lines.append(
                    f"  {name:<9} AUC {m[name]['roc_auc']:.4f}  PR-AUC {m[name]['pr_auc']:.4f}"
                    + (f"  ECE {m[name]['ece']:.4f}" if "ece" in m[name] else "")
                )
        lines += [f"  gate: {r}" for r in self.gates.reasons]
        return "\n".join(lines)


def split_cutoffs(
    cutoffs: Sequence[pd.Timestamp], split: SplitSpec, horizon_days: int
) -> TimeSplit:
    """Split cutoffs in time: train on the earliest, validate and test on the latest.

    With ``split.purge`` a train or validation cutoff is kept only if its label
    window closes by the first test cutoff: on the test date a model in production
    could not know any later outcome, so the evaluation must not either.

    Examples
    --------
    >>> cuts = list(pd.date_range("2024-01-01", periods=10, freq="7D", tz="UTC"))
    >>> s = split_cutoffs(cuts, SplitSpec(n_cutoffs=10), 14)
    >>> [len(s.train), len(s.validation), len(s.test), len(s.purged)]
    [7, 1, 1, 1]
    """
    cuts = sorted(pd.Timestamp(c) for c in cutoffs)
    horizon = pd.Timedelta(days=horizon_days)
    test = cuts[-split.test_cutoffs :]
    rest = cuts[: -split.test_cutoffs]
    if split.purge:
        rest = [c for c in rest if c + horizon <= test[0]]
    validation = rest[-split.validation_cutoffs :]
    train = rest[: -split.validation_cutoffs] if len(rest) > split.validation_cutoffs else []
    if not train or len(validation) < split.validation_cutoffs:
        raise ValueError(
            f"{len(cuts)} cutoffs ({cuts[0].date()} .. {cuts[-1].date()}) leave "
            f"{len(train)} train and {len(validation)} validation cutoffs with a "
            f"{horizon_days}-day horizon; need more history or a larger split.n_cutoffs"
        )
    purged = tuple(c for c in cuts if c not in set(train) | set(validation) | set(test))
    return TimeSplit(tuple(train), tuple(validation), tuple(test), purged)


def evaluate_gates(
    metrics: dict[str, float], gates: Gates, champion_auc: float | None = None
) -> tuple[bool, list[str]]:
    """Check a challenger's test metrics against the promotion gates.

    Returns
    -------
    (passed, reasons)
        ``reasons`` lists every check, passed or failed, in words.

    Examples
    --------
    >>> evaluate_gates({"roc_auc": 0.8, "ece": 0.01, "rows": 5000}, Gates(), 0.803)[0]
    True
    """
    checks = [
        (metrics["rows"] >= gates.min_rows, f"test rows {metrics['rows']:.0f} >= {gates.min_rows}"),
        (metrics["roc_auc"] >= gates.min_auc, f"AUC {metrics['roc_auc']:.4f} >= {gates.min_auc}"),
        (metrics["ece"] <= gates.max_ece, f"ECE {metrics['ece']:.4f} <= {gates.max_ece}"),
    ]
    if champion_auc is not None:
        floor = champion_auc - gates.max_auc_drop
        checks.append(
            (
                metrics["roc_auc"] >= floor,
                f"AUC {metrics['roc_auc']:.4f} >= champion {champion_auc:.4f} "
                f"- {gates.max_auc_drop}",
            )
        )
    return all(ok for ok, _ in checks), [("pass: " if ok else "FAIL: ") + t for ok, t in checks]


def _resolve_spec(settings: Settings, spec: ModelSpec | str) -> ModelSpec:
    return (
        spec if isinstance(spec, ModelSpec) else load_spec(spec, settings.path(settings.models_dir))
    )


def ensure_snapshots(settings: Settings, cutoffs: Sequence[pd.Timestamp]) -> list[pd.Timestamp]:
    """Build feature snapshots that are missing at the cutoffs; return those built.

    Feast joins each row to the latest snapshot at or before its timestamp, so a cutoff
    off the snapshot grid would silently get days-old features.
    """
    from propensity.features.snapshots import build_features, feature_table_path

    path = feature_table_path(settings.path(settings.features_dir), "session")
    have: set[pd.Timestamp] = set()
    if path.exists():
        stamps = pq.read_table(path, columns=["event_timestamp"])["event_timestamp"]
        have = {pd.Timestamp(t).tz_convert("UTC") for t in pd.unique(stamps.to_pandas())}
    missing = sorted(set(cutoffs) - have)
    if missing:
        build_features(settings, missing)
    return missing


def feature_adapter(settings: Settings) -> Any:
    """The project's Feast adapter with its repo applied (idempotent)."""
    from propensity.features.store import FeatureStoreAdapter

    adapter = FeatureStoreAdapter(settings)
    if not (settings.path(settings.features_dir) / "feast_registry.db").exists():
        adapter.apply()
    return adapter


def training_frame(
    settings: Settings, spec: ModelSpec, entity: pd.DataFrame
) -> tuple[pd.DataFrame, list[str]]:
    """Point-in-time features of ``spec``'s service joined to ``entity`` rows, via Feast.

    Returns the frame and the model's feature names (the service's features less
    ``spec.exclude_features``).
    """
    adapter = feature_adapter(settings)
    try:
        names = list(adapter.service_features(spec.feature_service))
        frame = adapter.historical(entity, spec.feature_service)
    except Exception as exc:  # a stale registry misses a new service: apply once, retry
        if "not found" not in str(exc).lower() and "FeatureService" not in type(exc).__name__:
            raise
        adapter.apply()
        names = list(adapter.service_features(spec.feature_service))
        frame = adapter.historical(entity, spec.feature_service)
    unknown = sorted(set(spec.exclude_features) - set(names))
    if unknown:
        raise ValueError(
            f"exclude_features {unknown} of spec {spec.name} are not in {spec.feature_service}"
        )
    names = [n for n in names if n not in set(spec.exclude_features)]
    bad = [n for n in names if not pd.api.types.is_numeric_dtype(frame[n])]
    if bad:
        raise TypeError(f"feature service {spec.feature_service} returned non-numeric {bad}")
    frame[names] = frame[names].astype("float64")
    return frame, names


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
    rows = test[["customer_id", "event_timestamp", "label"]].merge(
        truth, left_on=["customer_id", "event_timestamp"], right_on=["customer_id", "date"]
    )
    if len(rows) < len(test):
        return None, f"truth covers {len(rows)} of {len(test)} test rows"
    return ev.binary_metrics(rows["label"].to_numpy(), rows[column].to_numpy()), "ok"


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
    settings: Settings, name: str, test: pd.DataFrame
) -> tuple[int | None, float | None]:
    version = registry.champion_version(settings.tracking_uri, name)
    if version is None:
        return None, None
    champion = registry.load_estimator(settings.tracking_uri, name, version)
    missing = [c for c in champion.feature_names_ if c not in test.columns]
    if missing:
        # a champion on another feature service cannot score these rows: compare logged AUC
        logged = registry.version_info(settings.tracking_uri, name, version)["metrics"]
        return version, logged.get("test_roc_auc")
    score = champion.predict_proba(test[champion.feature_names_])[:, 1]
    return version, ev.ranking_metrics(test["label"].to_numpy(), score)["roc_auc"]


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
    auto_promote: bool = True,
) -> TrainingResult:
    """Train one propensity model end to end and log it to MLflow.

    Parameters
    ----------
    settings : Settings
        Project settings (lake, features, feature repo, models dir, MLflow URI).
    spec : ModelSpec or str
        A spec, or a model name (``churn``, ``purchase``) read from ``models_dir``.
    as_of : date, optional
        The latest (test) cutoff; its label window must close by the data end.
        Defaults to the latest weekly cutoff that allows it.
    horizon_days : int, optional
        Overrides the spec's label horizon.
    truth_dir : path, optional
        A simulator output folder: the test rows are also scored with the true
        probabilities (the oracle) and the gap is reported.
    progress : callable, optional
        ``progress(description, completed, total)`` after each stage.
    auto_promote : bool
        Move the ``champion`` alias when the gates pass.

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
    lake = EventLake(settings.path(settings.lake_dir))
    cutoffs = choose_cutoffs(data_window(lake), horizon, spec.split, as_of=as_of)
    split = split_cutoffs(cutoffs, spec.split, horizon)
    used = [*split.train, *split.validation, *split.test]
    entity = entity_frame(lake, used, spec.label, spec.population)

    report(progress, f"{spec.name}: features", next(step), _STAGES)
    built = ensure_snapshots(settings, used)
    frame, features = training_frame(settings, spec, entity)
    parts = {
        name: frame[frame["event_timestamp"].isin(list(cuts))].reset_index(drop=True)
        for name, cuts in (
            ("train", split.train),
            ("validation", split.validation),
            ("test", split.test),
        )
    }
    rows = {k: len(v) for k, v in parts.items()}
    train, val, test = parts["train"], parts["validation"], parts["test"]

    report(progress, f"{spec.name}: fit", next(step), _STAGES)
    model = CalibratedBooster(
        spec.lightgbm, spec.early_stopping_rounds, spec.calibration, seed=spec.seed
    ).fit(train[features], train["label"], eval_set=(val[features], val["label"]))

    report(progress, f"{spec.name}: baselines", next(step), _STAGES)
    logistic = LogisticBaseline(seed=spec.seed).fit(train[features], train["label"])
    recency = RecencyRule(higher_is_positive=spec.label.kind == "churn").fit(train)

    report(progress, f"{spec.name}: evaluate", next(step), _STAGES)
    y_test = test["label"].to_numpy()
    scores = {
        "model": model.predict_proba(test[features])[:, 1],
        "logistic": logistic.predict_proba(test[features])[:, 1],
        "recency": recency.predict(test),
    }
    metrics = {
        "model": ev.binary_metrics(y_test, scores["model"]),
        "logistic": ev.binary_metrics(y_test, scores["logistic"]),
        "recency": ev.ranking_metrics(y_test, scores["recency"]),
        "model_validation": ev.binary_metrics(
            val["label"].to_numpy(), model.predict_proba(val[features])[:, 1]
        ),
    }
    oracle_note = "no truth dir given"
    if truth_dir is not None:
        oracle, oracle_note = _oracle(Path(truth_dir), spec, test)
        if oracle is not None:
            metrics["oracle"] = oracle
            metrics["model"]["oracle_auc_gap"] = oracle["roc_auc"] - metrics["model"]["roc_auc"]

    report(progress, f"{spec.name}: gates", next(step), _STAGES)
    champion, champion_auc = _champion_auc(settings, spec.name, test)
    passed, reasons = evaluate_gates(metrics["model"], spec.gates, champion_auc)
    gates = GateDecision(passed, tuple(reasons), champion, champion_auc)

    report(progress, f"{spec.name}: log to MLflow", next(step), _STAGES)
    manifest = settings.path(settings.lake_dir) / MANIFEST_NAME
    lineage = {
        "feature_service": spec.feature_service,
        "label": f"{spec.label.kind}_{horizon}d",
        "data_fingerprint": _fingerprint(frame),
        "lake_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        if manifest.exists()
        else "none",
        "git_commit": registry.git_commit(settings.root) or "none",
        "seed": str(spec.seed),
        "cutoffs": json.dumps(split.as_dict()),
        "snapshots_built": ",".join(str(c.date()) for c in built),
        "gates_passed": str(passed),
        "oracle": oracle_note,
    }
    logged_metrics: dict[str, float] = {
        f"{'test' if part == 'model' else part}_{k}": v
        for part, values in metrics.items()
        for k, v in values.items()
    }
    logged_metrics.update({f"rows_{k}": float(v) for k, v in rows.items()})
    logged_metrics["best_iteration"] = float(model.best_iteration_)
    params = _flat("", spec.model_dump(mode="json"))
    params["calibration_chosen"] = model.calibration_
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _plots(out / "plots", y_test, scores, model, test[features], spec)
        (out / "report").mkdir()
        (out / "report" / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "report" / "spec.json").write_text(spec.model_dump_json(indent=2))
        (out / "report" / "gates.json").write_text(
            json.dumps({"passed": passed, "checks": reasons})
        )
        logged = registry.log_run(
            settings.tracking_uri,
            spec.name,
            estimator=model,
            input_example=test[features].head(5),
            params=params,
            metrics=logged_metrics,
            tags=lineage,
            artifacts_dir=out,
            register_as=spec.name,
            run_name=f"{spec.name}-{split.test[-1].date()}",
        )

    report(progress, f"{spec.name}: promote", next(step), _STAGES)
    promoted = bool(passed and auto_promote and logged.version is not None)
    if promoted and logged.version is not None:
        registry.set_champion(settings.tracking_uri, spec.name, logged.version)
    elif not passed and logged.version is not None:
        failed = "; ".join(r for r in reasons if r.startswith("FAIL"))
        registry.set_status(settings.tracking_uri, spec.name, logged.version, "rejected", failed)
    return TrainingResult(
        model=spec.name,
        run_id=logged.run_id,
        version=logged.version,
        promoted=promoted,
        gates=gates,
        split=split,
        rows=rows,
        metrics=metrics,
        calibration=model.calibration_,
        best_iteration=model.best_iteration_,
        feature_names=features,
    )


def train_all(
    settings: Settings,
    *,
    as_of: str | pd.Timestamp | None = None,
    horizon_days: int | None = None,
    truth_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, TrainingResult]:
    """Train every propensity model (churn, purchase_propensity) with the same options.

    Examples
    --------
    >>> results = train_all(load_settings())  # doctest: +SKIP
    """
    return {
        name: train_model(
            settings,
            name,
            as_of=as_of,
            horizon_days=horizon_days,
            truth_dir=truth_dir,
            progress=progress,
        )
        for name in ("churn", "purchase_propensity")
    }


def promote(settings: Settings, model: str, version: int) -> None:
    """Make ``version`` the champion of ``model`` by hand (bypasses the gates).

    Examples
    --------
    >>> promote(load_settings(), "churn", 3)  # doctest: +SKIP
    """
    registry.set_champion(settings.tracking_uri, model, version)
