"""What a running scoring service holds: champions, the online reader, hot reload.

:class:`Runtime` loads the ``champion`` version of each registered model,
opens one Feast store, and polls the registry every ``reload_seconds``. When
an alias moves it builds a complete new :class:`~propensity.serving.scorer.Scorer`
off to the side and swaps one reference: a request holds the scorer it
started with, so none fails or mixes versions during a reload.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from propensity.config import Serving, Settings
from propensity.serving.online import OnlineReader
from propensity.serving.scorer import (
    CHURN,
    NBA,
    PURCHASE,
    BoosterBundle,
    FeatureReader,
    NBAPolicy,
    Scorer,
    thread_pool,
)

__all__ = [
    "freeze_heap",
    "ModelSource",
    "RegistrySource",
    "Runtime",
    "online_reader",
]

_log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """Where champions come from: their versions, and the fitted objects."""

    def champion_versions(self) -> dict[str, int | None]: ...

    def load(self, model: str, version: int) -> Any: ...


class RegistrySource:
    """The MLflow registry of a project (through :mod:`propensity.registry`)."""

    def __init__(self, tracking_uri: str, models: tuple[str, ...] = (CHURN, PURCHASE, NBA)):
        self.tracking_uri = tracking_uri
        self.models = models

    def champion_versions(self) -> dict[str, int | None]:
        from propensity.registry import champion_version

        return {m: champion_version(self.tracking_uri, m) for m in self.models}

    def load(self, model: str, version: int) -> Any:
        from propensity.registry import load_estimator

        return load_estimator(self.tracking_uri, model, version)


def _as_policy(obj: Any, version: int) -> NBAPolicy:
    """Adapt the registered next-best-action object to the scorer's interface."""
    if hasattr(obj, "decide") and hasattr(obj, "feature_names"):
        return obj
    from propensity.serving.policy import ArbitrationPolicy

    return ArbitrationPolicy(obj, str(version))


def _days_since_last_seen(columns: dict[str, np.ndarray], now: float) -> np.ndarray:
    from propensity.features.definitions import request_features

    last = columns["last_event_epoch"]
    values = request_features({"request_time": [now] * len(last), "last_event_epoch": list(last)})
    return np.array(values["days_since_last_seen"], dtype=np.float64)


_DERIVED: dict[str, tuple[str, Callable[[dict[str, np.ndarray], float], np.ndarray]]] = {
    "days_since_last_seen": ("last_event_epoch", _days_since_last_seen),
}


def online_reader(adapter: Any, feature_names: list[str], direct: bool = True) -> FeatureReader:
    """A reader of ``feature_names`` from the project's Feast online store.

    Regular features are read from their view by the online-store plugin
    (:meth:`~propensity.features.store.FeatureStoreAdapter.reader`: SQLite
    read directly, one query per view; ``direct=False``, or Redis, through
    Feast); on-demand ones are computed here with the feature repo's own
    transformation (cheaper than Feast's on-demand path, same values).
    """
    from propensity.features.definitions import FEATURES, ON_DEMAND_FEATURES

    view_of = {f.name: f.view for f in FEATURES}
    base: list[str] = []
    derived = {}
    for name in feature_names:
        if name in _DERIVED:
            source, fn = _DERIVED[name]
            derived[name] = fn
            base.append(source)
        elif name in ON_DEMAND_FEATURES:
            raise ValueError(f"on-demand feature {name!r} has no serving-side transformation")
        elif name in view_of:
            base.append(name)
        else:
            raise ValueError(f"feature {name!r} is not defined in the feature registry")
    base = list(dict.fromkeys(base))
    refs = [f"{view_of[n]}:{n}" for n in base]
    rows = adapter.reader(
        refs, columns=list(derived), direct=direct, executor=thread_pool("sqlite")
    )
    return OnlineReader(rows, derived)


