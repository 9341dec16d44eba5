"""The real scoring service over HTTP (BentoML in a subprocess, Feast SQLite, MLflow SQLite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import API_KEY, Server
from project import OFFLINE_ONLY, SERVICES, Project, fit_model, free_port, register

from propensity.features.store import FeatureStoreAdapter
from propensity.models.attribution import PathAttribution
from propensity.registry import load_estimator
from propensity.serving.process import stop, wait_ready
from propensity.serving.schemas import (
    MAX_AUDIENCE_K,
    AudienceResponse,
    BatchResponse,
    ScoreResponse,
)

pytestmark = pytest.mark.slow


def test_score_fields_and_probabilities_match_the_models(server: Server, project: Project) -> None:
    customer = project.customers[3]
    with server.client() as client:
        started = time.perf_counter()
        response = client.post("/score", json={"customer_id": customer})
        elapsed_ms = (time.perf_counter() - started) * 1e3
    assert response.status_code == 200
    # The server's own scoring time, as a standard Server-Timing metric.
    name, duration = response.headers["server-timing"].split(";dur=")
    assert name == "score" and 0 < float(duration) < elapsed_ms
    body = ScoreResponse.model_validate(response.json())
    assert body.customer_id == customer
    assert 0 <= body.churn_probability <= 1 and 0 <= body.purchase_propensity <= 1
    # In-process: Feast's own online read of the same customer and the champion estimators.
    adapter = FeatureStoreAdapter(project.settings)
    uri = project.settings.tracking_uri
    for name, service, got in (
        ("churn", SERVICES["churn"], body.churn_probability),
        ("purchase_propensity", SERVICES["purchase_propensity"], body.purchase_propensity),
    ):
        model = load_estimator(uri, name, body.model_versions[name])
        frame = adapter.online([customer], service)
        expected = float(model.predict_proba(frame[model.feature_names_], num_threads=1)[0, 1])
        assert got == pytest.approx(expected, abs=1e-9)
        reasons = body.reasons[name]
        assert len(reasons) == 3
        sizes = [abs(r.contribution) for r in reasons]
        assert sizes == sorted(sizes, reverse=True)
        # The reasons are the model's three largest path attributions (the default method).
        X = frame[model.feature_names_].to_numpy(np.float64)
        attribution = PathAttribution(model.booster_, model.best_iteration_)(X)[0, :-1]
        top = np.argsort(-np.abs(attribution), kind="stable")[:3]
        assert [r.feature for r in reasons] == [model.feature_names_[j] for j in top]
        assert [r.contribution for r in reasons] == pytest.approx(attribution[top], abs=1e-9)
        for reason in reasons:
            assert reason.feature in model.feature_names_
            assert reason.direction == ("increases" if reason.contribution >= 0 else "decreases")
            online = frame[reason.feature].iloc[0]
            assert (
                reason.value is None if np.isnan(online) else reason.value == pytest.approx(online)
            )
    assert body.features_timestamp is not None and body.features_timestamp.startswith("2026-06-01")
    # The snapshot is months older than the views' 8-day TTL.
    assert body.stale is True


def test_score_batch_keeps_order_and_lists_unknown_ids(server: Server, project: Project) -> None:
    ids = [project.customers[5], "C9999999", project.customers[0], project.customers[5]]
    with server.client() as client:
        batch = client.post("/score_batch", json={"customer_ids": ids})
        single = client.post("/score", json={"customer_id": project.customers[0]}).json()
    assert batch.status_code == 200
    body = BatchResponse.model_validate(batch.json())
    assert [r.customer_id for r in body.results] == [ids[0], ids[2], ids[3]]
    assert body.unknown == ["C9999999"]
    assert body.results[1].churn_probability == single["churn_probability"]
    # The same reasons; days_since_last_seen's value moves with each request's clock.
    reasons = ScoreResponse.model_validate(single).reasons
    assert body.results[1].reasons.keys() == reasons.keys()
    for name, got in body.results[1].reasons.items():
        assert [r.model_copy(update={"value": None}) for r in got] == [
            r.model_copy(update={"value": None}) for r in reasons[name]
        ]
        assert [r.value for r in got] == pytest.approx([r.value for r in reasons[name]], rel=1e-6)


def test_score_batch_can_skip_reasons(server: Server, project: Project) -> None:
    ids = project.customers[:30]
    with server.client() as client:
        full = client.post("/score_batch", json={"customer_ids": ids}).json()
        lean = client.post("/score_batch", json={"customer_ids": ids, "reasons": False})
        bad = client.post("/score_batch", json={"customer_ids": ids, "reasons": "no"})
    assert lean.status_code == 200
    body = BatchResponse.model_validate(lean.json())
    assert all(r.reasons == {} for r in body.results)
    # The same model either way (up to the order of the floating-point sum of leaves).
    assert [r.churn_probability for r in body.results] == pytest.approx(
        [r["churn_probability"] for r in full["results"]], abs=1e-12
    )
    assert all(len(r["reasons"]["churn"]) == 3 for r in full["results"])
    assert bad.status_code == 422 and bad.json()["field"] == "reasons"


def test_unknown_customer_is_404_with_json_error(server: Server, project: Project) -> None:
    offline_only = project.customers[-OFFLINE_ONLY]  # in the offline tables, never online
    with server.client() as client:
        for customer in (offline_only, "nobody"):
            response = client.post("/score", json={"customer_id": customer})
            assert response.status_code == 404
            assert response.json()["field"] == "customer_id"
            assert customer in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "field"),
    [
        ("/score", b'{"customer_id": "C0', 400, None),
        ("/score", b"{}", 422, "customer_id"),
        ("/score", b'{"customer_id": 17}', 422, "customer_id"),
        ("/score", b'{"customer_id": "C1", "extra": 1}', 422, "extra"),
        ("/score_batch", b'{"customer_ids": "C0000001"}', 422, "customer_ids"),
        ("/score_batch", b'{"customer_ids": []}', 422, "customer_ids"),
        ("/audience", b'{"score": "revenue"}', 422, "score"),
        ("/audience", b'{"k": 0}', 422, "k"),
    ],
)
def test_malformed_requests_are_4xx_naming_the_field(
    server: Server, path: str, payload: bytes, status: int, field: str | None
) -> None:
    with server.client() as client:
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    assert response.status_code == status
    body = response.json()
    assert body["field"] == field
    if field:
        assert field in body["error"]


def test_oversize_batch_is_413(server: Server) -> None:
    ids = [f"C{i:07d}" for i in range(51)]  # the test server's limit is 50
    with server.client() as client:
        response = client.post("/score_batch", json={"customer_ids": ids})
        at_limit = client.post("/score_batch", json={"customer_ids": ids[:50]})
    assert response.status_code == 413
    assert "50" in response.json()["error"]
    assert at_limit.status_code == 200


def test_api_key_is_required_and_never_logged(server: Server, project: Project) -> None:
    payload = {"customer_id": project.customers[0]}
    wrong = "wrong-key-0ddba11"
    with server.client(key=None) as anonymous:
        assert anonymous.post("/score", json=payload).status_code == 401
        assert anonymous.post("/audience", json={}).status_code == 401
        # Probes and metrics stay open for orchestrators and scrapers.
        assert anonymous.get("/healthz").status_code == 200
    with server.client(key=wrong) as bad:
        response = bad.post("/score", json=payload)
        assert response.status_code == 401
        assert wrong not in response.text
    with server.client() as good:
        assert good.post("/score", json=payload).status_code == 200
    time.sleep(0.5)  # let the server flush its log
    text = server.log.read_text(errors="replace")
    assert "Service propensity_scoring initialized" in text  # the log is really captured
    assert API_KEY not in text
    assert wrong not in text


def test_health_readiness_and_metrics(server: Server) -> None:
    with server.client(key=None) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200
        with server.client() as authed:
            authed.post("/score", json={"customer_id": "C0000001"})
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "bentoml_service_request_total" in metrics.text
    assert 'endpoint="/score"' in metrics.text


def test_audience_filters_and_ordering(server: Server, project: Project) -> None:
    request = {
        "score": "purchase_propensity",
        "k": 10,
        "filters": [{"field": "churn_probability", "op": ">=", "value": 0.5}],
    }
    with server.client() as client:
        response = client.post("/audience", json=request)
        everyone = client.post(
            "/audience", json={"score": "churn_probability", "k": MAX_AUDIENCE_K}
        )
    assert response.status_code == 200
    assert "deprecation" not in response.headers
    body = AudienceResponse.model_validate(response.json())
    assert body.snapshot.startswith("2026-06-01")
    scores = [m.purchase_propensity for m in body.customers]
    assert scores == sorted(scores, reverse=True)
    assert all(m.churn_probability >= 0.5 for m in body.customers)
    assert all("churn" not in m for m in response.json()["customers"])  # no deprecated field
    # Bulk over the whole offline snapshot, not only the online customers.
    table = pd.DataFrame(everyone.json()["customers"])
    assert len(table) == len(project.customers)
    assert body.matched == int((table["churn_probability"] >= 0.5).sum())
    # Ties (leaves shared by every tree) rank by customer id, as the service ranks them.
    top = table[table["churn_probability"] >= 0.5].sort_values(
        ["purchase_propensity", "customer_id"], ascending=[False, True], kind="stable"
    )
    assert [m.customer_id for m in body.customers] == top["customer_id"].head(10).tolist()
    # Bulk and online agree for a customer present in both, under the same name.
    customer = body.customers[0].customer_id
    with server.client() as client:
        online = client.post("/score", json={"customer_id": customer}).json()
    assert online["churn_probability"] == pytest.approx(
        body.customers[0].churn_probability, abs=1e-9
    )


def test_audience_accepts_the_deprecated_names_for_one_release(server: Server) -> None:
    new = {
        "score": "churn_probability",
        "k": 20,
        "filters": [{"field": "purchase_propensity", "op": ">=", "value": 0.2}],
    }
    old = {**new, "score": "churn"}
    with server.client() as client:
        current = client.post("/audience", json=new)
        legacy = [client.post("/audience", json=old) for _ in range(2)]
    assert current.status_code == 200 and "deprecation" not in current.headers
    for response in legacy:
        assert response.status_code == 200
        assert response.headers["deprecation"].startswith("@")
        AudienceResponse.model_validate(response.json())
    ranked = [m["customer_id"] for m in current.json()["customers"]]
    members = legacy[0].json()["customers"]
    assert [m["customer_id"] for m in members] == ranked
    # The old member fields ride along, equal to the new ones.
    assert all(m["churn"] == m["churn_probability"] for m in members)
    assert all(m["action"] is None and m["next_best_action"] is None for m in members)
    # Logged once per name, not once per request.
    time.sleep(0.2)
    assert server.log.read_text().count("field name 'churn' is deprecated") == 1


def test_audience_rejects_a_filter_that_cannot_apply(server: Server) -> None:
    for field in ("next_best_action.action", "action"):
        bad = {"filters": [{"field": field, "op": ">=", "value": "discount"}]}
        with server.client() as client:
            response = client.post("/audience", json=bad)
        assert response.status_code == 422
        assert f"filters[0]: field {field!r}" in response.json()["error"]


def test_hot_reload_under_traffic(server: Server, project: Project) -> None:
    """A client scores continuously while the churn champion moves: no request fails."""
    customer = project.customers[1]
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with server.client() as client:
            while not stop.is_set():
                try:
                    r = client.post("/score", json={"customer_id": customer})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        seen.append(r.json()["model_versions"]["churn"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        new = register(project.settings, "churn", fit_model(project.churn_features, seed=7))
        deadline = time.monotonic() + 30
        while str(new) not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert not failures
    old = str(project.versions["churn"][0])
    assert seen[0] == old and seen[-1] == str(new)
    # Versions never go back once the swap happened.
    first_new = seen.index(str(new))
    assert set(seen[first_new:]) == {str(new)}


def test_serve_command_stops_its_server_on_sigterm(project: Project, tmp_path: Path) -> None:
    import psutil

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env.update(
        PROPENSITY_CONFIG=str(project.settings.root / "propensity.yaml"),
        BENTOML_HOME=str(tmp_path / "bentoml_home"),
    )
    command = [sys.executable, "-m", "propensity.cli", "serve", "--port", str(port)]
    cli = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", cli, timeout=90)
        server = psutil.Process(cli.pid).children(recursive=True)
        assert server, "the command runs the server as a child process"
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=30) is not None
        _, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, f"still running after the command stopped: {alive}"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2)
    finally:
        stop(cli)
        for process in server:  # orphans of a failed run
            if process.is_running():
                process.kill()


def test_quickstart_scores_over_http_and_explains_stale_answers(project: Project) -> None:
    from rich.console import Console

    from propensity.quickstart import _score_over_http

    console = Console(record=True, width=120)
    *answers, live = _score_over_http(project.settings, free_port(), console)
    assert [a["customer_id"] for a in answers] == project.customers[:3]
    assert all(a["stale"] for a in answers)  # the test snapshot is months old
    text = console.export_text()
    assert text.count("POST /score") == 3
    assert '"stale": true: the simulated snapshot (2026-06-01' in text
    # Then a few live events for the first customer: accepted, and its answer is fresh.
    assert live["customer_id"] == project.customers[0]
    assert live["events"]["accepted"] == 4 and not live["events"]["rejected"]
    assert live["before"]["stale"] is True and live["after"]["stale"] is False
    assert f"POST /events: 4 live events for {project.customers[0]}" in text


@pytest.mark.parametrize("key", ["", "   "])
def test_serve_refuses_an_empty_api_key(project: Project, tmp_path: Path, key: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env.update(
        PROPENSITY_CONFIG=str(project.settings.root / "propensity.yaml"),
        PROPENSITY_SERVING__API_KEY=key,
        BENTOML_HOME=str(tmp_path / "bentoml_home"),
    )
    command = [sys.executable, "-m", "propensity.cli", "serve", "--port", str(free_port())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    output = " ".join((done.stdout + done.stderr).split())
    assert "API key" in output and "empty or blank" in output
    assert "Traceback" not in output


def test_serve_keeps_secrets_off_disk_and_out_of_logs(project: Project, tmp_path: Path) -> None:
    password = "redis-pa55-" + os.urandom(4).hex()
    port = free_port()
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env.update(
        PROPENSITY_CONFIG=str(project.settings.root / "propensity.yaml"),
        # The SQLite store serves; the Redis URL is only a setting the server must receive.
        PROPENSITY_ONLINE_STORE__REDIS_URL=f"redis://:{password}@localhost:6379/0",
        BENTOML_HOME=str(tmp_path / "bentoml_home"),
        TMPDIR=str(temp),
    )
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "propensity.cli", "serve", "--port", str(port)]
    started = time.time()
    with log.open("wb") as out:
        cli = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", cli, timeout=90)
        response = httpx.post(
            f"http://127.0.0.1:{port}/score", json={"customer_id": "C0000001"}, timeout=10
        )
        assert response.status_code == 200  # no key configured: open, with a warning
        import psutil

        children = psutil.Process(cli.pid).children(recursive=True)
        server_env = children[0].environ()
        assert password in server_env["PROPENSITY_ONLINE_STORE__REDIS_URL"]  # really passed on
        # Every file written since the start, in the temp dir, the project and BentoML's home.
        for folder in (temp, project.settings.root, tmp_path / "bentoml_home"):
            for path in folder.rglob("*"):
                if path.is_file() and path.stat().st_mtime >= started - 1:
                    assert password.encode() not in path.read_bytes(), path
    finally:
        stop(cli)
    text = log.read_text(errors="replace")
    assert "Service propensity_scoring initialized" in text
    assert password not in text
    assert text.count("PROPENSITY_SERVING__API_KEY is not set") == 1
