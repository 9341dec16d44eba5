"""Train any registered model from its spec; promote a version by hand.

:func:`train` picks the trainer by model name (``churn``, ``purchase``,
``next_best_action`` or its short names): each one registers a version and
settles it by the one rule of :func:`~propensity.pipeline.gates.settle`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from propensity import registry
from propensity.config import Settings
from propensity.models.spec import registered_name
from propensity.pipeline.binary import TrainingResult, train_model
from propensity.pipeline.nba import NBAResult, train_nba
from propensity.progress import ProgressCallback

__all__ = ["promote", "train"]


def train(
    settings: Settings,
    model: str,
    *,
    promote: bool = True,
    truth_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    as_of: str | pd.Timestamp | None = None,
    horizon_days: int | None = None,
) -> TrainingResult | NBAResult:
    """Train, evaluate and register ``model``; make it champion if it passes and ``promote``.

    ``as_of`` and ``horizon_days`` apply to the propensity models (next-best-action
    trains on every closed exposure).

    Examples
    --------
    >>> train(load_settings(), "churn").promoted  # doctest: +SKIP
    True
    """
    name = registered_name(model)
    if name == "next_best_action":
        return train_nba(settings, truth_dir=truth_dir, progress=progress, promote=promote)
    return train_model(
        settings,
        name,
        as_of=as_of,
        horizon_days=horizon_days,
        truth_dir=truth_dir,
        progress=progress,
        promote=promote,
    )


def promote(settings: Settings, model: str, version: int) -> None:
    """Make ``version`` the champion of ``model`` by hand (bypasses the gates).

    Examples
    --------
    >>> promote(load_settings(), "churn", 3)  # doctest: +SKIP
    """
    registry.set_champion(settings.tracking_uri, registered_name(model), version)
