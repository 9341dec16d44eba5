"""``propensity stream``: consume live events from a message transport into the processor.

The loop, for each batch a :class:`~propensity.jobs.transport.Transport` reads:

1. decode each message (:func:`~propensity.jobs.transport.decode_events`);
   an undecodable message becomes a dead letter with its reason;
2. hand every event of the batch to the event processor in one call
   (``process``: validated, consent and suppression applied, idempotent by
   ``event_id``, durable when it returns); each rejected event becomes a dead
   letter naming its index, field and rule;
3. acknowledge the batch with its dead letters (only now: a consumer killed
   before this point leaves the batch pending, and the next consumer
   processes it again, which the processor's idempotency makes harmless);
4. every ``log_seconds``, trim the stream and log the counts (the processor
   flushes to the event lake in a thread of its own, as its ``streaming:``
   policy says).

SIGTERM or SIGINT stops it after the batch in hand: processed, acknowledged,
flushed. A lost connection to the transport is retried with backoff, the
batch in hand left pending; a failing processor likewise (an ``OSError`` or
a Redis connection error: a full disk, a store down), except for an error that
only some messages cause, which is isolated by processing the batch message by
message and dead-letters the message that fails alone (``processor_error``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from propensity.config import Settings

from .transport import EVENTS_FIELD, DeadLetter, Message, MessageError, Transport, decode_events

__all__ = [
    "MARKER_FILE",
    "Processor",
    "ProduceError",
    "StreamConsumer",
    "StreamStats",
    "erase_stream",
    "produce",
    "run_stream",
    "retryable_errors",
    "stop_on_signals",
]

_log = logging.getLogger(__name__)
#: In the jobs folder: this project has consumed a stream, so erasure must reach it.
MARKER_FILE = "stream.json"
#: Longest wait between retries while the transport or a store is down.
_MAX_BACKOFF = 5.0


class Processor(Protocol):
    """What the consumer needs of the event processor."""

    def process(self, records: list[dict[str, Any]], *, received_at: datetime | None = None) -> Any:
        """Apply a batch durably; the result has ``accepted``, ``duplicates``,
        ``suppressed`` and ``rejected`` (``(index, field, rule, message)``)."""
        ...

    def flush(self) -> Any:
        """Write what was processed to the event lake now."""
        ...


@dataclass
class StreamStats:
    """Counts since the consumer started."""

    batches: int = 0
    messages: int = 0
    events: int = 0
    accepted: int = 0
    duplicates: int = 0
    suppressed: int = 0
    rejected: int = 0
    undecodable: int = 0
    dead_letters: int = 0
    flushes: int = 0
    trimmed: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One log line of the counts and the rate."""
        seconds = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.events:,} events in {self.messages:,} messages "
            f"({self.events / seconds:,.0f}/s): {self.accepted:,} accepted, "
            f"{self.duplicates:,} duplicates, {self.suppressed:,} suppressed, "
            f"{self.rejected:,} rejected; {self.undecodable:,} undecodable messages, "
            f"{self.dead_letters:,} dead letters, {self.retries} retries"
        )


@dataclass
class _Batch:
    """The events of a batch and where each came from."""

    ids: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    origin: list[tuple[str, int]] = field(default_factory=list)  # (message id, position)
    dead: list[DeadLetter] = field(default_factory=list)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=str, ensure_ascii=False).encode()


def _decode(messages: Sequence[Message]) -> _Batch:
    batch = _Batch()
    for message in messages:
        batch.ids.append(message.id)
        try:
            items = decode_events(message.payload)
        except MessageError as exc:
            batch.dead.append(
                DeadLetter(
                    message.id, None, exc.field, exc.rule, exc.reason, message.payload or b""
                )
            )
            continue
        # Items that are not objects go to the processor too: it rejects them by its
        # one rule, and they come back as dead letters like any rejected event.
        batch.records += items
        batch.origin += [(message.id, position) for position in range(len(items))]
    return batch


