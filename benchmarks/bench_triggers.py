"""Benchmark: live events → triggered decisions on the outbound stream; many pending timers.

A project like the serving tests' (random features, real champions and a
next-best-action model, ``--customers`` online) with two triggers: ``visit``
(immediate: any event in the last 30 minutes, action ``loyalty_points``, no
hold-out) and ``revisit`` (delayed 30 minutes; a condition every customer
meets, so each due timer sends a decision). A
``propensity triggers run`` process evaluates them; this process:

1. **immediate**: applies events at ``--rate`` in batches of 500 for
   ``--seconds`` through ``EventProcessor.process`` (the tile store's change
   feed), a share ``--firing-share`` of them for customers not fired yet, the
   rest for customers already fired (evaluated, nothing sent), and reads the
   outbound stream: per decision, the time from the end of the ``process``
   call that applied its event to the entry's arrival (p50, p99, max);
2. **timers**: arms ``--timers`` pending ``revisit`` timers due uniformly over
   the next ``--spread`` seconds (as many delayed checks as that many recent
   visitors would leave) and records, per decision, its arrival after its due
   time.

Baseline in the same run: one step of an in-process runner on one changed
customer (the evaluation's own floor, no process hop, no polling).

    python benchmarks/bench_triggers.py [--customers 100000] [--rate 5000] [--seconds 30]
        [--firing-share 0.1] [--timers 100000] [--spread 60] [--warm 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

from project import REPO_ROOT, build_project, customer_ids, fit_nba, register  # noqa: E402

from propensity.activation.runner import TriggerRunner  # noqa: E402
from propensity.config import Settings, load_settings  # noqa: E402
from propensity.features.online.redis_client import connect  # noqa: E402
from propensity.features.store import FeatureStoreAdapter  # noqa: E402
from propensity.models.arbitration import in_holdout, load_catalog  # noqa: E402
from propensity.streaming.processor import EventProcessor  # noqa: E402

TRIGGERS = {
    "triggers": {
        "visit": {
            "when": [{"feature": "events_30m", "op": ">", "value": 0}],
            "action": "loyalty_points",
            "window_hours": 24,
            "holdout_share": 0.0,
        },
        "revisit": {
            "when": [{"feature": "tenure_days", "op": ">=", "value": 0}],
            "delay_minutes": 30,
            "action": "loyalty_points",
            "window_hours": 24,
            "holdout_share": 0.0,
        },
    }
}


def _pct(values: list[float]) -> str:
    a = np.asarray(values) * 1e3
    if not a.size:
        return "none"
    return (
        f"p50 {np.percentile(a, 50):.1f} ms, p99 {np.percentile(a, 99):.1f} ms, "
        f"max {a.max():.1f} ms over {a.size:,}"
    )


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _project(root: Path, customers: int, redis_url: str) -> Settings:
    project = build_project(root, n_customers=customers)
    # Random features count about six contacts a week: caps loose enough to send.
    model = fit_nba(FeatureStoreAdapter(project.settings).service_features("nba_v1"), seed=3)
    policy = model.catalog.contact_policy.model_copy(
        update={"max_contacts_7d": 10**6, "max_contacts_30d": 10**6, "cooldown_days": 0}
    )
    model.catalog = model.catalog.model_copy(update={"contact_policy": policy})
    register(project.settings, "next_best_action", model)
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "triggers.yaml").write_text(yaml.safe_dump(TRIGGERS))
    (root / "models" / "actions.yaml").write_text(
        (REPO_ROOT / "models" / "actions.yaml").read_text()
    )
    prefix = f"bench-triggers-{uuid.uuid4().hex[:8]}"
    config = yaml.safe_load((root / "propensity.yaml").read_text())
    config["activation"] = {
        "url": redis_url,
        "prefix": prefix,
        "outbound_key": f"{prefix}:out",
    }
    (root / "propensity.yaml").write_text(yaml.safe_dump(config))
    return load_settings(root, environ={})


def _awaited(settings: Settings, keys: dict[str, str]) -> list[str]:
    """The decision ids to wait for: the catalog's hold-out is never sent."""
    catalog = load_catalog(settings.path(settings.models_dir) / "actions.yaml")
    held = in_holdout(list(keys), catalog.holdout_share, catalog.holdout_salt)
    return [k for k, h in zip(keys.values(), held.tolist(), strict=True) if not h]


