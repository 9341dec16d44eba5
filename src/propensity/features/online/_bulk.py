"""The bulk write engine of the online-store plugins: Arrow rows in, Feast's layout out.

Feast's stock ``materialize`` builds one protobuf object per value and issues
one SQLite statement per value; at 100k customers x 40 features that is
minutes and gigabytes. :func:`write_many` writes *the same bytes in the same
layout* (so ``get_online_features`` and Feast's own tools read them
unchanged), but:

* encodes values and entity keys in bulk (:mod:`._codec`);
* streams the source in chunks of whole customers (DuckDB picks the latest row
  per customer, in key order, with a capped memory budget);
* hands each chunk, of every view sharing one source, to the store plugin's
  bulk writer (:mod:`.sqlite`, :mod:`.redis`) while a background thread
  encodes the next chunk. Each chunk is one SQLite transaction (one ``HSET``
  per customer on Redis), so a reader never sees a customer's features half
  old and half new.

The interval is recorded in the Feast registry as ``materialize`` does, so
``materialize_incremental`` and ``feast`` tooling know what has been written,
and in the online store itself (the plugin's materialization marks): the
registry is shared by every online store of a project, so an incremental
write into a new store (a fresh Redis) starts from what that store holds.
Unlike Feast's Redis writer, rows are not compared with the stored timestamp:
the latest row of the source wins.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from feast import FeatureStore, FeatureView
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.repo_config import RepoConfig

from ._codec import encode_entity_keys, encode_values, micros
from ._packed import quote_name as _quote

__all__ = [
    "BulkWriter",
    "BulkWrites",
    "Source",
    "WriteReport",
    "latest_rows",
    "materialized_until",
    "record_materialization",
    "write_many",
]

#: What the bulk writer accepts as rows: a Parquet file or folder, an Arrow
#: table, a record batch reader, or any iterable of record batches.
Source: TypeAlias = str | Path | pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch]


@dataclass(frozen=True)
class WriteReport:
    """What :func:`write_many` wrote into one view.

    Attributes
    ----------
    feature_view : str
        The view written.
    rows_read : int
        Source rows inside the time window.
    entities_written : int
        Distinct entities written (one per row unless a chunk held duplicates).
    superseded : int
        Rows of an entity replaced by a later row of the same entity in the same
        chunk (counted, never dropped silently).
    values_written : int
        Feature values written (entities x features).
    start, end : datetime
        The materialization interval recorded in the Feast registry.
    seconds : float
        Wall time of the write.
    store : str
        ``"sqlite"``, ``"redis"`` or the Feast online store type used as fallback.
    """

    feature_view: str
    rows_read: int
    entities_written: int
    superseded: int
    values_written: int
    start: datetime
    end: datetime
    seconds: float
    store: str


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _parquet_glob(path: Path) -> str:
    return str(path / "**" / "*.parquet") if path.is_dir() else str(path)


def latest_rows(
    path: str | Path,
    *,
    end: datetime,
    start: datetime | None = None,
    entity: str = "customer_id",
    timestamp: str = "event_timestamp",
    columns: Sequence[str] | None = None,
    created: str | None = None,
    chunk_rows: int = 50_000,
    memory_limit: str = "1GB",
) -> Iterator[pa.RecordBatch]:
    """Stream the latest row per entity with ``start < timestamp <= end`` from Parquet.

    This is the row selection Feast's ``materialize`` makes, done by DuckDB
    with a capped memory budget (it spills to a temporary folder beyond it).

    Parameters
    ----------
    path : str or Path
        A Parquet file, or a folder searched recursively for ``*.parquet``.
    end : datetime
        Inclusive upper bound on ``timestamp`` (naive means UTC).
    start : datetime, optional
        Exclusive lower bound; ``None`` reads all history.
    entity, timestamp : str
        Entity join key and event timestamp columns.
    columns : sequence of str, optional
        Feature columns to return (default: all).
    created : str, optional
        A created-timestamp column that breaks ties between equal timestamps.
    chunk_rows : int
        Rows per yielded batch.
    memory_limit : str
        DuckDB ``memory_limit``.

    Yields
    ------
    pyarrow.RecordBatch
        One row per entity, never split across batches.

    Examples
    --------
    >>> for batch in latest_rows("features.parquet", end=datetime(2024, 6, 1)):  # doctest: +SKIP
    ...     print(batch.num_rows)
    """
    con = duckdb.connect()
    try:
        with tempfile.TemporaryDirectory(prefix="latest_rows_") as spill:
            con.execute("SET TimeZone = 'UTC'")
            con.execute(f"SET memory_limit = '{memory_limit}'")
            con.execute(f"SET temp_directory = '{spill}'")
            con.execute("SET preserve_insertion_order = false")
            wanted = (
                "*"
                if columns is None
                else ", ".join(_quote(c) for c in dict.fromkeys([entity, timestamp, *columns]))
            )
            order = f"{_quote(timestamp)} DESC"
            if created:
                order += f", {_quote(created)} DESC"
            where = f"{_quote(timestamp)} <= $end"
            params: dict[str, Any] = {"end": _utc(end), "src": _parquet_glob(Path(path))}
            if start is not None:
                where += f" AND {_quote(timestamp)} > $start"
                params["start"] = _utc(start)
            query = (
                f"SELECT {wanted} FROM read_parquet($src, union_by_name = true) "
                f"WHERE {where} "
                f"QUALIFY row_number() OVER (PARTITION BY {_quote(entity)} ORDER BY {order}) = 1 "
                # Entity order makes the online store's B-tree inserts sequential.
                f"ORDER BY {_quote(entity)}"
            )
            relation = con.sql(query, params=params)
            # DuckDB 2 renamed fetch_arrow_reader to to_arrow_reader.
            name = (
                "to_arrow_reader" if hasattr(relation, "to_arrow_reader") else "fetch_arrow_reader"
            )
            reader = getattr(relation, name)(chunk_rows)
            yield from reader
    finally:
        con.close()


def _batches(source: Source, columns: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream the wanted columns; absent ones are left for ``ViewPlan.check`` to name."""
    if isinstance(source, str | Path):
        dataset = ds.dataset(str(source), format="parquet")
        present = [c for c in columns if c in dataset.schema.names]
        yield from dataset.to_batches(columns=present, batch_size=chunk_rows)
        return
    batches: Iterable[pa.RecordBatch] = (
        source.to_batches(max_chunksize=chunk_rows) if isinstance(source, pa.Table) else source
    )
    for batch in batches:
        yield batch.select([c for c in columns if c in batch.schema.names])


