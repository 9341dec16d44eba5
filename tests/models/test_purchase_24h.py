"""The 24-hour purchase model end to end on a simulation with in-session intent.

The simulation's truth is for a 1-day purchase horizon, so the oracle is comparable.
Real components: the event lake, DuckDB, Feast, MLflow on SQLite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from propensity import registry
from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.events.simulator import SimulationConfig, simulate, write_simulation
from propensity.features.snapshots import build_features
from propensity.features.tiles import STREAMING_NAMES
from propensity.pipeline.binary import TrainingResult, train_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, TrainingResult]:
    root = tmp_path_factory.mktemp("project24")
    settings = Settings(root=root, feature_repo=REPO / "feature_repo", models_dir=REPO / "models")
    config = SimulationConfig(
        customers=4000, days=120, seed=11, cart_returns=True, purchase_horizon_days=1
    )
    sim = simulate(config)
    write_simulation(sim, root / "sim")
    EventLake(settings.path(settings.lake_dir)).append(sim.events)
    build_features(settings)
    return settings, train_model(settings, "purchase_24h", truth_dir=root / "sim")


def test_the_24h_model_learns_from_in_session_features(
    trained: tuple[Settings, TrainingResult],
) -> None:
    settings, result = trained
    m = result.metrics
    assert result.horizon_days == 1 and len(result.split.test) == 7
    assert m["model"]["roc_auc"] > m["recency"]["roc_auc"] + 0.02
    assert m["model"]["roc_auc"] < m["oracle"]["roc_auc"]
    assert m["model"]["ece"] < 0.02
    # The in-session features are in the model and carry a share of its gain.
    gain = result.selection_model.feature_importance()
    streaming = gain[gain.index.isin(STREAMING_NAMES)]
    assert len(streaming) == len(STREAMING_NAMES)
    assert streaming.sum() > 0.03 * gain.sum()  # 7.6% at this seed
    # Gated, registered and promoted like the others, with its lineage.
    assert result.promoted and result.version == 1
    tags = registry.version_info(settings.tracking_uri, "purchase_24h")["tags"]
    assert tags["feature_service"] == "purchase_v2"
