"""Unattended lifecycle jobs: scheduled retraining with gates, drift monitoring, erasure."""

from propensity.jobs.drift import DriftReport, drift_report, psi
from propensity.jobs.erasure import ErasureReport, forget
from propensity.jobs.lock import JobLock, LockBusyError
from propensity.jobs.retrain import (
    ModelDecision,
    RetrainError,
    RetrainPolicy,
    RetrainReport,
    retrain,
)

__all__ = [
    "DriftReport",
    "ErasureReport",
    "JobLock",
    "LockBusyError",
    "ModelDecision",
    "RetrainError",
    "RetrainPolicy",
    "RetrainReport",
    "drift_report",
    "forget",
    "psi",
    "retrain",
]
