"""The Feast adapter against real Feast: offline (DuckDB), online (SQLite, Redis)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from features_testdata import REPO_FEATURE_REPO, random_events

from propensity.config import OnlineStore, Settings
from propensity.events.lake import EventLake
from propensity.features.definitions import (
    FEATURES,
    SERVICES,
    STREAMING_FEATURES,
    STREAMING_VIEW,
    features_of,
)
from propensity.features.snapshots import build_features, compute_features, feature_table_path
from propensity.features.store import FeatureStoreAdapter, redis_connection_string
from propensity.features.streaming_offline import streaming_features

TIMES = [pd.Timestamp(d, tz="UTC") for d in ("2024-02-05", "2024-02-12", "2024-02-19")]
LATEST = TIMES[-1]
# Together these two services read every feature view.
COVERING = ("nba_v1", "churn_v2")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("project")
    settings = Settings(root=root, feature_repo=REPO_FEATURE_REPO)
    EventLake(settings.path(settings.lake_dir)).append(
        random_events(customers=60, events=4000, days=50, seed=21)
    )
    build_features(settings, TIMES)
    return settings


@pytest.fixture(scope="module")
def snapshot_values(built: Settings) -> pd.DataFrame:
    events = EventLake(built.path(built.lake_dir)).read_table()
    return compute_features(events, TIMES).set_index(["customer_id", "event_timestamp"])


@pytest.fixture(scope="module")
def adapter(built: Settings) -> FeatureStoreAdapter:
    store = FeatureStoreAdapter(built)
    store.apply()
    return store


def test_build_writes_one_table_per_view_and_rebuilds_incrementally(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path, feature_repo=REPO_FEATURE_REPO)
    lake = EventLake(settings.path(settings.lake_dir))
    lake.append(random_events(customers=20, events=800, days=40, seed=2))
    times = ["2024-01-29", "2024-02-05"]
    build_features(settings, times)
    path = feature_table_path(settings.path(settings.features_dir), "session")
    first = pd.read_parquet(path)
    assert str(first["event_timestamp"].dt.tz) == "UTC"
    # late events for the second week only; rebuild that snapshot alone
    lake.append(random_events(customers=20, events=200, days=35, seed=9))
    report = build_features(settings, ["2024-02-05"])
    assert report.snapshots == (pd.Timestamp("2024-02-05", tz="UTC"),)
    second = pd.read_parquet(path)
    old = pd.Timestamp("2024-01-29", tz="UTC")
    pd.testing.assert_frame_equal(
        first[first.event_timestamp == old].reset_index(drop=True),
        second[second.event_timestamp == old].reset_index(drop=True),
    )
    assert not first[first.event_timestamp != old].equals(second[second.event_timestamp != old])
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_service_features_follow_the_registry(adapter: FeatureStoreAdapter) -> None:
    churn = adapter.service_features("churn_v1")
    assert "days_since_last_seen" in churn and "discounts_30d" not in churn
    shift = [f.name for f in features_of("activity_shift")]
    assert adapter.service_features("churn_v2") == churn[:-1] + shift + churn[-1:]
    assert "discounts_30d" in adapter.service_features("nba_v1")
    registered = {
        ref.name: ref for ref in adapter.store.list_feature_services()
    }  # what Feast holds matches the registry
    assert set(registered) == set(SERVICES)
    fs = adapter.store.get_feature_service("nba_v1")
    names = [f.name for p in fs.feature_view_projections for f in p.features]
    assert names == adapter.service_features("nba_v1")


def test_training_frame_equals_snapshot_values(
    adapter: FeatureStoreAdapter, snapshot_values: pd.DataFrame
) -> None:
    keys = snapshot_values.index.to_frame(index=False).sample(frac=1.0, random_state=0)
    entity = keys.assign(label=np.arange(len(keys)) % 2).reset_index(drop=True)
    first, second = (adapter.historical(entity, service) for service in COVERING)
    frame = first.join(second.drop(columns=first.columns.intersection(second.columns)))
    # entity rows kept, in order, with their extra columns
    pd.testing.assert_frame_equal(frame[["customer_id", "event_timestamp", "label"]], entity)
    expected = snapshot_values.loc[
        list(zip(entity.customer_id, entity.event_timestamp, strict=True))
    ]
    for f in FEATURES:
        np.testing.assert_allclose(frame[f.name], expected[f.name], rtol=1e-12, err_msg=f.name)
    # on-demand value, offline: request_time defaults to the cutoff
    np.testing.assert_allclose(
        frame["days_since_last_seen"], expected["days_since_last_event"], rtol=1e-9
    )


def test_cutoff_between_snapshots_reads_the_previous_one(
    adapter: FeatureStoreAdapter, snapshot_values: pd.DataFrame
) -> None:
    customer = snapshot_values.xs(TIMES[1], level=1).index[0]
    cutoff = TIMES[1] + pd.Timedelta(days=3)
    entity = pd.DataFrame({"customer_id": [customer], "event_timestamp": [cutoff]})
    row = adapter.historical(entity, "churn_v1").iloc[0]
    assert row["sessions_30d"] == snapshot_values.loc[(customer, TIMES[1]), "sessions_30d"]
    assert row["days_since_last_seen"] == pytest.approx(
        snapshot_values.loc[(customer, TIMES[1]), "days_since_last_event"] + 3
    )


def _check_online_matches_offline(
    store: FeatureStoreAdapter, snapshot_values: pd.DataFrame
) -> None:
    store.materialize()
    latest = snapshot_values.xs(LATEST, level=1)
    sample = list(latest.sample(n=25, random_state=1).index) + ["C_unknown"]
    request_time = LATEST + pd.Timedelta(hours=12)
    online = store.online(sample, "nba_v1", request_time=request_time)
    assert list(online["customer_id"]) == sample
    shift = store.online(sample, "churn_v2", request_time=request_time).set_index("customer_id")
    got = online.set_index("customer_id")
    got = got.join(shift.drop(columns=got.columns.intersection(shift.columns)))
    for f in FEATURES:
        np.testing.assert_allclose(
            got.loc[sample[:-1], f.name],
            latest.loc[sample[:-1], f.name],
            rtol=1e-12,
            err_msg=f.name,
        )
    assert got.loc["C_unknown"].isna().all()
    np.testing.assert_allclose(
        got.loc[sample[:-1], "days_since_last_seen"],
        latest.loc[sample[:-1], "days_since_last_event"] + 0.5,
        rtol=1e-9,
    )
    # the same request offline gives the same values
    entity = pd.DataFrame(
        {
            "customer_id": sample[:-1],
            "event_timestamp": LATEST,
            "request_time": request_time.timestamp(),
        }
    )
    for service in COVERING:
        offline = store.historical(entity, service).set_index("customer_id")
        names = store.service_features(service)
        pd.testing.assert_frame_equal(
            offline[names], got.loc[sample[:-1], names], check_names=False
        )


def test_online_equals_offline_on_sqlite(
    adapter: FeatureStoreAdapter, snapshot_values: pd.DataFrame
) -> None:
    _check_online_matches_offline(adapter, snapshot_values)


def _redis_url() -> str | None:
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    try:
        with socket.create_connection(("localhost", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return "localhost:6379"
    except OSError:
        pass
    return None


@pytest.mark.redis
def test_online_equals_offline_on_redis(built: Settings, snapshot_values: pd.DataFrame) -> None:
    url = _redis_url()
    if url is None:
        pytest.skip("REDIS_URL unset and no redis-server on localhost:6379")
    settings = built.model_copy(update={"online_store": OnlineStore(kind="redis", redis_url=url)})
    # a project of its own, so runs never read each other's keys
    store = FeatureStoreAdapter(settings, project=f"propensity_test_{uuid.uuid4().hex[:8]}")
    store.apply()
    try:
        _check_online_matches_offline(store, snapshot_values)
    finally:
        store.store.teardown()


def test_redis_url_forms() -> None:
    assert redis_connection_string("redis://:pw@h:1/3") == "h:1,db=3,password=pw"
    assert redis_connection_string("h:6379,db=1") == "h:6379,db=1"


def test_ensure_applied_applies_once_then_again_after_a_definition_change(
    tmp_path: Path,
) -> None:
    from propensity.config import Settings
    from propensity.features.store import FeatureStoreAdapter

    repo = tmp_path / "feature_repo"
    repo.mkdir()
    source = Path(__file__).resolve().parents[2] / "feature_repo" / "repo.py"
    (repo / "repo.py").write_text(source.read_text())
    adapter = FeatureStoreAdapter(Settings(root=tmp_path, feature_repo=repo))
    assert adapter.ensure_applied() is True  # no registry yet
    assert adapter.ensure_applied() is False  # nothing changed
    (repo / "repo.py").write_text(source.read_text() + "\n# edited\n")
    assert FeatureStoreAdapter(Settings(root=tmp_path, feature_repo=repo)).ensure_applied()


def test_streaming_services_serve_the_pushed_values_and_train_on_the_lakes(
    adapter: FeatureStoreAdapter, built: Settings
) -> None:
    adapter.apply()  # the Redis test (own project, same registry file) tears its project down
    streaming = [f.name for f in STREAMING_FEATURES]
    # The new versions add the streaming view; the old ones are unchanged.
    for new, old in (("churn_v3", "churn_v2"), ("purchase_v2", "purchase_v1")):
        names = adapter.service_features(new)
        assert [n for n in names if n not in streaming] == adapter.service_features(old)
        fs = adapter.store.get_feature_service(new)
        assert [f.name for p in fs.feature_view_projections for f in p.features] == names
    assert not set(streaming) & set(adapter.service_features("churn_v2"))

    # Offline: the batch values of the old version, the streaming ones from the lake's
    # tiles at each row's cutoff (minutes after real events, so the windows hold counts).
    lake = EventLake(built.path(built.lake_dir))
    events = lake.read_table().to_pandas()
    events = events[events["event_timestamp"] > LATEST - pd.Timedelta(days=6)]
    picked = events.drop_duplicates("customer_id").head(12)
    entity = pd.DataFrame(
        {
            "customer_id": picked["customer_id"].tolist(),
            "event_timestamp": pd.to_datetime(picked["event_timestamp"], utc=True)
            + pd.Timedelta(minutes=10),
        }
    )
    frame = adapter.historical(entity, "churn_v3")
    pd.testing.assert_frame_equal(
        frame.drop(columns=streaming), adapter.historical(entity, "churn_v2")
    )
    want = streaming_features(lake, entity, built.timezone)
    pd.testing.assert_frame_equal(frame[streaming], want[streaming])
    assert (frame["events_30m"] > 0).all()

    # Online: values pushed through Feast's push source are what Feast's reader of the
    # new service returns, beside the materialized batch values.
    adapter.materialize()
    row = frame.iloc[:1]
    adapter.store.push(
        f"{STREAMING_VIEW}_push", row[["customer_id", "event_timestamp", *streaming]]
    )
    when = row["event_timestamp"].iloc[0]
    ids = row["customer_id"].tolist()
    online = adapter.online(ids, "churn_v3", request_time=when)
    pd.testing.assert_frame_equal(
        online[streaming].reset_index(drop=True), row[streaming].reset_index(drop=True)
    )
    batch = adapter.online(ids, "churn_v2", request_time=when)
    pd.testing.assert_frame_equal(online[batch.columns], batch)
