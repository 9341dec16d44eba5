"""The online-store plugins keep Feast's online format byte for byte."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.types import Bool, Float32, Float64, Int32, Int64, String
from feast.utils import _columns_to_proto_values
from feast.value_type import ValueType

from propensity.features.online import WriteReport, latest_rows, write_many
from propensity.features.online._codec import encode_entity_keys, encode_values

T0 = datetime(2024, 3, 1, tzinfo=UTC)
T1 = datetime(2024, 3, 8, tzinfo=UTC)
T2 = datetime(2024, 3, 15, tzinfo=UTC)
FUTURE = datetime(2024, 3, 22, tzinfo=UTC)
FLOATS = [f"f{i}" for i in range(10)]
INTS = ["n_orders", "n_sessions"]
REDIS_URL = os.environ.get("REDIS_URL", "localhost:6379").removeprefix("redis://")


def _snapshots(n_customers: int, seed: int = 0) -> pa.Table:
    """Weekly snapshots; some customers miss the later ones, one row is in the future."""
    rng = np.random.default_rng(seed)
    ids, stamps = [], []
    for c in range(n_customers):
        last = [T0, T1, T2, FUTURE][: 1 + c % 4]
        ids += [f"C{c:07d}"] * len(last)
        stamps += last
    n = len(ids)
    columns: dict[str, pa.Array] = {
        "customer_id": pa.array(ids),
        "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
    }
    for name in FLOATS:
        values = rng.normal(0, 100, n)
        values[rng.random(n) < 0.1] = np.nan  # Feast reads NaN as missing
        mask = rng.random(n) < 0.1
        columns[name] = pa.array(values, pa.float64(), mask=mask)
    for name in INTS:
        values = rng.integers(-(2**40), 2**40, n)
        columns[name] = pa.array(values, pa.int64(), mask=rng.random(n) < 0.1)
    # Customers from C0000256 on carry long strings: their chunks take the row-by-row path.
    columns["segment"] = pa.array(
        [
            None if i % 7 == 0 else f"seg-é{i % 3}" + ("-long" * 10 if c >= "C0000256" else "")
            for i, c in enumerate(ids)
        ],
        pa.string(),
    )
    columns["is_member"] = pa.array([None if i % 5 == 0 else i % 2 == 0 for i in range(n)])
    return pa.table(columns)


SQLITE_PLUGIN = "propensity.features.online.sqlite.BulkSqliteOnlineStore"
REDIS_PLUGIN = "propensity.features.online.redis.BulkRedisOnlineStore"


def write_online(
    store: FeatureStore, view: str, source: object = None, **options: object
) -> WriteReport:
    """One view through the plugins' bulk writer."""
    return write_many(store, {view: source}, **options)[0]  # type: ignore[dict-item, arg-type]


def _store(tmp_path: Path, name: str, data: Path, online: str, project: str) -> FeatureStore:
    """A store on the project's plugin; the one named ``stock`` on Feast's own store."""
    repo = tmp_path / name
    repo.mkdir()
    stock = name == "stock"
    online_config: dict[str, object] = (
        {"type": "sqlite" if stock else SQLITE_PLUGIN, "path": str(repo / "online.db")}
        if online == "sqlite"
        else {"type": "redis" if stock else REDIS_PLUGIN, "connection_string": REDIS_URL}
    )
    config = RepoConfig(
        project=project,
        provider="local",
        registry=str(repo / "registry.db"),
        online_store=online_config,
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=3,
        repo_path=repo,
    )
    store = FeatureStore(config=config)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)
    source = FileSource(path=str(data), timestamp_field="event_timestamp")
    schema = [Field(name=f, dtype=Float64) for f in FLOATS]
    schema += [Field(name=f, dtype=Int64) for f in INTS]
    schema += [Field(name="segment", dtype=String), Field(name="is_member", dtype=Bool)]
    activity = FeatureView(
        name="activity",
        entities=[customer],
        ttl=timedelta(days=3650),
        schema=schema,
        source=source,
        online=True,
    )
    head = FeatureView(
        name="activity_head",
        entities=[customer],
        ttl=timedelta(days=3650),
        schema=schema[:3],
        source=source,
        online=True,
    )
    service = FeatureService(name="activity_v1", features=[activity, head])
    store.apply([customer, activity, head, service])
    return store


