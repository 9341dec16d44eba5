"""The command line on a folder that is not (yet) a project: one line, exit 2, a hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    command = [sys.executable, "-m", "propensity.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("apply", "feature repo definitions not found"),
        ("build", "event lake"),
        ("materialize", "feature table missing"),
    ],
)
def test_features_in_an_empty_folder_say_what_is_missing(
    tmp_path: Path, command: str, missing: str
) -> None:
    done = _cli(tmp_path, "features", command)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert missing in output and "propensity init" in output
    assert "Traceback" not in output


def test_init_starts_a_project_the_other_commands_accept(tmp_path: Path) -> None:
    done = _cli(tmp_path, "init", "shop")
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path / "shop"
    for part in ("propensity.yaml", "models/churn.yaml", "models/next_best_action.yaml"):
        assert (root / part).is_file(), part
    assert (root / "feature_repo" / "repo.py").is_file()
    again = _cli(tmp_path, "init", "shop")
    assert again.returncode == 2 and "already exists" in again.stdout
    # A project without events: the next step says so, without the init hint.
    build = _cli(root, "features", "build")
    output = " ".join(build.stdout.split())
    assert build.returncode == 2 and "is empty: ingest events first" in output
    assert "propensity init" not in output and "Traceback" not in build.stdout + build.stderr


def test_nba_tabular_prints_a_summary_and_names_the_arms(tmp_path: Path) -> None:
    from propensity.events.campaign_table import simulate_campaign_table

    table, _ = simulate_campaign_table(3_000, seed=2)
    table.to_csv(tmp_path / "campaign.csv", index=False)
    base = ["nba", "tabular", "campaign.csv", "--treatment", "arm", "--outcome", "visit"]
    done = _cli(tmp_path, *base, "--out", "out", "--id", "customer", "--value", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning: column 'conversion' looks post-treatment" in done.stdout
    assert "learned policy" in done.stdout and "qini (scikit-uplift)" in done.stdout
    clean = _cli(tmp_path, *base, "--out", "out2", "--exclude", "conversion,spend,propensity")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "warning" not in clean.stdout
    assert "features (8): customer, recency" in clean.stdout
    wrong = _cli(tmp_path, *base, "--out", "out3", "--control", "none")
    output = " ".join(wrong.stdout.split())
    assert wrong.returncode == 2
    assert "arms found: ['control', 'mens_email', 'womens_email']" in output
    assert "Traceback" not in wrong.stdout + wrong.stderr
