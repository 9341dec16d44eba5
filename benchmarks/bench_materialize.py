"""Online materialization: the plugins' ``write_many`` versus Feast's stock ``materialize``.

Each run happens in its own subprocess so its peak RSS is measured cleanly
(``ru_maxrss`` of that process); repo setup (``apply``) is outside the timing.

    python benchmarks/bench_materialize.py                 # 100k stock vs ours, 1M ours
    python benchmarks/bench_materialize.py --large 0       # skip the 1M runs
    python benchmarks/bench_materialize.py --small 20000 --large 0 --redis ''
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SNAPSHOT = datetime(2024, 6, 1, tzinfo=UTC)


def _generate(path: Path, customers: int, features: int, seed: int = 0) -> None:
    """One latest snapshot row per customer, 5% nulls, written in bounded slices."""
    rng = np.random.default_rng(seed)
    writer = None
    step = 100_000
    for lo in range(0, customers, step):
        n = min(step, customers - lo)
        columns = {
            "customer_id": pa.array([f"C{c:07d}" for c in range(lo, lo + n)]),
            "event_timestamp": pa.array([SNAPSHOT] * n, pa.timestamp("us", tz="UTC")),
        }
        for j in range(features):
            columns[f"f{j:02d}"] = pa.array(
                rng.normal(size=n), pa.float64(), mask=rng.random(n) < 0.05
            )
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def _worker(kind: str, data: Path, repo: Path, features: int, redis: str) -> None:
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.repo_config import RepoConfig
    from feast.types import Float64
    from feast.value_type import ValueType

    from propensity.features.online import write_many

    plugin = "propensity.features.online.{0}.Bulk{1}OnlineStore"
    stock = kind == "stock"  # Feast's own stores; ours are the project's plugins
    online = (
        {
            "type": "sqlite" if stock else plugin.format("sqlite", "Sqlite"),
            "path": str(repo / "online.db"),
        }
        if not kind.endswith("redis")
        else {"type": plugin.format("redis", "Redis"), "connection_string": redis}
    )
    project = f"bench{time.time_ns()}"
    config = RepoConfig(
        project=project,
        provider="local",
        registry=str(repo / "registry.db"),
        online_store=online,
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=3,
        repo_path=repo,
    )
    store = FeatureStore(config=config)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)
    view = FeatureView(
        name="bench",
        entities=[customer],
        ttl=timedelta(days=3650),
        schema=[Field(name=f"f{j:02d}", dtype=Float64) for j in range(features)],
        source=FileSource(path=str(data), timestamp_field="event_timestamp"),
        online=True,
    )
    store.apply([customer, view])
    began = time.perf_counter()
    if kind == "stock":
        store.materialize(SNAPSHOT - timedelta(days=1), SNAPSHOT, feature_views=["bench"])
    else:
        write_many(store, {"bench": data}, end=SNAPSHOT)
    seconds = time.perf_counter() - began
    probe = store.get_online_features(
        features=["bench:f00"], entity_rows=[{"customer_id": "C0000000"}]
    ).to_dict()
    if kind.endswith("redis"):
        import redis as redis_py

        host, _, port = redis.partition(":")
        client = redis_py.Redis(host=host, port=int(port or 6379))
        batch: list[bytes] = []
        for key in client.scan_iter(b"*" + project.encode(), count=10_000):
            batch.append(key)
            if len(batch) == 10_000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "probe": probe["f00"][0]}))


def _run(kind: str, data: Path, features: int, redis: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench_repo_") as repo:
        args = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--repo", repo]
        args += ["--features", str(features), "--redis", redis]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _line(label: str, customers: int, features: int, result: dict[str, float]) -> str:
    rate = customers * features / result["seconds"]
    return (
        f"{label:<22} {customers:>9,} x {features}  {result['seconds']:8.1f} s  "
        f"{result['peak_mb']:8.0f} MB peak RSS  {rate / 1e6:6.2f} M values/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=100_000, help="customers, stock vs ours")
    parser.add_argument("--large", type=int, default=1_000_000, help="customers, ours only")
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--redis", default="localhost:6379", help="'' skips Redis runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.data, args.repo, args.features, args.redis)
        return
    with tempfile.TemporaryDirectory(prefix="bench_materialize_") as tmp:
        data = Path(tmp) / "small.parquet"
        _generate(data, args.small, args.features)
        stock = _run("stock", data, args.features, args.redis)
        print(_line("feast materialize", args.small, args.features, stock), flush=True)
        ours = _run("ours", data, args.features, args.redis)
        print(_line("write_online sqlite", args.small, args.features, ours), flush=True)
        print(f"speed-up vs stock: {stock['seconds'] / ours['seconds']:.1f}x", flush=True)
        if args.redis:
            ours_redis = _run("ours-redis", data, args.features, args.redis)
            print(_line("write_online redis", args.small, args.features, ours_redis), flush=True)
        if args.large:
            big = Path(tmp) / "large.parquet"
            _generate(big, args.large, args.features, seed=1)
            result = _run("ours", big, args.features, args.redis)
            print(_line("write_online sqlite", args.large, args.features, result), flush=True)
            if args.redis:
                result = _run("ours-redis", big, args.features, args.redis)
                print(_line("write_online redis", args.large, args.features, result), flush=True)


if __name__ == "__main__":
    main()