def _online(store: FeatureStore, ids: list[str], view: str = "activity") -> dict[str, list]:
    refs = [f"{view}:{f}" for f in [*FLOATS, *INTS, "segment", "is_member"]]
    if view == "activity_head":
        refs = refs[:3]
    rows = [{"customer_id": c} for c in ids]
    return store.get_online_features(features=refs, entity_rows=rows).to_dict()


@pytest.fixture(scope="module")
def snapshot_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "snapshots.parquet"
    pq.write_table(_snapshots(300), path)
    return path


# ----------------------------------------------------------------------------- encoding


def test_double_and_int_bytes_equal_valueproto() -> None:
    doubles = [0.0, -0.0, 1.5, -2.25e-300, 1e308, float("inf"), float("-inf"), None, float("nan")]
    got = encode_values(pa.array(doubles, pa.float64()), ValueType.DOUBLE)
    for value, raw in zip(doubles, got, strict=True):
        if value is None or value != value:
            assert raw == b""
        else:
            assert raw == ValueProto(double_val=value).SerializeToString()
            assert len(raw) == 9 and raw[0] == 0x29

    ints = [0, 1, -1, 127, 128, 300, -300, 2**63 - 1, -(2**63), None]
    got = encode_values(pa.array(ints, pa.int64()), ValueType.INT64)
    expected = [b"" if v is None else ValueProto(int64_val=v).SerializeToString() for v in ints]
    assert got == expected
    int32s = [0, -1, 2**31 - 1, -(2**31), None]
    got = encode_values(pa.array(int32s, pa.int32()), ValueType.INT32)
    assert got == [
        b"" if v is None else ValueProto(int32_val=v).SerializeToString() for v in int32s
    ]


def test_every_bulk_type_equals_feasts_own_conversion() -> None:
    table = _snapshots(40, seed=3)
    extra = pa.table(
        {
            "f32": pa.array([1.1, None, float("nan"), -0.0] * 10, pa.float32()),
            "i32": pa.array([5, None, -7, 0] * 10, pa.int32()),
            "long": pa.array(["x" * 200, None, "", "ü"] * 10),
        }
    )
    columns = [(f, ValueType.DOUBLE) for f in FLOATS] + [(f, ValueType.INT64) for f in INTS]
    columns += [("segment", ValueType.STRING), ("is_member", ValueType.BOOL)]
    extra_columns = [("f32", ValueType.FLOAT), ("i32", ValueType.INT32), ("long", ValueType.STRING)]
    for source, cols in [(table, columns), (extra, extra_columns)]:
        feast_protos = _columns_to_proto_values(source.to_batches()[0], cols, allow_missing=False)
        for name, vtype in cols:
            expected = [p.SerializeToString() for p in feast_protos[name]]
            assert encode_values(source.column(name), vtype) == expected, name
    assert Float32 and Int32  # the types exercised above, as Feast names them


def test_entity_keys_equal_feast_serialization() -> None:
    ids = ["C0000001", "", "ünï", "C" * 300]
    got = encode_entity_keys({"customer_id": pa.array(ids)}, {"customer_id": ValueType.STRING})
    for key, raw in zip(ids, got, strict=True):
        proto = EntityKeyProto(
            join_keys=["customer_id"], entity_values=[ValueProto(string_val=key)]
        )
        assert raw == serialize_entity_key(proto, entity_key_serialization_version=3)
    nums = [0, -5, 2**62]
    got = encode_entity_keys({"uid": pa.array(nums)}, {"uid": ValueType.INT64})
    for key, raw in zip(nums, got, strict=True):
        proto = EntityKeyProto(join_keys=["uid"], entity_values=[ValueProto(int64_val=key)])
        assert raw == serialize_entity_key(proto, entity_key_serialization_version=3)
    with pytest.raises(ValueError, match="row 1: join key 'customer_id' is null"):
        encode_entity_keys(
            {"customer_id": pa.array(["a", None])}, {"customer_id": ValueType.STRING}
        )


