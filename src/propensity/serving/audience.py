"""Bulk scoring of every customer from the latest offline snapshot, and audiences.

Campaign audiences ("the 5,000 customers most likely to churn whose best
action is a discount") are answered from one vectorized pass over the
latest feature snapshot, never from per-customer online calls: LightGBM
predicts all rows at once on every core, the table is cached per (model
versions, snapshot), and each audience is a mask, a sort and a slice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.config import Settings
from propensity.models.arbitration import COMPARISONS
from propensity.progress import ProgressCallback, report
from propensity.serving.champions import ModelSource, RegistrySource, load_champions
from propensity.serving.schemas import AudienceRequest, canonical_field
from propensity.serving.scorer import NBA, ModelBundle, NBAPolicy, Scorer

__all__ = ["latest_snapshot", "score_frame", "snapshot_scores", "select_audience", "score_all"]

_NBA_CHUNK = 200_000


def latest_snapshot(
    settings: Settings, feature_names: list[str]
) -> tuple[pd.Timestamp, pd.DataFrame]:
    """Features of every customer at the latest snapshot in the offline feature tables.

    On-demand features are computed as offline training computes them (the
    request time is the snapshot time).

    Returns
    -------
    snapshot : Timestamp
    frame : DataFrame
        ``customer_id`` then ``feature_names`` (float64), one row per customer.

    Examples
    --------
    >>> when, frame = latest_snapshot(settings, ["sessions_7d"])  # doctest: +SKIP
    """
    from propensity.features.definitions import FEATURES, request_features
    from propensity.features.snapshots import TIMESTAMP, feature_table_path

    view_of = {f.name: f.view for f in FEATURES}
    wanted = list(feature_names)
    needs_last = "days_since_last_seen" in wanted
    base = [n for n in wanted if n != "days_since_last_seen"]
    if needs_last and "last_event_epoch" not in base:
        base.append("last_event_epoch")
    unknown = [n for n in base if n not in view_of]
    if unknown:
        raise ValueError(f"features {unknown} are not defined in the feature registry")
    features_dir = settings.path(settings.features_dir)
    by_view: dict[str, list[str]] = {}
    for name in base:
        by_view.setdefault(view_of[name], []).append(name)
    latest = None
    tables = {}
    for view, names in by_view.items():
        path = feature_table_path(features_dir, view)
        if not path.exists():
            raise LookupError(f"feature table missing: {path}; build features first")
        table = pq.read_table(path, columns=["customer_id", TIMESTAMP, *names])
        tables[view] = table
        top = pc.max(table[TIMESTAMP]).as_py()
        latest = top if latest is None or (top is not None and top > latest) else latest
    if latest is None:
        raise LookupError(f"the feature tables under {features_dir} are empty")
    frame: pd.DataFrame | None = None
    for table in tables.values():
        rows = table.filter(pc.equal(table[TIMESTAMP], pa.scalar(latest, table[TIMESTAMP].type)))
        part = rows.drop_columns([TIMESTAMP]).to_pandas()
        frame = part if frame is None else frame.merge(part, on="customer_id", how="outer")
    assert frame is not None
    snapshot = pd.Timestamp(latest)
    snapshot = snapshot.tz_localize("UTC") if snapshot.tzinfo is None else snapshot
    if needs_last:
        seconds = snapshot.timestamp()
        last = frame["last_event_epoch"].to_numpy(np.float64)
        values = request_features(
            {"request_time": [seconds] * len(frame), "last_event_epoch": last.tolist()}
        )
        frame["days_since_last_seen"] = np.array(values["days_since_last_seen"], dtype=np.float64)
    out = frame[["customer_id", *wanted]].copy()
    out[wanted] = out[wanted].astype(np.float64)
    return snapshot, out.sort_values("customer_id", kind="stable").reset_index(drop=True)


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


def score_all(
    settings: Settings,
    out: str | Path,
    progress: ProgressCallback | None = None,
    *,
    source: ModelSource | None = None,
) -> dict[str, Any]:
    """Score every customer of the latest snapshot with the champions; write Parquet.

    The file holds ``customer_id``, ``churn``, ``purchase_propensity``,
    ``action``, ``expected_value``; its metadata records the snapshot and the
    model versions.

    Parameters
    ----------
    settings : Settings
    out : path
        Output Parquet file.
    progress : callable, optional
    source : ModelSource, optional
        Where the champions come from; default the project's MLflow registry.

    Returns
    -------
    dict
        ``rows``, ``snapshot``, ``model_versions``, ``seconds`` and ``path``.

    Examples
    --------
    >>> score_all(load_settings(), "data/scores.parquet")["rows"]  # doctest: +SKIP
    20000
    """
    began = time.perf_counter()
    champions = load_champions(source or RegistrySource(settings.tracking_uri))
    snapshot, frame = latest_snapshot(settings, champions.feature_names)
    report(progress, "bulk scoring", 0, 3)
    table = score_frame(frame, champions.churn, champions.purchase, champions.policy, progress)
    versions = {name: str(v) for name, v in champions.versions.items() if v is not None}
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = {
        b"snapshot": snapshot.isoformat().encode(),
        b"model_versions": repr(sorted(versions.items())).encode(),
    }
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **meta})
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(arrow, tmp)
    tmp.replace(path)
    return {
        "rows": len(table),
        "snapshot": snapshot.isoformat(),
        "model_versions": versions,
        "seconds": time.perf_counter() - began,
        "path": str(path),
        "nba": NBA in versions,
    }
