"""Next-best-action for serving: the registered uplift model plus catalog arbitration.

Adapts the registered ``next_best_action`` object to the scorer's
:class:`~propensity.serving.scorer.NBAPolicy` interface, and nothing more:
uplift comes from the model's own numpy path
(:meth:`propensity.models.nba.NBAModel.uplift_matrix`) and every decision
from the arbitration kernel (:func:`propensity.models.arbitration.arbitrate`),
with contact counts read from the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from propensity.models.arbitration import (
    ActionCatalog,
    Arbitration,
    ArbitrationPlan,
    ContactState,
    arbitrate,
    catalog_features,
    load_catalog,
)
from propensity.serving.scorer import MULTI_THREAD_ROWS, predict_rows

__all__ = ["ArbitrationPolicy", "MatrixUpliftModel", "UpliftModel", "catalog_features"]


class UpliftModel(Protocol):
    """A fitted uplift model: its features, its catalog and uplift per action as a frame."""

    feature_names_: list[str]
    catalog: ActionCatalog

    def action_uplift(self, X: pd.DataFrame) -> pd.DataFrame: ...


@runtime_checkable
class MatrixUpliftModel(UpliftModel, Protocol):
    """An uplift model with a numpy path (:meth:`propensity.models.nba.NBAModel.uplift_matrix`).

    Runtime-checkable: the policy takes the numpy path only for a model that has one.
    """

    def uplift_matrix(self, X: np.ndarray, num_threads: int = 1) -> np.ndarray: ...


class ArbitrationPolicy:
    """Uplift per action and arbitration for a batch of feature rows.

    Parameters
    ----------
    model : UpliftModel
        Fitted uplift model; one with ``uplift_matrix`` (a
        :class:`MatrixUpliftModel`) is served through numpy, others through
        ``action_uplift``.
    version : str
        Registered version.
    catalog : ActionCatalog or path, optional
        Defaults to the catalog the model carries (``catalog``).

    Examples
    --------
    >>> policy = ArbitrationPolicy(nba_model, "2")  # doctest: +SKIP
    >>> policy.decide(["C0000001"], X)[0]["action"]  # doctest: +SKIP
    'discount'
    """

    def __init__(
        self, model: UpliftModel, version: str, catalog: ActionCatalog | str | Path | None = None
    ) -> None:
        self.model = model
        self.version = str(version)
        if catalog is None:
            catalog = model.catalog
        self.catalog = catalog if isinstance(catalog, ActionCatalog) else load_catalog(catalog)
        model_features = [str(c) for c in model.feature_names_]
        self.feature_names: list[str] = list(
            dict.fromkeys(model_features + catalog_features(self.catalog))
        )
        self._position = {name: j for j, name in enumerate(self.feature_names)}
        # Prepared once per loaded model: per call, only the arithmetic is left.
        self._plan = ArbitrationPlan.of(self.catalog)
        self._catalog_columns = [
            (name, self._position[name]) for name in catalog_features(self.catalog)
        ]
        self._model_columns = np.array([self._position[c] for c in model_features], dtype=np.intp)
        # A model fitted for another catalog orders its uplift otherwise: use its frame path.
        self._matrix_model = (
            model
            if isinstance(model, MatrixUpliftModel) and model.catalog.names == self.catalog.names
            else None
        )

    def uplift(self, X: np.ndarray) -> np.ndarray:
        """Uplift of each catalog action, shape ``(n, n_actions)``, catalog order."""
        if self._matrix_model is not None:
            threads = 0 if len(X) >= MULTI_THREAD_ROWS else 1
            X_model = np.ascontiguousarray(X[:, self._model_columns])
            return predict_rows(self._matrix_model.uplift_matrix, X_model, threads)
        frame = pd.DataFrame(X, columns=self.feature_names)
        return np.asarray(self.model.action_uplift(frame)[self.catalog.names].to_numpy(np.float64))

    def _arbitrate(
        self,
        customer_ids: Sequence[str],
        X: np.ndarray,
        reasons: bool,
        offered: Sequence[str] | None = None,
        must_pay: bool = True,
        holdout: bool = True,
    ) -> Arbitration:
        columns = {name: X[:, j] for name, j in self._catalog_columns}
        return arbitrate(
            self.uplift(X),
            columns,
            [str(c) for c in customer_ids],
            self._plan,
            contacts=ContactState.from_features(columns, self.catalog.contact_policy),
            reasons=reasons,
            offered=offered,
            must_pay=must_pay,
            holdout=holdout,
        )

    def decide(
        self,
        customer_ids: Sequence[str],
        X: np.ndarray,
        offered: Sequence[str] | None = None,
        must_pay: bool = True,
        holdout: bool = True,
    ) -> list[dict[str, Any]]:
        """Arbitrated action, value, reason, hold-out flag and ranked alternatives per row.

        ``offered`` limits the choice to those catalog actions, ``must_pay=False``
        takes the best eligible one whatever its value and ``holdout=False``
        leaves the catalog's hold-out to the caller (see :func:`arbitrate`).
        """
        if len(customer_ids) == 0:
            return []
        result = self._arbitrate(
            customer_ids, X, True, offered=offered, must_pay=must_pay, holdout=holdout
        )
        return result.decisions()

    def best_actions(
        self, customer_ids: Sequence[str], X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Only the arbitrated action and its expected value per row (bulk scoring).

        Returns
        -------
        actions : ndarray of object
        expected_values : ndarray of float64
        """
        if len(customer_ids) == 0:
            return np.zeros(0, dtype=object), np.zeros(0)
        result = self._arbitrate(customer_ids, X, reasons=False)
        return result.action, result.expected_value
