"""Per-action uplift with LightGBM meta-learners (T-, X- and DR-learner).

All learners share one contract, close to scikit-learn's::

    learner.fit(X, treatment, y, propensity=None)   # returns self
    learner.predict_uplift(X)                       # (n_rows, n_actions) array
    learner.uplift_matrix(X_float64, num_threads=1) # the same, straight from the boosters

``treatment`` holds one action id per row, ``control`` marks the untreated
arm; the columns of :meth:`predict_uplift` follow ``learner.actions_`` (every
non-control action seen in ``fit``) and hold the estimated change in the
outcome (a probability for binary outcomes) had the row received that action
rather than control.

``propensity`` is the logged probability that the row got the action it got.
The X- and DR-learners also need the probability of the *other* arms, which a
log never records, so a multinomial logistic regression is always fitted;
logged values replace its estimate for the observed arm (they are exact for a
randomized campaign). Per-action Qini curves and AUUC with bootstrap
intervals live here too, since they score exactly these predictions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from propensity.models._compiled import StackedTrees, compile_stack, compile_trees
from propensity.models._lightgbm import estimator_predict

__all__ = [
    "TLearner",
    "XLearner",
    "DRLearner",
    "PropensityModel",
    "QiniResult",
    "qini_curve",
    "qini_score",
    "qini_auc_normalized",
    "LEARNERS",
]

_DEFAULT_PARAMS: dict[str, Any] = {
    # Uplift is a small difference of noisy outcomes: shallow, heavily regularized trees.
    "n_estimators": 100,
    "learning_rate": 0.05,
    "num_leaves": 7,
    "min_child_samples": 200,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "reg_lambda": 10.0,
    "verbose": -1,
}
_PROPENSITY_CLIP = 0.01


def _as_frame(X: Any) -> pd.DataFrame:
    frame = X if isinstance(X, pd.DataFrame) else pd.DataFrame(np.asarray(X))
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].astype("category")
        elif pd.api.types.is_bool_dtype(frame[column]):
            frame[column] = frame[column].astype(float)
    return frame


def _is_binary(y: np.ndarray) -> bool:
    return bool(np.isin(np.unique(y), [0, 1]).all())


def _check_inputs(
    X: pd.DataFrame, treatment: Any, y: Any, control: str
) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(treatment).astype(str)
    target = np.asarray(y, dtype=float)
    if len(t) != len(X) or len(target) != len(X):
        raise ValueError(
            f"X has {len(X)} rows but treatment has {len(t)} and y has {len(target)}: "
            "all three must describe the same rows"
        )
    bad = np.flatnonzero(~np.isfinite(target))
    if bad.size:
        raise ValueError(
            f"row {int(bad[0])}: outcome y is {target[bad[0]]!r}; outcomes must be finite"
        )
    if not (t == control).any():
        raise ValueError(f"treatment has no row with the control arm {control!r}; uplift needs one")
    return t, target


class PropensityModel(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression of the assigned arm on the features.

    A scikit-learn pipeline over the numeric columns: missing values imputed
    by the training median (0 for a column never observed), standardized,
    then a logistic regression. A campaign randomized without regard to
    features simply yields near-constant probabilities; with a single arm or
    no numeric column the arms' shares are returned.

    Examples
    --------
    >>> model = PropensityModel().fit(X, treatment)  # doctest: +SKIP
    >>> model.predict_proba(X).shape  # doctest: +SKIP
    (1000, 5)
    """

    def __init__(self, C: float = 1.0, max_iter: int = 500) -> None:
        self.C = C
        self.max_iter = max_iter

    def fit(self, X: Any, y: Any) -> PropensityModel:
        frame = _as_frame(X)
        self.columns_ = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        t = np.asarray(y).astype(str)
        if len(t) != len(frame):
            raise ValueError(f"X has {len(frame)} rows but the arms have {len(t)}")
        self.classes_ = np.unique(t)
        self.prior_ = np.array([(t == c).mean() for c in self.classes_])
        self.pipeline_: Pipeline | None = None
        if len(self.classes_) > 1 and self.columns_:
            self.pipeline_ = make_pipeline(
                SimpleImputer(strategy="median", keep_empty_features=True),
                StandardScaler(),
                LogisticRegression(C=self.C, max_iter=self.max_iter),
            ).fit(frame[self.columns_].to_numpy(np.float64), t)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probability of each arm in ``classes_`` order, shape (n_rows, n_arms)."""
        frame = _as_frame(X)
        if self.pipeline_ is None:
            return np.tile(self.prior_, (len(frame), 1))
        values = frame.reindex(columns=self.columns_).to_numpy(np.float64)
        return np.asarray(self.pipeline_.predict_proba(values), dtype=np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable arm of each row."""
        return np.asarray(self.classes_[self.predict_proba(X).argmax(axis=1)])

    def proba_matrix(self, X: np.ndarray) -> np.ndarray:
        """:meth:`predict_proba` of a float64 matrix already in ``columns_`` order.

        The fitted pipeline's parameters applied in numpy: scikit-learn's
        per-call validation of three steps costs more than the arithmetic
        on the one row ``/score`` needs. The links are the ones
        ``LogisticRegression.predict_proba`` applies (scipy's ``expit``,
        scikit-learn's ``softmax``; scipy's softmax costs ~10x more per row).
        Tested equal to ``predict_proba``.
        """
        if self.pipeline_ is None:
            return np.tile(self.prior_, (len(X), 1))
        linear = getattr(self, "_linear_", None)
        if linear is None:  # the fitted pipeline's numbers, read once
            imputer, scaler, logistic = (step for _, step in self.pipeline_.steps)
            linear = self._linear_ = (
                imputer.statistics_,
                scaler.mean_,
                scaler.scale_,
                np.ascontiguousarray(logistic.coef_.T),
                logistic.intercept_,
            )
        fill, mean, scale, coef, intercept = linear
        decision = ((np.where(np.isnan(X), fill, X) - mean) / scale) @ coef
        decision += intercept
        if decision.shape[1] == 1:  # binary: one logit
            p1 = expit(decision[:, 0])
            return np.column_stack([1.0 - p1, p1])
        # scikit-learn's softmax, the same operations without its array-namespace
        # dispatch (14 -> 5 µs a row; the results are bit-identical).
        decision -= decision.max(axis=1)[:, None]
        np.exp(decision, out=decision)
        decision /= decision.sum(axis=1)[:, None]
        return decision


