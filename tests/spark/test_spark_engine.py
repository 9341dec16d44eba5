"""One setting switches a project to Spark: the CLI's build, materialize, train and bulk score.

Two projects hold the same simulated lake, one on DuckDB and one with ``engine: spark``;
what each engine produces must agree (labels exactly, online rows and scores to 1e-9/1e-6),
the Spark training frame is sampled with its weights applied and recorded in MLflow, and
the executors materialize into a real Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TEST_SPARK
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

from jobs_project import clean_env, fast_specs, free_port, make_project  # noqa: E402

from propensity import registry  # noqa: E402
from propensity.cli import app  # noqa: E402
from propensity.config import OnlineStore, Settings, load_settings  # noqa: E402
from propensity.events.lake import EventLake  # noqa: E402
from propensity.events.simulator import SimulationConfig, simulate  # noqa: E402
from propensity.features.definitions import VIEWS  # noqa: E402
from propensity.features.online import materialized_until  # noqa: E402
from propensity.features.snapshots import feature_table_path  # noqa: E402
from propensity.features.store import FeatureStoreAdapter  # noqa: E402
from propensity.features.tiles import STREAMING_NAMES  # noqa: E402
from propensity.labels import LabelSpec, entity_frame  # noqa: E402
from propensity.models.spec import load_spec  # noqa: E402
from propensity.pipeline.dataset import latest_snapshot  # noqa: E402
from propensity.pipeline.score import _champions, score_table  # noqa: E402
from propensity.spark.features import latest_spark_snapshot, spark_table_path  # noqa: E402
from propensity.spark.score import latest_snapshot_spark  # noqa: E402
from propensity.spark.training import entity_frame_spark, historical_features_spark  # noqa: E402

pytestmark = pytest.mark.slow
#: Few enough training rows that the Spark frame is sampled (the DuckDB one is not).
TRAINING_ROWS = 5000


def _project(root: Path, events: Any, **overrides: Any) -> Settings:
    make_project(root)
    # Lenient gates: these tests are about the engine, the quality tests are elsewhere.
    fast_specs(root / "models", min_auc=0.5, max_ece=0.25)
    config = yaml.safe_load((root / "propensity.yaml").read_text())
    config.update(overrides)
    (root / "propensity.yaml").write_text(yaml.safe_dump(config))
    EventLake(root / "data" / "lake").append(events)
    return load_settings(root / "propensity.yaml")


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory, spark: Any) -> dict[str, Settings]:
    events = simulate(SimulationConfig(customers=1500, days=140, seed=5)).events
    root = tmp_path_factory.mktemp("engines")
    spark_section = TEST_SPARK.model_dump() | {"training_rows": TRAINING_ROWS}
    return {
        "duckdb": _project(root / "duckdb", events),
        "spark": _project(root / "spark", events, engine="spark", spark=spark_section),
    }


def _cli(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--config", str(settings.root / "propensity.yaml")])
    assert result.exit_code == 0, result.output
    return result.output


def _built(settings: Settings) -> Settings:
    """The project with its feature tables built and materialized (once)."""
    if not (settings.path(settings.features_dir) / ".built-by-test").exists():
        for step in ("build", "apply", "materialize"):
            _cli(settings, "features", step)
        (settings.path(settings.features_dir) / ".built-by-test").touch()
    return settings


@pytest.mark.parametrize(
    ("kind", "population"), [("churn", "active"), ("purchase", "known"), ("churn", "known")]
)
def test_spark_labels_equal_duckdb_labels(
    projects: dict[str, Settings], spark: Any, kind: str, population: str
) -> None:
    settings = projects["spark"]
    label = LabelSpec(kind=kind, horizon_days=28)
    lake = EventLake(settings.path(settings.lake_dir))
    lake_start = pd.Timestamp(lake.read(["event_timestamp"])["event_timestamp"].min())
    cutoffs = [lake_start.floor("D") + pd.Timedelta(days=d) for d in (40, 61, 82)]
    expected = entity_frame(lake, cutoffs, label, population)
    got = entity_frame_spark(settings, spark, cutoffs, label, population).toPandas()
    got["event_timestamp"] = pd.to_datetime(got["event_timestamp"], utc=True)
    got = got.sort_values(["event_timestamp", "customer_id"]).reset_index(drop=True)
    assert len(expected) > 100 and 0 < expected["label"].mean() < 1
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_one_setting_moves_build_materialize_train_and_bulk_scores_to_spark(
    projects: dict[str, Settings], tmp_path: Path
) -> None:
    duck, spark_project = _built(projects["duckdb"]), _built(projects["spark"])
    # The Spark project's tables are the partitioned Spark ones, the DuckDB files absent.
    spark_dir = spark_project.path(spark_project.features_dir)
    for view in VIEWS:
        assert any(spark_table_path(spark_dir, view).glob("snapshot=*"))
        assert not feature_table_path(spark_dir, view).exists()

    # The executors wrote the same online rows Feast reads back for the DuckDB project.
    ids = sorted(latest_snapshot(duck, ["sessions_7d"])[1]["customer_id"])[:60]
    when = pd.Timestamp("2030-01-01", tz="UTC")
    for service in ("churn_v1", "purchase_v1"):
        want = FeatureStoreAdapter(duck).online(ids, service, when)
        got = FeatureStoreAdapter(spark_project).online(ids, service, when)
        pd.testing.assert_frame_equal(got, want, rtol=1e-9)
    assert FeatureStoreAdapter(spark_project).materialized_views() == set(VIEWS)

    trained = {model: _cli(spark_project, "train", model) for model in ("churn", "purchase")}
    # The sample and its weights are on record with the run.
    version = registry.champion_version(spark_project.tracking_uri, "churn")
    assert version is not None, trained["churn"]
    info = registry.version_info(spark_project.tracking_uri, "churn", version)
    assert info["tags"]["engine"] == "spark"
    sampling = yaml.safe_load(info["tags"]["sampling"])
    assert sampling["rows_sampled"] < sampling["rows_full"]
    assert sampling["rows_full"] == info["metrics"]["rows_before_sampling"]
    assert min(c["fraction"] for c in sampling["classes"].values()) < 1.0

    # Bulk scores from the executors equal the in-process path on the same champions,
    # fed the DuckDB project's features.
    out = tmp_path / "scores"
    _cli(spark_project, "score", "--all", "--out", str(out))
    got = pq.read_table(out).to_pandas().sort_values("customer_id").reset_index(drop=True)
    models = {name: model for name, (_, model) in _champions(spark_project).items()}
    names = [*models["churn"].feature_names_, *models["purchase_propensity"].feature_names_]
    _, frame = latest_snapshot(duck, list(dict.fromkeys(names)))
    want = score_table(frame, models["churn"], models["purchase_propensity"], None)
    want = want.sort_values("customer_id").reset_index(drop=True)
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    for column in ("churn", "purchase_propensity"):
        np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-6)


def test_the_spark_snapshot_and_training_frame_hold_the_same_streaming_values(
    projects: dict[str, Settings], spark: Any
) -> None:
    duck, spark_project = _built(projects["duckdb"]), _built(projects["spark"])
    adapter = FeatureStoreAdapter(spark_project)
    service = load_spec("churn", spark_project.path(spark_project.models_dir)).feature_service
    names = adapter.service_features(service)
    streaming = [n for n in names if n in STREAMING_NAMES]
    assert streaming
    snapshot = latest_snapshot_spark(spark_project, spark, names).toPandas()
    snapshot = snapshot.sort_values("customer_id").reset_index(drop=True)
    when = latest_spark_snapshot(spark_project, "session")
    # The same customers at the same clock through the Spark engine's training frame.
    entity = snapshot[["customer_id"]].assign(event_timestamp=when)
    frame = historical_features_spark(spark_project, adapter, entity, service, spark=spark)
    frame = frame.sort_values("customer_id").reset_index(drop=True)
    # And the DuckDB engine's snapshot of the same lake.
    duck_when, duck_snapshot = latest_snapshot(duck, names)
    assert duck_when == when
    assert snapshot["customer_id"].tolist() == frame["customer_id"].tolist()
    assert snapshot["customer_id"].tolist() == duck_snapshot["customer_id"].tolist()
    for got in (snapshot, frame):
        pd.testing.assert_frame_equal(got[streaming], duck_snapshot[streaming], check_dtype=False)
    assert (snapshot["events_24h"] > 0).sum() > 50


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test alone (the shared one belongs to the Redis tests' worker)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()


def test_executors_materialize_into_redis_incrementally(
    projects: dict[str, Settings], private_redis: str
) -> None:
    base, duck = _built(projects["spark"]), _built(projects["duckdb"])
    settings = base.model_copy(
        update={"online_store": OnlineStore(kind="redis", redis_url=private_redis)}
    )
    adapter = FeatureStoreAdapter(settings)
    reports = adapter.materialize()
    customers = {r.entities_written for r in reports}
    assert len(customers) == 1 and customers.pop() > 100
    assert adapter.materialized_views() == set(VIEWS)
    ids = sorted(latest_snapshot(duck, ["sessions_7d"])[1]["customer_id"])[:40]
    when = pd.Timestamp("2030-01-01", tz="UTC")
    want = FeatureStoreAdapter(duck).online(ids, "churn_v1", when)
    pd.testing.assert_frame_equal(adapter.online(ids, "churn_v1", when), want, rtol=1e-9)
    # Nothing newer than what the store holds: an incremental run writes nothing.
    assert all(r.entities_written == 0 for r in adapter.materialize(incremental=True))


def _killed_mid_way(command: list[str], client: Any, customers: int, log: Path) -> int:
    """Run ``command`` and SIGKILL its whole process group (driver, JVM, Python workers)
    once the executors have written some customers and not all; the count written then."""
    for _ in range(3):
        client.flushall()
        with log.open("wb") as out:
            job = subprocess.Popen(
                command, env=clean_env(), start_new_session=True, stdout=out, stderr=out
            )
            while job.poll() is None and client.dbsize() == 0:
                time.sleep(0.002)
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
            assert job.wait() == -signal.SIGKILL, log.read_text()[-3000:]
        written = int(client.dbsize())
        if 0 < written < customers:
            return written
    pytest.fail("three runs finished before a kill could land mid-way")


def test_a_killed_spark_materialization_records_nothing_and_a_rerun_writes_everything_once(
    projects: dict[str, Settings], private_redis: str, tmp_path: Path
) -> None:
    import redis

    base, duck = _built(projects["spark"]), _built(projects["duckdb"])
    root = tmp_path / "killed"
    shutil.copytree(base.root, root)
    config = yaml.safe_load((root / "propensity.yaml").read_text())
    config["online_store"] = {"kind": "redis", "redis_url": private_redis}
    # Many small partitions, so the job writes for long enough to be killed part-way.
    config["spark"]["shuffle_partitions"] = 24
    (root / "propensity.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(root / "propensity.yaml")
    ids = sorted(latest_snapshot(duck, ["sessions_7d"])[1]["customer_id"])
    client = redis.Redis.from_url(private_redis)
    command = [sys.executable, "-m", "propensity.cli", "features", "materialize", "--config"]
    log = tmp_path / "job.log"
    written = _killed_mid_way([*command, str(root / "propensity.yaml")], client, len(ids), log)

    # The killed job recorded no interval: the next incremental run starts from nothing.
    adapter = FeatureStoreAdapter(settings)
    assert materialized_until(adapter.store, VIEWS) is None
    reports = adapter.materialize(incremental=True)
    # Every customer once per view, the ones the killed job wrote included.
    assert {r.entities_written for r in reports} == {len(ids)} and written < len(ids)
    assert client.dbsize() == len(ids) + 1  # the customers' hashes and the marks
    when = pd.Timestamp("2030-01-01", tz="UTC")
    for service in ("churn_v1", "purchase_v1"):
        want = FeatureStoreAdapter(duck).online(ids, service, when)
        pd.testing.assert_frame_equal(adapter.online(ids, service, when), want, rtol=1e-9)
