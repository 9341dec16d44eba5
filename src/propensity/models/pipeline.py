"""The shared LightGBM classifier: early stopping, class imbalance, calibration.

:class:`CalibratedBooster` is what every propensity model (churn, purchase) fits and
what serving loads: a LightGBM booster plus a probability calibrator, with fast
single-thread prediction and per-feature contributions for reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from propensity.models.spec import CalibrationMethod, LightGBMParams

__all__ = ["CalibratedBooster", "Calibrator", "as_matrix"]

_EPS = 1e-6


def as_matrix(X: pd.DataFrame | np.ndarray, feature_names: list[str]) -> np.ndarray:
    """Return ``X`` as a C-contiguous float64 matrix with columns in ``feature_names`` order.

    A DataFrame is reordered by column name (so column order never matters); a
    missing column is an error that names it.

    Examples
    --------
    >>> as_matrix(pd.DataFrame({"b": [1], "a": [2]}), ["a", "b"]).tolist()
    [[2.0, 1.0]]
    """
    if isinstance(X, pd.DataFrame):
        missing = [c for c in feature_names if c not in X.columns]
        if missing:
            raise ValueError(f"input lacks feature column(s) {missing}")
        return np.ascontiguousarray(X[feature_names].to_numpy(dtype=np.float64, na_value=np.nan))
    arr = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
    if arr.ndim != 2 or arr.shape[1] != len(feature_names):
        raise ValueError(f"input has shape {arr.shape}; expected (n, {len(feature_names)})")
    return arr


@dataclass
class Calibrator:
    """Maps raw LightGBM probabilities to calibrated ones (isotonic, sigmoid or identity)."""

    method: str
    model: Any = None

    def fit(self, raw: np.ndarray, y: np.ndarray) -> Calibrator:
        if self.method == "isotonic":
            self.model = IsotonicRegression(y_min=_EPS, y_max=1 - _EPS, out_of_bounds="clip")
            self.model.fit(raw, y)
        elif self.method == "sigmoid":
            # Platt scaling on the logit: monotone, two parameters, hard to overfit
            self.model = LogisticRegression(C=1e6)
            self.model.fit(_logit(raw)[:, None], y)
        return self

    def transform(self, raw: np.ndarray) -> np.ndarray:
        if self.method == "isotonic":
            return np.asarray(self.model.predict(raw), dtype=np.float64)
        if self.method == "sigmoid":
            coef = float(self.model.coef_[0, 0])
            intercept = float(self.model.intercept_[0])
            return 1.0 / (1.0 + np.exp(-(coef * _logit(raw) + intercept)))
        return raw


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _choose_calibration(raw: np.ndarray, y: np.ndarray, seed: int) -> tuple[str, dict[str, float]]:
    """Pick the calibration with the lowest two-fold cross-fitted validation log loss.

    Fitting and scoring a calibrator on the same rows would always favour isotonic,
    so each half is scored by a calibrator fitted on the other half.
    """
    rng = np.random.default_rng(seed)
    fold = rng.permutation(y.size) % 2
    losses: dict[str, float] = {}
    for method in ("none", "sigmoid", "isotonic"):
        pred = np.empty_like(raw)
        for k in (0, 1):
            fit_rows, score_rows = fold != k, fold == k
            if np.unique(y[fit_rows]).size < 2:
                pred[score_rows] = raw[score_rows]
                continue
            cal = Calibrator(method).fit(raw[fit_rows], y[fit_rows])
            pred[score_rows] = cal.transform(raw[score_rows])
        losses[method] = float(log_loss(y, np.clip(pred, _EPS, 1 - _EPS), labels=[0, 1]))
    return min(losses, key=lambda m: losses[m]), losses


class CalibratedBooster:
    """LightGBM binary classifier with early stopping and a fitted calibrator.

    Parameters
    ----------
    params : LightGBMParams, optional
        Hyper-parameters; ``class_weight="balanced"`` sets ``scale_pos_weight`` to
        negatives/positives of the training rows.
    early_stopping_rounds : int or None
        Stop when validation log loss has not improved for this many rounds;
        ``None`` fits all ``n_estimators`` trees.
    calibration : {"auto", "isotonic", "sigmoid", "none"}
        Fitted on the validation rows; ``auto`` picks the method with the lowest
        cross-fitted validation log loss.
    seed : int
        Seeds LightGBM's bagging and feature sampling and the calibration folds.

    Attributes
    ----------
    booster_ : lightgbm.Booster
    calibrator_ : Calibrator
    feature_names_ : list of str
    best_iteration_ : int
    calibration_ : str
        The calibration method used.
    calibration_losses_ : dict
        Cross-fitted validation log loss of each method (``auto`` only).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame({"x": rng.normal(size=400)})
    >>> y = (X["x"] + rng.normal(size=400) > 0).astype(int)
    >>> model = CalibratedBooster(LightGBMParams(n_estimators=20))
    >>> model = model.fit(X[:300], y[:300], X[300:], y[300:])
    >>> model.predict_proba(X[:2]).shape
    (2, 2)
    """

    def __init__(
        self,
        params: LightGBMParams | None = None,
        early_stopping_rounds: int | None = 50,
        calibration: CalibrationMethod = "auto",
        seed: int = 42,
    ) -> None:
        self.params = params
        self.early_stopping_rounds = early_stopping_rounds
        self.calibration = calibration
        self.seed = seed

    def _lgb_params(self, y: np.ndarray) -> dict[str, Any]:
        p = self.params or LightGBMParams()
        out: dict[str, Any] = {
            "objective": "binary",
            "metric": "binary_logloss",
            "num_leaves": p.num_leaves,
            "learning_rate": p.learning_rate,
            "min_child_samples": p.min_child_samples,
            "bagging_fraction": p.subsample,
            "bagging_freq": p.subsample_freq,
            "feature_fraction": p.colsample_bytree,
            "lambda_l2": p.reg_lambda,
            "max_bin": p.max_bin,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        if p.num_threads:
            out["num_threads"] = p.num_threads
        if p.class_weight == "balanced":
            pos = float(y.sum())
            out["scale_pos_weight"] = (y.size - pos) / pos if pos else 1.0
        return out

    def fit(
        self,
        X: pd.DataFrame,
        y: np.ndarray | pd.Series,
        X_val: pd.DataFrame,
        y_val: np.ndarray | pd.Series,
    ) -> CalibratedBooster:
        """Fit the booster on ``X, y``, early-stop and calibrate on ``X_val, y_val``."""
        self.feature_names_ = [str(c) for c in X.columns]
        y_arr = np.asarray(y, dtype=np.float64)
        y_val_arr = np.asarray(y_val, dtype=np.float64)
        for name, arr in (("training", y_arr), ("validation", y_val_arr)):
            if np.unique(arr).size < 2:
                raise ValueError(f"the {name} labels hold a single class; cannot fit a classifier")
        params = self._lgb_params(y_arr)
        train_set = lgb.Dataset(
            as_matrix(X, self.feature_names_),
            y_arr,
            feature_name=self.feature_names_,
            free_raw_data=True,
        )
        # weigh validation positives like training ones so early stopping watches the
        # same (re-weighted) log loss the booster minimizes; calibration undoes the weights
        val_weight = np.where(y_val_arr == 1, params.get("scale_pos_weight", 1.0), 1.0)
        val_set = lgb.Dataset(
            as_matrix(X_val, self.feature_names_), y_val_arr, weight=val_weight, reference=train_set
        )
        n_rounds = (self.params or LightGBMParams()).n_estimators
        self.booster_ = lgb.train(
            params,
            train_set,
            num_boost_round=n_rounds,
            valid_sets=[val_set],
            valid_names=["validation"],
            callbacks=(
                [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
                if self.early_stopping_rounds
                else []
            ),
        )
        self.best_iteration_ = int(self.booster_.best_iteration or n_rounds)
        raw_val = self._raw(as_matrix(X_val, self.feature_names_))
        method: str = self.calibration
        self.calibration_losses_: dict[str, float] = {}
        if method == "auto":
            method, self.calibration_losses_ = _choose_calibration(raw_val, y_val_arr, self.seed)
        self.calibration_ = method
        self.calibrator_ = Calibrator(method).fit(raw_val, y_val_arr)
        return self

    def _raw(self, X: np.ndarray, num_threads: int = 0) -> np.ndarray:
        kwargs: dict[str, Any] = {"num_threads": num_threads} if num_threads else {}
        return np.asarray(self.booster_.predict(X, num_iteration=self.best_iteration_, **kwargs))

    def predict_proba(self, X: pd.DataFrame | np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Calibrated class probabilities, shape ``(n, 2)`` (column 1 is P(y=1)).

        ``num_threads=1`` is the fast path for single-row online scoring.
        """
        p1 = self.predict(X, num_threads=num_threads)
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X: pd.DataFrame | np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Calibrated P(y=1), shape ``(n,)``, clipped to [0, 1]."""
        raw = self._raw(as_matrix(X, self.feature_names_), num_threads)
        return np.clip(self.calibrator_.transform(raw), 0.0, 1.0)

    def contributions(self, X: pd.DataFrame | np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Per-feature contributions to the raw log-odds (TreeSHAP), shape ``(n, n_features + 1)``.

        The last column is the expected value (bias); rows sum to the uncalibrated logit.
        """
        kwargs: dict[str, Any] = {"num_threads": num_threads} if num_threads else {}
        return np.asarray(
            self.booster_.predict(
                as_matrix(X, self.feature_names_),
                num_iteration=self.best_iteration_,
                pred_contrib=True,
                **kwargs,
            )
        )

    def feature_importance(self) -> pd.Series:
        """Total gain per feature, largest first."""
        gain = self.booster_.feature_importance(
            importance_type="gain", iteration=self.best_iteration_
        )
        return pd.Series(gain, index=self.feature_names_, name="gain").sort_values(ascending=False)
