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

from propensity.models.arbitration import ActionCatalog, choose, load_catalog
from propensity.models.nba_report import evaluate_policy, plots, report_json
from propensity.models.spec import NBATraining
from propensity.models.uplift import LEARNERS

__all__ = [
    "MODEL_NAME",
    "OUTCOMES",
    "NBAModel",
    "TabularResult",
    "fit_tabular",
]

MODEL_NAME = "next_best_action"
OUTCOMES = ("purchase", "retention")


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

    def compile(self, cache_dir: str | Path | None = None) -> NBAModel:
        """Compile every learner's boosters to native code (:meth:`uplift_matrix`'s path).

        Examples
        --------
        >>> model.compile("data/compiled").uplift_matrix(X[:1])  # doctest: +SKIP
        """
        for learner in self.learners_.values():
            learner.compile(cache_dir)
        return self

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
