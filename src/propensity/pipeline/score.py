"""Bulk scoring: every customer, with registered models' own inference paths.

* :func:`score_customers`: one propensity model at an as-of date, features from
  Feast's historical retrieval (:func:`~propensity.pipeline.dataset.scoring_frame`),
  so bulk scores equal what training would have seen at that cutoff
  (``propensity score churn|purchase``);
* :func:`score_all`: the three champions on the latest offline snapshot
  (:func:`~propensity.pipeline.dataset.latest_snapshot`) in one vectorized pass:
  LightGBM on every core, next-best-action through
  :meth:`~propensity.models.nba.NBAModel.uplift_matrix` and the arbitration kernel
  (``propensity score --all``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity import registry
from propensity.config import Settings
from propensity.models._compiled import compile_model
from propensity.models.arbitration import ContactState, arbitrate, catalog_features
from propensity.models.spec import load_spec, registered_name
from propensity.pipeline.dataset import latest_snapshot, scoring_frame
from propensity.progress import ProgressCallback, report

__all__ = ["score_all", "score_customers", "score_table", "write_scores"]

_CHURN, _PURCHASE, _NBA = "churn", "purchase_propensity", "next_best_action"
#: Rows arbitrated at once: bounds the (rows × actions) arrays in memory.
_NBA_CHUNK = 200_000


def score_customers(
    settings: Settings,
    model: str,
    as_of: str | pd.Timestamp | None = None,
    *,
    version: int | str = registry.CHAMPION,
) -> pd.DataFrame:
    """Score every customer known before ``as_of`` with a registered model.

    Parameters
    ----------
    settings : Settings
    model : str
        Registered model name (``churn``, ``purchase_propensity``; ``purchase`` works).
    as_of : date, optional
        Midnight UTC to score at; defaults to the midnight after the lake's last event.
    version : int or str
        Model version or alias (default ``champion``).

    Returns
    -------
    DataFrame
        ``customer_id`` and ``score`` (P(y=1), float64), sorted by customer; the
        model version and as-of are in ``.attrs``.

    Examples
    --------
    >>> scores = score_customers(load_settings(), "churn")  # doctest: +SKIP
    >>> scores.sort_values("score").tail(3)  # doctest: +SKIP
    """
    name = registered_name(model)
    info = registry.version_info(settings.tracking_uri, name, version)
    service = (
        info["tags"].get("feature_service")
        or load_spec(name, settings.path(settings.models_dir)).feature_service
    )
    estimator = registry.load_estimator(settings.tracking_uri, name, info["version"])
    when, frame = scoring_frame(settings, service, as_of)
    scores = pd.DataFrame(
        {
            "customer_id": frame["customer_id"].astype(str),
            "score": estimator.predict_proba(frame[estimator.feature_names_].astype("float64"))[
                :, 1
            ],
        }
    )
    scores = scores.sort_values("customer_id", kind="stable").reset_index(drop=True)
    scores.attrs.update({"model": name, "version": info["version"], "as_of": when.isoformat()})
    return scores


def write_scores(scores: pd.DataFrame, path: str | Path) -> Path:
    """Write scores as CSV or Parquet, chosen by the file extension.

    Examples
    --------
    >>> write_scores(pd.DataFrame({"customer_id": ["C1"], "score": [0.2]}), "/tmp/s.csv")
    PosixPath('/tmp/s.csv')
    """
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        scores.to_csv(path, index=False)
    elif suffix in (".parquet", ".pq"):
        scores.to_parquet(path, index=False)
    else:
        raise ValueError(f"cannot write scores to {path}: use a .csv or .parquet file name")
    return path


def _champions(settings: Settings) -> dict[str, tuple[int, Any]]:
    """Version and estimator of each champion, compiled as the service compiles them.

    Churn and purchase must have one; next-best-action is scored when it has one.
    (The 24-hour purchase model is served by ``/score`` only, not in bulk yet.)
    """
    found = {}
    for name in (_CHURN, _PURCHASE, _NBA):
        version = registry.champion_version(settings.tracking_uri, name)
        if version is None and name != _NBA:
            raise LookupError(registry.why_no_champion(settings.tracking_uri, name))
        if version is not None:
            model = registry.load_estimator(settings.tracking_uri, name, version)
            cache = settings.compiled_models_dir()
            found[name] = (version, model if cache is None else compile_model(model, cache))
    return found


def _nba_columns(nba: Any) -> list[str]:
    return list(dict.fromkeys([*nba.feature_names_, *catalog_features(nba.catalog)]))


def score_table(
    frame: pd.DataFrame,
    churn: Any,
    purchase: Any,
    nba: Any = None,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Score every row of a feature frame with the fitted models, vectorized.

    Parameters
    ----------
    frame : DataFrame
        ``customer_id`` and every model's features (float64).
    churn, purchase : CalibratedBooster
    nba : NBAModel, optional
        Arbitrated with its own catalog (contact counts read from the features).

    Returns
    -------
    DataFrame
        ``customer_id``, ``churn``, ``purchase_propensity``, ``action`` and
        ``expected_value`` (``action`` is null without ``nba``).
    """
    ids = frame["customer_id"].astype(str).to_numpy()
    out = pd.DataFrame({"customer_id": ids})
    for k, (column, model) in enumerate(((_CHURN, churn), (_PURCHASE, purchase)), start=1):
        X = np.ascontiguousarray(frame[model.feature_names_].to_numpy(np.float64))
        out[column] = model.predict_proba(X, num_threads=0)[:, 1]
        report(progress, "bulk scoring", k, 3)
    actions = np.full(len(frame), None, dtype=object)
    values = np.full(len(frame), np.nan)
    if nba is not None:
        catalog = nba.catalog
        rules = catalog_features(catalog)
        for lo in range(0, len(frame), _NBA_CHUNK):
            part = frame.iloc[lo : lo + _NBA_CHUNK]
            X = np.ascontiguousarray(part[nba.feature_names_].to_numpy(np.float64))
            columns = {n: part[n].to_numpy(np.float64) for n in rules}
            result = arbitrate(
                nba.uplift_matrix(X, num_threads=0),
                columns,
                ids[lo : lo + len(part)].tolist(),
                catalog,
                contacts=ContactState.from_features(columns, catalog.contact_policy),
                reasons=False,
            )
            actions[lo : lo + len(part)] = result.action
            values[lo : lo + len(part)] = result.expected_value
    out["action"] = actions
    out["expected_value"] = values
    report(progress, "bulk scoring", 3, 3)
    return out