def _wait_for(outbound: _Outbound, awaited: list[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(k not in outbound.arrived for k in awaited):
        time.sleep(0.1)


def _event(customer: str, i: int, at: datetime) -> dict[str, Any]:
    return {
        "event_id": f"bench-{customer}-{i}",
        "customer_id": customer,
        "event_type": "page_view",
        "event_timestamp": at.isoformat().replace("+00:00", "Z"),
        "session_id": f"{customer}-s",
    }


class _Outbound(threading.Thread):
    """Reads the outbound stream as entries arrive: arrival time per decision id."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.client: Any = connect(settings.activation_url, timeout=30)
        self.key = settings.activation.outbound_key
        self.arrived: dict[str, tuple[float, dict[str, Any]]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stopping.is_set():
            reply = self.client.xread({self.key: last}, count=1000, block=100)
            now = time.time()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    decision = json.loads(fields[b"decision"])
                    self.arrived[decision["decision_id"]] = (now, decision)


def _runner(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "propensity.cli", "triggers", "run", "--config",
             str(settings.root)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def immediate(settings: Settings, outbound: _Outbound, args: argparse.Namespace) -> None:
    processor = EventProcessor(settings)
    ids = customer_ids(args.customers - 5)  # the served project's online customers
    rng = random.Random(1)
    fresh = iter(ids[args.warm :])
    fired: list[str] = ids[: args.warm]  # fired first by a warm-up, below
    warm = datetime.now(UTC)
    for lo in range(0, len(fired), 500):
        processor.process([_event(c, 0, warm) for c in fired[lo : lo + 500]])
    deadline = time.monotonic() + 300
    while len(outbound.arrived) < len(fired) * 0.95 and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"[{_load()}] warm-up: {len(outbound.arrived):,} decisions for {len(fired):,} customers")
    applied_at: dict[str, float] = {}
    batches = int(args.rate * args.seconds / 500)
    start = time.monotonic()
    for b in range(batches):
        pause = start + b * 500 / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        now = datetime.now(UTC)
        batch, new = [], []
        for j in range(500):
            if rng.random() < args.firing_share:
                customer = next(fresh, None)
                if customer is not None:
                    new.append(customer)
                    batch.append(_event(customer, 1, now))
                    continue
            batch.append(_event(rng.choice(fired), 10 + b * 500 + j, now))
        processor.process(batch)
        done = time.time()
        for customer in new:
            applied_at[customer] = done
    behind = time.monotonic() - start - args.seconds
    window = settings_window(now)
    keys = {c: f"visit:{c}:{window}" for c in applied_at}
    _wait_for(outbound, _awaited(settings, keys), 60)
    latencies = [
        outbound.arrived[k][0] - applied_at[c] for c, k in keys.items() if k in outbound.arrived
    ]
    print(
        f"[{_load()}] immediate: {batches * 500:,} events at {args.rate:,.0f}/s "
        f"({behind:+.1f} s behind at the end), {len(keys):,} firing; event applied -> decision "
        f"on the outbound stream: {_pct(latencies)}; not sent {len(keys) - len(latencies)} "
        "(the catalog's hold-out share)"
    )
    processor.close()


def settings_window(now: datetime) -> str:
    """The window key of a 24-hour trigger (UTC days), as the spec computes it."""
    return now.strftime("%Y-%m-%dT00:00:00Z")


def timers(settings: Settings, outbound: _Outbound, args: argparse.Namespace) -> None:
    from propensity.activation.state import ActivationState

    state = ActivationState(
        settings.activation_url, settings.activation.prefix, settings.activation.outbound_key
    )
    ids = customer_ids(args.customers - 5)
    rng = np.random.default_rng(2)
    chosen = [ids[i] for i in rng.choice(len(ids), size=min(args.timers, len(ids)), replace=False)]
    now_ms = int(time.time() * 1000)
    due = now_ms + 2000 + rng.uniform(0, args.spread * 1000, size=len(chosen)).astype(np.int64)
    for lo in range(0, len(chosen), 5000):
        with state.client.pipeline(transaction=False) as pipe:
            for c, d in zip(chosen[lo : lo + 5000], due[lo : lo + 5000].tolist(), strict=True):
                pipe.zadd(state.key("timers"), {f"revisit\x1f{c}": d})
            pipe.execute()
    window = settings_window(datetime.now(UTC))
    keys = {c: f"revisit:{c}:{window}" for c in chosen}
    _wait_for(outbound, _awaited(settings, keys), args.spread + 120)
    late = [
        outbound.arrived[k][0] - d / 1000
        for (c, k), d in zip(keys.items(), due.tolist(), strict=True)
        if k in outbound.arrived
    ]
    print(
        f"[{_load()}] timers: {len(chosen):,} pending, due over {args.spread:.0f} s; decision "
        f"after its due time: {_pct(late)}; not sent {len(keys) - len(late)} "
        "(the catalog's hold-out share)"
    )


def baseline(settings: Settings) -> None:
    processor = EventProcessor(settings)
    runner = TriggerRunner(settings)
    costs = []
    for i, customer in enumerate(customer_ids(200)):
        processor.process([_event(customer, 10**9 + i, datetime.now(UTC))])
        t0 = time.perf_counter()
        runner.step()
        costs.append(time.perf_counter() - t0)
    runner.close()
    processor.close()
    print(f"baseline, one in-process step on one changed customer: {_pct(costs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--warm", type=int, default=5_000, help="customers fired before timing")
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--firing-share", type=float, default=0.1)
    parser.add_argument("--timers", type=int, default=100_000)
    parser.add_argument("--spread", type=float, default=60.0)
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "localhost:6379"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "project"
        began = time.monotonic()
        settings = _project(root, args.customers, args.redis)
        print(f"[{_load()}] project ready in {time.monotonic() - began:.0f} s: "
              f"{args.customers:,} customers")  # fmt: skip
        args.timers = min(args.timers, args.customers - 5)
        outbound = _Outbound(settings)
        outbound.start()
        process = _runner(settings, Path(folder) / "runner.log")
        try:
            immediate(settings, outbound, args)
            timers(settings, outbound, args)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            outbound.stopping.set()
        baseline(settings)
        client: Any = connect(settings.activation_url)
        stale = list(client.scan_iter(match=f"{settings.activation.prefix}*"))
        if stale:
            client.delete(*stale)


if __name__ == "__main__":
    main()