#: ``predict(model) -> (n,)``: one fitted outcome or effect model's prediction on the rows.
_ModelPredict = Callable[[Any], np.ndarray]


class _MetaLearner(BaseEstimator):
    """Shared fitting plumbing: arms, propensities, LightGBM factories.

    Each learner writes its uplift formula once, in :meth:`_uplift`, over
    a function that predicts one fitted model on the rows: the scikit-learn
    wrappers on a DataFrame (:meth:`predict_uplift`) or the boosters on a
    float64 matrix (:meth:`uplift_matrix`, serving's path).
    """

    outcome_models_: dict[str, Any]

    def fit(self, X: Any, treatment: Any, y: Any, propensity: Any = None) -> _MetaLearner:
        raise NotImplementedError

    def _uplift(
        self, predict: _ModelPredict, proba: Callable[[], np.ndarray], actions: Sequence[str]
    ) -> np.ndarray:
        """Uplift of ``actions``, shape (n_rows, len(actions)); only their models are predicted."""
        raise NotImplementedError

    def _fitted_models(self) -> list[Any]:
        """Every model :meth:`_uplift` predicts."""
        raise NotImplementedError

    def __init__(
        self,
        control: str = "control",
        params: dict[str, Any] | None = None,
        random_state: int = 0,
        n_jobs: int = 1,
    ) -> None:
        self.control = control
        self.params = params
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _params(self) -> dict[str, Any]:
        merged = {**_DEFAULT_PARAMS, **(self.params or {})}
        merged.update(random_state=self.random_state, n_jobs=self.n_jobs)
        return merged

    def _outcome_model(self, X: pd.DataFrame, y: np.ndarray) -> Any:
        if self.binary_ and len(np.unique(y)) == 2:
            return lgb.LGBMClassifier(**self._params()).fit(X, y)
        return lgb.LGBMRegressor(**self._params()).fit(X, y)

    @staticmethod
    def _predict_outcome(model: Any, X: pd.DataFrame) -> np.ndarray:
        if isinstance(model, lgb.LGBMClassifier):
            proba = np.asarray(model.predict_proba(X))
            return proba[:, 1]
        return np.asarray(model.predict(X), dtype=float)

    def _setup(
        self, X: Any, treatment: Any, y: Any, propensity: Any
    ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
        frame = _as_frame(X)
        t, target = _check_inputs(frame, treatment, y, self.control)
        self.feature_names_ = list(frame.columns)
        self.binary_ = _is_binary(target)
        self.actions_ = [a for a in np.unique(t).tolist() if a != self.control]
        if not self.actions_:
            raise ValueError(
                "treatment only holds the control arm; no action to estimate uplift for"
            )
        self.arms_ = [self.control, *self.actions_]
        self.propensity_model_ = PropensityModel().fit(frame, t)
        proba = self.propensity_matrix(frame)
        if propensity is not None:
            logged = np.asarray(propensity, dtype=float)
            bad = np.flatnonzero(~((logged > 0) & (logged <= 1)))
            if bad.size:
                raise ValueError(
                    f"row {int(bad[0])}: propensity {logged[bad[0]]!r} must lie in (0, 1]"
                )
            rows = np.arange(len(t))
            proba[rows, [self.arms_.index(a) for a in t]] = logged
        return frame, t, target, np.clip(proba, _PROPENSITY_CLIP, 1.0)

    def _arm_order(self) -> list[int]:
        classes = list(self.propensity_model_.classes_)
        return [classes.index(a) for a in self.arms_]

    def propensity_matrix(self, X: Any) -> np.ndarray:
        """Estimated probability of each arm in ``arms_`` order (control first)."""
        return self.propensity_model_.predict_proba(X)[:, self._arm_order()]

    def _frame_for_predict(self, X: Any) -> pd.DataFrame:
        frame = _as_frame(X)
        missing = [c for c in self.feature_names_ if c not in frame.columns]
        if missing:
            raise ValueError(f"X lacks the feature columns {missing} seen in fit")
        return frame[self.feature_names_]

    def predict_outcomes(self, X: Any) -> np.ndarray:
        """Expected outcome under each arm in ``arms_`` order, shape (n_rows, n_arms)."""
        frame = self._frame_for_predict(X)
        return np.column_stack(
            [self._predict_outcome(self.outcome_models_[a], frame) for a in self.arms_]
        )

    def predict_uplift(self, X: Any) -> np.ndarray:
        """Uplift of every action in ``actions_`` order, shape (n_rows, n_actions)."""
        frame = self._frame_for_predict(X)
        return self._uplift(
            lambda model: self._predict_outcome(model, frame),
            lambda: self.propensity_matrix(frame),
            self.actions_,
        )

    def compile(
        self, cache_dir: str | Path | None = None, actions: Sequence[str] | None = None
    ) -> _MetaLearner:
        """Compile every booster :meth:`uplift_matrix` predicts to native code; returns ``self``.

        The boosters the uplift of ``actions`` (default: every action) needs
        are stacked into one library (one call per row or batch); the others
        keep LightGBM's predict (each booster is compiled on its own when
        stacking is impossible). Uplift equals the boosters' own (tested per
        learner); a booster that cannot be compiled keeps LightGBM's predict
        (logged once). Libraries are cached in ``cache_dir`` by the boosters' content.

        Examples
        --------
        >>> learner.compile("data/compiled").uplift_matrix(X[:1])  # doctest: +SKIP
        """
        self._build_predictor(cache_dir, compiled=True, actions=actions)
        return self

    def _models_for(self, actions: Sequence[str]) -> list[Any]:
        """The fitted models :meth:`_uplift` predicts for ``actions``, in the order it asks."""
        asked: list[Any] = []
        if not actions:
            return asked

        def record(model: Any) -> np.ndarray:
            if all(model is not m for m in asked):
                asked.append(model)
            return np.zeros(1)

        uniform = np.full((1, len(self.arms_)), 1.0 / len(self.arms_))
        self._uplift(record, lambda: uniform, actions)
        return asked

    def _build_predictor(
        self,
        cache_dir: str | Path | None = None,
        compiled: bool = False,
        actions: Sequence[str] | None = None,
    ) -> None:
        """The numpy predict path, built once after fit (as scikit-learn's HGB builds its own)."""
        models = self._fitted_models()
        native: list[Any] = [None] * len(models)
        self._stack_: StackedTrees | None = None
        self._stack_columns_: dict[int, int] = {}
        if compiled:
            # The boosters the actions need in one library: one input conversion and one
            # call per row or batch (next-best-action's row 116 -> 86 us, batch 26 -> 20 ms).
            stacked = self._models_for(self.actions_ if actions is None else actions)
            if stacked:
                self._stack_ = compile_stack([m.booster_ for m in stacked], cache_dir)
            if self._stack_ is not None:
                self._stack_columns_ = {id(m): k for k, m in enumerate(stacked)}
            # Without a stack, every booster on its own; with one, the others are never
            # asked for by the caller that chose the actions, and keep LightGBM's predict.
            rest = [] if self._stack_ is not None else list(range(len(models)))
            # Each compile is mostly a C compiler process: run them side by side.
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                boosters = [models[k].booster_ for k in rest]
                built = pool.map(lambda b: compile_trees(b, None, cache_dir), boosters)
                for k, library in zip(rest, built, strict=True):
                    native[k] = library
        self._predictors_ = {
            id(m): estimator_predict(m, c) for m, c in zip(models, native, strict=True)
        }
        own = self.propensity_model_.columns_
        # The propensity model reads the numeric columns, a subset of feature_names_.
        self._propensity_columns_ = np.array(
            [self.feature_names_.index(c) for c in own], dtype=np.intp
        )
        self._arm_order_ = np.array(self._arm_order(), dtype=np.intp)

    def uplift_matrix(
        self, X: np.ndarray, num_threads: int = 1, actions: Sequence[str] | None = None
    ) -> np.ndarray:
        """:meth:`predict_uplift` of a float64 matrix whose columns follow ``feature_names_``.

        One ``Booster.predict`` per model with ``num_threads`` LightGBM
        threads (0: all cores); one row takes the C API's single-row path.
        Compiled (:meth:`compile`), one call of the stacked library predicts
        every stacked model.
        Numeric features only (a categorical column has no float encoding).
        ``actions`` (default ``actions_``) limits the columns, and the models
        predicted, to those actions.

        Examples
        --------
        >>> learner.uplift_matrix(X[:1]).shape  # doctest: +SKIP
        (1, 4)
        """
        if getattr(self, "_predictors_", None) is None:
            self._build_predictor()
        data = np.asarray(X, dtype=np.float64)
        if data.ndim != 2 or data.shape[1] != len(self.feature_names_):
            raise ValueError(
                f"X has shape {data.shape}; expected (n, {len(self.feature_names_)}) "
                f"columns {self.feature_names_}"
            )
        predictors, stack, columns = self._predictors_, self._stack_, self._stack_columns_
        stacked: list[np.ndarray] = []  # the stack's outputs, predicted on first use

        def predict(model: Any) -> np.ndarray:
            k = columns.get(id(model))
            if k is None or stack is None:
                return np.asarray(predictors[id(model)](data, num_threads))
            if not stacked:
                stacked.append(stack.predict(data, num_threads))
            return np.asarray(stacked[0][:, k])

        return self._uplift(
            predict,
            lambda: self.propensity_model_.proba_matrix(data[:, self._propensity_columns_])[
                :, self._arm_order_
            ],
            self.actions_ if actions is None else actions,
        )

    def __getstate__(self) -> dict[str, Any]:
        # Predictors are keyed by the models' ids, which a pickle does not keep: rebuilt on use.
        state: dict[str, Any] = super().__getstate__()
        for name in ("_predictors_", "_stack_", "_stack_columns_"):
            state.pop(name, None)
        return state


class TLearner(_MetaLearner):
    """One outcome model per arm; uplift = mu_a(x) - mu_control(x).

    Examples
    --------
    >>> learner = TLearner().fit(X, treatment, y)  # doctest: +SKIP
    >>> learner.predict_uplift(X).shape  # doctest: +SKIP
    (1000, 4)
    """

    def fit(self, X: Any, treatment: Any, y: Any, propensity: Any = None) -> TLearner:
        frame, t, target, _ = self._setup(X, treatment, y, propensity)
        self.outcome_models_ = {
            a: self._outcome_model(frame[t == a], target[t == a]) for a in self.arms_
        }
        self._build_predictor()
        return self

    def _fitted_models(self) -> list[Any]:
        return list(self.outcome_models_.values())

    def _uplift(
        self, predict: _ModelPredict, proba: Callable[[], np.ndarray], actions: Sequence[str]
    ) -> np.ndarray:
        base = predict(self.outcome_models_[self.control])
        return np.column_stack([predict(self.outcome_models_[a]) - base for a in actions])


class XLearner(_MetaLearner):
    """Künzel et al.'s X-learner, one action against control at a time.

    Stage one fits outcome models per arm; stage two regresses the imputed
    effects (``y - mu_0(x)`` on treated rows, ``mu_a(x) - y`` on controls) and
    blends the two by the propensity of the action among {action, control}.

    Examples
    --------
    >>> XLearner().fit(X, treatment, y).predict_uplift(X)  # doctest: +SKIP
    """

    def fit(self, X: Any, treatment: Any, y: Any, propensity: Any = None) -> XLearner:
        frame, t, target, _ = self._setup(X, treatment, y, propensity)
        self.outcome_models_ = {
            a: self._outcome_model(frame[t == a], target[t == a]) for a in self.arms_
        }
        params = self._params()
        is_control = t == self.control
        self.effect_models_: dict[str, tuple[Any, Any]] = {}
        for action in self.actions_:
            treated = t == action
            mu0_treated = self._predict_outcome(self.outcome_models_[self.control], frame[treated])
            mua_control = self._predict_outcome(self.outcome_models_[action], frame[is_control])
            tau1 = lgb.LGBMRegressor(**params).fit(frame[treated], target[treated] - mu0_treated)
            tau0 = lgb.LGBMRegressor(**params).fit(
                frame[is_control], mua_control - target[is_control]
            )
            self.effect_models_[action] = (tau0, tau1)
        self._build_predictor()
        return self

    def _fitted_models(self) -> list[Any]:
        return [m for pair in self.effect_models_.values() for m in pair]

    def _uplift(
        self, predict: _ModelPredict, proba: Callable[[], np.ndarray], actions: Sequence[str]
    ) -> np.ndarray:
        p = proba()
        arm = p[:, [self.arms_.index(action) for action in actions]]
        # Weight toward the effect model trained on the larger (better estimated) arm.
        g = arm / np.clip(arm + p[:, :1], 1e-9, None)
        pairs = [self.effect_models_[action] for action in actions]
        tau0 = np.column_stack([predict(models[0]) for models in pairs])
        tau1 = np.column_stack([predict(models[1]) for models in pairs])
        return np.asarray(g * tau0 + (1 - g) * tau1)


class DRLearner(_MetaLearner):
    """Doubly robust learner (Kennedy): regress cross-fitted AIPW scores on X.

    Outcome models are cross-fitted over ``n_folds`` folds so a row's
    pseudo-outcome never uses a model that saw that row.

    Examples
    --------
    >>> DRLearner(n_folds=2).fit(X, treatment, y, propensity=p).predict_uplift(X)  # doctest: +SKIP
    """

    def __init__(
        self,
        control: str = "control",
        params: dict[str, Any] | None = None,
        random_state: int = 0,
        n_jobs: int = 1,
        n_folds: int = 2,
    ) -> None:
        super().__init__(control=control, params=params, random_state=random_state, n_jobs=n_jobs)
        self.n_folds = n_folds

    def fit(self, X: Any, treatment: Any, y: Any, propensity: Any = None) -> DRLearner:
        frame, t, target, proba = self._setup(X, treatment, y, propensity)
        mu = np.zeros((len(frame), len(self.arms_)))
        folds = KFold(self.n_folds, shuffle=True, random_state=self.random_state)
        for train, test in folds.split(frame):
            for j, arm in enumerate(self.arms_):
                rows = train[t[train] == arm]
                model = self._outcome_model(frame.iloc[rows], target[rows])
                mu[test, j] = self._predict_outcome(model, frame.iloc[test])
        # Full-data outcome models serve predict_outcomes (used for DR policy values).
        self.outcome_models_ = {
            a: self._outcome_model(frame[t == a], target[t == a]) for a in self.arms_
        }
        control_score = mu[:, 0] + (t == self.control) / proba[:, 0] * (target - mu[:, 0])
        self.effect_models_: dict[str, Any] = {}
        params = self._params()
        for j, action in enumerate(self.actions_, start=1):
            score = mu[:, j] + (t == action) / proba[:, j] * (target - mu[:, j]) - control_score
            self.effect_models_[action] = lgb.LGBMRegressor(**params).fit(frame, score)
        self._build_predictor()
        return self

    def _fitted_models(self) -> list[Any]:
        return list(self.effect_models_.values())

    def _uplift(
        self, predict: _ModelPredict, proba: Callable[[], np.ndarray], actions: Sequence[str]
    ) -> np.ndarray:
        return np.column_stack([predict(self.effect_models_[a]) for a in actions])


LEARNERS: dict[str, type[_MetaLearner]] = {"t": TLearner, "x": XLearner, "dr": DRLearner}


@dataclass(frozen=True)
class QiniResult:
    """A Qini curve and its summaries, with bootstrap intervals.

    ``fraction`` is the share of rows targeted (best-ranked first) and
    ``gain`` the incremental outcomes per row of the whole population
    gained by treating that share. ``qini`` is the mean gap between the curve
    and the random-targeting diagonal; ``auuc`` the mean height of the curve.
    """

    fraction: np.ndarray
    gain: np.ndarray
    qini: float
    qini_low: float
    qini_high: float
    auuc: float
    auuc_low: float
    auuc_high: float
    #: scikit-uplift's ``qini_auc_score`` (area over the diagonal relative to the perfect
    #: ranking's, unweighted, binary outcomes only; NaN otherwise).
    qini_normalized: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "qini_normalized": self.qini_normalized,
            "qini": self.qini,
            "qini_low": self.qini_low,
            "qini_high": self.qini_high,
            "auuc": self.auuc,
            "auuc_low": self.auuc_low,
            "auuc_high": self.auuc_high,
        }