def test_latest_rows_picks_the_latest_row_at_or_before_end(snapshot_file: Path) -> None:
    rows = pa.Table.from_batches(list(latest_rows(snapshot_file, end=T2, chunk_rows=64)))
    assert rows.num_rows == 300  # one per customer, the future row ignored
    assert len(set(rows.column("customer_id").to_pylist())) == 300
    stamps = dict(
        zip(rows["customer_id"].to_pylist(), rows["event_timestamp"].to_pylist(), strict=True)
    )
    assert stamps["C0000000"] == T0 and stamps["C0000001"] == T1
    assert stamps["C0000002"] == T2 and stamps["C0000003"] == T2
    newer = pa.Table.from_batches(list(latest_rows(snapshot_file, end=T2, start=T1)))
    assert set(newer["event_timestamp"].to_pylist()) == {T2}


# ------------------------------------------------------------------------------- SQLite


def _sqlite_rows(store: FeatureStore, table: str) -> list[tuple]:
    path = store.config.repo_path / "online.db"  # type: ignore[operator]
    with sqlite3.connect(path) as conn:
        return conn.execute(
            f"SELECT entity_key, feature_name, value, value_text, event_ts, created_ts "
            f"FROM {table} ORDER BY entity_key, feature_name"
        ).fetchall()


def test_sqlite_matches_stock_materialize_cell_by_cell(tmp_path: Path, snapshot_file: Path) -> None:
    stock = _store(tmp_path, "stock", snapshot_file, "sqlite", "proj")
    fast = _store(tmp_path, "fast", snapshot_file, "sqlite", "proj")
    stock.materialize(T0 - timedelta(days=1), T2, feature_views=["activity"])
    report = write_online(fast, "activity", snapshot_file, end=T2, chunk_rows=64)
    assert report.entities_written == 300 and report.rows_read == 300
    assert report.values_written == 300 * 14 and report.store == "sqlite"

    ids = [f"C{c:07d}" for c in range(300)] + ["C9999999"]  # plus one unknown customer
    expected, got = _online(stock, ids), _online(fast, ids)
    assert got.keys() == expected.keys()
    for column in expected:
        for i, (e, g) in enumerate(zip(expected[column], got[column], strict=True)):
            assert e == g or (e != e and g != g), (column, ids[i], e, g)
    assert got["f0"][-1] is None  # unknown customer
    assert any(v is None for v in got["f1"][:300])  # nulls survive as nulls
    # The stored rows themselves are identical, byte for byte.
    assert _sqlite_rows(fast, "proj_activity") == _sqlite_rows(stock, "proj_activity")

    interval = fast.get_feature_view("activity").materialization_intervals[-1]
    assert interval[1] == T2


def test_incremental_writes_only_rows_newer_than_last_end(
    tmp_path: Path, snapshot_file: Path
) -> None:
    data = tmp_path / "data.parquet"
    pq.write_table(pq.read_table(snapshot_file), data)
    store = _store(tmp_path, "repo", data, "sqlite", "proj")
    first = write_online(store, "activity", data, end=T1)
    assert first.entities_written == 300
    assert store.get_feature_view("activity").most_recent_end_time == T1

    # Rewrite history at and before T1: an incremental run must not read it again.
    table = pq.read_table(data)
    old = pc_less_equal(table, T1)
    f0 = np.where(old, 99.0, table["f0"].to_numpy(zero_copy_only=False))
    pq.write_table(table.set_column(table.schema.get_field_index("f0"), "f0", pa.array(f0)), data)

    second = write_online(store, "activity", data, end=T2, incremental=True)
    assert second.rows_read == 150 and second.entities_written == 150  # customers with a T2 row
    assert second.start == T1 and second.end == T2
    ids = [f"C{c:07d}" for c in range(300)]
    values = dict(zip(ids, _online(store, ids)["f0"], strict=True))
    assert 99.0 not in values.values()
    assert store.get_feature_view("activity").most_recent_end_time == T2


def pc_less_equal(table: pa.Table, when: datetime) -> np.ndarray:
    stamps = table["event_timestamp"].to_pylist()
    return np.array([s <= when for s in stamps])


def _uniform(n_customers: int, value: float, when: datetime) -> pa.Table:
    ids = [f"C{c:07d}" for c in range(n_customers)]
    columns: dict[str, pa.Array] = {
        "customer_id": pa.array(ids),
        "event_timestamp": pa.array([when] * n_customers, pa.timestamp("us", tz="UTC")),
    }
    for name in FLOATS:
        columns[name] = pa.array([value] * n_customers)
    for name in INTS:
        columns[name] = pa.array([int(value)] * n_customers)
    columns["segment"] = pa.array([str(value)] * n_customers)
    columns["is_member"] = pa.array([value > 1] * n_customers)
    return pa.table(columns)


