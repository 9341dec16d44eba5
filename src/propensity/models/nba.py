"""Next-best-action estimator: per-action uplift for every outcome the catalog targets.

:class:`NBAModel` holds one meta-learner per outcome (:mod:`propensity.models.uplift`)
and arbitrates with its catalog. :func:`fit_tabular` fits, evaluates and exports it
from a user's randomized campaign table. Training from the event lake (exposures →
features at exposure time → fit → policy evaluation → MLflow) is
:func:`propensity.pipeline.nba.train_nba`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from propensity.models.arbitration import ActionCatalog, arbitrate, choose, load_catalog
from propensity.models.leakage import post_treatment_columns
from propensity.models.nba_report import evaluate_policy, plots, report_json
from propensity.models.policy import bootstrap_mean, incremental_scores, policy_matrix
from propensity.models.spec import NBATraining
from propensity.models.uplift import LEARNERS

__all__ = [
    "MODEL_NAME",
    "OUTCOMES",
    "HeterogeneityGate",
    "NBAModel",
    "TabularResult",
    "fit_tabular",
]

MODEL_NAME = "next_best_action"
OUTCOMES = ("purchase", "retention")
#: A campaign table without a given ``training`` falls back to its best arm unless
#: per-row uplifts beat it at this confidence.
TABULAR_GATE_LEVEL = 0.9


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
    gate_level : float or None
        Confidence of the heterogeneity gate: ``fit`` first cross-fits the learners
        over ``gate_folds`` folds and keeps per-row uplifts only if the
        learned policy, scored out of fold, beats the best single action with
        this confidence (doubly robust values, paired bootstrap); otherwise every
        row gets each action's average effect, so arbitration falls back to the
        best single action. ``None`` keeps per-row uplifts unconditionally.
    gate_folds : int
        Folds of the gate's cross-fitting.

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
        gate_level: float | None = None,
        gate_folds: int = 2,
    ) -> None:
        self.catalog = catalog
        self.learner = learner
        self.params = params
        self.random_state = random_state
        self.gate_level = gate_level
        self.gate_folds = gate_folds

    def fit(
        self, X: pd.DataFrame, treatment: Any, outcomes: Mapping[str, Any], propensity: Any = None
    ) -> NBAModel:
        self.gate_ = (
            None
            if self.gate_level is None
            else _heterogeneity_gate(self, X, treatment, outcomes, propensity)
        )
        self._fit_learners(X, treatment, outcomes, propensity)
        self.average_uplift_ = None
        if self.gate_ is not None and not self.gate_.passed:
            self.average_uplift_ = self._average_uplift(X, treatment, outcomes, propensity)
        return self

    def _fit_learners(
        self, X: pd.DataFrame, treatment: Any, outcomes: Mapping[str, Any], propensity: Any
    ) -> None:
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

    learners_: dict[str, Any]
    gate_: HeterogeneityGate | None
    average_uplift_: np.ndarray | None

    def _dr_scores(
        self, X: pd.DataFrame, treatment: Any, outcomes: Mapping[str, Any], propensity: Any
    ) -> np.ndarray:
        """Doubly robust incremental value of every action per row (catalog order)."""
        t = np.asarray(treatment).astype(str)
        estimated = self.propensity(X, t)
        p = estimated if propensity is None else np.asarray(propensity, dtype=float)
        observed = np.column_stack(
            [
                np.asarray(outcomes[s.outcome], dtype=float) * s.value
                for s in self.catalog.actions.values()
            ]
        )
        mu_a, mu_c = self.valued_outcomes(X)
        return incremental_scores(
            t,
            p,
            self.catalog.names,
            observed,
            self.catalog.costs(),
            control=self.catalog.control,
            mu_action=mu_a,
            mu_control=mu_c,
        )

    def _average_uplift(
        self, X: pd.DataFrame, treatment: Any, outcomes: Mapping[str, Any], propensity: Any
    ) -> np.ndarray:
        # The AIPW mean: each action's average effect, robust to the outcome models' bias.
        scores = self._dr_scores(X, treatment, outcomes, propensity).mean(axis=0)
        return (scores + self.catalog.costs()) / self.catalog.values()

    def _uplift_of(self, per_row: np.ndarray) -> np.ndarray:
        # A failed gate: every row gets the average effects (the best single action wins).
        # Models pickled before the gate existed have no such attribute.
        average = getattr(self, "average_uplift_", None)
        if average is None:
            return per_row
        return np.broadcast_to(average, per_row.shape).copy()

    def compile(self, cache_dir: str | Path | None = None) -> NBAModel:
        """Compile every learner's boosters to native code (:meth:`uplift_matrix`'s path).

        Examples
        --------
        >>> model.compile("data/compiled").uplift_matrix(X[:1])  # doctest: +SKIP
        """
        # Each learner stacks the boosters of the actions that target its outcome.
        targeted = {o: actions for o, (actions, _) in self._by_outcome().items()}
        for outcome, learner in self.learners_.items():
            learner.compile(cache_dir, targeted.get(outcome, []))
        return self

    def _columns(self, outcome: str) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.learners_[outcome].actions_)}

    def action_uplift(self, X: pd.DataFrame) -> pd.DataFrame:
        """Uplift of each catalog action on its own outcome, one column per action."""
        frame = X[self.feature_names_]
        cache = {o: learner.predict_uplift(frame) for o, learner in self.learners_.items()}
        per_row = np.column_stack(
            [
                cache[spec.outcome][:, self._columns(spec.outcome)[a]]
                for a, spec in self.catalog.actions.items()
            ]
        )
        return pd.DataFrame(self._uplift_of(per_row), index=X.index, columns=self.catalog.names)

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
        return self._uplift_of(out)

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


# -- heterogeneity gate ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeterogeneityGate:
    """Did per-row uplifts beat the best single action on held-back rows?

    ``diff`` is the learned policy's doubly robust value minus the best single
    action's (per row), ``low``/``high`` its paired bootstrap interval at ``level``.
    """

    passed: bool
    best_single: str
    diff: float
    low: float
    high: float
    level: float
    n_rows: int

    def describe(self) -> str:
        verdict = "per-row uplifts kept" if self.passed else "fell back to average effects"
        return (
            f"heterogeneity gate: learned - {self.best_single} = {self.diff:+.4f} "
            f"[{self.low:+.4f}, {self.high:+.4f}] ({self.level:.0%}) on {self.n_rows} "
            f"cross-fitted rows: {verdict}"
        )


def _heterogeneity_gate(
    model: NBAModel, X: pd.DataFrame, treatment: Any, outcomes: Mapping[str, Any], propensity: Any
) -> HeterogeneityGate:
    """Cross-fit the learners, compare the learned policy with each single action out of fold.

    Every row is scored by learners fitted on the other folds (so all rows
    count, and none is judged by a model that saw it). Significance is
    one-sided: the lower bound of the paired bootstrap interval of (learned −
    best single) at ``gate_level`` two-sided confidence must be above zero.
    The best single action is chosen on the same rows, which favours it: a
    gate that is passed is passed against the strongest simple alternative.
    """
    level = float(model.gate_level or 0.9)
    t = np.asarray(treatment).astype(str)
    logged = None if propensity is None else np.asarray(propensity, dtype=float)
    values = {o: np.asarray(v) for o, v in outcomes.items()}
    folds = StratifiedKFold(model.gate_folds, shuffle=True, random_state=model.random_state)
    scores = np.zeros((len(X), len(model.catalog.names)))
    uplift = np.zeros_like(scores)
    for fit_rows, held in folds.split(np.zeros(len(t)), t):
        part = NBAModel(model.catalog, model.learner, model.params, model.random_state)
        part._fit_learners(
            X.iloc[fit_rows],
            t[fit_rows],
            {o: v[fit_rows] for o, v in values.items()},
            None if logged is None else logged[fit_rows],
        )
        X_held = X.iloc[held]
        scores[held] = part._dr_scores(
            X_held,
            t[held],
            {o: v[held] for o, v in values.items()},
            None if logged is None else logged[held],
        )
        uplift[held] = part.action_uplift(X_held).to_numpy(float)
    names = model.catalog.names
    learned = arbitrate(
        uplift,
        X,
        [],
        model.catalog,
        contacts=None,
        holdout=False,
        reasons=False,
    )
    chosen = policy_matrix(learned.action, names)
    single = learned.eligible.astype(float)
    contrib = np.column_stack([(chosen * scores).sum(axis=1), single * scores])
    best = int(np.argmax(contrib[:, 1:].mean(axis=0)))
    # Doing nothing is a single policy too: compare with whichever of the two is better.
    if contrib[:, 1 + best].mean() < 0:
        diff, label = contrib[:, 0], "no_action"
    else:
        diff, label = contrib[:, 0] - contrib[:, 1 + best], f"all_{names[best]}"
    mean, low, high = bootstrap_mean(diff, n_boot=300, level=level, random_state=model.random_state)
    return HeterogeneityGate(
        passed=bool(low[0] > 0),
        best_single=label,
        diff=float(mean[0]),
        low=float(low[0]),
        high=float(high[0]),
        level=level,
        n_rows=len(X),
    )


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


def _tabular_features(
    path: Path,
    columns: list[str],
    reserved: list[str | None],
    feature_cols: list[str] | None,
    exclude_cols: list[str] | None,
) -> list[str]:
    for label, names in (("--features", feature_cols), ("--exclude", exclude_cols)):
        unknown = [c for c in names or [] if c not in columns]
        if unknown:
            raise ValueError(f"{path}: {label} names no column {unknown}; columns are {columns}")
    clash = [c for c in feature_cols or [] if c in reserved]
    if clash:
        raise ValueError(
            f"{path}: --features {clash} also serve as the treatment, outcome, propensity or id"
        )
    chosen = feature_cols or [c for c in columns if c not in reserved]
    features = [c for c in chosen if c not in set(exclude_cols or [])]
    if not features:
        raise ValueError(f"{path}: no feature column left after --features/--exclude")
    return features


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
    exclude_cols: list[str] | None = None,
    catalog: ActionCatalog | str | Path | None = None,
    value: float = 1.0,
    cost: float = 0.0,
    training: NBATraining | None = None,
    truth: pd.DataFrame | None = None,
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
    exclude_cols : list of str, optional
        Columns left out of the features (the campaign's own outcomes, say).
        Features that look post-treatment (:func:`~.leakage.post_treatment_columns`)
        are kept but named in the report's ``warnings``.
    catalog : ActionCatalog or path, optional
        Costs, values and eligibility per action. Without it every non-control
        arm gets ``value`` and ``cost`` and no rules.
    training : NBATraining, optional
        Defaults to :class:`NBATraining` with the heterogeneity gate on
        (``gate_level=TABULAR_GATE_LEVEL``).
    truth : DataFrame, optional
        Row-aligned true outcome probabilities ``p_purchase_<arm>`` (simulated
        tables): adds the oracle policy and true values to the report.

    Returns
    -------
    TabularResult

    Examples
    --------
    >>> result = fit_tabular("campaign.csv", "arm", "bought", out_dir="out",
    ...                      value=40, cost=2)  # doctest: +SKIP
    >>> result.report["policies"]["learned"]["dr"]  # doctest: +SKIP
    """
    settings = training or NBATraining(gate_level=TABULAR_GATE_LEVEL)
    path = Path(table_path)
    frame = _read_table(path)
    for column in [treatment_col, outcome_col, propensity_col, id_col]:
        if column is not None and column not in frame.columns:
            raise ValueError(f"{path}: no column {column!r}; columns are {list(frame.columns)}")
    missing_outcome = frame[outcome_col].isna().to_numpy()
    if missing_outcome.any():
        row = int(np.flatnonzero(missing_outcome)[0])
        raise ValueError(f"{path}: row {row}: outcome column {outcome_col!r} is empty")
    found = sorted(set(frame[treatment_col].astype(str)))
    if control not in found:
        raise ValueError(
            f"{path}: no row of column {treatment_col!r} has the control arm {control!r}; "
            f"arms found: {found} (name the control arm with --control)"
        )
    arms = [a for a in found if a != control]
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
    reserved = [treatment_col, outcome_col, propensity_col, id_col]
    features = _tabular_features(path, list(frame.columns), reserved, feature_cols, exclude_cols)
    leaks = post_treatment_columns(frame, features, treatment_col, outcome_col)
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
    model = NBAModel(
        catalog,
        settings.learner,
        settings.params,
        settings.seed,
        gate_level=settings.gate_level,
        gate_folds=settings.gate_folds,
    )
    model.fit(
        train[features],
        train["action"],
        {o: train[o] for o in OUTCOMES},
        propensity=train["propensity"] if propensity_col else None,
    )
    evaluation = evaluate_policy(
        model,
        test,
        truth=None if truth is None else truth[~is_train].reset_index(drop=True),
        n_boot=settings.n_boot,
        seed=settings.seed,
        contact_policy=False,
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
            "arms": {
                arm: {"rows": int(len(rows)), "outcome_mean": float(rows.mean())}
                for arm, rows in pd.Series(y).groupby(log["action"].to_numpy())
            },
            "control": control,
            "warnings": [leak.describe() for leak in leaks],
        },
    )
    report_path = out / "report.json"
    report_path.write_text(json.dumps(body, indent=2))
    plots(evaluation, out)
    return TabularResult(body, model_path, decisions_path, report_path, decisions, model)
