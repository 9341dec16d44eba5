"""Small simulated projects for the job tests: two periods of events and fast model specs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from propensity.config import Settings
from propensity.events.simulator import SimulationConfig, simulate

REPO = Path(__file__).resolve().parents[2]
#: First period: 2026-01-01 .. 2026-04-30 (120 days); second: the next 30 days.
SPLIT = pd.Timestamp("2026-05-01", tz="UTC")


@dataclass(frozen=True)
class Periods:
    first: pa.Table
    second: pa.Table


def simulate_periods(customers: int = 2000, days: int = 150, seed: int = 11) -> Periods:
    events = simulate(SimulationConfig(customers=customers, days=days, seed=seed)).events
    split = pa.scalar(SPLIT.to_pydatetime(), pa.timestamp("us", tz="UTC"))
    early = pc.less(events["event_timestamp"], split)
    return Periods(events.filter(early), events.filter(pc.invert(early)))


def fast_specs(models_dir: Path, **gates: float) -> None:
    """The project's specs, shrunk for tests: fewer trees and cutoffs, one thread, no SHAP."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in ("churn", "purchase_propensity"):
        spec = yaml.safe_load((REPO / "models" / f"{name}.yaml").read_text())
        spec["lightgbm"].update(n_estimators=80, learning_rate=0.1, num_threads=1)
        spec["early_stopping_rounds"] = 15
        spec["split"]["n_cutoffs"] = 9
        spec["shap_sample"] = 0
        spec["gates"].update({"min_rows": 200, "max_ece": 0.08, "max_auc_drop": 0.05, **gates})
        (models_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(REPO / "models" / "actions.yaml", models_dir / "actions.yaml")
    nba = yaml.safe_load((REPO / "models" / "next_best_action.yaml").read_text())
    nba.update(n_boot=10, min_test_rows=50, params={"n_estimators": 40, "num_threads": 1})
    (models_dir / "next_best_action.yaml").write_text(yaml.safe_dump(nba))


def make_project(root: Path) -> Settings:
    """A project folder with its own data, MLflow database and fast specs."""
    root.mkdir(parents=True, exist_ok=True)
    fast_specs(root / "models")
    (root / "propensity.yaml").write_text(
        yaml.safe_dump(
            {
                "feature_repo": str(REPO / "feature_repo"),
                "models_dir": "models",
                "mlflow_tracking_uri": "sqlite:///data/mlflow.db",
            }
        )
    )
    return Settings(
        root=root,
        feature_repo=REPO / "feature_repo",
        models_dir=Path("models"),
    )


def drop(settings: Settings, table: pa.Table, name: str) -> Path:
    """Write events into the landing folder as a new Parquet file."""
    landing = settings.path(settings.landing_dir)
    landing.mkdir(parents=True, exist_ok=True)
    path = landing / name
    pq.write_table(table, path)
    return path


def wait_for_stage(
    settings: Settings, run: subprocess.Popen, stage: str, log: Path, timeout: float = 120
) -> None:
    """Wait until the retrain run ``run`` records ``stage`` in its status file."""
    from propensity.jobs.retrain import read_status

    deadline = time.monotonic() + timeout
    while True:
        status = read_status(settings)
        if status and status["pid"] == run.pid and status["stage"] == stage:
            return
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached stage {stage!r}: {status}"
        time.sleep(0.05)


MODELS = ("churn", "purchase_propensity", "next_best_action")


def champion_versions(settings: Settings) -> dict[str, int | None]:
    """The champion version of every registered model (None where there is none)."""
    from propensity import registry

    return {m: registry.champion_version(settings.tracking_uri, m) for m in MODELS}


def clean_env() -> dict[str, str]:
    """This process's environment without PROPENSITY_* variables, for child processes."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_versions(url: str, customer: str) -> dict[str, str] | None:
    """The model versions a live server answers with, or None while it cannot answer."""
    try:
        response = httpx.post(f"{url}/score", json={"customer_id": customer}, timeout=10)
    except httpx.HTTPError:
        return None
    return response.json()["model_versions"] if response.status_code == 200 else None


def wait_until_served(
    url: str, server: subprocess.Popen, customer: str, expected: dict[str, str]
) -> dict[str, str] | None:
    """Poll ``/score`` (up to 120 s) until it names the ``expected`` versions; the last answer."""
    served = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        served = served_versions(url, customer)
        if served and all(served.get(m) == v for m, v in expected.items()):
            break
        assert server.poll() is None, "the server exited"
        time.sleep(0.5)
    return served
