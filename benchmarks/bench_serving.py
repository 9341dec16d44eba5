"""Scoring API speed: /score p50/p99, /score_batch(1000), bulk scoring of 1M customers.

Builds a small real project in a temporary folder (random feature tables, the
real Feast repo with a SQLite online store, calibrated LightGBM champions for
churn and purchase and an X-learner next-best-action champion in MLflow on
SQLite), starts the BentoML service as a subprocess and calls it sequentially
over loopback. The baseline runs in the same way in the same run: a naive
BentoML handler (this file's ``Naive`` service) that reads the features
through Feast's ``get_online_features`` and scores with
``LGBMClassifier.predict_proba`` and the NBA model's own pandas path.

The online store holds 100,000 customers by default (about 1 GB of SQLite):
a store that fits in a CPU cache flatters every read. Requests are timed
with a persistent ``http.client`` connection, a client as lean as wrk's, so
the figures are the service's; ``httpx``, several times heavier per call,
adds about a millisecond and is measured beside it. The server's own time
(its ``Server-Timing`` header) is printed too.

Every figure is printed with the machine's load average and the server's CPU
time per request, since the machine may be shared: wall-clock medians on a
busy 2-core box measure the neighbours as much as the code.

Also printed: the HTTP floors (a no-op ASGI route hosted by BentoML, as the
scoring routes are, and a no-op ``@bentoml.api``; ``_floor_services.py``), and
``/score`` timed in turns with the ASGI floor's server, in alternating blocks
of 100 requests, so the ratio compares the two under the same machine load,
LightGBM's own predict against the compiled one per champion, and the batch
route under 4 concurrent clients.

Usage: python benchmarks/bench_serving.py [--customers 100000] [--requests 2000]
       [--bulk 1000000] [--no-naive] [--project FOLDER]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bentoml
import httpx
import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

from project import FULL_SIZE_TREES, SERVICES, build_project, customer_ids  # noqa: E402

from propensity.config import load_settings  # noqa: E402
from propensity.serving.process import stop, wait_ready  # noqa: E402

_NAIVE_ENV = "BENCH_NAIVE_PROJECT"
_BATCHES = 31  # timed /score_batch calls of 1,000 random customers each


@bentoml.service(
    name="naive_scoring",
    workers=1,
    logging={"access": {"enabled": False}},
    tracing={"sample_rate": 0.0},
)
class Naive:
    """The baseline handler: Feast online read, sklearn-wrapper predictions and TreeSHAP
    reasons from models of the champions' size, pandas NBA."""

    def __init__(self) -> None:
        import lightgbm as lgb

        from propensity.features.store import FeatureStoreAdapter
        from propensity.registry import load_estimator

        settings = load_settings(Path(os.environ[_NAIVE_ENV]), environ={})
        self.adapter = FeatureStoreAdapter(settings)
        self.models = {}
        rng = np.random.default_rng(1)
        for name, service in SERVICES.items():
            features = self.adapter.service_features(service)
            X = pd.DataFrame(rng.gamma(2.0, 3.0, size=(3000, len(features))), columns=features)
            y = (X.iloc[:, 1] + rng.normal(0, 3, 3000) > 6).astype(int)
            clf = lgb.LGBMClassifier(
                n_estimators=FULL_SIZE_TREES[name], learning_rate=0.03, num_leaves=15, verbose=-1
            ).fit(X, y)
            self.models[name] = (service, features, clf)
        self.nba = load_estimator(settings.tracking_uri, "next_best_action")

    @bentoml.api
    def score(self, customer_id: str) -> dict[str, Any]:
        from propensity.models.arbitration import decide

        out: dict[str, Any] = {"customer_id": customer_id}
        for name, (service, features, clf) in self.models.items():
            frame = self.adapter.online([customer_id], service)
            out[name] = float(clf.predict_proba(frame[features])[0, 1])
            contributions = clf.predict(frame[features], pred_contrib=True)[0, :-1]
            top = np.argsort(-np.abs(contributions))[:3]
            out[f"{name}_reasons"] = [(features[j], float(contributions[j])) for j in top]
        frame = self.adapter.online([customer_id], "nba_v1")
        out["action"] = str(decide(frame, self.nba, self.nba.catalog)["action"].iloc[0])
        return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def _load() -> str:
    return "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _server_cpu(proc: subprocess.Popen[bytes]) -> float:
    """CPU seconds of the server process tree so far."""
    total = 0.0
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def _start(
    service: str, env: dict[str, str], cwd: Path | None = None, log: Path | None = None
) -> tuple[Any, str]:
    """``bentoml serve`` a service on a free port; its process and URL once ready.

    The server's output goes to ``log`` when given (else nowhere).
    """
    port = _port()
    command = [
        sys.executable, "-m", "bentoml", "serve", service,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    out: Any = subprocess.DEVNULL if log is None else log.open("ab")
    try:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
    except RuntimeError:
        stop(proc)
        raise
    return proc, url


class _Client:
    """POST JSON over one keep-alive HTTP/1.1 connection; returns status, body, server time."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, body: Any) -> tuple[int, bytes, float]:
        payload = json.dumps(body)
        try:
            self.connection.request("POST", path, payload, {"content-type": "application/json"})
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed a keep-alive connection left idle (uvicorn: after 5 s).
            self.connection.close()
            self.connection.request("POST", path, payload, {"content-type": "application/json"})
            response = self.connection.getresponse()
        data = response.read()
        timing = response.getheader("server-timing") or "dur=nan"
        return response.status, data, float(timing.rsplit("dur=", 1)[1]) / 1e3

    def close(self) -> None:
        self.connection.close()


def _timed_posts(
    client: _Client | httpx.Client,
    proc: Any,
    path: str,
    bodies: list[dict[str, Any]],
    errors: Counter[int] | None = None,
) -> tuple[list[float], float, list[float]]:
    """Wall times, server CPU per request, and the server's own times (Server-Timing).

    A status other than 200 fails, or is counted in ``errors`` (and left out of the times).
    """
    times, server = [], []
    cpu = _server_cpu(proc)
    for body in bodies:
        t = time.perf_counter()
        if isinstance(client, httpx.Client):
            r = client.post(path, json=body)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            continue
        status, data, own = client.post(path, body)
        elapsed = time.perf_counter() - t
        if status != 200 and errors is not None:
            errors[status] += 1
            continue
        assert status == 200, data[:500]
        times.append(elapsed)
        server.append(own)
    return times, (_server_cpu(proc) - cpu) / len(bodies), server


def _interleaved(
    client: _Client, floor: _Client, bodies: list[dict[str, Any]], block: int = 100
) -> tuple[list[float], list[float]]:
    """``/score`` and the ASGI floor's no-op timed in alternating blocks of ``block`` requests.

    A floor measured minutes apart, in another phase of a shared machine,
    moved by ±30 % between runs; in blocks a few hundred milliseconds long
    both see the same phase. (Alternating request by request was unfair the
    other way: each floor request then waited on the scoring server's own
    after-response work on the same two cores, +50 % on the floor.)
    """
    times: list[float] = []
    floors: list[float] = []
    for start in range(0, len(bodies), block):
        for target, out in ((floor, floors), (client, times)):
            for body in bodies[start : start + block]:
                t = time.perf_counter()
                status, data, _ = target.post("/score", body)
                out.append(time.perf_counter() - t)
                assert status == 200, data[:300]
    return times, floors


def bench_http(root: Path, ids: list[str], n_requests: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env["PROPENSITY_CONFIG"] = str(root / "propensity.yaml")
    proc, url = _start("propensity.serving.service:Scoring", env)
    floor_proc, floor_url = _start("_floor_services:AsgiFloor", _bench_env(), Path(__file__).parent)
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    client, floor = _Client(url), _Client(floor_url)
    try:
        warm = [{"customer_id": ids[i]} for i in rng.integers(0, len(ids), 300)]
        _timed_posts(client, proc, "/score", warm)
        _timed_posts(floor, floor_proc, "/score", warm)
        bodies = [{"customer_id": ids[i]} for i in rng.integers(0, len(ids), n_requests)]
        times, cpu, own = _timed_posts(client, proc, "/score", bodies)
        out.update(p50=_pct(times, 50), p99=_pct(times, 99), cpu=cpu * 1e3, own=_pct(own, 50))
        times, floors = _interleaved(client, floor, bodies)
        out.update(
            turns_p50=_pct(times, 50),
            turns_p99=_pct(times, 99),
            turns_floor=_pct(floors, 50),
            turns_ratio=float(np.median(times) / np.median(floors)),
        )
        floor.close()
        stop(floor_proc)
        with httpx.Client(base_url=url, timeout=60) as heavy:
            times, _, _ = _timed_posts(heavy, proc, "/score", bodies[: n_requests // 2])
            out.update(httpx_p50=_pct(times, 50))

        def batches(reasons: bool) -> list[dict[str, Any]]:
            # Every batch a new draw: the same 1,000 customers again would read warm pages.
            draws = [rng.choice(len(ids), 1000, replace=False) for _ in range(_BATCHES)]
            return [{"customer_ids": [ids[i] for i in d], "reasons": reasons} for d in draws]

        _timed_posts(client, proc, "/score_batch", batches(True)[:3])  # threads, connections
        times, cpu, own = _timed_posts(client, proc, "/score_batch", batches(True))
        out.update(batch=_pct(times, 50), batch_cpu=cpu * 1e3, batch_own=_pct(own, 50))
        times, cpu, own = _timed_posts(client, proc, "/score_batch", batches(False))
        out.update(batch_nr=_pct(times, 50), batch_nr_cpu=cpu * 1e3)
        out.update({f"conc_{k}": v for k, v in bench_concurrent(url, ids).items()})
        # Resident memory apart from file pages: the memory-mapped online store is page
        # cache, counted once per connection by RSS.
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
        memory = [p.memory_info() for p in processes]
        out["rss"] = sum(m.rss - m.shared for m in memory) / 2**20
        out["mapped"] = sum(m.shared for m in memory) / 2**20
    finally:
        client.close()
        floor.close()
        stop(proc)
        stop(floor_proc)
    return out


def _bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def bench_floor(service: str, ids: list[str], n_requests: int) -> dict[str, float]:
    """p50/p99 and server CPU of a no-op BentoML service (``_floor_services``), same client."""
    proc, url = _start(f"_floor_services:{service}", _bench_env(), cwd=Path(__file__).parent)
    client = _Client(url)
    try:
        _timed_posts(client, proc, "/score", [{"customer_id": ids[0]}] * 300)
        bodies = [{"customer_id": ids[i % len(ids)]} for i in range(n_requests)]
        times, cpu, _ = _timed_posts(client, proc, "/score", bodies)
    finally:
        client.close()
        stop(proc)
    return {"p50": _pct(times, 50), "p99": _pct(times, 99), "cpu": cpu * 1e3}


def _median_seconds(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _model_figures(plain: Any, fast: Any, X: np.ndarray) -> tuple[float, float, float, float]:
    """One-row µs and 1,000-row ms of a model's LightGBM predict and its compiled one."""
    if hasattr(plain, "uplift_matrix"):  # next-best-action: every booster its uplift needs
        calls = [
            lambda: plain.uplift_matrix(X[:1], 1),
            lambda: fast.uplift_matrix(X[:1], 1),
            lambda: plain.uplift_matrix(X, 1),
            lambda: fast.uplift_matrix(X, 1),
        ]
    else:
        from propensity.models._lightgbm import SingleRowPredictor

        row = SingleRowPredictor(plain.booster_, plain.best_iteration_)
        best = plain.best_iteration_
        calls = [
            lambda: row(X[0]),
            lambda: fast.compiled_.predict_row(X[0]),
            lambda: plain.booster_.predict(X, num_iteration=best, num_threads=1),
            lambda: fast.compiled_.predict(X, 1),
        ]
    return (
        _median_seconds(calls[0], 300) * 1e6,
        _median_seconds(calls[1], 300) * 1e6,
        _median_seconds(calls[2], 7) * 1e3,
        _median_seconds(calls[3], 7) * 1e3,
    )


def bench_models(root: Path) -> list[tuple[str, float, float, float, float]]:
    """LightGBM's own predict vs the compiled one, per champion, single-threaded."""
    from propensity.models._compiled import compile_model
    from propensity.serving.champions import RegistrySource

    settings = load_settings(root, environ={})
    source = RegistrySource(settings.tracking_uri)
    cache = settings.path(settings.compiled_dir)
    rng = np.random.default_rng(3)
    out = []
    for name, version in source.champion_versions().items():
        if version is None:
            continue
        plain = source.load(name, int(version))
        fast = compile_model(source.load(name, int(version)), cache)
        X = rng.gamma(2.0, 3.0, size=(1000, len(plain.feature_names_)))
        X[rng.random(X.shape) < 0.05] = np.nan
        out.append((name, *_model_figures(plain, fast, X)))
    return out


def bench_concurrent(url: str, ids: list[str], clients: int = 4, each: int = 8) -> dict[str, float]:
    """``/score_batch`` of 1,000 fresh customers (with reasons) from ``clients`` at once."""
    import threading

    rng = np.random.default_rng(4)
    work = [
        [
            {"customer_ids": [ids[i] for i in rng.choice(len(ids), 1000, replace=False)]}
            for _ in range(each)
        ]
        for _ in range(clients)
    ]
    times: list[float] = []
    lock = threading.Lock()

    def run(bodies: list[dict[str, Any]]) -> None:
        client = _Client(url)
        try:
            for body in bodies:
                t = time.perf_counter()
                status, data, _ = client.post("/score_batch", body)
                elapsed = time.perf_counter() - t
                assert status == 200, data[:300]
                with lock:
                    times.append(elapsed)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(w,)) for w in work]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {
        "throughput": clients * each * 1000 / wall,
        "p50": _pct(times, 50),
        "p99": _pct(times, 99),
    }