def qini_curve(
    score: Any, treated: Any, y: Any, *, weight: Any = None, points: int = 101
) -> tuple[np.ndarray, np.ndarray]:
    """The Qini curve of an uplift ranking on treated-vs-control rows.

    Parameters
    ----------
    score : array-like
        Predicted uplift; rows with a higher score are targeted first.
    treated : array-like of bool
        True for rows that got the action, False for control rows.
    y : array-like
        The observed outcome.
    weight : array-like, optional
        Inverse-propensity weights when arms were not assigned uniformly.
    points : int
        Number of evenly spaced fractions at which the curve is returned.

    Returns
    -------
    fraction, gain : ndarray
        ``gain[k]`` = (treated outcomes − control outcomes × treated/control
        counts) among the top ``fraction[k]`` rows, divided by all rows.

    Examples
    --------
    >>> f, g = qini_curve([0.3, 0.1, 0.2, 0.0], [1, 0, 1, 0], [1, 0, 0, 0])
    >>> round(float(g[-1]), 3)
    0.25
    """
    s = np.asarray(score, dtype=float)
    tr = np.asarray(treated, dtype=bool)
    target = np.asarray(y, dtype=float)
    w = np.ones_like(target) if weight is None else np.asarray(weight, dtype=float)
    order = np.argsort(-s, kind="stable")
    tr, target, w = tr[order], target[order], w[order]
    n_t = np.cumsum(w * tr)
    n_c = np.cumsum(w * ~tr)
    y_t = np.cumsum(w * target * tr)
    y_c = np.cumsum(w * target * ~tr)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(n_c > 0, y_t - y_c * n_t / n_c, y_t)
    n = len(s)
    fraction = np.linspace(0, 1, points)
    # Tied scores have no order among themselves: the curve is read at the end of each
    # tie block and interpolated within it (as scikit-uplift does), never by row order.
    ends = np.r_[np.flatnonzero(np.diff(s[order])), n - 1] if n else np.array([], dtype=int)
    curve = np.interp(fraction * n, np.r_[0, ends + 1], np.r_[0.0, gain[ends]])
    return fraction, curve / max(w.sum(), 1e-12)


