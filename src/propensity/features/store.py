"""The Feast adapter: the package's one door to the feature store.

:class:`FeatureStoreAdapter` builds the Feast configuration from the project
settings (DuckDB offline store over the Parquet feature tables; the online-store
plugins of :mod:`propensity.features.online`, SQLite by default, Redis when
``online_store.kind == "redis"``), applies the definitions of
``feature_repo/repo.py`` under one rule (:meth:`~FeatureStoreAdapter.ensure_applied`),
and is the one path for training frames (:meth:`~FeatureStoreAdapter.historical`,
only ever through ``get_historical_features``), the scoring API's reads
(:meth:`~FeatureStoreAdapter.reader`), materialization and erasure
(:meth:`~FeatureStoreAdapter.forget`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore, RepoConfig

from propensity.progress import ProgressCallback, report

from .definitions import (
    ENTITY,
    ON_DEMAND_FEATURES,
    PROJECT,
    STREAMING_FEATURES,
    STREAMING_VIEW,
    VIEWS,
    batch_views,
    features_of,
    service_views,
)
from .online import FeastReader, MatrixReader, WriteReport, entity_keys, write_many
from .online.redis import BulkRedisOnlineStore
from .online.redis_client import redis_connection_string
from .online.sqlite import BulkSqliteOnlineStore, BulkSqliteOnlineStoreConfig
from .snapshots import REGISTRY_FILE, TIMESTAMP, feature_table_path
from .streaming_offline import with_streaming_features

if TYPE_CHECKING:
    from propensity.config import Settings

# Feast installs "once" filters for these categories when imported; the on-demand view
# here runs in python mode on small request data, and ibis's deprecation is Feast's to fix.
warnings.filterwarnings("ignore", "On demand feature view is an experimental", RuntimeWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning, module="ibis")

__all__ = [
    "FeatureStoreAdapter",
    "ForgetReport",
    "PROJECT",
    "REQUEST_TIME",
    "redis_connection_string",
]

REQUEST_TIME = "request_time"
_REPO_MODULE = "propensity_feature_repo"
_EPOCH = pd.Timestamp(0, tz="UTC")


def _load_repo(repo_path: Path) -> ModuleType:
    # Registered under one fixed name so the import happens once per process.
    if _REPO_MODULE in sys.modules:
        return sys.modules[_REPO_MODULE]
    file = repo_path / "repo.py"
    if not file.exists():
        raise FileNotFoundError(f"feature repo definitions not found: {file}")
    spec = importlib.util.spec_from_file_location(_REPO_MODULE, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_REPO_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_REPO_MODULE]
        raise
    return module


def _utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class ForgetReport:
    """What :meth:`FeatureStoreAdapter.forget` deleted from the online stores."""

    sqlite_rows: int = 0
    sqlite_vacuumed: bool = False
    redis_keys: int = 0


class FeatureStoreAdapter:
    """Feast feature store configured from the project settings.

    Parameters
    ----------
    settings : Settings
        ``feature_repo`` (folder of ``repo.py``), ``features_dir`` (Parquet
        tables; the Feast registry is kept there too as ``feast_registry.db``)
        and ``online_store`` (``kind`` sqlite or redis, ``sqlite_path``,
        ``redis_url``; override with ``PROPENSITY_ONLINE_STORE__KIND=redis``
        and ``PROPENSITY_ONLINE_STORE__REDIS_URL=redis://host:6379/0``).
    project : str
        Feast project name (also the key prefix in Redis).

    Examples
    --------
    >>> store = FeatureStoreAdapter(load_settings())  # doctest: +SKIP
    >>> store.ensure_applied()  # doctest: +SKIP
    >>> frame = store.historical(entity_df, "churn_v1")  # doctest: +SKIP
    >>> store.materialize()  # doctest: +SKIP
    >>> store.online(["C0000001"], "churn_v1")  # doctest: +SKIP
    >>> store.forget(["C0000001"])  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, project: str = PROJECT) -> None:
        self.settings = settings
        self.project = project
        self.repo_path = settings.path(settings.feature_repo)
        self.features_dir = settings.path(settings.features_dir)
        self._services: dict[str, Any] = {}

    def repo_config(self) -> RepoConfig:
        """The Feast configuration: ``feature_repo/feature_store.yaml``, built from settings."""
        online = self.settings.online_store
        if online.kind == "redis":
            online_config: dict[str, Any] = {
                "type": _class_path(BulkRedisOnlineStore),
                "connection_string": redis_connection_string(online.redis_url),
            }
        else:
            online_config = {
                "type": _class_path(BulkSqliteOnlineStore),
                "path": str(self._sqlite_path),
            }
        self.features_dir.mkdir(parents=True, exist_ok=True)
        return RepoConfig(
            project=self.project,
            provider="local",
            registry={
                "registry_type": "file",
                "path": str(self._registry),
                "cache_ttl_seconds": 60,
            },
            offline_store={"type": "duckdb"},
            online_store=online_config,
            entity_key_serialization_version=3,
            repo_path=str(self.repo_path),
        )

    @cached_property
    def store(self) -> FeatureStore:
        """The underlying ``feast.FeatureStore``."""
        _load_repo(self.repo_path)  # the on-demand view's code must be importable
        return FeatureStore(config=self.repo_config())

    def definitions(self) -> list[Any]:
        """The Feast objects of ``feature_repo/repo.py`` bound to this project's tables."""
        return list(_load_repo(self.repo_path).definitions(self.features_dir))

    def apply(self) -> None:
        """Register the entity, views and services (idempotent)."""
        self.store.apply(self.definitions())
        self._services.clear()
        self._applied_mark.write_text(self._fingerprint())

    def ensure_applied(self) -> bool:
        """Apply the definitions when the registry is missing or they changed since.

        The one rule for when to run ``feast apply``: a fingerprint of the
        definition sources and the feature folder is recorded next to the
        registry at each :meth:`apply`. Returns whether it applied.
        """
        mark = self._applied_mark
        if self._registry.exists() and mark.exists() and mark.read_text() == self._fingerprint():
            return False
        self.apply()
        return True

    @property
    def _registry(self) -> Path:
        return self.features_dir / REGISTRY_FILE

    @property
    def _applied_mark(self) -> Path:
        return self._registry.with_name(self._registry.name + ".applied")

    @property
    def _sqlite_path(self) -> Path:
        return self.settings.path(self.settings.online_store.sqlite_path)

    def _fingerprint(self) -> str:
        from . import definitions

        digest = hashlib.sha256(str(self.features_dir.resolve()).encode())
        for source in (self.repo_path / "repo.py", Path(definitions.__file__)):
            digest.update(source.read_bytes())
        return digest.hexdigest()

    def ttls(self, views: Iterable[str]) -> dict[str, float]:
        """Time to live of each applied feature view, in seconds (``inf`` when unset).

        Examples
        --------
        >>> FeatureStoreAdapter(settings).ttls(["session"])  # doctest: +SKIP
        {'session': 691200.0}
        """
        out = {}
        for view in views:
            ttl = self.store.get_feature_view(view).ttl
            out[view] = ttl.total_seconds() if ttl else math.inf
        return out

    def service_features(self, service: str) -> list[str]:
        """Feature names a service returns, in a stable order.

        Examples
        --------
        >>> FeatureStoreAdapter(settings).service_features("churn_v1")[:2]  # doctest: +SKIP
        ['sessions_7d', 'sessions_14d']
        """
        names: list[str] = []
        for view in service_views(service):
            if view in VIEWS:
                names += [f.name for f in features_of(view)]
            elif view == STREAMING_VIEW:
                names += [f.name for f in STREAMING_FEATURES]
            else:
                names += list(ON_DEMAND_FEATURES)
        return names

    def historical(self, entity_df: pd.DataFrame, service: str) -> pd.DataFrame:
        """Point-in-time correct features for each entity row (training frames).

        Parameters
        ----------
        entity_df : pandas.DataFrame
            ``customer_id``, ``event_timestamp`` (the cutoff) and any extra
            columns (labels...), which are kept. ``request_time`` (epoch
            seconds) defaults to the row's ``event_timestamp``.
        service : str
            Feature service name, e.g. ``"churn_v1"``.

        Returns
        -------
        pandas.DataFrame
            The entity rows in their original order, then the service's features.
        """
        missing = {ENTITY, TIMESTAMP} - set(entity_df.columns)
        if missing:
            raise ValueError(f"entity_df lacks required column(s) {sorted(missing)}")
        frame = entity_df.copy()
        frame[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True)
        added = REQUEST_TIME not in frame.columns
        if added:
            frame[REQUEST_TIME] = (frame[TIMESTAMP] - _EPOCH).dt.total_seconds()
        row = "__entity_row__"
        frame[row] = range(len(frame))
        features: Any = self._service(service)
        streaming = STREAMING_VIEW in service_views(service)
        if streaming:
            # Feast stores only final values of a push source's view; the point-in-time
            # values come from the lake's tiles, merged at each row's cutoff as online.
            features = [
                f"{view}:{name}"
                for view in service_views(service)
                if view != STREAMING_VIEW
                for name in (
                    [f.name for f in features_of(view)] if view in VIEWS else ON_DEMAND_FEATURES
                )
            ]
        job = self.store.get_historical_features(entity_df=frame, features=features)
        out = job.to_df().sort_values(row).reset_index(drop=True)
        out = with_streaming_features(self.settings, out, self.service_features(service))
        keep = [c for c in entity_df.columns if c != row]
        if added:
            keep = [c for c in keep if c != REQUEST_TIME]
        result = out[keep + self.service_features(service)].copy()
        result[TIMESTAMP] = pd.to_datetime(result[TIMESTAMP], utc=True)
        return result

    def online(
        self, customer_ids: Sequence[str], service: str, request_time: Any = None
    ) -> pd.DataFrame:
        """Latest materialized features for customers, one row each, in input order.

        Parameters
        ----------
        customer_ids : sequence of str
        service : str
        request_time : datetime-like, optional
            Time the on-demand features are computed for (default: now, UTC).
        """
        when = _utc(request_time if request_time is not None else datetime.now().astimezone())
        seconds = when.timestamp()
        rows = [{ENTITY: str(c), REQUEST_TIME: seconds} for c in customer_ids]
        result = self.store.get_online_features(
            features=self._service(service), entity_rows=rows
        ).to_dict()
        names = self.service_features(service)
        # None (unknown customer, NULL feature) becomes NaN; one frame build, not per column.
        values = {
            n: np.array([np.nan if v is None else v for v in result[n]], float) for n in names
        }
        return pd.DataFrame({ENTITY: result[ENTITY], **values})

    def _service(self, service: str) -> Any:
        # Parsing a FeatureService from the registry proto costs ~50 ms: once per process.
        if service not in self._services:
            self._services[service] = self.store.get_feature_service(service, allow_cache=True)
        return self._services[service]

    def reader(
        self,
        features: str | Sequence[str],
        *,
        columns: Sequence[str] = (),
        direct: bool = True,
        executor: Executor | None = None,
    ) -> MatrixReader:
        """The vectorized online read of a service's features, or of ``"view:feature"`` refs.

        With ``direct`` (the default) the online-store plugin reads its own
        storage (SQLite: one query over the packed rows, views whose copy is
        off one query each, in parallel on ``executor``); otherwise, and for
        stores without a direct read (Redis), the read goes through Feast's
        ``get_online_features``. TTLs come from the registered views.

        Parameters
        ----------
        features : str or sequence of str
            A feature service name (its view features), or ``"view:feature"`` refs.
        columns : sequence of str
            Extra matrix columns after the served ones, left NaN (request-time features).
        direct : bool
        executor : concurrent.futures.Executor, optional

        Examples
        --------
        >>> rows = adapter.reader("churn_v1").read(["C0000001"], now=time.time())  # doctest: +SKIP
        """
        if isinstance(features, str):
            refs = [f"{view}:{f.name}" for view in batch_views(features) for f in features_of(view)]
        else:
            refs = list(features)
        ttls = self.ttls(dict.fromkeys(ref.split(":", 1)[0] for ref in refs))
        config = self.store.config
        if direct and isinstance(config.online_store, BulkSqliteOnlineStoreConfig):
            return BulkSqliteOnlineStore().reader(
                config, refs, ttls=ttls, columns=columns, executor=executor
            )
        return FeastReader(self.store, refs, ttls=ttls, columns=columns)

    def materialized_views(self, views: Iterable[str] | None = None) -> set[str]:
        """Those of ``views`` (default: every batch view) holding rows in the online store.

        Read from the plugin's materialization marks, or, in a store written
        before marks existed, from its rows. Needs no applied registry. The
        scoring service is not ready while a view it reads is missing here:
        it would answer 404 for every customer.

        Examples
        --------
        >>> adapter.materialized_views(["session", "lifecycle"])  # doctest: +SKIP
        {'session', 'lifecycle'}
        """
        chosen = list(views) if views is not None else list(VIEWS)
        if self.settings.online_store.kind == "redis":
            return BulkRedisOnlineStore().materialized_views(self.repo_config(), chosen)
        return BulkSqliteOnlineStore.materialized_views(self._sqlite_path, self.project, chosen)

    def forget(self, customer_ids: Sequence[str]) -> ForgetReport:
        """Delete customers' rows from the online stores (the erasure job's online step).

        The SQLite file is cleaned whenever it exists (a project that moved to
        Redis may keep one), Redis when it is the configured store. Needs no
        applied registry.
        """
        keys = entity_keys([str(c) for c in customer_ids], ENTITY)
        rows, vacuumed = BulkSqliteOnlineStore.delete_entities(
            self._sqlite_path, self.project, keys
        )
        report = ForgetReport(sqlite_rows=rows, sqlite_vacuumed=vacuumed)
        if self.settings.online_store.kind == "redis":
            report.redis_keys = BulkRedisOnlineStore().delete_entities(self.repo_config(), keys)
        return report

    def latest_snapshot(self) -> pd.Timestamp:
        """Latest snapshot time found in the feature tables."""
        latest: pd.Timestamp | None = None
        for view in VIEWS:
            path = feature_table_path(self.features_dir, view)
            if not path.exists():
                raise FileNotFoundError(f"feature table missing: {path}; build features first")
            column = pq.read_table(path, columns=[TIMESTAMP])[TIMESTAMP]
            value = column.to_pandas().max() if len(column) else None
            if value is not None and (latest is None or value > latest):
                latest = _utc(value)
        if latest is None:
            raise ValueError(f"the feature tables under {self.features_dir} are empty")
        return latest

    def materialize(
        self,
        end: Any = None,
        views: Iterable[str] | None = None,
        *,
        incremental: bool = True,
        progress: ProgressCallback | None = None,
    ) -> list[WriteReport]:
        """Load each customer's latest snapshot row into the online store.

        Uses the plugins' bulk writer (:func:`propensity.features.online.write_many`:
        Feast's own online format, bounded chunks). All views read one joined stream of latest
        rows, so each customer's features of every view are written together
        (one SQLite transaction, one Redis ``HSET``): a reader never sees a
        customer half refreshed. With ``incremental`` only rows newer than
        each view's last materialized end are written.

        ``end`` defaults to just after the latest snapshot in the feature tables
        (not "now": event data may be historical). With ``engine: spark`` the
        Spark executors write the store, partition by partition
        (:func:`propensity.spark.materialize.materialize_spark`).
        """
        if self.settings.engine == "spark":
            from propensity.spark.materialize import materialize_spark

            return materialize_spark(self, end, views, incremental=incremental)
        stop = _utc(end) if end is not None else self.latest_snapshot() + timedelta(seconds=1)
        chosen = sorted(set(views) if views is not None else set(VIEWS))
        total = self._customers(chosen, stop)
        done = 0

        def advance(entities: int) -> None:
            nonlocal done
            done += entities
            report(progress, "materialize", done, total)

        source = self._latest_rows(chosen, stop)
        return write_many(
            self.store,
            {view: source for view in chosen},
            end=stop.to_pydatetime(),
            incremental=incremental,
            progress=advance,
        )

    def _view_scan(self, view: str) -> str:
        path = feature_table_path(self.features_dir, view)
        if not path.exists():
            raise FileNotFoundError(f"feature table missing: {path}; build features first")
        return "read_parquet('" + str(path).replace("'", "''") + "')"

    def _customers(self, views: Sequence[str], end: pd.Timestamp) -> int:
        import duckdb

        con = duckdb.connect()
        try:
            row = con.execute(
                f"SELECT count(DISTINCT {ENTITY}) FROM {self._view_scan(views[0])} "
                f"WHERE {TIMESTAMP} <= ?",
                [end.to_pydatetime()],
            ).fetchone()
        finally:
            con.close()
        return int(row[0]) if row else 0

    def _latest_rows(self, views: Sequence[str], end: pd.Timestamp) -> pa.RecordBatchReader:
        """Latest row at or before ``end`` per customer, all views joined, in customer order.

        Every view's table holds the same (customer, snapshot) rows, since one
        snapshot run writes them all, so the join is on both keys.
        """
        import duckdb

        con = duckdb.connect(config={"memory_limit": "1GB", "threads": 2})
        con.execute("SET preserve_insertion_order = false")
        lead = views[0]
        columns = [f"v0.{ENTITY}", f"v0.{TIMESTAMP}"]
        joins = []
        for k, view in enumerate(views):
            columns += [f"v{k}.{f.name}" for f in features_of(view)]
            if k:
                joins.append(
                    f"JOIN {self._view_scan(view)} v{k} "
                    f"ON v{k}.{ENTITY} = v0.{ENTITY} AND v{k}.{TIMESTAMP} = v0.{TIMESTAMP}"
                )
        sql = f"""
            WITH latest AS (
                SELECT {ENTITY}, max({TIMESTAMP}) AS {TIMESTAMP}
                FROM {self._view_scan(lead)} WHERE {TIMESTAMP} <= '{end.isoformat()}'::TIMESTAMPTZ
                GROUP BY {ENTITY}
            )
            SELECT {", ".join(columns)}
            FROM latest l JOIN {self._view_scan(lead)} v0
              ON v0.{ENTITY} = l.{ENTITY} AND v0.{TIMESTAMP} = l.{TIMESTAMP}
            {" ".join(joins)}
            ORDER BY v0.{ENTITY}
        """
        return con.sql(sql).to_arrow_reader(50_000)
