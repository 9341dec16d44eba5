"""Feast online-store plugins: the only code that knows Feast's online storage layout.

* :mod:`.sqlite` — :class:`BulkSqliteOnlineStore` (the default store),
* :mod:`.redis` — :class:`BulkRedisOnlineStore` (production),

both subclasses of Feast's stores, selected by their class path in the
``online_store.type`` of the Feast configuration, with a bulk
``online_write_batch``, the Arrow bulk write :func:`write_many` (latest row per
customer, chunked, each customer written atomically across views), a
vectorized read into a matrix (:class:`SqliteReader`, or :class:`FeastReader`
through ``get_online_features``) and entity deletion. One private codec
(:mod:`._codec`) builds and parses entity keys and ``ValueProto`` bytes.

Beside Feast's rows, the streaming-feature state (tiles, sessions, applied
event ids, events staged for the lake) lives in the same store:
:class:`~.tiles.SqliteTileStore` in the SQLite file, :class:`~.redis_tiles.RedisTileStore`
in Redis; :func:`tile_store` picks the one of the settings.

The readers and :func:`entity_key` import no Feast; the stores and the writer
are loaded on first use, so the scoring service's readers stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._codec import entity_key, entity_keys
from ._read import FeastReader, MatrixReader, OnlineRows, SqliteReader

if TYPE_CHECKING:
    from propensity.config import Settings

    from ._bulk import (
        Source,
        WriteReport,
        latest_rows,
        materialized_until,
        record_materialization,
        write_many,
    )
    from .redis import BulkRedisOnlineStore
    from .redis_tiles import RedisTileStore
    from .sqlite import BulkSqliteOnlineStore
    from .tiles import SqliteTileStore

__all__ = [
    "BulkRedisOnlineStore",
    "BulkSqliteOnlineStore",
    "FeastReader",
    "MatrixReader",
    "OnlineRows",
    "Source",
    "SqliteReader",
    "WriteReport",
    "entity_key",
    "entity_keys",
    "latest_rows",
    "materialized_until",
    "record_materialization",
    "tile_store",
    "write_many",
]

_LAZY = {
    "BulkRedisOnlineStore": ".redis",
    "BulkSqliteOnlineStore": ".sqlite",
    "Source": "._bulk",
    "WriteReport": "._bulk",
    "latest_rows": "._bulk",
    "materialized_until": "._bulk",
    "record_materialization": "._bulk",
    "write_many": "._bulk",
}


def tile_store(settings: Settings, project: str | None = None) -> SqliteTileStore | RedisTileStore:
    """The streaming state of a project, in its online store (``online_store.kind``).

    Parameters
    ----------
    settings : Settings
        ``online_store`` (``sqlite_path`` or ``redis_url``) and ``timezone``.
    project : str, optional
        Feast project name; default the package's.

    Examples
    --------
    >>> tile_store(load_settings()).read(["C1"], clock_us)  # doctest: +SKIP
    """
    from propensity.features.definitions import PROJECT

    name = project or PROJECT
    online = settings.online_store
    if online.kind == "redis":
        from .redis_tiles import RedisTileStore

        return RedisTileStore(online.redis_url, name, timezone=settings.timezone)
    from .tiles import SqliteTileStore

    return SqliteTileStore(settings.path(online.sqlite_path), name, timezone=settings.timezone)


def __getattr__(name: str) -> Any:
    # Feast loads only when a store or the writer is used (PEP 562).
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