def _rechunk(batches: Iterable[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """Group batches into tables of about ``chunk_rows`` rows."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        size += batch.num_rows
        if size >= chunk_rows:
            yield pa.Table.from_batches(pending)
            pending, size = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


@dataclass
class Chunk:
    """One chunk of a view, encoded: one entry per entity."""

    keys: list[bytes]
    event_ts: np.ndarray  # int64 microseconds since epoch, UTC
    created_ts: np.ndarray | None
    arrays: list[pa.Array]  # per feature

    def values(self, plan: ViewPlan) -> list[list[bytes]]:
        """ValueProto bytes, one list per feature."""
        return [encode_values(a, t) for a, (_, t) in zip(self.arrays, plan.features, strict=True)]


class ViewPlan:
    """Everything about one feature view needed to encode and write its rows."""

    def __init__(self, store: FeatureStore, view: FeatureView) -> None:
        config = store.config
        self.view = view
        self.project = store.project
        self.versioning = bool(config.registry.enable_online_feature_view_versioning)
        self.key_version = int(config.entity_key_serialization_version)
        self.join_keys = {c.name: c.dtype.to_value_type() for c in view.entity_columns}
        self.features = [(f.name, f.dtype.to_value_type()) for f in view.features]
        batch_source = view.batch_source
        if batch_source is None:
            raise ValueError(f"feature view {view.name!r} has no batch source")
        self.timestamp = batch_source.timestamp_field
        self.created = batch_source.created_timestamp_column or None
        self.columns = [*self.join_keys, self.timestamp, *(name for name, _ in self.features)]
        if self.created:
            self.columns.append(self.created)

    def check(self, schema: pa.Schema) -> None:
        missing = [c for c in self.columns if c not in schema.names]
        if missing:
            raise ValueError(
                f"feature view {self.view.name!r}: source lacks column(s) {missing}; "
                f"it needs {self.columns}"
            )

    def window(self, table: pa.Table, start: datetime | None, end: datetime) -> pa.Table:
        ts = table.column(self.timestamp)
        if pa.types.is_timestamp(ts.type) and ts.type.tz is None:
            ts = ts.cast(pa.timestamp(ts.type.unit, tz="UTC"))
        keep = pc.less_equal(ts, pa.scalar(_utc(end), pa.timestamp("us", tz="UTC")))
        if start is not None:
            after = pc.greater(ts, pa.scalar(_utc(start), pa.timestamp("us", tz="UTC")))
            keep = pc.and_(keep, after)
        return table.filter(keep)

    def encode(self, table: pa.Table) -> tuple[Chunk, int]:
        """Encode a table; keeps the latest row per entity and counts the rest."""
        keys = encode_entity_keys(
            {k: table.column(k) for k in self.join_keys}, self.join_keys, self.key_version
        )
        ts = micros(table.column(self.timestamp))
        superseded = 0
        if len(set(keys)) < len(keys):
            # Latest row per entity wins, as in Feast's own materialization.
            order = np.lexsort((ts, np.array(keys, dtype=object).astype(bytes)))
            sorted_keys = [keys[i] for i in order]
            last = [
                i
                for j, i in enumerate(order)
                if j + 1 == len(order) or sorted_keys[j + 1] != sorted_keys[j]
            ]
            superseded = len(keys) - len(last)
            take = np.array(sorted(last))
            table = table.take(take)
            keys = [keys[i] for i in take]
            ts = ts[take]
        created = micros(table.column(self.created)) if self.created else None
        arrays = [table.column(name).combine_chunks() for name, _ in self.features]
        return Chunk(keys, ts, created, arrays), superseded


class _FeastWriter:
    """Any other online store: hand Feast its own protos (slow, but always right)."""

    def __init__(self, config: RepoConfig, online: Any) -> None:
        self.config = config
        self.online = online

    def prepare(self, plan: ViewPlan) -> None:
        return None

    def encode(self, parts: list[tuple[ViewPlan, Chunk]]) -> list[tuple[ViewPlan, Chunk]]:
        return parts

    def written_end(self, plan: ViewPlan) -> datetime | None:
        # Another store: trust the registry's intervals, as Feast does.
        last = plan.view.most_recent_end_time
        return _utc(last) if last is not None else None

    def mark(self, plan: ViewPlan, end: datetime) -> None:
        return None

    def write(self, parts: list[tuple[ViewPlan, Chunk]]) -> None:
        from feast.infra.key_encoding_utils import deserialize_entity_key
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        for plan, chunk in parts:
            names = [name for name, _ in plan.features]
            encoded = chunk.values(plan)
            data: list[tuple[Any, dict[str, Any], datetime, datetime | None]] = []
            for i, key in enumerate(chunk.keys):
                values = {}
                for j, name in enumerate(names):
                    proto = ValueProto()
                    proto.ParseFromString(encoded[j][i])
                    values[name] = proto
                ts = datetime.fromtimestamp(int(chunk.event_ts[i]) / 1e6, tz=UTC)
                entity = deserialize_entity_key(key, plan.key_version)
                data.append((entity, values, ts, None))
            self.online.online_write_batch(self.config, plan.view, data, None)

    def close(self) -> None:
        return None


def _writer(config: RepoConfig, wal: bool) -> tuple[BulkWriter, str]:
    online = get_online_store_from_config(config.online_store)
    if isinstance(online, BulkWrites):
        return online.bulk_writer(config, wal), online.kind
    return _FeastWriter(config, online), str(config.online_store.type)


def _resolve(store: FeatureStore, view: str | FeatureView) -> FeatureView:
    name = view if isinstance(view, str) else view.name
    # Always re-read from the registry: materialization intervals live there.
    return store.get_feature_view(name, allow_registry_cache=False)


def _default_source(store: FeatureStore, view: FeatureView) -> Source:
    path = getattr(view.batch_source, "path", None)
    if not path:
        raise ValueError(
            f"feature view {view.name!r}: no source given and its batch source has no file path"
        )
    repo = store.config.repo_path
    # Feast reads relative file sources against the repo folder; so do we.
    return Path(path) if Path(path).is_absolute() or repo is None else Path(repo) / path


def write_many(
    store: FeatureStore,
    sources: Mapping[str, Source | None] | Sequence[str] | str,
    *,
    end: datetime | None = None,
    start: datetime | None = None,
    incremental: bool = False,
    chunk_rows: int = 20_000,
    progress: Callable[[int], Any] | None = None,
    wal: bool = True,
    record: bool = True,
) -> list[WriteReport]:
    """Write feature views into the online store, fast and in bounded memory.

    Chunks of views that share one source are written together (one SQLite
    transaction / one ``HSET`` per customer across those views), so a reader
    never sees a customer half refreshed.

    Parameters
    ----------
    store : feast.FeatureStore
        The store; its online store (a :class:`BulkWrites` plugin, else
        Feast's own ``online_write_batch``) receives the rows.
    sources : mapping of view name to source, list of view names, or str
        A source is a Parquet path (reduced to the latest row per entity by
        DuckDB, as ``materialize`` does), an Arrow table or record batches
        (written as given, except that within a chunk the latest row of an
        entity wins), or None for the view's file batch source. A feature
        service name writes all its views from their batch sources.
    end : datetime, optional
        Only rows with timestamp ``<= end`` are written; default now (UTC).
    start : datetime, optional
        Only rows with timestamp ``> start`` are written.
    incremental : bool
        Use each view's last materialized end time (in the registry and in
        this store's marks, whichever is earlier) as ``start``.
    chunk_rows : int
        Entities per transaction; bounds memory.
    progress : callable, optional
        Called with the number of entities after each chunk.
    wal : bool
        Switch a SQLite store to WAL journaling (readers never block on the
        writer; Feast reads WAL databases unchanged).
    record : bool
        Record the written interval (the store's marks and the Feast registry).
        ``False`` for one part of a distributed write (a Spark partition): the
        driver records it once, with :func:`record_materialization`, after every
        part succeeded.

    Returns
    -------
    list of WriteReport
        One per view, in the order of ``sources``.

    Examples
    --------
    >>> write_many(store, {"activity": "data/features/activity.parquet"})  # doctest: +SKIP
    [WriteReport(feature_view='activity', rows_read=100000, ...)]
    """
    if isinstance(sources, str):
        service = store.get_feature_service(sources, allow_cache=False)
        sources = {p.name: None for p in service.feature_view_projections}
    elif not isinstance(sources, Mapping):
        sources = {name: None for name in sources}
    end = _utc(end or datetime.now(UTC))
    writer, kind = _writer(store.config, wal)
    reports = []
    try:
        groups: dict[int, list[tuple[FeatureView, Source]]] = {}
        keys: dict[int, Source] = {}
        for name, source in sources.items():
            view = _resolve(store, name)
            src = _default_source(store, view) if source is None else source
            ident = id(src) if not isinstance(src, str | Path) else hash(str(Path(src)))
            groups.setdefault(ident, []).append((view, src))
            keys[ident] = src
        for ident, members in groups.items():
            reports += _write_group(
                store, writer, kind, members, keys[ident], end, start, incremental, chunk_rows,
                progress, record,
            )  # fmt: skip
    finally:
        writer.close()
    order = list(sources)
    return sorted(reports, key=lambda r: order.index(r.feature_view))


def _held_end(writer: BulkWriter, plan: ViewPlan) -> datetime | None:
    """Up to when this store holds the view's rows: where an incremental write starts."""
    last = plan.view.most_recent_end_time
    if last is None:
        return None
    # The registry's intervals are shared by every online store of the project:
    # start from what this store itself holds (nothing, for a new Redis).
    held = writer.written_end(plan)
    return None if held is None else min(_utc(last), held)


def materialized_until(store: FeatureStore, views: Sequence[str]) -> datetime | None:
    """The time up to which every one of ``views`` is materialized in this store, or None.

    Where an incremental write done in parts (Spark executors) starts: the same
    rule :func:`write_many` applies with ``incremental=True``.

    Examples
    --------
    >>> materialized_until(store, ["session", "basket"])  # doctest: +SKIP
    datetime.datetime(2024, 6, 3, 0, 0, 1, tzinfo=datetime.timezone.utc)
    """
    writer, _ = _writer(store.config, wal=True)
    try:
        ends = [_held_end(writer, ViewPlan(store, _resolve(store, v))) for v in views]
    finally:
        writer.close()
    known = [e for e in ends if e is not None]
    return min(known) if len(known) == len(ends) else None


def _record(
    store: FeatureStore, writer: BulkWriter, plan: ViewPlan, start: datetime, end: datetime
) -> None:
    writer.mark(plan, end)
    store.registry.apply_materialization(plan.view, store.project, start, end)


def record_materialization(
    store: FeatureStore, views: Sequence[str], start: datetime | None, end: datetime
) -> None:
    """Record that ``views`` hold their rows up to ``end`` (marks and Feast registry).

    What :func:`write_many` does after writing, for a write done in parts
    (``record=False``), e.g. by Spark executors; ``start`` defaults to ``end``.

    Examples
    --------
    >>> record_materialization(store, ["session"], None, end)  # doctest: +SKIP
    """
    writer, _ = _writer(store.config, wal=True)
    try:
        for name in views:
            plan = ViewPlan(store, _resolve(store, name))
            _record(store, writer, plan, _utc(start or end), _utc(end))
    finally:
        writer.close()


def _prefetch(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Run ``items`` in a background thread, at most ``depth`` results ahead.

    Encoding (Python, holds the GIL) then overlaps with writing (SQLite's C code
    and socket I/O release it); the bounded queue keeps memory bounded.
    """
    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((True, done))
        except BaseException as exc:  # handed to the consumer, re-raised there
            box.put((False, exc))

    worker = threading.Thread(target=run, name="online-writer-encode", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = box.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                box.get_nowait()
            except queue.Empty:
                worker.join(0.05)


@dataclass
class _Stats:
    rows: int = 0
    entities: int = 0
    superseded: int = 0
    first: datetime | None = None

    def add(self, rows: int, entities: int, superseded: int, micros: np.ndarray) -> None:
        self.rows += rows
        self.entities += entities
        self.superseded += superseded
        low = datetime.fromtimestamp(int(micros.min()) / 1e6, tz=UTC)
        self.first = low if self.first is None else min(self.first, low)


def _write_group(
    store: FeatureStore,
    writer: BulkWriter,
    kind: str,
    members: list[tuple[FeatureView, Source]],
    source: Source,
    end: datetime,
    start: datetime | None,
    incremental: bool,
    chunk_rows: int,
    progress: Callable[[int], Any] | None,
    record: bool,
) -> list[WriteReport]:
    began = time.perf_counter()
    plans = [ViewPlan(store, view) for view, _ in members]
    held = [_held_end(writer, plan) if incremental else None for plan in plans]
    windows = [w if w is not None else start for w in held]
    lead = plans[0]
    if any(p.join_keys != lead.join_keys or p.timestamp != lead.timestamp for p in plans):
        raise ValueError(
            "views sharing one source must share join keys and timestamp field: "
            + ", ".join(p.view.name for p in plans)
        )
    # Views sharing a source read it once, from the earliest start of any of them.
    window_start = None if any(w is None for w in windows) else min(windows)  # type: ignore[type-var]
    columns = list(dict.fromkeys(c for p in plans for c in p.columns))
    if isinstance(source, str | Path):
        (entity,) = lead.join_keys if len(lead.join_keys) == 1 else (None,)
        if entity is None:
            batches: Iterable[pa.RecordBatch] = _batches(source, columns, chunk_rows)
        else:
            batches = latest_rows(
                source,
                end=end,
                start=window_start,
                entity=entity,
                timestamp=lead.timestamp,
                columns=columns[1:],
                created=lead.created,
                chunk_rows=chunk_rows,
            )
    else:
        batches = _batches(source, columns, chunk_rows)
    for plan in plans:
        writer.prepare(plan)
    stats = [_Stats() for _ in plans]

    def produce() -> Iterator[tuple[int, Any]]:
        for table in _rechunk(batches, chunk_rows):
            parts = []
            for k, plan in enumerate(plans):
                plan.check(table.schema)
                rows = plan.window(table, windows[k], end)
                if rows.num_rows == 0:
                    continue
                chunk, superseded = plan.encode(rows)
                stats[k].add(rows.num_rows, len(chunk.keys), superseded, chunk.event_ts)
                parts.append((plan, chunk))
            if parts:
                yield max(len(c.keys) for _, c in parts), writer.encode(parts)

    for entities, payload in _prefetch(produce()):
        writer.write(payload)
        if progress is not None:
            progress(entities)
    seconds = time.perf_counter() - began
    reports = []
    for k, plan in enumerate(plans):
        got = stats[k]
        interval_start = windows[k]
        if interval_start is None:
            interval_start = got.first if got.first is not None else end
        if record:
            _record(store, writer, plan, interval_start, end)
        reports.append(
            WriteReport(
                feature_view=plan.view.name,
                rows_read=got.rows,
                entities_written=got.entities,
                superseded=got.superseded,
                values_written=got.entities * len(plan.features),
                start=interval_start,
                end=end,
                seconds=seconds,
                store=kind,
            )
        )
    return reports


class BulkWriter(Protocol):
    """A store plugin's side of :func:`write_many`; one per write, closed after it."""

    def prepare(self, plan: ViewPlan) -> None: ...

    def encode(self, parts: list[tuple[ViewPlan, Chunk]]) -> Any:
        """Runs on the prefetch thread: everything but the store's own I/O."""

    def write(self, payload: Any) -> None: ...

    def written_end(self, plan: ViewPlan) -> datetime | None:
        """End of the last interval of ``plan``'s view this store holds (its marks)."""

    def mark(self, plan: ViewPlan, end: datetime) -> None: ...

    def close(self) -> None: ...


class BulkWrites:
    """Mixin of the project's online-store plugins: they provide a :class:`BulkWriter`."""

    #: Name of the store in write reports.
    kind = "bulk"

    def bulk_writer(self, config: RepoConfig, wal: bool) -> BulkWriter:
        raise NotImplementedError
