"""Train, evaluate and register next-best-action from the event lake.

``next_best_action.yaml + actions.yaml → exposures with outcomes → features at
exposure time (Feast) → NBAModel fitted on the earlier exposure days → policy
evaluation on the later days (IPS/DR against random, the best single action, no
action; on simulated data the oracle) → MLflow run → registered version → gates
(:func:`~propensity.pipeline.gates.nba_checks`) → the one promotion rule``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from propensity import registry
from propensity.config import Settings
from propensity.models.arbitration import ActionCatalog, load_catalog
from propensity.models.nba import MODEL_NAME, OUTCOMES, NBAModel
from propensity.models.nba_report import evaluate_policy, plots, policy_summary, report_json
from propensity.models.spec import NBATraining, load_nba_training
from propensity.pipeline.dataset import nba_dataset
from propensity.pipeline.gates import GateResult, nba_checks, settle
from propensity.progress import ProgressCallback, report

__all__ = ["NBAResult", "train_nba"]

_STEPS = 6


@dataclass
class NBAResult:
    """Outcome of :func:`train_nba`: the policy report, the MLflow run and the gate verdict."""

    report: dict[str, Any]
    run_id: str | None
    version: int | None
    promoted: bool
    gates: GateResult
    model: NBAModel = field(repr=False)

    @property
    def gate_failures(self) -> list[str]:
        """The failed checks, in words."""
        return [str(c) for c in self.gates.failures]

    def summary(self) -> str:
        """Policy values (learned, random, best single, no action, oracle) and the verdict.

        Examples
        --------
        >>> print(train_nba(settings, truth_dir="data/sim").summary())  # doctest: +SKIP
        """
        verdict = (
            f"registered version {self.version}, "
            + ("promoted to champion" if self.promoted else "not promoted")
            if self.version is not None
            else "not registered"
        )
        lines = [f"next-best-action ({self.report.get('learner', '?')}-learner): {verdict}"]
        lines.append(policy_summary(self.report))
        lines += [f"  {gate}" for gate in self.gate_failures]
        return "\n".join(lines)


def train_nba(
    settings: Settings,
    *,
    truth_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    catalog_path: str | Path | None = None,
    promote: bool = True,
) -> NBAResult:
    """Train, evaluate and register the next-best-action model from the event lake.

    Parameters
    ----------
    settings : Settings
        Project settings (lake, features, Feast repo, MLflow, horizons).
    truth_dir : path, optional
        A simulation's output folder; adds the oracle policy and true values.
    progress : callable, optional
        ``progress(description, completed, total)``.
    catalog_path : path, optional
        Defaults to ``<models_dir>/actions.yaml``; the training settings come from
        ``<models_dir>/next_best_action.yaml``.
    promote : bool
        Move ``champion`` to the new version when its gates pass (see
        :func:`~propensity.pipeline.gates.settle`).

    Returns
    -------
    NBAResult

    Examples
    --------
    >>> result = train_nba(load_settings(), truth_dir="data/sim")  # doctest: +SKIP
    >>> result.report["policies"]["learned"]["dr"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    models_dir = settings.path(settings.models_dir)
    catalog = load_catalog(Path(catalog_path or models_dir / "actions.yaml"))
    training = load_nba_training(models_dir)
    report(progress, "next-best-action", 0, _STEPS)
    data = nba_dataset(settings, catalog, training.feature_service, truth_dir)
    report(progress, "next-best-action", 2, _STEPS)
    log, features, truth = data.log, data.features, data.truth
    # A later time window is held out: split on exposure days, never within one wave.
    days = np.array(sorted(set(log["day"])))
    split_day = days[min(len(days) - 1, max(1, int(round(len(days) * training.train_fraction))))]
    is_train = (log["day"] < split_day).to_numpy()
    train, test = log[is_train], log[~is_train]
    model = NBAModel(
        catalog,
        training.learner,
        training.params,
        training.seed,
        gate_level=training.gate_level,
        gate_folds=training.gate_folds,
    )
    logged = train["propensity"]
    model.fit(
        train[features],
        train["action"],
        {o: train[o] for o in OUTCOMES},
        propensity=logged if logged.notna().all() else None,
    )
    report(progress, "next-best-action", 3, _STEPS)
    evaluation = evaluate_policy(
        model,
        test.reset_index(drop=True),
        truth=None if truth is None else truth[~is_train].reset_index(drop=True),
        n_boot=training.n_boot,
        seed=training.seed,
        contact_policy=training.evaluate_with_contact_policy,
    )
    report(progress, "next-best-action", 4, _STEPS)
    body = report_json(
        evaluation,
        {
            "learner": training.learner,
            "feature_service": training.feature_service,
            "n_train_rows": int(is_train.sum()),
            "exposures_with_open_windows_dropped": data.still_open,
            "train_days": [str(d.date()) for d in days[days < split_day]],
            "test_days": [str(d.date()) for d in days[days >= split_day]],
            "actions": catalog.names,
            "horizons": {
                "purchase_days": settings.horizons.purchase_days,
                "churn_days": settings.horizons.churn_days,
            },
        },
    )
    gates = _gates(settings, test, evaluation, training)
    body["gates"] = [str(c) for c in gates.checks]
    run_id, version = _register(
        settings, model, test, features, evaluation, body, training, gates.passed
    )
    promoted = settle(settings, MODEL_NAME, version, gates.checks, promote=promote)
    body["seconds"] = round(time.perf_counter() - started, 1)
    report(progress, "next-best-action", _STEPS, _STEPS)
    return NBAResult(body, run_id, version, promoted, gates, model)


def _gates(
    settings: Settings, test: pd.DataFrame, evaluation: dict[str, Any], training: NBATraining
) -> GateResult:
    """Gate checks, the champion re-evaluated on the challenger's test rows."""
    champion_value = None
    version = registry.champion_version(settings.tracking_uri, MODEL_NAME)
    if version is not None:
        champion = registry.load_estimator(settings.tracking_uri, MODEL_NAME)
        if set(champion.feature_names_) <= set(test.columns):
            again = evaluate_policy(
                champion, test.reset_index(drop=True), n_boot=0, seed=training.seed
            )
            champion_value = float(again["table"].loc["learned", "dr"])
    return GateResult(nba_checks(evaluation, training, champion_value), version, champion_value)


def _register(
    settings: Settings,
    model: NBAModel,
    test: pd.DataFrame,
    features: list[str],
    evaluation: dict[str, Any],
    body: dict[str, Any],
    training: NBATraining,
    passed: bool,
) -> tuple[str, int | None]:
    catalog: ActionCatalog = model.catalog
    table = evaluation["table"]
    metrics = {
        f"{name}_{col}": float(v) for name, row in table.iterrows() for col, v in row.items()
    }
    metrics.update({f"qini_{a}": r.qini for a, r in evaluation["qini"].items()})
    metrics.update({f"auuc_{a}": r.auuc for a, r in evaluation["qini"].items()})
    if evaluation.get("captured") is not None:
        metrics["captured_oracle_fraction"] = evaluation["captured"]
    metrics["rows_test"] = float(evaluation["n_rows"])
    metrics["rows_train"] = float(body["n_train_rows"])
    params = {f"training_{k}": v for k, v in training.model_dump(mode="json").items()}
    params["catalog"] = catalog.model_dump_json()
    params["output_columns"] = ",".join(catalog.names)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots(evaluation, out)
        (out / "policy_report.json").write_text(json.dumps(body, indent=2))
        logged = registry.log_run(
            settings.tracking_uri,
            MODEL_NAME,
            estimator=model,
            input_example=test[features].head(5),
            params=params,
            metrics=metrics,
            tags={
                "feature_service": training.feature_service,
                "git_commit": registry.git_commit(settings.root) or "none",
                "gates_passed": str(passed),
                "output": "uplift per action, columns " + ",".join(catalog.names),
            },
            artifacts_dir=out,
            register_as=MODEL_NAME,
            run_name=f"{MODEL_NAME}-{body['test_days'][-1] if body['test_days'] else 'all'}",
        )
    return logged.run_id, logged.version
