"""Baselines every propensity model must beat, trained and evaluated in the same run.

* :class:`LogisticBaseline`: logistic regression on the same features (median
  imputation with missing-value indicators, standard scaling).
* :class:`RecencyRule`: a one-feature rule that ranks by days since the last activity
  (churn) or last purchase (purchase); no fitting beyond the fill value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted

from propensity.models.pipeline import fit_matrix, predict_matrix

__all__ = ["LogisticBaseline", "RecencyRule"]


class LogisticBaseline(ClassifierMixin, BaseEstimator):
    """Logistic regression on the model's features.

    Parameters
    ----------
    C : float
        Inverse L2 regularization strength.
    max_iter : int
        Solver iterations.
    seed : int
        Seed of the solver (only matters for ties).

    Attributes
    ----------
    pipeline_ : sklearn.pipeline.Pipeline
    classes_ : ndarray
    n_iter_ : ndarray
        The solver's iterations (as ``LogisticRegression.n_iter_``).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when fitted on a DataFrame with string column names.

    Examples
    --------
    >>> X = pd.DataFrame({"x": [0.0, 1.0, 2.0, np.nan, 4.0, 5.0]})
    >>> model = LogisticBaseline().fit(X, [0, 0, 0, 1, 1, 1])
    >>> model.predict_proba(X).shape
    (6, 2)
    >>> model.predict(X).tolist()
    [0, 0, 0, 1, 1, 1]
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, seed: int = 42) -> None:
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def fit(
        self,
        X: pd.DataFrame | np.ndarray,
        y: np.ndarray | pd.Series,
        sample_weight: np.ndarray | pd.Series | None = None,
    ) -> LogisticBaseline:
        """Fit imputation, scaling and the regression on ``X, y`` (weighted rows, optionally)."""
        matrix = fit_matrix(self, X)
        # a feature that is NaN everywhere carries nothing; keep_empty_features keeps shapes stable
        self.pipeline_: Pipeline = make_pipeline(
            SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            StandardScaler(),
            LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed),
        )
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.pipeline_.fit(matrix, np.asarray(y), logisticregression__sample_weight=weight)
        self.classes_ = self.pipeline_.classes_
        self.n_iter_ = self.pipeline_[-1].n_iter_
        return self

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # imputed, with an indicator column
        return tags

    def predict_proba(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)`` (column 1 is P(y=1) for 0/1 labels)."""
        check_is_fitted(self)
        return np.asarray(self.pipeline_.predict_proba(predict_matrix(self, X)), dtype=np.float64)

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """The most probable class label of each row."""
        proba = self.predict_proba(X)
        return np.asarray(self.classes_[proba.argmax(axis=1)])


class RecencyRule(BaseEstimator):
    """Rank customers by days since their last activity.

    A scikit-learn estimator for ``get_params``/``clone``, but not a classifier:
    ``predict`` is a ranking score, not a probability, read from one named column.

    Parameters
    ----------
    column : str
        The days-since column (``days_since_last`` of the entity frame).
    higher_is_positive : bool
        ``True`` for churn (long silence = likely churn), ``False`` for purchase
        (recent buyers buy again).

    Attributes
    ----------
    fill_value_ : float
        Used for rows that never had the activity: one day more than the longest
        silence seen in training, i.e. "the most silent of all".

    Examples
    --------
    >>> X = pd.DataFrame({"days_since_last": [1.0, 20.0, np.nan]})
    >>> RecencyRule(higher_is_positive=True).fit(X).predict(X).tolist()
    [1.0, 20.0, 21.0]
    """

    def __init__(self, column: str = "days_since_last", higher_is_positive: bool = True) -> None:
        self.column = column
        self.higher_is_positive = higher_is_positive

    def fit(self, X: pd.DataFrame, y: object = None) -> RecencyRule:
        """Learn the fill value for never-active rows."""
        values = pd.to_numeric(X[self.column], errors="raise").astype("float64")
        self.fill_value_ = (
            float(np.nanmax(values.to_numpy())) + 1.0 if values.notna().any() else 0.0
        )
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """A ranking score (not a probability): higher = more likely positive."""
        days = X[self.column].astype("float64").fillna(self.fill_value_).to_numpy()
        return days if self.higher_is_positive else -days
