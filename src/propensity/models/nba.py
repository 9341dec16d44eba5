"""Next-best-action: learn per-action uplift from logged campaigns, evaluate, register.

The flow is one direction:

1. logged exposures (customer, action, time, assignment probability) and their
   outcomes within the horizons (purchase; retention = a session or purchase);
2. features at exposure time (Feast ``nba_v1``, point in time) — or the
   pre-treatment columns of a user's table (:func:`fit_tabular`);
3. an :class:`NBAModel` (one meta-learner per outcome) fitted on the earlier
   exposures;
4. policy evaluation on the later exposures: IPS and DR values of the learned
   policy against random, the best single action, no action — and, on
   simulated data, the oracle and the learned policy's true value;
5. MLflow: the run, its plots and report, the model registered as
   ``next_best_action`` and promoted to ``champion`` when it passes the gates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from propensity.models._nba_log import exposure_log, exposure_truth, features_at
from propensity.models.arbitration import ActionCatalog, choose, load_catalog
from propensity.models.nba_report import evaluate_policy, plots, policy_summary, report_json
from propensity.models.uplift import LEARNERS
from propensity.progress import ProgressCallback, report

__all__ = [
    "MODEL_NAME",
    "NBATraining",
    "NBAModel",
    "NBAResult",
    "TabularResult",
    "load_training",
    "evaluate_policy",
    "fit_tabular",
    "train_nba",
]

MODEL_NAME = "next_best_action"
OUTCOMES = ("purchase", "retention")
_META = {"customer_id", "event_id", "exposure_timestamp", "event_timestamp", "action", "propensity"}


class NBATraining(BaseModel):
    """How uplift models are trained, evaluated and gated (``training:`` in actions.yaml)."""

    model_config = ConfigDict(extra="forbid")

    learner: Literal["t", "x", "dr"] = "x"
    params: dict[str, Any] = Field(default_factory=dict)
    train_fraction: float = Field(default=0.7, gt=0, lt=1)
    n_boot: int = Field(default=300, ge=0)
    seed: int = 42
    #: Apply contact caps when evaluating policies (eligibility rules always apply).
    evaluate_with_contact_policy: bool = False
    min_test_rows: int = Field(default=500, ge=0)
    #: A challenger's DR value may trail the champion's (same test rows) by at most this.
    max_value_drop: float = Field(default=0.0, ge=0)


def load_training(path: str | Path) -> NBATraining:
    """Read the ``training`` section of an action catalog file (defaults if absent)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return NBATraining.model_validate(data.get("training") or {})


