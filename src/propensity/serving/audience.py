"""Bulk scoring of every customer from the latest offline snapshot, and audiences.

Campaign audiences ("the 5,000 customers most likely to churn whose best
action is a discount") are answered from one vectorized pass over the
latest feature snapshot, never from per-customer online calls: LightGBM
predicts all rows at once on every core, the table is cached per (model
versions, snapshot), and each audience is a mask, a sort and a slice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from propensity.config import Settings
from propensity.models.arbitration import COMPARISONS
from propensity.pipeline.dataset import latest_snapshot
from propensity.progress import ProgressCallback, report
from propensity.serving.schemas import AudienceRequest, canonical_field
from propensity.serving.scorer import ModelBundle, NBAPolicy, Scorer

__all__ = ["latest_snapshot", "score_frame", "snapshot_scores", "select_audience"]

_NBA_CHUNK = 200_000


def score_frame(
    frame: pd.DataFrame,
    churn: ModelBundle,
    purchase: ModelBundle,
    policy: NBAPolicy | None = None,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Score every row of a feature frame with all models, vectorized.

    Returns
    -------
    DataFrame
        ``customer_id``, ``churn``, ``purchase_propensity``, ``action`` and
        ``expected_value`` (``action`` is null without a policy).

    Examples
    --------
    >>> scores = score_frame(frame, churn_bundle, purchase_bundle, policy)  # doctest: +SKIP
    """
    ids = frame["customer_id"].astype(str).to_numpy()
    out = pd.DataFrame({"customer_id": ids})
    for column, bundle in (("churn", churn), ("purchase_propensity", purchase)):
        X = np.ascontiguousarray(frame[bundle.feature_names].to_numpy(np.float64))
        out[column] = np.clip(bundle.with_threads(0).predict_proba(X), 0.0, 1.0)
        report(progress, "bulk scoring", 1 if column == "churn" else 2, 3)
    actions = np.full(len(frame), None, dtype=object)
    values = np.full(len(frame), np.nan)
    if policy is not None:
        X = np.ascontiguousarray(frame[policy.feature_names].to_numpy(np.float64))
        # Bulk needs only the action and its value (no reasons or alternatives),
        # chunked to bound memory.
        for lo in range(0, len(frame), _NBA_CHUNK):
            hi = min(lo + _NBA_CHUNK, len(frame))
            actions[lo:hi], values[lo:hi] = policy.best_actions(ids[lo:hi].tolist(), X[lo:hi])
    out["action"] = actions
    out["expected_value"] = values
    report(progress, "bulk scoring", 3, 3)
    return out


def _scorer_features(scorer: Scorer) -> list[str]:
    names = scorer.churn.feature_names + scorer.purchase.feature_names
    if scorer.policy is not None:
        names = names + scorer.policy.feature_names
    return list(dict.fromkeys(names))


def snapshot_scores(
    settings: Settings, scorer: Scorer, cache: dict[tuple[Any, ...], Any] | None = None
) -> dict[str, Any]:
    """Bulk scores of the latest snapshot, cached per (model versions, snapshot).

    Returns
    -------
    dict
        ``table`` (from :func:`score_frame`), ``snapshot`` (ISO time) and
        ``model_versions``.
    """
    features_dir = settings.path(settings.features_dir)
    # The snapshot's identity without reading it: the tables' modification times.
    stamps = []
    for path in sorted(features_dir.glob("*.parquet")):
        stamps.append((path.name, path.stat().st_mtime_ns))
    key = (tuple(sorted(scorer.versions.items())), tuple(stamps))
    if cache is not None and key in cache:
        return cache[key]
    snapshot, frame = latest_snapshot(settings, _scorer_features(scorer))
    table = score_frame(frame, scorer.churn, scorer.purchase, scorer.policy)
    result = {"table": table, "snapshot": snapshot.isoformat(), "model_versions": scorer.versions}
    if cache is not None:
        cache.clear()  # one snapshot at a time: older tables are never asked for again
        cache[key] = result
    return result


#: Column of the bulk score table (:func:`score_frame`) behind each audience field.
_COLUMN = {
    "churn_probability": "churn",
    "purchase_propensity": "purchase_propensity",
    "next_best_action.expected_value": "expected_value",
    "next_best_action.action": "action",
}


def select_audience(scores: Mapping[str, Any], request: AudienceRequest) -> dict[str, Any]:
    """Top-``k`` customers of a bulk score table by one score, among those passing the filters.

    Fields are named as ``/score`` names them (``churn_probability``,
    ``next_best_action.action``...); a request that uses a deprecated name
    (:data:`~propensity.serving.schemas.DEPRECATED_FIELDS`) gets the old
    member fields as well.

    Examples
    --------
    >>> rule = {"field": "churn_probability", "op": ">=", "value": 0.6}
    >>> req = AudienceRequest(score="churn_probability", k=10, filters=[rule])
    >>> select_audience(snapshot_scores(settings, scorer), req)["matched"]  # doctest: +SKIP
    123
    """
    table: pd.DataFrame = scores["table"]
    mask = np.ones(len(table), dtype=bool)
    for k, rule in enumerate(request.filters):
        name = canonical_field(rule.field)
        column = table[_COLUMN[name]]
        if name == "next_best_action.action":
            if rule.op not in ("==", "!="):
                raise ValueError(
                    f"filters[{k}]: field {rule.field!r} supports == and !=, not {rule.op!r}"
                )
            value: Any = str(rule.value)
        else:
            if isinstance(rule.value, str):
                raise ValueError(
                    f"filters[{k}]: field {rule.field!r} needs a number, got {rule.value!r}"
                )
            value = float(rule.value)
        mask &= (
            np.asarray(COMPARISONS[rule.op](column, value), dtype=bool) & column.notna().to_numpy()
        )
    selected = table.loc[mask]
    ranked = selected.sort_values(
        [_COLUMN[canonical_field(request.score)], "customer_id"],
        ascending=[False, True],
        kind="stable",
        na_position="last",
    ).head(request.k)
    legacy = bool(request.deprecated_names())
    members = []
    for cid, churn, purchase, action, value in zip(
        ranked["customer_id"],
        ranked["churn"],
        ranked["purchase_propensity"],
        ranked["action"],
        ranked["expected_value"],
        strict=True,
    ):
        expected = None if value != value else float(value)  # NaN is unequal to itself
        member: dict[str, Any] = {
            "customer_id": cid,
            "churn_probability": float(churn),
            "purchase_propensity": float(purchase),
            "next_best_action": (
                None if action is None else {"action": action, "expected_value": expected}
            ),
        }
        if legacy:
            member.update(churn=float(churn), action=action, expected_value=expected)
        members.append(member)
    return {
        "snapshot": scores["snapshot"],
        "model_versions": scores["model_versions"],
        "matched": int(mask.sum()),
        "customers": members,
    }
