"""Live events: one processing path (validate, screen, apply to tiles, stage for the lake)."""

from propensity.streaming.processor import EventProcessor, ProcessResult, Rejection
from propensity.streaming.worker import EventWorker

__all__ = ["EventProcessor", "EventWorker", "ProcessResult", "Rejection"]
