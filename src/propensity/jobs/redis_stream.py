"""The Redis Streams transport: the only module that talks to Redis about the event stream.

:class:`RedisStream` implements :class:`~propensity.jobs.transport.Transport`
with a consumer group:

* the group is created at the start of the stream (``XGROUP CREATE … 0
  MKSTREAM``) when absent, again after a Redis that lost it (``NOGROUP``);
* a consumer first re-reads its own pending entries (``XREADGROUP … 0``: the
  batch it was processing when it was killed, under the same name), then
  new ones (``XREADGROUP … >``, blocking ``block_ms``); every
  ``claim_idle_ms / 2`` it claims entries other consumers left
  unacknowledged for ``claim_idle_ms`` (``XAUTOCLAIM``);
* :meth:`RedisStream.ack` adds the dead letters and acknowledges the batch
  in one ``MULTI``/``EXEC``;
* :meth:`RedisStream.tidy` trims entries every group of the stream has
  acknowledged (``XTRIM MINID``), so the stream holds work not yet done.

After a lost connection the next read starts again from the consumer's own
pending entries, so a batch processed but not acknowledged is processed again
(harmless: the processor is idempotent by ``event_id``).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from propensity.config import Settings
from propensity.config import Stream as StreamSettings
from propensity.features.online.redis_client import connect

from .transport import EVENTS_FIELD, DeadLetter, Message, MessageError, decode_events

__all__ = ["RedisStream", "StreamErasure", "TransportError", "connect"]

_EVENTS = EVENTS_FIELD.encode()
#: Entries per XRANGE page when erasing.
_PAGE = 1_000
#: The errors of a Redis that is down, restarting, unreachable, or cannot take writes for now
#: (out of memory, a replica during a failover).
TransportError: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class StreamErasure:
    """What :meth:`RedisStream.erase_customers` removed."""

    entries: int = 0
    events: int = 0
    dead_letters: int = 0


class RedisStream:
    """A consumer (and producer) of one Redis Stream with a consumer group.

    Parameters
    ----------
    settings : Settings
        ``stream`` gives the keys, group, consumer and timings; the Redis is
        ``stream.url``, else ``online_store.redis_url``.
    consumer : str, optional
        Overrides ``stream.consumer`` (default: the host name).
    config : Stream, optional
        Another stream than ``settings.stream`` (the outbound decisions, say):
        its key, group, dead-letter key and timings.
    url : str, optional
        That stream's Redis (default ``config.url``, then ``online_store.redis_url``).
    field : str
        The entry field that holds the payload (``events`` for the event stream).
    extra : tuple of str
        Further fields read into :attr:`Message.fields` (``("key",)`` for decisions).

    Examples
    --------
    >>> stream = RedisStream(load_settings())  # doctest: +SKIP
    >>> stream.add([b'[{"event_id": "e1", ...}]'])  # doctest: +SKIP
    """

    def __init__(
        self,
        settings: Settings,
        consumer: str | None = None,
        *,
        config: StreamSettings | None = None,
        url: str | None = None,
        field: str = EVENTS_FIELD,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.config: StreamSettings = config or settings.stream
        self.url = url or self.config.url or settings.online_store.redis_url
        self._field = field.encode()
        self._extra = tuple(name.encode() for name in extra)
        self.key = self.config.key
        self.group = self.config.group
        self.consumer = consumer or self.config.consumer or socket.gethostname()
        # The read timeout must outlast a blocking read.
        # Any: redis-py types its sync and asyncio replies as one union.
        self.client: Any = connect(self.url, timeout=self.config.block_ms / 1000 + 10)
        self._own_cursor: str | None = "0"  # re-read own pending entries first
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._group_ready = False
        self.claimed = 0

    # -- consumer side -------------------------------------------------------

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # At 0, not $: entries added before the group existed are work too.
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _call(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a group command, recreating the group once if Redis lost it."""
        self._ensure_group()
        try:
            return command(*args, **kwargs)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False
            self._own_cursor = "0"
            self._ensure_group()
            return command(*args, **kwargs)
        except TransportError:
            # After an outage, start again from our own pending entries.
            self._own_cursor = "0"
            self._group_ready = False
            raise

    def _messages(self, entries: Iterable[Any]) -> tuple[list[Message], list[str]]:
        messages, deleted = [], []
        for entry_id, fields in entries:
            # Pending, then deleted (by an erasure): Redis gives no fields; nothing to process.
            if not fields:
                deleted.append(_text(entry_id))
                continue
            more = {_text(k): _text(fields[k]) for k in self._extra if k in fields}
            messages.append(Message(_text(entry_id), fields.get(self._field), more))
        return messages, deleted

    def read(self, count: int) -> list[Message]:
        """Own pending entries first, then stale ones of others, then new ones."""
        if self._own_cursor is not None:
            reply = self._call(
                self.client.xreadgroup,
                self.group,
                self.consumer,
                {self.key: self._own_cursor},
                count=count,
            )
            entries = reply[0][1] if reply else []
            if entries:
                self._own_cursor = _text(entries[-1][0])
                messages, deleted = self._messages(entries)
                if deleted:
                    self._call(self.client.xack, self.key, self.group, *deleted)
                if messages:
                    return messages
                return self.read(count)
            self._own_cursor = None
        now = time.monotonic()
        if now >= self._next_claim:
            cursor, entries, *_ = self._call(
                self.client.xautoclaim,
                self.key,
                self.group,
                self.consumer,
                self.config.claim_idle_ms,
                start_id=self._claim_cursor,
                count=count,
            )
            self._claim_cursor = _text(cursor)
            if self._claim_cursor == "0-0":  # a full pass: wait before the next one
                self._next_claim = now + self.config.claim_idle_ms / 2000
            messages, _ = self._messages(entries)
            if messages:
                self.claimed += len(messages)
                return messages
        reply = self._call(
            self.client.xreadgroup,
            self.group,
            self.consumer,
            {self.key: ">"},
            count=count,
            block=self.config.block_ms,
        )
        return self._messages(reply[0][1] if reply else [])[0]

    def ack(self, ids: Sequence[str], dead: Sequence[DeadLetter]) -> None:
        """Add the dead letters and acknowledge ``ids`` in one transaction."""
        if not ids and not dead:
            return
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        pipe = self.client.pipeline(transaction=True)
        for letter in dead:
            fields: dict[str, str | bytes] = {
                "message_id": letter.message_id,
                "index": "" if letter.index is None else str(letter.index),
                "field": letter.field,
                "rule": letter.rule,
                "reason": letter.reason,
                "payload": letter.payload,
                "consumer": self.consumer,
                "at": at,
            }
            pipe.xadd(self.config.dead_letter_key, fields)
        if ids:
            pipe.xack(self.key, self.group, *ids)
        self._call(pipe.execute)

    def backlog(self) -> tuple[int, int]:
        """Entries of the group not yet delivered, and delivered but not acknowledged."""
        self._ensure_group()
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.ResponseError:  # the stream is gone (Redis lost it)
            self._group_ready = False
            return 0, 0
        for group in groups:
            if _text(group["name"]) != self.group:
                continue
            lag = group.get("lag")
            if lag is None:  # Redis cannot tell after deletions: look for one entry
                after = "(" + _text(group["last-delivered-id"])
                lag = len(self.client.xrange(self.key, after, "+", count=1))
            return int(lag), int(group["pending"])
        self._group_ready = False
        return 0, 0

    def tidy(self) -> int:
        """Trim the entries every group of the stream has acknowledged; return how many."""
        if not self.config.trim:
            return 0
        floor: str | None = None
        for group in self.client.xinfo_groups(self.key):
            name = _text(group["name"])
            mark = _text(group["last-delivered-id"])
            if int(group["pending"]):
                mark = _text(self.client.xpending(self.key, name)["min"])
            if floor is None or _id_key(mark) < _id_key(floor):
                floor = mark
        if floor is None or floor == "0-0":
            return 0
        # MINID keeps `floor` itself: the oldest pending entry, or the last delivered one.
        return int(self.client.xtrim(self.key, minid=floor, approximate=False))

    def close(self) -> None:
        self.client.close()

    # -- producer side and erasure -------------------------------------------

    def add(self, payloads: Sequence[bytes]) -> list[str]:
        """Append one message per payload (JSON of one event or an array); return their ids."""
        pipe = self.client.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.key, {self._field: payload})
        return [_text(i) for i in pipe.execute()]

    def dead_letters(self, count: int = 1000) -> list[dict[str, str]]:
        """The first ``count`` dead letters, oldest first, fields decoded (payload as text)."""
        entries = self.client.xrange(self.config.dead_letter_key, count=count)
        return [
            {"id": _text(i)} | {_text(k): _text(v) for k, v in fields.items()}
            for i, fields in entries
        ]

    def erase_customers(self, ids: Iterable[str]) -> StreamErasure:
        """Remove the customers' events from the stream and their dead letters.

        Every entry is read (``XRANGE`` in pages) and decoded: an entry holding
        an event that names one of the ids (exactly, or anywhere in its text)
        is replaced by an entry with its other events, in one transaction, or
        deleted when nothing else is left; dead letters naming the ids are
        deleted. The cost is a full read of both streams (trimmed streams hold
        only the work not yet done); a consumer may be processing an entry
        while it is erased, which the suppression list, filled first, covers.
        """
        from propensity.jobs.erasure_scan import IdPattern

        wanted = set(ids)
        pattern = IdPattern(wanted)
        done = StreamErasure()
        for entry_id, fields in self._scan(self.key):
            raw = fields.get(_EVENTS)
            keep, dropped = _without(raw, wanted, pattern)
            if not dropped:
                continue
            pipe = self.client.pipeline(transaction=True)
            if keep:
                pipe.xadd(self.key, {_EVENTS: json.dumps(keep).encode()})
            pipe.xdel(self.key, entry_id)
            pipe.execute()
            done.entries += 1
            done.events += dropped
        for entry_id, fields in self._scan(self.config.dead_letter_key):
            if any(pattern.search_text(_text(v)) for v in fields.values()) or _names(
                fields.get(b"payload"), wanted
            ):
                self.client.xdel(self.config.dead_letter_key, entry_id)
                done.dead_letters += 1
        return done

    def _scan(self, key: str) -> Iterable[tuple[bytes, dict[bytes, bytes]]]:
        start = "-"
        while True:
            page = self.client.xrange(key, start, "+", count=_PAGE)
            yield from page
            if len(page) < _PAGE:
                return
            start = "(" + _text(page[-1][0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _names(raw: bytes | None, wanted: set[str]) -> bool:
    """Whether a JSON payload holds an event whose ``customer_id`` is wanted."""
    try:
        items = decode_events(raw)
    except MessageError:
        return False
    return any(isinstance(i, dict) and i.get("customer_id") in wanted for i in items)


def _without(raw: bytes | None, wanted: set[str], pattern: Any) -> tuple[list[Any], int]:
    """The items of a payload that do not name the ids, and how many did."""
    if raw is None:
        return [], 0
    try:
        items = decode_events(raw)
    except MessageError:
        # Undecodable: drop it whole if its bytes hold an id.
        return [], int(
            pattern.search_bytes(raw) or pattern.search_text(raw.decode("utf8", "replace"))
        )
    keep = [
        item
        for item in items
        if not (
            (isinstance(item, dict) and item.get("customer_id") in wanted)
            or pattern.search_text(json.dumps(item, ensure_ascii=False))
        )
    ]
    return keep, len(items) - len(keep)