class StreamConsumer:
    """The consumer loop over one transport and one processor.

    Parameters
    ----------
    transport : Transport
    processor : Processor
    batch_size : int
        Most messages per read.
    log_seconds : float
        How often to log the counts and tidy the transport.
    clock : callable, optional
        The receive time given to the processor (default: now, UTC).

    Examples
    --------
    >>> consumer = StreamConsumer(RedisStream(settings), EventProcessor(settings))  # doctest: +SKIP
    >>> consumer.run(stop_when_idle=True).events  # doctest: +SKIP
    1000
    """

    def __init__(
        self,
        transport: Transport,
        processor: Processor,
        *,
        batch_size: int = 100,
        log_seconds: float = 10.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.transport = transport
        self.processor = processor
        self.batch_size = batch_size
        self.log_seconds = log_seconds
        self.clock = clock or (lambda: datetime.now(UTC))
        self.stats = StreamStats()
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Stop after the batch in hand (what SIGTERM and SIGINT call)."""
        self.stopping.set()

    def _apply(self, batch: _Batch) -> None:
        """Process a batch's events; add a dead letter per rejected event."""
        if not batch.records:
            return
        result = self.processor.process(batch.records, received_at=self.clock())
        self.stats.events += len(batch.records)
        self.stats.accepted += int(result.accepted)
        self.stats.duplicates += int(result.duplicates)
        self.stats.suppressed += int(getattr(result, "suppressed", 0))
        for index, column, rule, reason in result.rejected:
            message_id, position = batch.origin[index]
            batch.dead.append(
                DeadLetter(message_id, position, column, rule, reason, _dumps(batch.records[index]))
            )
            self.stats.rejected += 1

    def _apply_isolating(self, messages: Sequence[Message]) -> _Batch:
        """Process a batch; when the processor fails on it, find the message that fails alone."""
        batch = _decode(messages)
        try:
            self._apply(batch)
            return batch
        except retryable_errors():
            raise  # a store or disk problem, not the data's: retry the whole batch later
        except Exception as exc:
            if len(messages) == 1:
                _log.error("message %s fails in the processor: %s", messages[0].id, exc)
                payload = messages[0].payload or b""
                error = DeadLetter(
                    messages[0].id, None, EVENTS_FIELD, "processor_error", str(exc), payload
                )
                return _Batch(ids=batch.ids, dead=[error])
        merged = _Batch()
        for message in messages:
            one = self._apply_isolating([message])
            merged.ids += one.ids
            merged.dead += one.dead
        return merged

    def step(self) -> int:
        """Read, process and acknowledge one batch; return the messages it held."""
        messages = self.transport.read(self.batch_size)
        if not messages:
            return 0
        batch = self._apply_isolating(messages)
        self.transport.ack(batch.ids, batch.dead)
        self.stats.batches += 1
        self.stats.messages += len(messages)
        self.stats.undecodable += sum(1 for d in batch.dead if d.index is None)
        self.stats.dead_letters += len(batch.dead)
        return len(messages)

    def flush(self) -> None:
        """Flush the processor to the lake now."""
        self.processor.flush()
        self.stats.flushes += 1

    def tidy(self) -> None:
        """Drop what the transport no longer needs (acknowledged by every reader)."""
        tidy = getattr(self.transport, "tidy", None)
        if tidy is not None:
            self.stats.trimmed += int(tidy())

    def _idle(self) -> bool:
        backlog = getattr(self.transport, "backlog", None)
        return backlog is None or not any(backlog())

    def run(self, *, stop_when_idle: bool = False) -> StreamStats:
        """Consume until :meth:`stop` (or, with ``stop_when_idle``, nothing is left to read).

        Returns
        -------
        StreamStats
        """
        next_log = time.monotonic() + self.log_seconds
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                if not self.step() and stop_when_idle and self._idle():
                    break
                if time.monotonic() >= next_log:
                    self.tidy()
                    _log.info("stream: %s", self.stats.line())
                    next_log = time.monotonic() + self.log_seconds
                backoff = 0.0
            except retryable_errors() as exc:
                # Redis restarting, a store down, a full disk: the batch stays pending.
                self.stats.retries += 1
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                _log.warning("stream: %s; retrying in %.1f s", exc, backoff)
                self.stopping.wait(backoff)
        self._final_flush()
        _log.info("stream stopped: %s", self.stats.line())
        return self.stats

    def _final_flush(self) -> None:
        for attempt in range(5):
            try:
                self.flush()
                return
            except retryable_errors() as exc:
                _log.warning("stream: final flush failed (%s), attempt %d", exc, attempt + 1)
                time.sleep(min(0.2 * 2**attempt, _MAX_BACKOFF))
        _log.error("stream: stopped without a final flush; the processor's next flush writes it")


def retryable_errors() -> tuple[type[Exception], ...]:
    """Errors of the environment, not of the data: a transport or a store down, a full disk."""
    from .redis_stream import TransportError

    return (OSError, *TransportError)


class _Stoppable(Protocol):
    def stop(self) -> None: ...


@contextmanager
def stop_on_signals(loop: _Stoppable) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT call ``loop.stop()`` (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, lambda *_: loop.stop()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_stream(
    settings: Settings,
    *,
    consumer: str | None = None,
    stop_when_idle: bool = False,
    processor: Processor | None = None,
) -> StreamStats:
    """Consume the project's Redis Stream into the event processor until stopped.

    Parameters
    ----------
    settings : Settings
        ``stream:`` settings; the processor's own (lake, online store).
    consumer : str, optional
        This consumer's name (default ``stream.consumer``, else the host name).
    stop_when_idle : bool
        Stop once nothing is left to read or pending (a drain), instead of on a signal.
    processor : Processor, optional
        Defaults to the project's event processor.

    Returns
    -------
    StreamStats

    Examples
    --------
    >>> run_stream(load_settings(), stop_when_idle=True).line()  # doctest: +SKIP
    '1,000 events in 10 messages (...): 1,000 accepted, ...'
    """
    from .redis_stream import RedisStream

    if processor is None:
        from propensity.streaming.processor import EventProcessor

        processor = EventProcessor(settings)
    transport = RedisStream(settings, consumer=consumer)
    _mark(settings, transport)
    loop = StreamConsumer(
        transport,
        processor,
        batch_size=settings.stream.batch_size,
        log_seconds=settings.stream.log_seconds,
    )
    try:
        with stop_on_signals(loop):
            return loop.run(stop_when_idle=stop_when_idle)
    finally:
        transport.close()


class ProduceError(ValueError):
    """A file of events that cannot be sent: names the line and the rule."""


def _event_lines(path: Path) -> list[bytes]:
    """The JSON object on each non-blank line of a JSON Lines file, checked before sending."""
    lines = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProduceError(f"{path} line {number}: not UTF-8 JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ProduceError(
                    f"{path} line {number}: expected an event object, got {type(value).__name__}"
                )
            lines.append(line.strip())
    return lines


def produce(
    settings: Settings,
    path: str | Path,
    *,
    per_message: int = 100,
    retry_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Send a JSON Lines file of events into the project's stream; return the events sent.

    Each message holds up to ``per_message`` events as a JSON array. Every line
    is checked to be a JSON object before anything is sent. A lost connection
    is retried for ``retry_seconds``; a chunk whose reply was lost may be sent
    twice, which the processor's idempotency by ``event_id`` absorbs.

    Raises
    ------
    ProduceError
        A line is not a JSON object (its number is named).

    Examples
    --------
    >>> produce(load_settings(), "events.jsonl", per_message=500)  # doctest: +SKIP
    10000
    """
    from .redis_stream import RedisStream, TransportError

    if per_message < 1:
        raise ProduceError(f"per_message must be at least 1, got {per_message}")
    lines = _event_lines(Path(path))
    payloads = [
        b"[" + b",".join(lines[i : i + per_message]) + b"]"
        for i in range(0, len(lines), per_message)
    ]
    stream = RedisStream(settings)
    chunk = 100  # messages per pipeline
    try:
        for start in range(0, len(payloads), chunk):
            part = payloads[start : start + chunk]
            deadline = time.monotonic() + retry_seconds
            while True:
                try:
                    stream.add(part)
                    break
                except TransportError as exc:
                    if time.monotonic() > deadline:
                        raise
                    _log.warning("produce: %s; retrying", exc)
                    time.sleep(0.2)
            sent = min((start + len(part)) * per_message, len(lines))
            if progress is not None:
                progress(sent, len(lines))
    finally:
        stream.close()
    return len(lines)


def _mark(settings: Settings, transport: Any) -> None:
    """Record that this project streams, so ``forget`` reaches the stream too."""
    jobs = settings.path(settings.jobs_dir)
    jobs.mkdir(parents=True, exist_ok=True)
    marker = {"key": transport.key, "dead_letter_key": settings.stream.dead_letter_key}
    (jobs / MARKER_FILE).write_text(json.dumps(marker) + "\n")


def erase_stream(settings: Settings, ids: Sequence[str]) -> Any:
    """Remove customers' events from the stream and its dead letters, when the project streams.

    The project streams when ``propensity stream`` ran in it, a ``stream.url`` is
    set, or the online store is Redis. Returns a
    :class:`~propensity.jobs.redis_stream.StreamErasure`, or ``None`` when the
    project does not stream.

    Raises
    ------
    ConnectionError
        The stream's Redis cannot be reached (the ids may still be in it).
    """
    from .redis_stream import RedisStream, TransportError

    streams = (
        (settings.path(settings.jobs_dir) / MARKER_FILE).exists()
        or settings.stream.url is not None
        or settings.online_store.kind == "redis"
    )
    if not streams:
        return None
    stream = RedisStream(settings)
    try:
        return stream.erase_customers(ids)
    except TransportError as exc:
        raise ConnectionError(f"stream {stream.key} at {stream.url} not reachable: {exc}") from exc
    finally:
        stream.close()