def _assert_never_torn(store: FeatureStore, n: int) -> None:
    """A reader polling during a refresh sees each customer all-old or all-new."""
    write_online(store, "activity", _uniform(n, 1.0, T1), end=T1, chunk_rows=n)
    ids = [f"C{c:07d}" for c in range(0, n, 7)]
    seen: list[list[set]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            got = _online(store, ids)
            seen.append([{got[f][i] for f in FLOATS} for i in range(len(ids))])

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        # A pause between chunks (outside any transaction) lets the reader land mid-refresh.
        write_online(
            store,
            "activity",
            _uniform(n, 2.0, T2),
            end=T2,
            chunk_rows=40,
            progress=lambda _: time.sleep(0.01),
        )
    finally:
        done.set()
        reader.join()
    assert seen
    assert all(len(values) == 1 for snapshot in seen for values in snapshot)
    mixed = [s for s in seen if {next(iter(v)) for v in s} == {1.0, 2.0}]
    assert mixed, "the reader never observed a refresh in progress"
    assert all(v == {2.0} for v in _online_sets(store, ids))


def _online_sets(store: FeatureStore, ids: list[str]) -> list[set]:
    got = _online(store, ids)
    return [{got[f][i] for f in FLOATS} for i in range(len(ids))]


def test_sqlite_reader_never_sees_a_customer_half_refreshed(tmp_path: Path) -> None:
    data = tmp_path / "uniform.parquet"
    pq.write_table(_uniform(10, 0.0, T0), data)
    _assert_never_torn(_store(tmp_path, "repo", data, "sqlite", "proj"), 2_000)


def test_feature_service_views_sharing_a_source_are_written_together(
    tmp_path: Path, snapshot_file: Path
) -> None:
    store = _store(tmp_path, "repo", snapshot_file, "sqlite", "proj")
    reports = write_many(store, "activity_v1", end=T2, chunk_rows=50)
    assert [r.feature_view for r in reports] == ["activity", "activity_head"]
    ids = [f"C{c:07d}" for c in range(300)]
    full, head = _online(store, ids), _online(store, ids, "activity_head")
    for name in FLOATS[:3]:
        assert np.allclose(
            np.array(full[name], dtype=float), np.array(head[name], dtype=float), equal_nan=True
        )


def test_missing_feature_column_is_named(tmp_path: Path, snapshot_file: Path) -> None:
    store = _store(tmp_path, "repo", snapshot_file, "sqlite", "proj")
    table = _uniform(5, 1.0, T1).drop_columns(["f3"])
    with pytest.raises(
        ValueError, match=r"feature view 'activity': source lacks column\(s\) \['f3'\]"
    ):
        write_online(store, "activity", table, end=T2)


def test_duplicate_rows_in_a_chunk_keep_the_latest_and_are_counted(
    tmp_path: Path, snapshot_file: Path
) -> None:
    store = _store(tmp_path, "repo", snapshot_file, "sqlite", "proj")
    table = pa.concat_tables([_uniform(5, 2.0, T2), _uniform(5, 1.0, T1)])
    report = write_online(store, "activity", table, end=T2)
    assert report.superseded == 5 and report.entities_written == 5
    assert all(v == {2.0} for v in _online_sets(store, [f"C{c:07d}" for c in range(5)]))


# -------------------------------------------------------------------------------- Redis


def _redis_client():  # type: ignore[no-untyped-def]
    redis = pytest.importorskip("redis")
    host, _, port = REDIS_URL.partition(",")[0].partition(":")
    client = redis.Redis(host=host, port=int(port or 6379))
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        # CI sets REDIS_URL and starts the server: a dead server there is a failure.
        if "REDIS_URL" in os.environ:
            pytest.fail(f"REDIS_URL is set but no redis-server answers at {REDIS_URL}")
        pytest.skip(f"no redis-server at {REDIS_URL}")
    return client


@pytest.mark.redis
def test_redis_matches_stock_materialize_cell_by_cell(tmp_path: Path, snapshot_file: Path) -> None:
    client = _redis_client()
    suffix = f"{os.getpid()}_{time.time_ns()}"
    stock = _store(tmp_path, "stock", snapshot_file, "redis", f"stock_{suffix}")
    fast = _store(tmp_path, "fast", snapshot_file, "redis", f"fast_{suffix}")
    try:
        stock.materialize(T0 - timedelta(days=1), T2, feature_views=["activity"])
        report = write_online(fast, "activity", snapshot_file, end=T2, chunk_rows=64)
        assert report.entities_written == 300 and report.store == "redis"
        ids = [f"C{c:07d}" for c in range(300)] + ["C9999999"]
        expected, got = _online(stock, ids), _online(fast, ids)
        for column in expected:
            for i, (e, g) in enumerate(zip(expected[column], got[column], strict=True)):
                assert e == g or (e != e and g != g), (column, ids[i], e, g)
        # Same hash fields and bytes under each customer's key.
        for customer in ids[:50]:
            proto = EntityKeyProto(
                join_keys=["customer_id"], entity_values=[ValueProto(string_val=customer)]
            )
            key = serialize_entity_key(proto, entity_key_serialization_version=3)
            assert client.hgetall(key + f"fast_{suffix}".encode()) == client.hgetall(
                key + f"stock_{suffix}".encode()
            )
    finally:
        for project in (f"stock_{suffix}", f"fast_{suffix}"):
            for key in client.scan_iter(b"*" + project.encode()):
                client.delete(key)


@pytest.mark.redis
def test_redis_reader_never_sees_a_customer_half_refreshed(tmp_path: Path) -> None:
    client = _redis_client()
    project = f"torn_{os.getpid()}_{time.time_ns()}"
    data = tmp_path / "uniform.parquet"
    pq.write_table(_uniform(10, 0.0, T0), data)
    try:
        _assert_never_torn(_store(tmp_path, "repo", data, "redis", project), 2_000)
    finally:
        for key in client.scan_iter(b"*" + project.encode()):
            client.delete(key)


@pytest.mark.redis
def test_incremental_write_into_a_new_store_writes_everything(
    tmp_path: Path, snapshot_file: Path
) -> None:
    # The registry's intervals are shared by the project's online stores: after an
    # incremental write to SQLite, the first incremental write to an empty Redis must
    # still write every customer, not find the interval "already materialized".
    client = _redis_client()
    project = f"switch_{os.getpid()}_{time.time_ns()}"
    sqlite_store = _store(tmp_path, "repo", snapshot_file, "sqlite", project)
    assert write_online(sqlite_store, "activity", end=T2, incremental=True).entities_written == 300
    redis_store = FeatureStore(
        config=RepoConfig(
            project=project,
            provider="local",
            registry=str(tmp_path / "repo" / "registry.db"),  # the same registry
            online_store={"type": REDIS_PLUGIN, "connection_string": REDIS_URL},
            offline_store={"type": "duckdb"},
            entity_key_serialization_version=3,
            repo_path=tmp_path / "repo",
        )
    )
    try:
        report = write_online(redis_store, "activity", end=T2, incremental=True)
        assert report.entities_written == 300 and report.store == "redis"
        ids = [f"C{c:07d}" for c in range(300)]
        assert None not in _online(redis_store, ids)["n_orders"][:3]
        # Written once, the store is up to date: the next incremental run writes nothing.
        again = write_online(redis_store, "activity", end=T2, incremental=True)
        assert again.entities_written == 0
    finally:
        for key in client.scan_iter(b"*" + project.encode()):
            client.delete(key)


# ----------------------------------------------------------------------------- the plugins


def test_feasts_own_materialize_through_the_plugin_writes_stock_bytes(
    tmp_path: Path, snapshot_file: Path
) -> None:
    # Feast's materialize (and push, write_to_online_store) call the plugin's
    # online_write_batch: its one-transaction bulk path must store what Feast's would.
    stock = _store(tmp_path, "stock", snapshot_file, "sqlite", "proj")
    plugin = _store(tmp_path, "plugin", snapshot_file, "sqlite", "proj")
    assert type(plugin._get_provider().online_store).__name__ == "BulkSqliteOnlineStore"
    for store in (stock, plugin):
        store.materialize(T0 - timedelta(days=1), T2, feature_views=["activity"])
    assert _sqlite_rows(plugin, "proj_activity") == _sqlite_rows(stock, "proj_activity")
    ids = [f"C{c:07d}" for c in range(0, 300, 7)]
    assert _online(plugin, ids) == _online(stock, ids)
    pushed = pa.table({"customer_id": ["C0000001"], "event_timestamp": [FUTURE]}).to_pandas()
    for name in [*FLOATS, *INTS]:
        pushed[name] = 1
    pushed["segment"], pushed["is_member"] = "x", True
    for store in (stock, plugin):
        store.write_to_online_store("activity", pushed)
    assert _sqlite_rows(plugin, "proj_activity") == _sqlite_rows(stock, "proj_activity")


def test_delete_entities_leaves_no_key_bytes_in_the_file(
    tmp_path: Path, snapshot_file: Path
) -> None:
    from propensity.features.online import BulkSqliteOnlineStore, entity_key

    store = _store(tmp_path, "repo", snapshot_file, "sqlite", "proj")
    write_online(store, "activity", snapshot_file, end=T2)
    path = tmp_path / "repo" / "online.db"
    gone = [entity_key(f"C{c:07d}") for c in (1, 2)]
    removed, _ = BulkSqliteOnlineStore.delete_entities(path, "proj", gone)
    assert removed == 2 * (len(FLOATS) + len(INTS) + 2)
    data = path.read_bytes()
    assert not any(k in data for k in gone)
    assert _online(store, ["C0000001", "C0000003"])["n_orders"][0] is None
    assert _online(store, ["C0000003"])["n_orders"][0] is not None


def _layout(store: FeatureStore, table: str) -> str:
    path = store.config.repo_path / "online.db"  # type: ignore[operator]
    with sqlite3.connect(path) as conn:
        return str(
            conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        )


def test_a_store_in_feasts_rowid_layout_is_read_then_clustered(
    tmp_path: Path, snapshot_file: Path
) -> None:
    from propensity.features.online import SqliteReader

    stock = _store(tmp_path, "stock", snapshot_file, "sqlite", "proj")
    stock.materialize(T0 - timedelta(days=1), T2, feature_views=["activity"])
    feast_ddl = _layout(stock, "proj_activity")
    assert "WITHOUT ROWID" not in feast_ddl.upper()
    plugin = _store(tmp_path, "plugin", snapshot_file, "sqlite", "proj")
    assert "WITHOUT ROWID" in _layout(plugin, "proj_activity")  # applied: clustered from the start
    # A store written before the clustered layout: Feast's own table and rows.
    plugin_db = plugin.config.repo_path / "online.db"  # type: ignore[operator]
    with sqlite3.connect(plugin_db) as conn:
        conn.execute("DROP TABLE proj_activity")
        conn.execute(feast_ddl)
        conn.execute("CREATE INDEX proj_activity_ek ON proj_activity (entity_key)")
        conn.execute("ATTACH ? AS old", (str(stock.config.repo_path / "online.db"),))  # type: ignore[operator]
        conn.execute("INSERT INTO proj_activity SELECT * FROM old.proj_activity")
    assert "WITHOUT ROWID" not in _layout(plugin, "proj_activity").upper()

    ids = [f"C{c:07d}" for c in range(0, 300, 3)] + ["C9999999"]
    refs = [f"activity:{f}" for f in [*FLOATS, *INTS]]
    reader = SqliteReader(plugin_db, refs, project="proj")
    before = reader.read(ids, time.time())
    assert before.found[:-1].all() and not before.found[-1]
    assert _online(plugin, ids) == _online(stock, ids)  # Feast's reader, old layout

    report = write_online(plugin, "activity", snapshot_file, end=T2, chunk_rows=64)
    assert report.entities_written == 300
    assert "WITHOUT ROWID" in _layout(plugin, "proj_activity")  # rebuilt on write
    after = SqliteReader(plugin_db, refs, project="proj").read(ids, time.time())
    np.testing.assert_array_equal(after.matrix, before.matrix)
    np.testing.assert_array_equal(after.found, before.found)
    assert _online(plugin, ids) == _online(stock, ids)  # Feast's reader, new layout
    assert _sqlite_rows(plugin, "proj_activity") == _sqlite_rows(stock, "proj_activity")
