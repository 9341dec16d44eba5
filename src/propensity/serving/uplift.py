"""Uplift per action from raw LightGBM boosters: the next-best-action model's serving path.

:meth:`propensity.models.nba.NBAModel.action_uplift` goes through pandas and
the scikit-learn wrappers of every outcome and effect model, on all cores:
tens of milliseconds for one customer, more than the whole ``/score``
budget. :func:`compile_uplift` reads the fitted pieces once (each model's
``booster_``, the propensity model's medians, scaler and logistic
coefficients) and :class:`CompiledUplift` evaluates the same formulas on a
float64 matrix: one ``Booster.predict`` per needed model with a chosen
thread count, the rest numpy.

Only the learners it knows (T, X and DR of :mod:`propensity.models.uplift`)
are compiled; anything else returns ``None`` and the caller keeps the
model's own ``action_uplift``. The tests compare both paths on real fitted
models, so a change to a learner's formula shows up as a failing test, not
as silently different actions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np

from propensity.serving.single_row import SingleRowPredictor

__all__ = ["CompiledUplift", "compile_uplift"]

_Predict = Callable[[np.ndarray, int], np.ndarray]


def _booster_predict(model: Any, columns: np.ndarray | None) -> _Predict:
    """``predict_proba[:, 1]`` of a binary LGBMClassifier or ``predict`` of a regressor."""
    if not isinstance(model, (lgb.LGBMClassifier, lgb.LGBMRegressor)):
        raise TypeError(f"cannot compile a {type(model).__name__}")
    if isinstance(model, lgb.LGBMClassifier) and len(model.classes_) != 2:
        raise TypeError("cannot compile a multi-class outcome model")
    booster: lgb.Booster = model.booster_
    one_row = SingleRowPredictor(booster)

    def predict(X: np.ndarray, num_threads: int) -> np.ndarray:
        data = X if columns is None else X[:, columns]
        if len(data) == 1 and num_threads == 1:
            return one_row(data[0])
        # For a binary objective Booster.predict already returns P(y=1), as predict_proba[:, 1].
        return np.asarray(booster.predict(data, num_threads=num_threads), dtype=np.float64)

    return predict


class _Propensity:
    """:meth:`propensity.models.uplift.PropensityModel.predict_proba` in numpy."""

    def __init__(self, model: Any, feature_names: list[str], arms: list[str]) -> None:
        position = {name: j for j, name in enumerate(feature_names)}
        classes = [str(c) for c in model.classes_]
        self._order = np.array([classes.index(a) for a in arms], dtype=np.intp)
        self._prior: np.ndarray | None = None
        if model.model_ is None:
            self._prior = np.asarray(model.prior_, dtype=np.float64)[self._order]
            return
        missing = [c for c in model.columns_ if c not in position]
        if missing:
            raise TypeError(f"propensity model reads columns {missing} the uplift model lacks")
        self._columns = np.array([position[c] for c in model.columns_], dtype=np.intp)
        medians = model.medians_.reindex(model.columns_).to_numpy(np.float64)
        self._fill = np.where(np.isnan(medians), 0.0, medians)
        scaler = model.scaler_
        self._mean = np.asarray(scaler.mean_ if scaler.with_mean else 0.0, dtype=np.float64)
        self._scale = np.asarray(scaler.scale_ if scaler.with_std else 1.0, dtype=np.float64)
        lr = model.model_
        self._coef = np.asarray(lr.coef_, dtype=np.float64).T
        self._intercept = np.asarray(lr.intercept_, dtype=np.float64)
        multi = getattr(lr, "multi_class", "auto")
        self._ovr = multi == "ovr" or getattr(lr, "solver", "lbfgs") == "liblinear"

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self._prior is not None:
            return np.tile(self._prior, (len(X), 1))
        values = X[:, self._columns]
        values = np.where(np.isnan(values), self._fill, values)
        decision = ((values - self._mean) / self._scale) @ self._coef + self._intercept
        if decision.shape[1] == 1:  # binary: sigmoid of one logit
            p1 = 1.0 / (1.0 + np.exp(-decision[:, 0]))
            proba = np.column_stack([1.0 - p1, p1])
        elif self._ovr:
            expit = 1.0 / (1.0 + np.exp(-decision))
            proba = expit / expit.sum(axis=1, keepdims=True)
        else:
            shifted = np.exp(decision - decision.max(axis=1, keepdims=True))
            proba = shifted / shifted.sum(axis=1, keepdims=True)
        return proba[:, self._order]


def _compile_learner(learner: Any, feature_names: list[str], actions: list[str]) -> Any:
    """``fn(X, num_threads) -> (n, len(actions))`` uplift of ``actions`` for one learner."""
    from propensity.models.uplift import DRLearner, TLearner, XLearner

    position = {name: j for j, name in enumerate(feature_names)}
    own = [str(c) for c in learner.feature_names_]
    missing = [c for c in own if c not in position]
    if missing:
        raise TypeError(f"learner reads columns {missing} the model lacks")
    columns = np.array([position[c] for c in own], dtype=np.intp)
    identity = own == feature_names
    cols = None if identity else columns
    kind = type(learner)
    if kind is TLearner:
        control = _booster_predict(learner.outcome_models_[learner.control], cols)
        treated = [_booster_predict(learner.outcome_models_[a], cols) for a in actions]

        def t_uplift(X: np.ndarray, num_threads: int) -> np.ndarray:
            base = control(X, num_threads)
            return np.column_stack([f(X, num_threads) - base for f in treated])

        return t_uplift
    if kind is XLearner:
        propensity = _Propensity(learner.propensity_model_, own, list(learner.arms_))
        arm_index = [list(learner.arms_).index(a) for a in actions]
        pairs = [
            (_booster_predict(tau0, cols), _booster_predict(tau1, cols))
            for tau0, tau1 in (learner.effect_models_[a] for a in actions)
        ]

        def x_uplift(X: np.ndarray, num_threads: int) -> np.ndarray:
            proba = propensity(X if identity else X[:, columns])
            out = []
            for j, (tau0, tau1) in zip(arm_index, pairs, strict=True):
                g = proba[:, j] / np.clip(proba[:, j] + proba[:, 0], 1e-9, None)
                out.append(g * tau0(X, num_threads) + (1 - g) * tau1(X, num_threads))
            return np.column_stack(out)

        return x_uplift
    if kind is DRLearner:
        effects = [_booster_predict(learner.effect_models_[a], cols) for a in actions]

        def dr_uplift(X: np.ndarray, num_threads: int) -> np.ndarray:
            return np.column_stack([f(X, num_threads) for f in effects])

        return dr_uplift
    raise TypeError(f"cannot compile a {kind.__name__}")


class CompiledUplift:
    """Uplift of each catalog action on its own outcome, from a float64 matrix.

    Build it with :func:`compile_uplift`. Columns of ``X`` are the model's
    ``feature_names_``; the output's columns follow ``actions``.
    """

    def __init__(self, actions: list[str], parts: list[tuple[Any, np.ndarray]]) -> None:
        self.actions = actions
        self._parts = parts  # per learner: its function and the output columns it fills

    def action_uplift(self, X: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """Uplift, shape ``(n, len(actions))``; ``num_threads`` per LightGBM call (0: all cores).

        Examples
        --------
        >>> compiled = compile_uplift(nba_model)  # doctest: +SKIP
        >>> compiled.action_uplift(X[:1]).shape  # doctest: +SKIP
        (1, 4)
        """
        out = np.empty((len(X), len(self.actions)), dtype=np.float64)
        for fn, where in self._parts:
            out[:, where] = fn(X, num_threads)
        return out


def compile_uplift(model: Any) -> CompiledUplift | None:
    """Compile a fitted :class:`propensity.models.nba.NBAModel`; ``None`` when it cannot.

    Examples
    --------
    >>> compiled = compile_uplift(nba_model)  # doctest: +SKIP
    >>> np.allclose(compiled.action_uplift(X), nba_model.action_uplift(frame))  # doctest: +SKIP
    True
    """
    catalog = getattr(model, "catalog", None)
    learners = getattr(model, "learners_", None)
    names = getattr(model, "feature_names_", None)
    if catalog is None or not isinstance(learners, dict) or names is None:
        return None
    feature_names = [str(c) for c in names]
    actions = list(catalog.names)
    by_outcome: dict[str, list[int]] = {}
    for j, action in enumerate(actions):
        by_outcome.setdefault(catalog.actions[action].outcome, []).append(j)
    parts = []
    try:
        for outcome, where in by_outcome.items():
            learner = learners[outcome]
            fn = _compile_learner(learner, feature_names, [actions[j] for j in where])
            parts.append((fn, np.array(where, dtype=np.intp)))
    except (TypeError, KeyError, AttributeError, ValueError):
        return None
    return CompiledUplift(actions, parts)
