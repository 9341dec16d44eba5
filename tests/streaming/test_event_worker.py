"""The event processor in a child process of the server: replaced when it dies, gone with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from propensity.config import load_settings
from propensity.events.lake import EventLake
from propensity.streaming.worker import EventWorker


def _events(n: int, prefix: str) -> list[dict]:
    now = datetime.now(UTC).isoformat()
    return [
        {"event_id": f"{prefix}{i}", "customer_id": f"C{i}", "event_type": "page_view",
         "event_timestamp": now}
        for i in range(n)
    ]  # fmt: skip


def _child_of(pid: int) -> psutil.Process:
    children = [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]
    workers = [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]
    assert workers, children
    return workers[0]


def test_a_killed_child_is_replaced_and_the_batch_handed_again(tmp_path: Path) -> None:
    worker = EventWorker(load_settings(tmp_path, environ={})).start()
    try:
        assert worker.process(_events(10, "a")).accepted == 10
        _child_of(os.getpid()).kill()
        # The next batch finds the pool broken, starts another child and hands it over;
        # the repeat of the first batch is a duplicate, not a second count.
        again = worker.process(_events(10, "a") + _events(5, "b"))
        assert (again.accepted, again.duplicates) == (5, 10)
    finally:
        worker.close()
    # close() flushed the staged events into the lake and ended the child.
    assert EventLake(tmp_path / "data" / "lake").count() == 15


def test_the_child_exits_when_the_server_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(f"""
        import time
        from propensity.config import load_settings
        from propensity.streaming.worker import EventWorker
        if __name__ == "__main__":
            EventWorker(load_settings({str(tmp_path)!r}, environ={{}})).start()
            print("ready", flush=True)
            time.sleep(600)
    """)
    )
    server = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline().strip()
        assert first == "ready", first + server.stdout.read()[-2000:]
        child = _child_of(server.pid)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        deadline = time.monotonic() + 30
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphaned child is still running"
            time.sleep(0.2)
    finally:
        server.kill()
