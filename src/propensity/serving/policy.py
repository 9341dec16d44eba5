"""Next-best-action for serving: the registered uplift model plus catalog arbitration.

Adapts the registered ``next_best_action`` object (anything with
``action_uplift(DataFrame) -> DataFrame``, e.g. ``propensity.models.nba.NBAModel``)
to the scorer's :class:`~propensity.serving.scorer.NBAPolicy` interface.
Uplift comes from the compiled boosters (:mod:`propensity.serving.uplift`)
and arbitration follows :func:`propensity.models.arbitration.choose`
vectorized over the batch; ``decide_frame`` keeps the reference path, and
the tests hold the two equal row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from propensity.models.arbitration import (
    COMPARISONS,
    NO_ACTION,
    ActionCatalog,
    Condition,
    decide,
    in_holdout,
    load_catalog,
)
from propensity.serving.scorer import MULTI_THREAD_ROWS, predict_rows
from propensity.serving.uplift import compile_uplift

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


def _holds(rule: Condition, column: np.ndarray) -> np.ndarray:
    """:meth:`Condition.holds` on a float64 column, without building a Series for numbers."""
    if (
        rule.op in COMPARISONS
        and isinstance(rule.value, (int, float))
        and not isinstance(rule.value, bool)
    ):
        return np.asarray(COMPARISONS[rule.op](column, float(rule.value)), dtype=bool) & ~np.isnan(
            column
        )
    return np.asarray(rule.holds(pd.Series(column)), dtype=bool)


class ArbitrationPolicy:
    """Uplift per action, eligibility, contact policy and arbitration for a batch.

    The uplift comes from :func:`propensity.serving.uplift.compile_uplift`
    (raw boosters, one thread for small batches) when the model compiles,
    else from the model's ``action_uplift``. Arbitration is
    :func:`propensity.models.arbitration.choose` with contact counts read
    from features, vectorized over the batch: the same actions, values,
    reasons and ranked alternatives (the tests compare the two on every
    row), at a fraction of the cost of its per-row loop.

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
        position = {name: j for j, name in enumerate(self.feature_names)}
        self._model_columns = np.array([position[c] for c in model_features], dtype=np.intp)
        self._position = position
        self.compiled = compile_uplift(model)
        if self.compiled is not None and self.compiled.actions != self.catalog.names:
            self.compiled = None  # the model was fitted for another catalog: use its own path
        names = self.catalog.names
        self._names = names
        self._values = self.catalog.values(names)
        self._costs = self.catalog.costs(names)
        self._specs = [self.catalog.actions[a] for a in names]
        self._rule_fail = [
            [
                (
                    rule,
                    position[rule.feature],
                    f"ineligible: {rule.describe()} fails ({rule.feature}=",
                )
                for rule in spec.eligibility
            ]
            for spec in self._specs
        ]

    def decide_frame(self, customer_ids: Sequence[str], X: np.ndarray) -> pd.DataFrame:
        """The reference arbitration table (:func:`propensity.models.arbitration.decide`)."""
        frame = pd.DataFrame(X, columns=self.feature_names)
        frame.insert(0, "customer_id", [str(c) for c in customer_ids])
        return decide(frame, self.model, self.catalog)

    def uplift(self, X: np.ndarray) -> np.ndarray:
        """Uplift of each catalog action, shape ``(n, n_actions)``, catalog order."""
        if self.compiled is not None:
            threads = 0 if len(X) >= MULTI_THREAD_ROWS else 1
            X_model = np.ascontiguousarray(X[:, self._model_columns])
            return predict_rows(self.compiled.action_uplift, X_model, threads)
        frame = pd.DataFrame(X, columns=self.feature_names)
        return np.asarray(self.model.action_uplift(frame)[self._names].to_numpy(np.float64))

    def _blocked(self, X: np.ndarray, reasons: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Eligibility mask and the first blocking reason per (row, action), as ``eligibility``.

        With ``reasons=False`` (bulk scoring) only the mask is computed.
        """
        n, k = len(X), len(self._names)
        policy = self.catalog.contact_policy
        ok = np.ones((n, k), dtype=bool)
        why = np.full((n, k) if reasons else (0, k), "", dtype=object)
        c7 = X[:, self._position[policy.contacts_7d_feature]]
        c7 = np.where(np.isnan(c7), 0.0, c7)
        c30 = X[:, self._position[policy.contacts_30d_feature]]
        c30 = np.where(np.isnan(c30), 0.0, c30)
        since = X[:, self._position[policy.days_since_last_feature]]
        since = np.where(np.isnan(since), np.inf, since)
        # Without an exposure history no per-action cooldown can run (days since = inf).
        contact_rules = [
            (c7 >= policy.max_contacts_7d, lambda i: (
                f"contact cap: {c7[i]:g} contacts in 7 days >= max {policy.max_contacts_7d}"
            )),
            (c30 >= policy.max_contacts_30d, lambda i: (
                f"contact cap: {c30[i]:g} contacts in 30 days >= max {policy.max_contacts_30d}"
            )),
            (since < policy.cooldown_days, lambda i: (
                f"cooldown: last contact {since[i]:.1f} days ago < {policy.cooldown_days}"
            )),
        ]  # fmt: skip
        for mask, text in contact_rules:
            fresh = mask & ok[:, 0]  # the contact policy blocks every action alike
            if reasons:
                for i in np.flatnonzero(fresh):
                    why[i, :] = text(i)
            ok[fresh, :] = False
        for a, rules in enumerate(self._rule_fail):
            for rule, j, prefix in rules:
                column = X[:, j]
                fails = ~_holds(rule, column) & ok[:, a]
                if reasons:
                    for i in np.flatnonzero(fails):
                        why[i, a] = f"{prefix}{column[i].item()})"
                ok[fails, a] = False
        return ok, why

    def decide(self, customer_ids: Sequence[str], X: np.ndarray) -> list[dict[str, Any]]:
        """Arbitrated action, value, reason, hold-out flag and ranked alternatives per row."""
        ids = [str(c) for c in customer_ids]
        n = len(ids)
        if n == 0:
            return []
        up = self.uplift(X)
        values = up * self._values[None, :] - self._costs[None, :]
        ok, why = self._blocked(X)
        masked = np.where(ok, values, -np.inf)
        best = masked.argmax(axis=1)
        best_value = masked[np.arange(n), best]
        held = in_holdout(ids, self.catalog.holdout_share, self.catalog.holdout_salt)
        # choose() ranks eligible actions by value, then the ineligible in catalog order.
        ranks = np.argsort(np.where(ok, -values, np.inf), axis=1, kind="stable")
        names = self._names
        share = self.catalog.holdout_share
        held_reason = f"hold-out: customer in the {share:.0%} untreated measurement group"
        # The fixed parts of each action's "eligible" reason, formatted once per batch.
        texts = [
            ("eligible; uplift ", f" x value {spec.value:g} - cost {spec.cost:g} = ")
            for spec in self._specs
        ]
        # Python lists: indexing them per (row, action) is several times cheaper than numpy.
        rows = zip(
            ok.tolist(),
            up.tolist(),
            values.tolist(),
            why.tolist(),
            ranks.tolist(),
            best.tolist(),
            best_value.tolist(),
            held.tolist(),
            strict=True,
        )
        out = []
        for ok_i, up_i, val_i, why_i, rank_i, best_i, best_value_i, held_i in rows:
            alts: list[dict[str, Any]] = []
            for j in rank_i:
                if ok_i[j]:
                    head, middle = texts[j]
                    alts.append(
                        {
                            "action": names[j],
                            "expected_value": val_i[j],
                            "eligible": True,
                            "reason": f"{head}{up_i[j]:.3f}{middle}{val_i[j]:.2f}",
                        }
                    )
                else:
                    alts.append(
                        {
                            "action": names[j],
                            "expected_value": None,
                            "eligible": False,
                            "reason": why_i[j],
                        }
                    )
            if held_i:
                action, expected, reason = NO_ACTION, 0.0, held_reason
            elif best_value_i > 0:
                action, expected, reason = names[best_i], best_value_i, alts[0]["reason"]
            elif alts[0]["eligible"]:
                action, expected = NO_ACTION, 0.0
                reason = "no eligible action pays: best " + alts[0]["reason"].removeprefix(
                    "eligible; "
                )
            else:
                action, expected = NO_ACTION, 0.0
                reason = "no eligible action: " + "; ".join(a["reason"] for a in alts)
            out.append(
                {
                    "action": action,
                    "expected_value": expected,
                    "reason": reason,
                    "holdout": held_i,
                    "alternatives": alts,
                }
            )
        return out

    def best_actions(
        self, customer_ids: Sequence[str], X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Only the arbitrated action and its expected value per row (bulk scoring).

        Returns
        -------
        actions : ndarray of object
        expected_values : ndarray of float64
        """
        n = len(customer_ids)
        if n == 0:
            return np.zeros(0, dtype=object), np.zeros(0)
        values = self.uplift(X) * self._values[None, :] - self._costs[None, :]
        ok, _ = self._blocked(X, reasons=False)
        masked = np.where(ok, values, -np.inf)
        best = masked.argmax(axis=1)
        best_value = masked[np.arange(n), best]
        held = in_holdout(list(customer_ids), self.catalog.holdout_share, self.catalog.holdout_salt)
        act = (best_value > 0) & ~held
        actions = np.where(act, np.asarray(self._names, dtype=object)[best], NO_ACTION)
        return actions.astype(object), np.where(act, best_value, 0.0)
