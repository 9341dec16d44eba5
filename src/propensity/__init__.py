"""propensity: churn, purchase-propensity and next-best-action models on behavioral events.

The main names are importable from the package root, loaded on first use so that
``import propensity`` stays cheap (no Feast, MLflow or LightGBM until needed)::

    from propensity import Project

    project = Project.create("my-project")
    project.simulate(customers=2_000, days=120)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> module that defines it; resolved lazily by ``__getattr__``.
_LAZY: dict[str, str] = {
    "Project": "propensity.project",
    "NBAEvaluation": "propensity.project",
    "Settings": "propensity.config",
    "load_settings": "propensity.config",
    "EventLake": "propensity.events.lake",
    "SimulationConfig": "propensity.events.simulator",
    "simulate": "propensity.events.simulator",
    "simulate_to": "propensity.events.simulator",
    "load_truth": "propensity.events.simulator",
    "ingest": "propensity.events.ingest",
    "build_features": "propensity.features.snapshots",
    "FeatureStoreAdapter": "propensity.features.store",
    "entity_frame": "propensity.labels",
    "choose_cutoffs": "propensity.labels",
    "load_spec": "propensity.models.spec",
    "ModelSpec": "propensity.models.spec",
    "train": "propensity.pipeline.train",
    "train_model": "propensity.pipeline.binary",
    "TrainingResult": "propensity.pipeline.binary",
    "score_customers": "propensity.pipeline.score",
    "train_nba": "propensity.pipeline.nba",
    "NBAResult": "propensity.pipeline.nba",
}

__all__ = [
    "__version__",
    "Project",
    "NBAEvaluation",
    "Settings",
    "load_settings",
    "EventLake",
    "SimulationConfig",
    "simulate",
    "simulate_to",
    "load_truth",
    "ingest",
    "build_features",
    "FeatureStoreAdapter",
    "entity_frame",
    "choose_cutoffs",
    "load_spec",
    "ModelSpec",
    "train",
    "train_model",
    "TrainingResult",
    "score_customers",
    "train_nba",
    "NBAResult",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from propensity.config import Settings, load_settings
    from propensity.events.ingest import ingest
    from propensity.events.lake import EventLake
    from propensity.events.simulator import SimulationConfig, load_truth, simulate, simulate_to
    from propensity.features.snapshots import build_features
    from propensity.features.store import FeatureStoreAdapter
    from propensity.labels import choose_cutoffs, entity_frame
    from propensity.models.spec import ModelSpec, load_spec
    from propensity.pipeline.binary import TrainingResult, train_model
    from propensity.pipeline.nba import NBAResult, train_nba
    from propensity.pipeline.score import score_customers
    from propensity.pipeline.train import train
    from propensity.project import NBAEvaluation, Project


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'propensity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
