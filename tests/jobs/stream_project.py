"""Helpers of the stream tests: a Redis server of their own, a project, events, CLI processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from jobs_project import free_port

from propensity.config import Settings, load_settings
from propensity.jobs.redis_stream import connect

EVENT_TYPES = ("session_start", "page_view", "product_view", "add_to_cart", "purchase")


@dataclass
class RedisServer:
    """A redis-server on a free port, persisting every write (append-only, fsync always).

    Killed with SIGKILL and restarted on the same port and files, it comes back
    with every acknowledged write, as a production Redis with AOF does.
    """

    folder: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> Any:
        return connect(self.url, timeout=5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        self.kill()


def make_project(root: Path, redis_url: str, online: str = "sqlite", **stream: Any) -> Settings:
    """A project folder whose stream lives in the given Redis (fast claims, short blocks).

    ``online="redis"`` keeps the streaming state in that Redis too (its db 1).
    """
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "stream": {
            "url": redis_url,
            "claim_idle_ms": 500,
            "block_ms": 100,
            "log_seconds": 1,
            "batch_size": 5,
            **stream,
        },
        "streaming": {"flush_seconds": 0.5},
    }
    if online == "redis":
        config["online_store"] = {"kind": "redis", "redis_url": f"{redis_url},db=1"}
    (root / "propensity.yaml").write_text(yaml.safe_dump(config))
    return load_settings(root, environ={})


def make_events(n: int, customers: int, seed: int, now: datetime) -> list[dict[str, Any]]:
    """Valid canonical events in the half hour before ``now``, each with its own event_id."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        customer = f"C{rng.randrange(customers):05d}"
        kind = rng.choice(EVENT_TYPES)
        at = now - timedelta(seconds=rng.uniform(1, 1800))
        event: dict[str, Any] = {
            "event_id": f"ev-{seed}-{i}",
            "customer_id": customer,
            "event_type": kind,
            "event_timestamp": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "session_id": f"{customer}-s{rng.randrange(3)}",
        }
        if kind in ("product_view", "add_to_cart", "purchase"):
            event["product_id"] = f"P{rng.randrange(50)}"
        if kind == "purchase":
            event["price"] = round(rng.uniform(1, 100), 2)
            event["quantity"] = 1.0
        events.append(event)
    return events


def write_jsonl(events: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def cli(settings: Settings, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """``propensity ARGS --config <project>`` as a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "propensity.cli", *args, "--config", str(settings.root)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def run_cli(settings: Settings, *args: str, timeout: float = 180) -> str:
    process = cli(settings, *args)
    out, _ = process.communicate(timeout=timeout)
    command = " ".join(args)
    assert process.returncode == 0, f"propensity {command} exited {process.returncode}:\n{out}"
    return out


def group_progress(client: Any, key: str, group: str) -> tuple[int, int]:
    """(entries read by the group, entries pending) — (0, 0) before the group exists."""
    try:
        groups = client.xinfo_groups(key)
    except Exception:
        return 0, 0
    for info in groups:
        if info["name"] in (group, group.encode()):
            return int(info.get("entries-read") or 0), int(info["pending"])
    return 0, 0
