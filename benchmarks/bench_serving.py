"""Scoring API speed: /score p50/p99, /score_batch(1000), bulk scoring of 1M customers.

Builds a small real project in a temporary folder (random feature tables, the
real Feast repo with a SQLite online store, calibrated LightGBM champions in
MLflow on SQLite), starts the BentoML service as a subprocess and calls it
sequentially over loopback. Baseline, measured in the same run: the naive
path per request (Feast ``get_online_features`` through the adapter, then
``LGBMClassifier.predict_proba``) timed in-process, i.e. without any HTTP cost.

Usage: python benchmarks/bench_serving.py [--customers 2000] [--requests 2000] [--bulk 1000000]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import lightgbm as lgb
import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

from project import build_project  # noqa: E402

from propensity.features.store import FeatureStoreAdapter  # noqa: E402
from propensity.serving.audience import score_frame  # noqa: E402
from propensity.serving.runtime import Runtime, ServingConfig  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def bench_http(project_root: Path, ids: list[str], n_requests: int) -> None:
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env["PROPENSITY_CONFIG"] = str(project_root / "propensity.yaml")
    command = [
        sys.executable, "-m", "bentoml", "serve", "propensity.serving.service:Scoring",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(200):  # warm up
                client.post("/score", json={"customer_id": ids[0]})
            times = []
            for i in rng.integers(0, len(ids), n_requests):
                t = time.perf_counter()
                r = client.post("/score", json={"customer_id": ids[i]})
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            print(f"/score            p50 {_pct(times, 50):6.2f} ms  p99 {_pct(times, 99):6.2f} ms")
            batch = [ids[i] for i in rng.integers(0, len(ids), 1000)]
            times = []
            for _ in range(7):
                t = time.perf_counter()
                r = client.post("/score_batch", json={"customer_ids": batch})
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            print(f"/score_batch 1000 median {_pct(times, 50):6.1f} ms")
            rss = psutil.Process(proc.pid).memory_info().rss
            rss += sum(c.memory_info().rss for c in psutil.Process(proc.pid).children(True))
            print(f"server RSS        {rss / 2**20:6.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_naive(project: object, ids: list[str], n_requests: int) -> None:
    settings = project.settings  # type: ignore[attr-defined]
    adapter = FeatureStoreAdapter(settings)
    features = adapter.service_features("churn_v1")
    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.gamma(2.0, 3.0, size=(3000, len(features))), columns=features)
    y = (X.iloc[:, 1] > 6).astype(int)
    clf = lgb.LGBMClassifier(n_estimators=40, num_leaves=15, verbose=-1).fit(X, y)
    times = []
    for i in rng.integers(0, len(ids), n_requests // 4):
        t = time.perf_counter()
        frame = adapter.online([ids[i]], "churn_v1")
        clf.predict_proba(frame[features])
        times.append(time.perf_counter() - t)
    print(
        f"naive in-process  p50 {_pct(times, 50):6.2f} ms  p99 {_pct(times, 99):6.2f} ms"
        "  (Feast get_online_features + LGBMClassifier.predict_proba, one model, no HTTP)"
    )


def bench_bulk(project: object, n_rows: int) -> None:
    runtime = Runtime(project.settings, ServingConfig.from_env({}))  # type: ignore[attr-defined]
    runtime.reload()
    scorer = runtime.scorer
    assert scorer is not None
    names = list(dict.fromkeys(scorer.churn.feature_names + scorer.purchase.feature_names))
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n_rows, len(names))), columns=names)
    frame.insert(0, "customer_id", [f"C{i:07d}" for i in range(n_rows)])
    t = time.perf_counter()
    out = score_frame(frame, scorer.churn, scorer.purchase, scorer.policy)
    seconds = time.perf_counter() - t
    naive = scorer.churn.model  # the same model, per-row single-thread predict (the online path)
    sample = frame[scorer.churn.feature_names].to_numpy()[:2000]
    t = time.perf_counter()
    for row in sample:
        naive.predict(row[None, :], num_threads=1)
    per_row = (time.perf_counter() - t) / len(sample)
    peak = psutil.Process().memory_info().rss / 2**20
    print(
        f"bulk {n_rows:,} rows  {seconds:6.1f} s  ({len(out):,} scored; nba="
        f"{scorer.policy is not None}); row-by-row baseline ≈ {per_row * n_rows * 2:,.0f} s; "
        f"RSS {peak:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        project = build_project(root, n_customers=args.customers)
        ids = project.customers[: args.customers - 5]
        bench_http(root, ids, args.requests)
        bench_naive(project, ids, args.requests)
        bench_bulk(project, args.bulk)


if __name__ == "__main__":
    main()
