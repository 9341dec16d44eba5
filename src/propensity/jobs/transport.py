"""The seam between the stream consumer and a message transport, and the message format.

The consumer loop (:mod:`propensity.jobs.stream`) only sees a
:class:`Transport`: read a batch of :class:`Message`, then acknowledge it,
dead letters included, once the events it held are durable. Redis Streams
(:mod:`propensity.jobs.redis_stream`) is the one transport shipped; another
(Kafka, SQS, NATS…) plugs in by implementing the three methods with the same
guarantees:

* ``read`` returns messages not yet acknowledged, including those delivered
  to a consumer that died before acknowledging them (after some idle time),
  so delivery is at least once;
* ``ack`` writes the dead letters and acknowledges the messages together (a
  crash in between may repeat a dead letter, never lose one or a message);
* a message is only acknowledged through ``ack``.

The consumer never deduplicates: the event processor is idempotent by
``event_id``, which makes redelivery harmless.

Message format: one field, ``events``, holding UTF-8 JSON: an array of
canonical event objects (a batch) or a single object (one event).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["EVENTS_FIELD", "DeadLetter", "Message", "MessageError", "Transport", "decode_events"]

#: The message field holding the JSON events.
EVENTS_FIELD = "events"


@dataclass(frozen=True)
class Message:
    """One message of the transport: its id and the raw ``events`` payload.

    ``payload`` is ``None`` when the message has no ``events`` field;
    ``fields`` holds the further fields the transport was asked for (as text).
    """

    id: str
    payload: bytes | None
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeadLetter:
    """A bad message, or one rejected event of a message, with the reason.

    Attributes
    ----------
    message_id : str
        The id of the message it came from.
    index : int or None
        The event's position in the message's array (``None``: the whole message).
    field : str
        The field at fault (``events`` for an undecodable message).
    rule : str
        The rule broken (``json``, ``shape``, ``missing_field``, a validation rule…).
    reason : str
        One line saying what is wrong.
    payload : bytes
        The bad message, or the rejected event as JSON.
    """

    message_id: str
    index: int | None
    field: str
    rule: str
    reason: str
    payload: bytes


class MessageError(ValueError):
    """A message that cannot be read as events: names the field and the rule."""

    def __init__(self, field: str, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.rule = rule
        self.reason = reason


class Transport(Protocol):
    """What the consumer loop needs from a message transport."""

    def read(self, count: int) -> list[Message]:
        """Up to ``count`` messages to process (an empty list after waiting a while)."""
        ...

    def ack(self, ids: Sequence[str], dead: Sequence[DeadLetter]) -> None:
        """Write ``dead`` to the dead-letter destination and acknowledge ``ids``, together."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


def decode_events(payload: bytes | None) -> list[Any]:
    """The items of one message payload: a JSON array, or one object as a batch of one.

    Items that are not objects are returned as they are: the processor rejects
    each of them alone, so one bad item costs no valid event.

    Raises
    ------
    MessageError
        No payload, not UTF-8 JSON, or neither an object nor an array.

    Examples
    --------
    >>> decode_events(b'[{"event_id": "e1"}, {"event_id": "e2"}]')
    [{'event_id': 'e1'}, {'event_id': 'e2'}]
    >>> decode_events(b'{"event_id": "e1"}')
    [{'event_id': 'e1'}]
    """
    if payload is None:
        raise MessageError(
            EVENTS_FIELD, "missing_field", f"the message has no {EVENTS_FIELD!r} field"
        )
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(EVENTS_FIELD, "json", f"not UTF-8 JSON: {exc}") from None
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise MessageError(
            EVENTS_FIELD,
            "shape",
            f"expected a JSON object or an array of objects, got {type(value).__name__}",
        )
    return value
