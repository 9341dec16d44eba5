"""The latest-snapshot fast path returns what a training frame holds at the same clock."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.events.simulator import SimulationConfig, simulate
from propensity.features.snapshots import build_features
from propensity.features.tiles import STREAMING_NAMES
from propensity.models.spec import load_spec
from propensity.pipeline.dataset import feature_adapter, historical_features, latest_snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("dataset")
    settings = Settings(root=root, feature_repo=REPO / "feature_repo", models_dir=REPO / "models")
    events = simulate(SimulationConfig(customers=300, days=60, seed=3)).events
    EventLake(settings.path(settings.lake_dir)).append(events)
    build_features(settings)
    return settings


@pytest.mark.parametrize("model", ["churn", "purchase"])
def test_latest_snapshot_equals_the_training_frame_at_its_clock(
    settings: Settings, model: str
) -> None:
    service = load_spec(model, settings.path(settings.models_dir)).feature_service
    names = feature_adapter(settings).service_features(service)
    streaming = [n for n in names if n in STREAMING_NAMES]
    assert streaming, f"the served {model} model reads no streaming feature"
    when, snapshot = latest_snapshot(settings, names)
    # The same customers at the same clock through Feast's point-in-time join.
    entity = snapshot[["customer_id"]].assign(event_timestamp=when)
    frame, _ = historical_features(settings, entity, service)
    pd.testing.assert_frame_equal(
        snapshot[["customer_id", *names]],
        frame[["customer_id", *names]].astype({n: "float64" for n in names}),
    )
    # The last day's events are inside the windows: the values are not all defaults.
    assert (snapshot["events_24h"] > 0).sum() > 20
    assert snapshot["minutes_since_last_event"].notna().sum() > 20
