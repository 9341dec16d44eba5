"""``propensity ingest`` on unusable input: one line naming the problem, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GOOD = "customer_id,event_type,event_timestamp\nC1,search,2024-01-05\n"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "propensity.cli", "ingest", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        # A narrow terminal: the error must stay one line whatever its length.
        env={**os.environ, "COLUMNS": "60"},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["events.csv", "--map", "user=customr_id"], "['customr_id'] are not fields"),
        (["events.csv", "--map", "user=customer_id"], "mapped column(s) ['user'] not found"),
        (["events.csv", "--map", "user"], "--map expects SOURCE=TARGET"),
        (["missing.csv"], "no such file or folder"),
        (["broken.parquet"], "cannot be read as parquet"),
    ],
)
def test_unusable_input_is_one_line_and_exit_code_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "events.csv").write_text(GOOD)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")

    done = _run(tmp_path, *args)

    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert message in lines[0]


def test_bad_rows_are_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_bytes(GOOD.encode() + b"C\xff2,search,2024-01-05\nC3,x\n")
    done = _run(tmp_path, "events.csv")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quarantined not_utf8: 1" in done.stdout
    assert "quarantined ragged_row: 1" in done.stdout