def bench_naive(root: Path, ids: list[str], n_requests: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env[_NAIVE_ENV] = str(root)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc, url = _start("bench_serving:Naive", env, cwd=Path(__file__).parent)
    rng = np.random.default_rng(1)
    client = _Client(url)
    try:
        _timed_posts(client, proc, "/score", [{"customer_id": ids[0]}] * 20)
        n = max(n_requests // 4, 50)
        bodies = [{"customer_id": ids[i]} for i in rng.integers(0, len(ids), n)]
        times, cpu, _ = _timed_posts(client, proc, "/score", bodies)
        # The naive service has no batch route: 1,000 customers cost 1,000 calls
        # (200 timed, scaled by 5).
        t = time.perf_counter()
        for cid in [ids[i] for i in rng.integers(0, len(ids), 200)]:
            client.post("/score", {"customer_id": cid})
        batch = (time.perf_counter() - t) * 5
    finally:
        client.close()
        stop(proc)
    return {"p50": _pct(times, 50), "p99": _pct(times, 99), "cpu": cpu * 1e3, "batch": batch * 1e3}


def bench_bulk(project: Any, n_rows: int) -> dict[str, float]:
    from propensity.config import Serving
    from propensity.serving.audience import score_frame
    from propensity.serving.runtime import Runtime

    runtime = Runtime(project.settings, Serving())
    runtime.reload()
    scorer = runtime.scorer
    assert scorer is not None and scorer.policy is not None
    names = list(
        dict.fromkeys(
            scorer.churn.feature_names + scorer.purchase.feature_names + scorer.policy.feature_names
        )
    )
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n_rows, len(names))), columns=names)
    for column in ("exposures_7d", "exposures_30d", "discounts_30d"):
        frame[column] = rng.integers(0, 3, n_rows).astype(np.float64)
    frame.insert(0, "customer_id", [f"C{i:07d}" for i in range(n_rows)])
    t, cpu = time.perf_counter(), time.process_time()
    out = score_frame(frame, scorer.churn, scorer.purchase, scorer.policy)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    assert out["action"].notna().all()
    # Baseline: the online path row by row (three models' single-row calls), extrapolated.
    sample = frame.iloc[:300]
    t = time.perf_counter()
    for k in range(len(sample)):
        row = sample.iloc[k : k + 1]
        scorer.churn.model.predict_proba(row[scorer.churn.feature_names], num_threads=1)
        scorer.purchase.model.predict_proba(row[scorer.purchase.feature_names], num_threads=1)
        scorer.policy.model.action_uplift(row)
    per_row = (time.perf_counter() - t) / len(sample)
    peak = psutil.Process().memory_info().rss / 2**20
    return {
        "seconds": seconds,
        "cpu": cpu,
        "baseline": per_row * n_rows,
        "rss": peak,
        "rows": float(len(out)),
    }


