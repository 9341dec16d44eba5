"""Live events: one processing path (validate, screen, apply to tiles, stage for the lake)."""

from propensity.streaming.processor import EventProcessor, ProcessResult, Rejection

__all__ = ["EventProcessor", "ProcessResult", "Rejection"]
