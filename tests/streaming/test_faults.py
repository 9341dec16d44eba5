"""A server killed (SIGKILL) while a client posts: after a restart and the client's retries,
no event is lost and none is counted twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from conftest import as_records, day_of_events, free_port, kill_server, start_server, stop_server

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.features.streaming_offline import streaming_features
from propensity.features.tiles import STREAMING_NAMES, clock_micros
from propensity.streaming import EventProcessor


def test_killed_server_mid_batch_loses_and_doubles_nothing(
    project: Settings, tmp_path: Path
) -> None:
    events = day_of_events(customers=400, seed=11)
    records = as_records(events)
    batches = [records[i : i + 100] for i in range(0, len(records), 100)]
    assert len(batches) >= 4
    port = free_port()
    server = start_server(project, tmp_path / "server.log", port=port)
    answers: list[dict[str, Any]] = []
    failures = 0
    posting = threading.Event()

    def client() -> None:
        nonlocal failures
        for k, batch in enumerate(batches):
            while True:  # at-least-once: retry the batch until it is acknowledged
                if k == 2:
                    posting.set()  # the third batch is on its way: the server dies now
                try:
                    answer = httpx.post(f"{server.url}/events", json={"events": batch}, timeout=10)
                    if answer.status_code == 200:
                        answers.append(answer.json())
                        break
                except httpx.HTTPError:
                    pass
                failures += 1
                time.sleep(0.2)

    thread = threading.Thread(target=client)
    thread.start()
    assert posting.wait(timeout=300)
    time.sleep(0.01)
    kill_server(server)  # mid-batch: the third post is in flight
    answered_before_kill = len(answers)
    server = start_server(project, tmp_path / "server.log", port=port)
    thread.join(timeout=300)
    stop_server(server)
    assert not thread.is_alive() and len(answers) == len(batches)
    assert answered_before_kill < len(batches) and failures > 0  # the kill interrupted a post
    assert sum(a["accepted"] for a in answers) <= len(records)
    assert all(not a["rejected"] for a in answers)

    processor = EventProcessor(project)
    processor.flush()
    lake = EventLake(project.path(project.lake_dir))
    ids = lake.read(["event_id"])["event_id"]
    assert len(ids) == events.num_rows and ids.is_unique
    customers = sorted(set(events.column("customer_id").to_pylist()))
    last = events.column("event_timestamp")[-1].as_py()
    online = processor.tiles.read(customers, clock_micros(last))
    entity = pd.DataFrame({"customer_id": customers, "event_timestamp": pd.Timestamp(last)})
    offline = streaming_features(lake, entity, project.timezone)[list(STREAMING_NAMES)]
    np.testing.assert_allclose(online, offline.to_numpy(), rtol=0, atol=1e-9, equal_nan=True)
