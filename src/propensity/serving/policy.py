"""Next-best-action for serving: the registered uplift model plus catalog arbitration.

Adapts the registered ``next_best_action`` object (anything with
``action_uplift(DataFrame) -> DataFrame``, e.g. ``propensity.models.nba.NBAModel``)
to the scorer's :class:`~propensity.serving.scorer.NBAPolicy` interface, using
:func:`propensity.models.arbitration.decide` so online and bulk decisions
are the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from propensity.models.arbitration import ActionCatalog, decide, load_catalog

__all__ = ["ArbitrationPolicy", "catalog_features"]


def catalog_features(catalog: ActionCatalog) -> list[str]:
    """Feature columns the catalog's eligibility rules and contact policy read.

    Examples
    --------
    >>> catalog_features(load_catalog("models/actions.yaml"))[:2]  # doctest: +SKIP
    ['exposures_7d', 'exposures_30d']
    """
    policy = catalog.contact_policy
    names = [
        policy.contacts_7d_feature,
        policy.contacts_30d_feature,
        policy.days_since_last_feature,
    ]
    for spec in catalog.actions.values():
        names += [rule.feature for rule in spec.eligibility]
    return list(dict.fromkeys(names))


def _catalog_of(model: Any, catalog: ActionCatalog | str | Path | None) -> ActionCatalog:
    if isinstance(catalog, ActionCatalog):
        return catalog
    if catalog is not None:
        return load_catalog(catalog)
    for attr in ("catalog_", "catalog"):
        found = getattr(model, attr, None)
        if isinstance(found, ActionCatalog):
            return found
    raise ValueError("the next-best-action model carries no action catalog; pass one")


class ArbitrationPolicy:
    """Uplift per action, eligibility, contact policy and arbitration for a batch.

    Parameters
    ----------
    model : object
        Fitted uplift model with ``action_uplift(features) -> DataFrame`` and
        ``feature_names_``.
    version : str
        Registered version.
    catalog : ActionCatalog or path, optional
        Defaults to the catalog the model carries (``catalog_``).

    Examples
    --------
    >>> policy = ArbitrationPolicy(nba_model, "2")  # doctest: +SKIP
    >>> policy.decide(["C0000001"], X)[0]["action"]  # doctest: +SKIP
    'discount'
    """

    def __init__(
        self, model: Any, version: str, catalog: ActionCatalog | str | Path | None = None
    ) -> None:
        self.model = model
        self.version = str(version)
        self.catalog = _catalog_of(model, catalog)
        model_features = [str(c) for c in getattr(model, "feature_names_", [])]
        self.feature_names: list[str] = list(
            dict.fromkeys(model_features + catalog_features(self.catalog))
        )

    def decide_frame(self, customer_ids: Sequence[str], X: np.ndarray) -> pd.DataFrame:
        """The arbitration table (see :func:`propensity.models.arbitration.choose`)."""
        frame = pd.DataFrame(X, columns=self.feature_names)
        frame.insert(0, "customer_id", [str(c) for c in customer_ids])
        return decide(frame, self.model, self.catalog)

    def decide(self, customer_ids: Sequence[str], X: np.ndarray) -> list[dict[str, Any]]:
        table = self.decide_frame(customer_ids, X)
        return [
            {
                "action": action,
                "expected_value": float(value),
                "reason": reason,
                "holdout": bool(held),
                "alternatives": alternatives,
            }
            for action, value, reason, held, alternatives in zip(
                table["action"],
                table["expected_value"],
                table["reason"],
                table["holdout"],
                table["alternatives"],
                strict=True,
            )
        ]
