"""The champions a service or a bulk run scores with: where they come from, loaded once.

Both the running service (:class:`~propensity.serving.runtime.Runtime`) and
bulk scoring (:func:`~propensity.serving.audience.score_all`) load the
``champion`` version of each model through :func:`load_champions`, so the
two never disagree on which objects serve, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from propensity.models._compiled import compile_model
from propensity.serving.policy import ArbitrationPolicy
from propensity.serving.scorer import (
    CHURN,
    NBA,
    PURCHASE,
    PURCHASE_24H,
    BoosterBundle,
    ModelBundle,
    NBAPolicy,
    ReasonsMethod,
)

__all__ = [
    "Champions",
    "ModelSource",
    "RegistrySource",
    "as_policy",
    "load_champions",
]


class ModelSource(Protocol):
    """Where champions come from: their versions, and the fitted objects."""

    def champion_versions(self) -> dict[str, int | None]: ...

    def load(self, model: str, version: int) -> Any: ...


class RegistrySource:
    """The MLflow registry of a project (through :mod:`propensity.registry`)."""

    def __init__(
        self, tracking_uri: str, models: tuple[str, ...] = (CHURN, PURCHASE, PURCHASE_24H, NBA)
    ):
        self.tracking_uri = tracking_uri
        self.models = models

    def champion_versions(self) -> dict[str, int | None]:
        # mlflow loads on first use, never when the service module is imported.
        from propensity.registry import champion_version

        return {m: champion_version(self.tracking_uri, m) for m in self.models}

    def load(self, model: str, version: int) -> Any:
        from propensity.registry import load_estimator

        return load_estimator(self.tracking_uri, model, version)


def as_policy(obj: object, version: int | str) -> NBAPolicy:
    """The registered next-best-action object as an :class:`NBAPolicy`.

    An object that already is one serves as it is; a fitted uplift model
    (:class:`propensity.models.nba.NBAModel`) gets catalog arbitration.
    """
    if isinstance(obj, NBAPolicy):  # a registry may hold either kind: checked at run time
        return obj
    return ArbitrationPolicy(obj, str(version))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Champions:
    """The loaded champions and their registered versions."""

    versions: dict[str, int | None]
    churn: ModelBundle
    purchase: ModelBundle
    policy: NBAPolicy | None
    purchase_24h: ModelBundle | None = None

    @property
    def feature_names(self) -> list[str]:
        """Every feature any champion reads, each once, in model order."""
        names = self.churn.feature_names + self.purchase.feature_names
        if self.purchase_24h is not None:
            names = names + self.purchase_24h.feature_names
        if self.policy is not None:
            names = names + self.policy.feature_names
        return list(dict.fromkeys(names))


def load_champions(
    source: ModelSource,
    versions: dict[str, int | None] | None = None,
    reasons: ReasonsMethod = "path",
    cache_dir: str | Path | None = None,
) -> Champions:
    """Load the champion of each model (``versions``: default the source's current ones).

    With a ``cache_dir``, every tree model is compiled to native code (cached there,
    see :func:`~propensity.models._compiled.compile_model`); one that cannot be compiled serves with
    LightGBM's own predict. Without one, the models predict with LightGBM.

    Raises
    ------
    LookupError
        Churn or purchase propensity has no champion (the 24-hour purchase model and
        next-best-action are optional).

    Examples
    --------
    >>> champions = load_champions(RegistrySource("sqlite:///mlflow.db"))  # doctest: +SKIP
    >>> champions.versions  # doctest: +SKIP
    {'churn': 3, 'purchase_propensity': 2, 'next_best_action': None}
    """
    versions = source.champion_versions() if versions is None else versions
    loaded: dict[str, ModelBundle] = {}
    for name in (CHURN, PURCHASE):
        version = versions.get(name)
        if version is None:
            raise LookupError(f"model {name!r} has no champion version in the registry")
        model = _compiled(source.load(name, int(version)), cache_dir)
        loaded[name] = BoosterBundle(name, str(version), model, reasons=reasons)
    short = None
    short_version = versions.get(PURCHASE_24H)
    if short_version is not None:
        model = _compiled(source.load(PURCHASE_24H, int(short_version)), cache_dir)
        short = BoosterBundle(PURCHASE_24H, str(short_version), model, reasons=reasons)
    nba_version = versions.get(NBA)
    policy = None
    if nba_version is not None:
        policy = as_policy(_compiled(source.load(NBA, nba_version), cache_dir), nba_version)
    return Champions(dict(versions), loaded[CHURN], loaded[PURCHASE], policy, short)


def _compiled(model: Any, cache_dir: str | Path | None) -> Any:
    """The model compiled into ``cache_dir``, or as it is when there is none."""
    return model if cache_dir is None else compile_model(model, cache_dir)
