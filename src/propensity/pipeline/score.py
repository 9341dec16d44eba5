"""Bulk scoring: every known customer with a registered propensity model.

:func:`score_customers` reads the features at an as-of date through Feast's
historical retrieval (:func:`~propensity.pipeline.dataset.scoring_frame`), so
bulk scores equal what training would have seen at that cutoff, and predicts
with the model's own numpy path.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from propensity import registry
from propensity.config import Settings
from propensity.models.spec import load_spec, registered_name
from propensity.pipeline.dataset import scoring_frame

__all__ = ["score_customers", "write_scores"]


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
            "score": estimator.predict(frame[estimator.feature_names_].astype("float64")),
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