class NBAModel:
    """Per-action uplift for every outcome the catalog's actions target.

    Parameters
    ----------
    catalog : ActionCatalog
    learner : {"t", "x", "dr"}
        Meta-learner of :mod:`propensity.models.uplift`.
    params : dict, optional
        LightGBM parameters passed to the learner.
    random_state : int

    Examples
    --------
    >>> outcomes = {"purchase": y_p, "retention": y_r}
    >>> model = NBAModel(catalog).fit(X, log["action"], outcomes)  # doctest: +SKIP
    >>> model.action_uplift(X).head()  # doctest: +SKIP
    """

    def __init__(
        self,
        catalog: ActionCatalog,
        learner: str = "x",
        params: dict[str, Any] | None = None,
        random_state: int = 0,
    ) -> None:
        self.catalog = catalog
        self.learner = learner
        self.params = params
        self.random_state = random_state

    def fit(
        self, X: pd.DataFrame, treatment: Any, outcomes: Mapping[str, Any], propensity: Any = None
    ) -> NBAModel:
        arms = set(np.asarray(treatment).astype(str))
        unseen = [a for a in self.catalog.names if a not in arms]
        if unseen:
            raise ValueError(
                f"catalog actions {unseen} never appear in the logged treatment column"
            )
        needed = sorted({spec.outcome for spec in self.catalog.actions.values()})
        missing = [o for o in needed if o not in outcomes]
        if missing:
            raise ValueError(f"outcomes lack {missing}, targeted by catalog actions")
        self.feature_names_ = [str(c) for c in X.columns]
        self.learners_ = {
            o: LEARNERS[self.learner](
                control=self.catalog.control, params=self.params, random_state=self.random_state
            ).fit(X, treatment, outcomes[o], propensity=propensity)
            for o in needed
        }
        return self

    learners_: dict[str, Any]

    def _columns(self, outcome: str) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.learners_[outcome].actions_)}

    def action_uplift(self, X: pd.DataFrame) -> pd.DataFrame:
        """Uplift of each catalog action on its own outcome, one column per action."""
        frame = X[self.feature_names_]
        cache = {o: learner.predict_uplift(frame) for o, learner in self.learners_.items()}
        data = {
            a: cache[spec.outcome][:, self._columns(spec.outcome)[a]]
            for a, spec in self.catalog.actions.items()
        }
        return pd.DataFrame(data, index=X.index)

    def uplift_matrix(self, X: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """:meth:`action_uplift` of a float64 matrix (columns ``feature_names_``), in numpy.

        Columns follow ``catalog.names``. Each learner predicts from its own
        boosters (:meth:`~propensity.models.uplift.TLearner.uplift_matrix`),
        ``num_threads`` LightGBM threads per call (0: all cores): the
        serving path, with no pandas.

        Examples
        --------
        >>> model.uplift_matrix(X[:1]).shape  # doctest: +SKIP
        (1, 4)
        """
        data = np.asarray(X, dtype=np.float64)
        out = np.empty((len(data), len(self.catalog.names)), dtype=np.float64)
        # Each learner predicts only the models of the actions that target its outcome.
        for outcome, (actions, where) in self._by_outcome().items():
            out[:, where] = self.learners_[outcome].uplift_matrix(data, num_threads, actions)
        return out

    def _by_outcome(self) -> dict[str, tuple[list[str], np.ndarray]]:
        groups: dict[str, list[int]] = {}
        for j, spec in enumerate(self.catalog.actions.values()):
            groups.setdefault(spec.outcome, []).append(j)
        names = self.catalog.names
        return {
            o: ([names[j] for j in where], np.array(where, dtype=np.intp))
            for o, where in groups.items()
        }

    def valued_outcomes(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``value × E[outcome | x, arm]`` under each action and under control (for DR)."""
        frame = X[self.feature_names_]
        cache = {o: learner.predict_outcomes(frame) for o, learner in self.learners_.items()}
        values = self.catalog.values()
        under_action = np.column_stack(
            [
                cache[s.outcome][:, 1 + self._columns(s.outcome)[a]]
                for a, s in self.catalog.actions.items()
            ]
        )
        under_control = np.column_stack(
            [cache[s.outcome][:, 0] for s in self.catalog.actions.values()]
        )
        return under_action * values, under_control * values

    def propensity(self, X: pd.DataFrame, treatment: Any) -> np.ndarray:
        """Estimated probability of the arm each row received (when the log has none)."""
        learner = next(iter(self.learners_.values()))
        proba = learner.propensity_matrix(X[self.feature_names_])
        columns = [learner.arms_.index(a) for a in np.asarray(treatment).astype(str)]
        return np.asarray(proba[np.arange(len(columns)), columns])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Uplift per catalog action (columns in ``catalog.names`` order) — the pyfunc output."""
        return self.action_uplift(pd.DataFrame(X)).to_numpy(dtype=np.float64)

    def decide(
        self, X: pd.DataFrame, history: pd.DataFrame | None = None, **kwargs: Any
    ) -> pd.DataFrame:
        """Arbitrate with this model's catalog (see :func:`~.arbitration.choose`)."""
        return choose(self.action_uplift(X), X, self.catalog, history=history, **kwargs)


# -- tabular path ------------------------------------------------------------------------------


@dataclass
class TabularResult:
    """What :func:`fit_tabular` wrote and measured."""

    report: dict[str, Any]
    model_path: Path
    decisions_path: Path
    report_path: Path
    decisions: pd.DataFrame = field(repr=False)
    model: NBAModel = field(repr=False)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".txt"):
        return pd.read_csv(path)
    raise ValueError(f"{path}: unsupported table format {suffix!r}; use .csv or .parquet")


def fit_tabular(
    table_path: str | Path,
    treatment_col: str,
    outcome_col: str,
    *,
    out_dir: str | Path,
    propensity_col: str | None = None,
    control: str = "control",
    id_col: str | None = None,
    feature_cols: list[str] | None = None,
    catalog: ActionCatalog | str | Path | None = None,
    value: float = 1.0,
    cost: float = 0.0,
    training: NBATraining | None = None,
) -> TabularResult:
    """Fit, evaluate and export uplift and a policy from a randomized campaign table.

    Parameters
    ----------
    table_path : path
        CSV or Parquet: one row per customer with pre-treatment feature
        columns, the arm received and the outcome (0/1 or numeric).
    treatment_col, outcome_col : str
        Column names of the arm and the outcome.
    out_dir : path
        Receives ``model.joblib``, ``decisions.parquet`` (one row per input
        row, with reasons), ``report.json`` and the plots.
    propensity_col : str, optional
        Logged assignment probability; estimated when absent.
    control : str
        The untreated arm's label.
    id_col : str, optional
        Customer id column (used for the hold-out hash); row numbers otherwise.
    feature_cols : list of str, optional
        Defaults to every other column.
    catalog : ActionCatalog or path, optional
        Costs, values and eligibility per action. Without it every non-control
        arm gets ``value`` and ``cost`` and no rules.
    training : NBATraining, optional

    Returns
    -------
    TabularResult

    Examples
    --------
    >>> result = fit_tabular("campaign.csv", "arm", "bought", out_dir="out",
    ...                      value=40, cost=2)  # doctest: +SKIP
    >>> result.report["policies"]["learned"]["dr"]  # doctest: +SKIP
    """
    settings = training or NBATraining()
    path = Path(table_path)
    frame = _read_table(path)
    for column in [treatment_col, outcome_col, propensity_col, id_col]:
        if column is not None and column not in frame.columns:
            raise ValueError(f"{path}: no column {column!r}; columns are {list(frame.columns)}")
    missing_outcome = frame[outcome_col].isna().to_numpy()
    if missing_outcome.any():
        row = int(np.flatnonzero(missing_outcome)[0])
        raise ValueError(f"{path}: row {row}: outcome column {outcome_col!r} is empty")
    arms = sorted(set(frame[treatment_col].astype(str)) - {control})
    if isinstance(catalog, str | Path):
        catalog = load_catalog(catalog)
    if catalog is None:
        catalog = ActionCatalog.model_validate(
            {
                "control": control,
                "holdout_share": 0.0,
                "actions": {a: {"cost": cost, "value": value, "outcome": "purchase"} for a in arms},
            }
        )
    reserved = {treatment_col, outcome_col, propensity_col, id_col}
    features = feature_cols or [c for c in frame.columns if c not in reserved]
    ids = frame[id_col].astype(str) if id_col else pd.Series([f"row{i}" for i in range(len(frame))])
    log = frame[features].copy()
    log["customer_id"] = ids.to_numpy()
    log["action"] = frame[treatment_col].astype(str).to_numpy()
    log["propensity"] = frame[propensity_col].to_numpy(float) if propensity_col else np.nan
    y = frame[outcome_col].to_numpy(float)
    for outcome in OUTCOMES:
        log[outcome] = y
    rng = np.random.default_rng(settings.seed)
    is_train = rng.random(len(log)) < settings.train_fraction
    train, test = log[is_train], log[~is_train]
    model = NBAModel(catalog, settings.learner, settings.params, settings.seed)
    model.fit(
        train[features],
        train["action"],
        {o: train[o] for o in OUTCOMES},
        propensity=train["propensity"] if propensity_col else None,
    )
    evaluation = evaluate_policy(
        model, test, n_boot=settings.n_boot, seed=settings.seed, contact_policy=False
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decisions = model.decide(log, contact_policy=False)
    decisions.insert(1, "split", np.where(is_train, "train", "test"))
    written = decisions.assign(alternatives=decisions["alternatives"].map(json.dumps))
    decisions_path = out / "decisions.parquet"
    written.to_parquet(decisions_path, index=False)
    model_path = out / "model.joblib"
    joblib.dump(model, model_path)
    body = report_json(
        evaluation,
        {
            "source": path.name,
            "treatment_col": treatment_col,
            "outcome_col": outcome_col,
            "learner": settings.learner,
            "n_train_rows": int(is_train.sum()),
            "features": features,
        },
    )
    report_path = out / "report.json"
    report_path.write_text(json.dumps(body, indent=2))
    plots(evaluation, out)
    return TabularResult(body, model_path, decisions_path, report_path, decisions, model)


# -- event-log path ----------------------------------------------------------------------------


@dataclass
class NBAResult:
    """Outcome of :func:`train_nba`: the policy report, the MLflow run and the gate verdict."""

    report: dict[str, Any]
    run_id: str | None
    version: int | None
    promoted: bool
    gate_failures: list[str]
    model: NBAModel = field(repr=False)

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


def _gates(
    evaluation: dict[str, Any], training: NBATraining, champion_value: float | None
) -> list[str]:
    table = evaluation["table"]
    learned = float(table.loc["learned", "dr"])
    checks = [
        (
            evaluation["n_rows"] >= training.min_test_rows,
            f"test rows {evaluation['n_rows']} >= {training.min_test_rows}",
        ),
        (learned > 0, f"learned DR value {learned:.4f} > 0 (beats no action)"),
        (
            learned >= float(table.loc[evaluation["best_single"], "dr"]),
            f"learned DR value {learned:.4f} >= best single action "
            f"{evaluation['best_single']} {float(table.loc[evaluation['best_single'], 'dr']):.4f}",
        ),
    ]
    if champion_value is not None:
        checks.append(
            (
                learned >= champion_value - training.max_value_drop,
                f"learned DR value {learned:.4f} >= champion {champion_value:.4f} "
                f"- {training.max_value_drop}",
            )
        )
    return [("pass: " if ok else "FAIL: ") + text for ok, text in checks]


def train_nba(
    settings: Any,
    *,
    truth_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    catalog_path: str | Path | None = None,
    register: bool = True,
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
        Defaults to ``<models_dir>/actions.yaml``.
    register : bool
        Log to MLflow, register ``next_best_action`` and apply the gates.

    Returns
    -------
    NBAResult

    Examples
    --------
    >>> result = train_nba(load_settings(), truth_dir="data/sim")  # doctest: +SKIP
    >>> result.report["policies"]["learned"]["dr"]  # doctest: +SKIP
    """
    from propensity.events.lake import EventLake

    started = time.perf_counter()
    steps = 6
    path = Path(catalog_path or settings.path(settings.models_dir) / "actions.yaml")
    catalog, training = load_catalog(path), load_training(path)
    report(progress, "next-best-action", 0, steps)
    lake = EventLake(settings.path(settings.lake_dir))
    log, still_open = exposure_log(lake, catalog, settings.horizons)
    report(progress, "next-best-action", 1, steps)
    log, features = features_at(settings, log, "nba_v1")
    report(progress, "next-best-action", 2, steps)
    truth = None if truth_dir is None else exposure_truth(truth_dir, log)
    # A later time window is held out: split on exposure days, never within one wave.
    days = np.array(sorted(set(log["day"])))
    split_day = days[min(len(days) - 1, max(1, int(round(len(days) * training.train_fraction))))]
    is_train = (log["day"] < split_day).to_numpy()
    train, test = log[is_train], log[~is_train]
    model = NBAModel(catalog, training.learner, training.params, training.seed)
    logged = train["propensity"]
    model.fit(
        train[features],
        train["action"],
        {o: train[o] for o in OUTCOMES},
        propensity=logged if logged.notna().all() else None,
    )
    report(progress, "next-best-action", 3, steps)
    evaluation = evaluate_policy(
        model,
        test.reset_index(drop=True),
        truth=None if truth is None else truth[~is_train].reset_index(drop=True),
        n_boot=training.n_boot,
        seed=training.seed,
        contact_policy=training.evaluate_with_contact_policy,
    )
    report(progress, "next-best-action", 4, steps)
    body = report_json(
        evaluation,
        {
            "learner": training.learner,
            "feature_service": "nba_v1",
            "n_train_rows": int(is_train.sum()),
            "exposures_with_open_windows_dropped": still_open,
            "train_days": [str(d.date()) for d in days[days < split_day]],
            "test_days": [str(d.date()) for d in days[days >= split_day]],
            "actions": catalog.names,
            "horizons": {
                "purchase_days": settings.horizons.purchase_days,
                "churn_days": settings.horizons.churn_days,
            },
        },
    )
    run_id: str | None = None
    version: int | None = None
    promoted = False
    checks: list[str] = []
    if register:
        run_id, version, promoted, checks = _register(
            settings, model, test, features, evaluation, body, training, catalog
        )
    body["gates"] = checks
    body["seconds"] = round(time.perf_counter() - started, 1)
    report(progress, "next-best-action", steps, steps)
    failures = [c for c in checks if c.startswith("FAIL")]
    return NBAResult(body, run_id, version, promoted, failures, model)


def _register(
    settings: Any,
    model: NBAModel,
    test: pd.DataFrame,
    features: list[str],
    evaluation: dict[str, Any],
    body: dict[str, Any],
    training: NBATraining,
    catalog: ActionCatalog,
) -> tuple[str, int | None, bool, list[str]]:
    import tempfile

    from propensity import registry

    champion_value = None
    if registry.champion_version(settings.tracking_uri, MODEL_NAME) is not None:
        champion = registry.load_estimator(settings.tracking_uri, MODEL_NAME)
        if set(champion.feature_names_) <= set(test.columns):
            again = evaluate_policy(
                champion, test.reset_index(drop=True), n_boot=0, seed=training.seed
            )
            champion_value = float(again["table"].loc["learned", "dr"])
    checks = _gates(evaluation, training, champion_value)
    passed = not any(c.startswith("FAIL") for c in checks)
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
        (out / "policy_report.json").write_text(json.dumps({**body, "gates": checks}, indent=2))
        logged = registry.log_run(
            settings.tracking_uri,
            MODEL_NAME,
            estimator=model,
            input_example=test[features].head(5),
            params=params,
            metrics=metrics,
            tags={
                "feature_service": "nba_v1",
                "git_commit": registry.git_commit(settings.root) or "none",
                "gates_passed": str(passed),
                "output": "uplift per action, columns " + ",".join(catalog.names),
            },
            artifacts_dir=out,
            register_as=MODEL_NAME,
            run_name=f"{MODEL_NAME}-{body['test_days'][-1] if body['test_days'] else 'all'}",
        )
    promoted = bool(passed and logged.version is not None)
    if promoted and logged.version is not None:
        registry.set_champion(settings.tracking_uri, MODEL_NAME, logged.version)
    elif logged.version is not None:
        failed = "; ".join(c for c in checks if c.startswith("FAIL"))
        registry.set_status(settings.tracking_uri, MODEL_NAME, logged.version, "rejected", failed)
    return logged.run_id, logged.version, promoted, checks
