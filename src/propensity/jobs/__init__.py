"""Unattended jobs: scheduled retraining with gates, drift monitoring, erasure, the stream.

The names below are imported on first use (PEP 562): ``propensity stream``
imports :mod:`propensity.jobs.stream` without paying for MLflow, scikit-learn
and Feast, which retraining and drift need (tens of seconds on a busy 2-core box).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DriftReport": "drift",
    "drift_report": "drift",
    "psi": "drift",
    "ErasureReport": "erasure",
    "forget": "erasure",
    "JobLock": "lock",
    "LockBusyError": "lock",
    "ModelDecision": "retrain",
    "RetrainError": "retrain",
    "RetrainPolicy": "retrain",
    "RetrainReport": "retrain",
    "retrain": "retrain",
    "StreamConsumer": "stream",
    "run_stream": "stream",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
