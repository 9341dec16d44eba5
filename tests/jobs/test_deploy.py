"""The CronJob manifest runs the retrain command, never two at once."""

from __future__ import annotations

from pathlib import Path

import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "retrain-cronjob.yaml"


def test_cronjob_runs_retrain_without_overlap():
    doc = yaml.safe_load(MANIFEST.read_text())
    assert doc["kind"] == "CronJob" and doc["apiVersion"] == "batch/v1"
    spec = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["propensity", "retrain"]
    env = {e["name"] for e in container["env"]}
    assert "PROPENSITY_CONFIG" in env
