"""The jobs lock: one holder at a time, freed by the kernel when a holder is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from propensity.jobs.lock import JobLock, LockBusyError

HOLD = """
import sys, time
from propensity.jobs.lock import JobLock
lock = JobLock(sys.argv[1], "retrain").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_holder_is_refused_then_admitted(tmp_path: Path):
    path = tmp_path / "jobs" / "jobs.lock"
    with (
        JobLock(path, "retrain"),
        pytest.raises(
            LockBusyError, match=f"another retrain run is in progress \\(pid {os.getpid()}"
        ),
    ):
        JobLock(path, "retrain").acquire()
    with JobLock(path, "retrain") as again:
        assert again.holder()["pid"] == os.getpid()


def test_waiting_acquire_gets_the_lock_when_released(tmp_path: Path):
    path = tmp_path / "jobs.lock"
    first = JobLock(path).acquire()
    timer = threading.Timer(0.5, first.release)
    timer.start()
    started = time.monotonic()
    with JobLock(path).acquire(wait_seconds=10):
        assert time.monotonic() - started >= 0.4
    timer.join()


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path):
    path = tmp_path / "jobs.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusyError, match=f"pid {holder.pid}"):
            JobLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    with JobLock(path):
        pass
