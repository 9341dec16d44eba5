"""The retrain job end to end on a small simulation, in the order a schedule would run it.

Real components throughout: the event lake, DuckDB, Feast (SQLite online store),
LightGBM, MLflow on SQLite, the BentoML server and real subprocesses killed by a
signal. The tests of this module share one project and run in file order:

1. first period dropped → first run trains and promotes;
2. re-run → nothing new, nothing done;
3. a corrupt file → quarantined, champions kept;
4. second period dropped → a run killed mid-way (a concurrent run is refused
   meanwhile) → the next run completes, promotes, and a live server picks it up;
5. a drift threshold blocks promotion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from jobs_project import (
    MODELS,
    Periods,
    champion_versions,
    clean_env,
    drop,
    free_port,
    make_project,
    wait_for_stage,
    wait_until_served,
)

from propensity import registry
from propensity.events.lake import EventLake
from propensity.jobs.lock import LockBusyError, job_dir
from propensity.jobs.retrain import (
    RETRAIN_EXPERIMENT,
    STATE_FILE,
    RetrainPolicy,
    read_status,
    retrain,
)
from propensity.serving.process import stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, periods: Periods) -> dict:
    settings = make_project(tmp_path_factory.mktemp("retrain") / "project")
    drop(settings, periods.first, "events-period1.parquet")
    first = retrain(settings)
    return {"settings": settings, "first": first}


def test_first_run_ingests_trains_and_promotes(project, periods):
    settings, first = project["settings"], project["first"]
    assert first.status == "trained"
    assert first.ingested_files == ["events-period1.parquet"]
    assert EventLake(settings.path(settings.lake_dir)).count() == periods.first.num_rows
    landing = settings.path(settings.landing_dir)
    assert not (landing / "events-period1.parquet").exists()
    assert (landing / "processed" / "events-period1.parquet").exists()
    assert set(first.decisions) == set(MODELS)
    champions = champion_versions(settings)
    for name in ("churn", "purchase_propensity"):
        decision = first.decisions[name]
        assert decision.promoted, decision.reasons
        assert champions[name] == decision.challenger_version
        assert all(c.passed for c in decision.reasons)
    # Every decision is in MLflow, with the why.
    record = registry.find_records(settings.tracking_uri, RETRAIN_EXPERIMENT)[0]
    assert record["run_id"] == first.run_id
    assert record["tags"]["status"] == "trained"
    assert record["tags"]["decision.churn"].startswith("churn: promoted")
    assert "decision.next_best_action" in record["tags"]
    assert "promoted" in first.summary()


def test_rerun_after_success_does_nothing(project):
    settings = project["settings"]
    before = champion_versions(settings)
    versions = registry.version_info(settings.tracking_uri, "churn")["version"]
    started = time.perf_counter()
    again = retrain(settings)
    assert again.status == "up_to_date" and not again.decisions
    assert time.perf_counter() - started < 15  # no feature build, no training
    assert champion_versions(settings) == before
    assert registry.version_info(settings.tracking_uri, "churn")["version"] == versions


def test_corrupt_file_is_quarantined_and_champions_kept(project):
    settings = project["settings"]
    before = champion_versions(settings)
    landing = settings.path(settings.landing_dir)
    (landing / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all")
    result = retrain(settings)
    assert "broken.parquet" in result.rejected_files
    assert result.exit_code == 2 and not result.validation_passed
    assert not (landing / "broken.parquet").exists()
    kept = list((settings.path(settings.quarantine_dir) / "files").glob("*broken.parquet*"))
    assert len(kept) == 2  # the file and its .reason.txt
    assert "broken.parquet" in next(p for p in kept if p.suffix == ".txt").read_text()
    assert champion_versions(settings) == before
    assert result.status == "up_to_date"


def test_killed_run_recovers_concurrent_run_refused_and_server_picks_up(project, periods, tmp_path):
    settings = project["settings"]
    lake = EventLake(settings.path(settings.lake_dir))
    rows_before, before = lake.count(), champion_versions(settings)
    drop(settings, periods.second, "events-period2.parquet")

    # Run A in a real subprocess, killed once it has ingested and built the features.
    log = tmp_path / "run_a.log"
    command = [sys.executable, "-m", "propensity.jobs.retrain", "--config", str(settings.root)]
    with log.open("wb") as out:
        run_a = subprocess.Popen(command, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_stage(settings, run_a, "materialize", log)
        # A concurrent run B is refused at once and changes nothing.
        with pytest.raises(LockBusyError, match=f"pid {run_a.pid}"):
            retrain(settings)
        busy = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert busy.returncode == 75 and "another retrain run is in progress" in busy.stderr
    finally:
        run_a.send_signal(signal.SIGKILL)
        run_a.wait(timeout=30)
    assert read_status(settings)["pid"] == run_a.pid  # killed mid-run: its stage is left

    # Killed after ingesting: the lake holds the second period, committed and readable.
    assert lake.count() == rows_before + periods.second.num_rows
    assert len(lake.read(["event_id"])) == lake.count()
    assert champion_versions(settings) == before

    # A server is serving the first champions before the next run.
    port = free_port()
    from propensity.serving.service import serve

    server = serve(settings, port=port, wait=False, reload_seconds=1, env=clean_env())
    url = f"http://127.0.0.1:{port}"
    customer = periods.first["customer_id"][0].as_py()
    try:
        result = retrain(settings)  # the next scheduled run completes the work
        assert result.status == "trained", result.summary()
        assert not result.ingested_files  # ingested by the killed run, not twice
        assert set(result.decisions) == set(MODELS)
        for name, decision in result.decisions.items():
            assert decision.challenger_version is not None, (name, decision.reasons)
            assert decision.champion_before == before[name]
        promoted = result.promoted
        assert promoted, result.summary()
        record = registry.find_records(settings.tracking_uri, RETRAIN_EXPERIMENT)[0]
        assert record["tags"]["promoted"] == ",".join(promoted)

        expected = {m: str(result.decisions[m].champion_after) for m in promoted}
        served = wait_until_served(url, server, customer, expected)
        assert served and all(served.get(m) == v for m, v in expected.items()), served
    finally:
        stop(server)
    assert (job_dir(settings) / STATE_FILE).exists()
    assert retrain(settings).status == "up_to_date"


def test_drift_threshold_blocks_promotion(project):
    settings = project["settings"]
    before = champion_versions(settings)
    policy = RetrainPolicy(models=("churn",), block_promotion_psi=1e-6)
    result = retrain(settings, policy=policy, force=True)
    decision = result.decisions["churn"]
    assert result.drift is not None and result.drift.max_score_psi > 1e-6
    assert decision.challenger_version is not None and not decision.promoted
    assert any(c.name == "drift" and not c.passed for c in decision.reasons)
    assert champion_versions(settings) == before
    record = registry.find_records(settings.tracking_uri, RETRAIN_EXPERIMENT)[0]
    assert "kept" in record["tags"]["decision.churn"]
    assert "blocked: drift" in record["tags"]["decision.churn"]


def test_drift_report_logs_json_and_plot(project):
    from propensity.jobs.drift import DRIFT_EXPERIMENT, drift_report

    settings = project["settings"]
    report = drift_report(settings, threshold=0.25)
    assert set(report.scores) == {"churn", "purchase_propensity"}
    assert report.champions == {
        m: registry.champion_version(settings.tracking_uri, m) for m in report.scores
    }
    assert all(v >= 0 for v in report.features.values()) and "sessions_7d" in report.features
    assert "last_event_epoch" not in report.features  # an absolute clock always drifts
    record = registry.find_records(settings.tracking_uri, DRIFT_EXPERIMENT)[0]
    assert record["run_id"] == report.run_id
    assert record["metrics"]["max_psi"] == pytest.approx(report.max_psi)
    folder = Path(record["artifact_uri"].removeprefix("file://"))
    saved = json.loads((folder / "drift.json").read_text())
    assert saved["features"] == pytest.approx(report.features)
    assert (folder / "drift.png").stat().st_size > 1000


def test_failure_is_recorded_raised_and_champions_kept(project):
    from propensity.jobs.retrain import RetrainError

    settings = project["settings"]
    before = champion_versions(settings)
    state = (job_dir(settings) / STATE_FILE).read_text()
    spec = settings.path(settings.models_dir) / "churn.yaml"
    good = spec.read_text()
    spec.write_text(good.replace("min_auc:", "min_aux:"))  # an unknown key: the spec is invalid
    try:
        with pytest.raises(RetrainError, match="churn: SpecError: unknown key 'gates.min_aux'"):
            retrain(settings, policy=RetrainPolicy(models=("churn",)))
    finally:
        spec.write_text(good)
    assert champion_versions(settings) == before
    assert (job_dir(settings) / STATE_FILE).read_text() == state  # the next run redoes it
    record = registry.find_records(settings.tracking_uri, RETRAIN_EXPERIMENT)[0]
    assert record["tags"]["status"] == "failed"
    assert "SpecError" in record["tags"]["error"]


def test_the_24h_model_is_retrained_once_it_is_served(project):
    from propensity.jobs.retrain import retrained_models

    settings = project["settings"]
    assert retrained_models(settings, RetrainPolicy()) == MODELS  # never served: not trained
    # A champion registered by hand (as the quickstart's first training would).
    churn = registry.load_estimator(settings.tracking_uri, "churn")
    example = pd.DataFrame(np.zeros((2, len(churn.feature_names_))), columns=churn.feature_names_)
    run = registry.log_run(
        settings.tracking_uri,
        "purchase_24h",
        estimator=churn,
        input_example=example,
        register_as="purchase_24h",
    )
    assert run.version is not None
    registry.set_champion(settings.tracking_uri, "purchase_24h", run.version)
    assert retrained_models(settings, RetrainPolicy()) == (*MODELS, "purchase_24h")
    only = RetrainPolicy(models=("churn",), when_served=())
    assert retrained_models(settings, only) == ("churn",)