def score_all(
    settings: Settings, out: str | Path, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Score every customer of the latest snapshot with the champions; write Parquet.

    The file holds ``customer_id``, ``churn``, ``purchase_propensity``,
    ``action``, ``expected_value``; its metadata records the snapshot and the
    model versions. With ``engine: spark`` the executors score and write the
    parts of a Parquet folder at ``out``
    (:func:`propensity.spark.score.score_all_spark`).

    Returns
    -------
    dict
        ``rows``, ``snapshot``, ``model_versions``, ``seconds``, ``path`` and
        ``nba`` (whether next-best-action had a champion).

    Examples
    --------
    >>> score_all(load_settings(), "data/scores.parquet")["rows"]  # doctest: +SKIP
    20000
    """
    began = time.perf_counter()
    champions = _champions(settings)
    models = {name: model for name, (_, model) in champions.items()}
    versions = {name: str(version) for name, (version, _) in champions.items()}
    if settings.engine == "spark":
        from propensity.spark.score import score_all_spark

        result = score_all_spark(settings, out, models=models)
        return {**result, "model_versions": versions, "seconds": time.perf_counter() - began}
    nba = models.get(_NBA)
    names = [*models[_CHURN].feature_names_, *models[_PURCHASE].feature_names_]
    names += _nba_columns(nba) if nba is not None else []
    snapshot, frame = latest_snapshot(settings, list(dict.fromkeys(names)))
    report(progress, "bulk scoring", 0, 3)
    table = score_table(frame, models[_CHURN], models[_PURCHASE], nba, progress)
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
        "nba": nba is not None,
    }
