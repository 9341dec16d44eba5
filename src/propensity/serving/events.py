"""``POST /events``: live events into the streaming features (and the event lake).

A thin HTTP face of :class:`~propensity.streaming.processor.EventProcessor`:
the body is ``{"events": [...]}``, canonical events as JSON objects (at most
``serving.batch_limit`` of them, within ``serving.max_body_bytes``). The answer
counts the accepted, duplicate and suppressed events and names each rejected
row by its index, field and rule; a rejected row goes to the quarantine as in
file ingest. When the answer arrives, the accepted events are durable and
visible to ``/score`` (read-your-writes): a client may retry a batch whose
answer it did not get, and a repeat counts as ``duplicates``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EventsRequest", "EventsResponse", "RejectedRow", "post_events"]


class EventsRequest(BaseModel):
    """``POST /events``: a batch of canonical events."""

    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[dict[str, Any]] = Field(
        min_length=1,
        description="Canonical events (customer_id, event_id, event_timestamp as ISO 8601, "
        "event_type, and the optional fields of the schema); consent: false withdraws "
        "the customer (their events are dropped).",
    )


class RejectedRow(BaseModel):
    """One rejected event: where, which field, which rule, and the rule in words."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, description="0-based position in the batch.")
    field: str
    rule: str
    message: str


class EventsResponse(BaseModel):
    """``len(events) == accepted + duplicates + suppressed + len(rejected)``."""

    model_config = ConfigDict(extra="forbid")

    accepted: int = Field(ge=0, description="New events applied (and staged for the lake).")
    duplicates: int = Field(ge=0, description="Events whose event_id was applied before.")
    suppressed: int = Field(ge=0, description="Events of customers without consent, dropped.")
    rejected: list[RejectedRow]


def post_events(processor: Any, request: EventsRequest) -> dict[str, Any]:
    """Process one ``/events`` batch; the JSON answer (blocking: run it off the event loop)."""
    result: dict[str, Any] = processor.process(request.events).to_dict()
    return result