def _sklift_qini_curve(
    y: np.ndarray, score: np.ndarray, treated: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    # scikit-uplift 0.5.1's qini_curve: one point per distinct score, counts not shares.
    order = np.argsort(score, kind="mergesort")[::-1]
    y, treated, score = y[order], treated[order], score[order]
    thresholds = np.r_[np.where(np.diff(score))[0], score.size - 1]
    n_t = np.cumsum(treated, dtype=np.float64)[thresholds]
    y_t = np.cumsum(y * treated, dtype=np.float64)[thresholds]
    y_c = np.cumsum(y * (1 - treated), dtype=np.float64)[thresholds]
    n_all = (thresholds + 1).astype(np.float64)
    n_c = n_all - n_t
    ratio = np.divide(n_t, n_c, out=np.zeros_like(n_t), where=n_c != 0)
    curve = y_t - y_c * ratio
    if n_all.size == 0 or curve[0] != 0 or n_all[0] != 0:
        n_all, curve = np.r_[0.0, n_all], np.r_[0.0, curve]
    return n_all, curve


def qini_auc_normalized(score: Any, treated: Any, y: Any) -> float:
    """The Qini coefficient on scikit-uplift's scale (``sklift.metrics.qini_auc_score``).

    The area between the Qini curve and the random diagonal divided by that of
    the perfect ranking (treated responders first, control responders last:
    ``negative_effect=True``): 1 is a perfect ranking, 0 random. Rows are
    unweighted, so it reads as on a randomized campaign; binary outcomes only
    (NaN otherwise, or when one arm is absent). Implemented here, to the
    letter of scikit-uplift 0.5.1, because that package calls a scikit-learn
    helper scheduled for removal; the tests compare the two.

    Examples
    --------
    >>> qini_auc_normalized([0.9, 0.8, 0.2, 0.1], [1, 0, 1, 0], [1, 0, 0, 1])
    1.0
    """
    s = np.asarray(score, dtype=float)
    t = np.asarray(treated).astype(int)
    target = np.asarray(y, dtype=float)
    if not (_is_binary(target) and _is_binary(t.astype(float))) or len(np.unique(t)) < 2:
        return float("nan")
    x_actual, y_actual = _sklift_qini_curve(target, s, t)
    x_perfect, y_perfect = _sklift_qini_curve(target, target * t - target * (1 - t), t)
    baseline = 0.5 * x_perfect[-1] * y_perfect[-1]
    perfect = float(np.trapezoid(y_perfect, x_perfect)) - baseline
    if perfect == 0:
        return float("nan")
    return (float(np.trapezoid(y_actual, x_actual)) - baseline) / perfect


def _qini_summary(fraction: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    auuc = float(np.mean(gain))
    return float(np.mean(gain - fraction * gain[-1])), auuc


def qini_score(
    score: Any,
    treated: Any,
    y: Any,
    *,
    weight: Any = None,
    n_boot: int = 200,
    level: float = 0.9,
    random_state: int = 0,
) -> QiniResult:
    """Qini coefficient and AUUC of an uplift ranking, with bootstrap intervals.

    Examples
    --------
    >>> r = qini_score(uplift, treated, y, n_boot=100)  # doctest: +SKIP
    >>> r.qini > 0  # doctest: +SKIP
    True
    """
    s = np.asarray(score, dtype=float)
    tr = np.asarray(treated, dtype=bool)
    target = np.asarray(y, dtype=float)
    w = np.ones_like(target) if weight is None else np.asarray(weight, dtype=float)
    fraction, gain = qini_curve(s, tr, target, weight=w)
    qini, auuc = _qini_summary(fraction, gain)
    rng = np.random.default_rng(random_state)
    draws = np.empty((n_boot, 2))
    for b in range(n_boot):
        rows = rng.integers(0, len(s), len(s))
        f, g = qini_curve(s[rows], tr[rows], target[rows], weight=w[rows])
        draws[b] = _qini_summary(f, g)
    tail = (1 - level) / 2
    low = np.quantile(draws, tail, axis=0) if n_boot else np.array([np.nan, np.nan])
    high = np.quantile(draws, 1 - tail, axis=0) if n_boot else np.array([np.nan, np.nan])
    return QiniResult(
        fraction=fraction,
        gain=gain,
        qini=qini,
        qini_low=float(low[0]),
        qini_high=float(high[0]),
        auuc=auuc,
        auuc_low=float(low[1]),
        auuc_high=float(high[1]),
        qini_normalized=qini_auc_normalized(s, tr, target),
    )