def _project(root: Path, n_customers: int) -> Any:
    """Build the benchmark project under ``root``, or reuse the one built there before."""
    marker = root / "built-customers.txt"
    if marker.exists() and int(marker.read_text()) == n_customers:
        settings = load_settings(root, environ={})
        return SimpleNamespace(settings=settings, customers=customer_ids(n_customers))
    project = build_project(root, n_customers=n_customers, nba=True, full_size=True)
    marker.write_text(str(n_customers))
    return project


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=1_000_000)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive handler")
    parser.add_argument(
        "--project", type=Path, help="build the project in this folder once, reuse it after"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.project or Path(tmp) / "project"
        project = _project(root, args.customers)
        ids = project.customers[: args.customers - 5]
        print(
            f"[{_load()}] project built, {args.customers:,} customers online; timing /score",
            flush=True,
        )
        floors = {kind: bench_floor(kind, ids, args.requests) for kind in ("AsgiFloor", "ApiFloor")}
        print(f"[{_load()}] floors measured; compiling and timing the models", flush=True)
        models = bench_models(root)
        fast = bench_http(root, ids, args.requests)
        naive = dict.fromkeys(("p50", "p99", "cpu", "batch"), float("nan"))
        if not args.no_naive:
            print(f"[{_load()}] measuring the naive handler ...", flush=True)
            naive = bench_naive(root, ids, args.requests)
        print(f"[{_load()}] bulk scoring {args.bulk:,} rows ...", flush=True)
        bulk = bench_bulk(project, args.bulk)
        print(f"{'':28s}{'service':>12s}{'naive':>12s}{'target':>10s}")
        floor = floors["AsgiFloor"]["p50"]
        print(f"\nHTTP floors (same client), {_load()}")
        for kind, label in (
            ("AsgiFloor", "ASGI no-op in BentoML"),
            ("ApiFloor", "@bentoml.api no-op"),
        ):
            f = floors[kind]
            print(
                f"  {label:28s} p50 {f['p50']:.3f} ms  p99 {f['p99']:.3f} ms  "
                f"server CPU {f['cpu']:.3f} ms/req"
            )
        print("\nmodel predict, one thread: LightGBM's own vs compiled")
        heads = ("1 row LGBM us", "compiled", "1000 LGBM ms", "compiled")
        print(f"  {'model':22s}{heads[0]:>15s}{heads[1]:>10s}{heads[2]:>14s}{heads[3]:>10s}")
        for name, a, b, c, d in models:
            print(f"  {name:22s}{a:15.1f}{b:10.1f}{c:14.2f}{d:10.2f}   x{c / d:.1f}")
        print(f"\nall three models (churn, purchase, next-best-action), {_load()}")
        rows = [
            ("/score p50 ms", fast["p50"], naive["p50"], "<= 3"),
            ("  ratio to the ASGI floor", fast["p50"] / floor, float("nan"), "<= 2.5"),
            ("/score p99 ms", fast["p99"], naive["p99"], "<= 2"),
            ("in blocks with the floor: p50", fast["turns_p50"], float("nan"), ""),
            ("  p99 ms", fast["turns_p99"], float("nan"), "<= 2"),
            ("  ASGI floor p50 ms", fast["turns_floor"], float("nan"), ""),
            ("  ratio of the p50s", fast["turns_ratio"], float("nan"), "<= 2.5"),
            ("  p50 with an httpx client", fast["httpx_p50"], float("nan"), ""),
            ("  server time p50 ms", fast["own"], float("nan"), ""),
            ("  server CPU ms/req", fast["cpu"], naive["cpu"], ""),
            ("/score_batch 1000 ms", fast["batch"], naive["batch"], "<= 50"),
            ("  server time ms", fast["batch_own"], float("nan"), ""),
            ("  server CPU ms/batch", fast["batch_cpu"], float("nan"), ""),
            ("  without reasons ms", fast["batch_nr"], float("nan"), "<= 30"),
            ("  without reasons CPU ms", fast["batch_nr_cpu"], float("nan"), ""),
            ("4 clients: customers/s", fast["conc_throughput"], float("nan"), ""),
            ("  batch p50 ms", fast["conc_p50"], float("nan"), ""),
            ("  batch p99 ms", fast["conc_p99"], float("nan"), ""),
            (f"bulk {args.bulk:,} s", bulk["seconds"], bulk["baseline"], "<= 10"),
            ("  bulk CPU s", bulk["cpu"], float("nan"), ""),
        ]
        for label, a, b, target in rows:
            print(f"{label:28s}{a:12.2f}{b:12.2f}{target:>10s}")
        print(
            f"server memory {fast['rss']:.0f} MiB (+{fast['mapped']:,.0f} MiB mapped files); "
            f"bulk process RSS {bulk['rss']:,.0f} MiB; "
            "naive /score_batch = 1000 sequential naive /score calls (200 timed x 5); naive bulk = "
            "single-row online calls extrapolated"
        )


if __name__ == "__main__":
    main()