def freeze_heap() -> None:
    """Keep the garbage collector's full passes off everything loaded so far.

    A full collection walks every object the collector tracks. With the
    champions, the Feast registry and MLflow loaded (about 400,000 objects)
    that is a 200 ms stall, which the result dicts of a few 1,000-customer
    batches trigger. Frozen objects are never walked. The service calls this
    after each model swap: one collection first frees the previous models,
    a single pause per reload instead of one every few batches.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Runtime:
    """Champions, one open feature store and the reload loop of a service.

    Parameters
    ----------
    settings : Settings
    config : Serving, optional
        The serving options; default ``settings.serving``.
    source : ModelSource, optional
        Defaults to the project's MLflow registry.
    reader_factory : callable, optional
        ``fn(feature_names) -> FeatureReader``; defaults to the project's Feast
        online store.
    on_swap : callable, optional
        Called after each new scorer is swapped in (the service passes
        :func:`freeze_heap`).

    Examples
    --------
    >>> runtime = Runtime(load_settings()).start()  # doctest: +SKIP
    >>> runtime.scorer.score(["C0000001"])  # doctest: +SKIP
    """

    def __init__(
        self,
        settings: Settings,
        config: Serving | None = None,
        *,
        source: ModelSource | None = None,
        reader_factory: Callable[[list[str]], FeatureReader] | None = None,
        on_swap: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_swap = on_swap
        self.config = config or settings.serving
        self.source = source or RegistrySource(settings.tracking_uri)
        self._reader_factory = reader_factory
        self._store: Any = None
        self.scorer: Scorer | None = None
        self.versions: dict[str, int | None] = {}
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._audience_cache: dict[tuple[Any, ...], Any] = {}

    @property
    def ready(self) -> bool:
        """Models and the feature store are loaded."""
        return self.scorer is not None

    def _reader(self, feature_names: list[str]) -> FeatureReader:
        if self._reader_factory is not None:
            return self._reader_factory(feature_names)
        if self._store is None:
            from propensity.features.store import FeatureStoreAdapter

            self._store = FeatureStoreAdapter(self.settings)
        return online_reader(self._store, feature_names)

    def reload(self) -> bool:
        """Load the champions if any alias moved; True when a new scorer was swapped in."""
        with self._lock:
            versions = self.source.champion_versions()
            if versions == self.versions and self.scorer is not None:
                return False
            for name in (CHURN, PURCHASE):
                if versions.get(name) is None:
                    raise LookupError(f"model {name!r} has no champion version in the registry")
            churn, purchase = (
                BoosterBundle(
                    name,
                    str(versions[name]),
                    self.source.load(name, int(versions[name] or 0)),
                    reasons=self.config.reasons_method,
                )
                for name in (CHURN, PURCHASE)
            )
            policy = None
            nba_version = versions.get(NBA)
            if nba_version is not None:
                policy = _as_policy(self.source.load(NBA, nba_version), nba_version)
            names = list(
                dict.fromkeys(
                    churn.feature_names
                    + purchase.feature_names
                    + (policy.feature_names if policy else [])
                )
            )
            scorer = Scorer(self._reader(names), churn, purchase, policy)
            self.scorer = scorer  # the swap: one reference assignment
            self.versions = versions
            self.last_error = None
            _log.info("serving model versions %s", scorer.versions)
            if self.on_swap is not None:
                self.on_swap()
            return True

    def _poll(self) -> None:
        while not self._stop.wait(self.config.reload_seconds):
            self._try_reload()

    def _try_reload(self) -> None:
        try:
            self.reload()
        except Exception as exc:  # keep serving the previous models
            self.last_error = f"{type(exc).__name__}: {exc}"
            _log.warning("model reload failed (still serving %s): %s", self.versions, exc)

    def start(self) -> Runtime:
        """Load the champions (errors are kept in ``last_error``) and start polling."""
        self._try_reload()
        self._thread = threading.Thread(target=self._poll, name="champion-reload", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the reload loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def audience(self, request: Any) -> dict[str, Any]:
        """Answer an ``AudienceRequest`` from the latest offline snapshot."""
        from propensity.serving.audience import select_audience, snapshot_scores

        scorer = self.scorer
        if scorer is None:
            raise LookupError("models are not loaded")
        table = snapshot_scores(self.settings, scorer, cache=self._audience_cache)
        return select_audience(table, request)
