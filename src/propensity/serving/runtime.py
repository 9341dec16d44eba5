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
from typing import TYPE_CHECKING, Any

import numpy as np

from propensity.config import Serving, Settings
from propensity.features.definitions import FEATURES, ON_DEMAND_FEATURES, request_features
from propensity.features.online import tile_store
from propensity.features.tiles import STREAMING_NAMES
from propensity.serving.audience import select_audience, snapshot_scores
from propensity.serving.champions import ModelSource, RegistrySource, load_champions
from propensity.serving.online import OnlineReader, StreamingRead
from propensity.serving.schemas import AudienceRequest
from propensity.serving.scorer import Scorer, thread_pool

if TYPE_CHECKING:
    from propensity.features.store import FeatureStoreAdapter

__all__ = [
    "freeze_heap",
    "ModelSource",
    "RegistrySource",
    "Runtime",
    "online_reader",
    "served_views",
]

_log = logging.getLogger(__name__)


def _days_since_last_seen(columns: dict[str, np.ndarray], now: float) -> np.ndarray:
    last = columns["last_event_epoch"]
    values = request_features({"request_time": [now] * len(last), "last_event_epoch": list(last)})
    return np.array(values["days_since_last_seen"], dtype=np.float64)


_DERIVED: dict[str, tuple[str, Callable[[dict[str, np.ndarray], float], np.ndarray]]] = {
    "days_since_last_seen": ("last_event_epoch", _days_since_last_seen),
}


def _base_features(feature_names: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The stored features behind ``feature_names``, and the request-time ones among them."""
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
        elif name in STREAMING_NAMES:
            continue  # merged from the streaming tiles at request time
        else:
            raise ValueError(f"feature {name!r} is not defined in the feature registry")
    return list(dict.fromkeys(base)), derived


def served_views(feature_names: list[str]) -> list[str]:
    """The feature views the online reader of ``feature_names`` reads, in first-use order.

    Examples
    --------
    >>> served_views(["sessions_7d", "days_since_last_seen"])
    ['session', 'lifecycle']
    """
    view_of = {f.name: f.view for f in FEATURES}
    return list(dict.fromkeys(view_of[n] for n in _base_features(feature_names)[0]))


def online_reader(
    adapter: FeatureStoreAdapter,
    feature_names: list[str],
    direct: bool = True,
    streaming: StreamingRead | None = None,
) -> OnlineReader:
    """A reader of ``feature_names`` from the project's Feast online store.

    Regular features are read from their view by the online-store plugin
    (:meth:`~propensity.features.store.FeatureStoreAdapter.reader`: SQLite
    read directly, one query over the packed rows; ``direct=False``, or Redis, through
    Feast); on-demand ones are computed here with the feature repo's own
    transformation (cheaper than Feast's on-demand path, same values);
    streaming ones are merged from their tiles at the request clock by
    ``streaming``.
    """
    view_of = {f.name: f.view for f in FEATURES}
    base, derived = _base_features(feature_names)
    refs = [f"{view_of[n]}:{n}" for n in base]
    streamed = [n for n in feature_names if n in STREAMING_NAMES]
    rows = adapter.reader(
        refs, columns=list(derived) + streamed, direct=direct, executor=thread_pool("sqlite")
    )
    return OnlineReader(rows, derived, streaming=streaming)


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
    on_swap : callable, optional
        Called after each new scorer is swapped in (the service passes
        :func:`freeze_heap`).

    Examples
    --------
    >>> runtime = Runtime(load_settings()).start()  # doctest: +SKIP
    >>> runtime.not_ready() is None  # doctest: +SKIP
    True
    >>> runtime.scorer.score(["C0000001"])  # doctest: +SKIP
    """

    def __init__(
        self,
        settings: Settings,
        config: Serving | None = None,
        *,
        source: ModelSource | None = None,
        on_swap: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_swap = on_swap
        self.config = config or settings.serving
        self.source = source or RegistrySource(settings.tracking_uri)
        self._store: FeatureStoreAdapter | None = None
        self.scorer: Scorer | None = None
        self.versions: dict[str, int | None] = {}
        self.last_error: str | None = None
        self._views: list[str] = []
        self._stocked = False
        self._logged_reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._audience_cache: dict[tuple[Any, ...], Any] = {}
        self.streaming: StreamingRead = tile_store(settings)

    @property
    def store(self) -> FeatureStoreAdapter:
        """The project's feature store, opened on first use."""
        if self._store is None:
            from propensity.features.store import FeatureStoreAdapter  # feast: only when used

            self._store = FeatureStoreAdapter(self.settings)
        return self._store

    def not_ready(self) -> str | None:
        """Why the service cannot answer yet, or ``None`` when it can.

        Not ready until the champions are loaded, and while the online store
        holds no materialized rows for a view the champions read: such a
        service would answer 404 for every customer. The store is asked on
        each call until it has them all (after that, once is enough: a
        materialized view is never emptied by the pipeline), and each new
        reason is logged once.
        """
        scorer = self.scorer
        if scorer is None:
            reason = "models are not loaded" + (f": {self.last_error}" if self.last_error else "")
        elif self._stocked:
            return None
        else:
            try:
                stocked = self.store.materialized_views(self._views)
            except Exception as exc:  # an unreachable store is a reason, not a crash
                stocked, error = set(), f" ({type(exc).__name__}: {exc})"
            else:
                error = ""
            empty = [v for v in self._views if v not in stocked]
            if not empty:
                self._stocked = True
                if self._logged_reason is not None:
                    _log.info("online store now holds every served feature view: ready")
                self._logged_reason = None
                return None
            reason = (
                f"the online store holds no materialized rows for feature view(s) "
                f"{empty}{error}; run `propensity features materialize`"
            )
        if reason != self._logged_reason:
            self._logged_reason = reason
            _log.warning("not ready: %s", reason)
        return reason

    @property
    def ready(self) -> bool:
        """Models are loaded and the online store holds every view they read."""
        return self.not_ready() is None

    def reload(self) -> bool:
        """Load the champions if any alias moved; True when a new scorer was swapped in."""
        with self._lock:
            versions = self.source.champion_versions()
            if versions == self.versions and self.scorer is not None:
                return False
            champions = load_champions(
                self.source,
                versions,
                self.config.reasons_method,
                cache_dir=self.settings.compiled_models_dir(),
            )
            names = champions.feature_names
            reader = online_reader(self.store, names, streaming=self.streaming)
            scorer = Scorer(
                reader,
                champions.churn,
                champions.purchase,
                champions.policy,
                champions.purchase_24h,
            )
            views = served_views(names)
            if not set(views) <= set(self._views):
                self._stocked = False  # a new view must be checked in the store
            self._views = views
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

    def audience(self, request: AudienceRequest) -> dict[str, Any]:
        """Answer an ``AudienceRequest`` from the latest offline snapshot."""
        scorer = self.scorer
        if scorer is None:
            raise LookupError("models are not loaded")
        table = snapshot_scores(self.settings, scorer, cache=self._audience_cache)
        return select_audience(table, request)
