"""The one processing path of live events (``POST /events``, the stream consumer).

:meth:`EventProcessor.process` takes a batch of JSON-like records in the
canonical event schema and:

1. validates them as the same lines of a JSON Lines file would be validated
   (:func:`~propensity.events.records.validate_records`: plain records are
   checked in Python by the file-ingest rules, any other goes through
   :func:`~propensity.events.validation.validate_events`), so the rules, reasons
   and time-zone handling are those of ``propensity ingest``;
   a rejected record goes to the quarantine (``data/quarantine/``) and comes back
   as ``(index, field, rule, message)``; an event later than the clock plus
   :data:`~propensity.events.validation.FUTURE_TOLERANCE` is rejected
   (``future_timestamp``);
2. drops the events of customers without consent — on the suppression list
   (erased by ``forget``) or with ``consent: false`` in the batch — counted in
   ``suppressed``, neither stored nor quarantined;
3. applies the valid events in one atomic write to the online store's
   streaming state (:func:`~propensity.features.online.tile_store`: one SQLite
   transaction, or one Redis script): tiles, sessions, the applied ``event_id``
   record and the staged copy for the lake. An ``event_id`` applied before is a
   duplicate and changes nothing;
4. flushes the staged events into the event lake when enough are waiting
   (``streaming.flush_rows``) or the oldest waited long enough
   (``streaming.flush_seconds``), in a background thread of its own: a flush
   (a few hundred milliseconds of Parquet and manifest writes) never holds
   up the batches behind it. The lake dedupes by ``event_id``, so a crash
   between the lake's commit and the unstaging re-flushes without duplicates.

When ``process`` returns, everything it accepted is durable (in Redis: when it
runs with its append-only file): a caller may acknowledge the batch.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, astuple, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from propensity.events.lake import EventLake
from propensity.events.records import validate_records
from propensity.events.schema import ARROW_SCHEMA
from propensity.events.suppression import Screen, SuppressionList
from propensity.events.validation import FUTURE_TOLERANCE, QUARANTINE_SCHEMA
from propensity.features.online import tile_store
from propensity.features.tiles import TILE_US, clock_micros

if TYPE_CHECKING:
    from propensity.config import Settings
    from propensity.project import Project

__all__ = ["EventProcessor", "ProcessResult", "Rejection", "FUTURE_TOLERANCE"]

_log = logging.getLogger(__name__)
#: Longest pause of the background flusher between two looks at the staged events.
_FLUSH_POLL_SECONDS = 1.0
#: Processors with a running flusher, stopped at exit (see :func:`_stop_flushers`).
_FLUSHING: weakref.WeakSet[EventProcessor] = weakref.WeakSet()


@atexit.register
def _stop_flushers() -> None:
    # At exit the interpreter kills daemon threads where they stand, and one
    # killed inside DuckDB or Parquet code aborts the process: let a flush in
    # progress finish first (what is still staged waits for the next flush).
    for processor in list(_FLUSHING):
        processor._stop_flusher()


_CANONICAL = [f.name for f in ARROW_SCHEMA]


@dataclass(frozen=True)
class Rejection:
    """One rejected record: its 0-based index in the batch, the field, the rule, in words."""

    index: int
    field: str
    rule: str
    message: str

    def __iter__(self) -> Iterator[Any]:
        # Unpacks as the tuple ``(index, field, rule, message)``.
        return iter(astuple(self))


@dataclass
class ProcessResult:
    """One batch: ``len(records) == accepted + duplicates + suppressed + len(rejected)``."""

    accepted: int = 0
    duplicates: int = 0
    suppressed: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``POST /events`` answer)."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "suppressed": self.suppressed,
            "rejected": [asdict(r) for r in self.rejected],
        }


class _Suppressed:
    """The suppression list's screen, rebuilt when the audit file changes (a new erasure)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stamp: tuple[float, int] | None = None
        self._screen: Screen | None = None

    def screen(self) -> Screen:
        lake = self.settings.path(self.settings.lake_dir)
        erased = SuppressionList.bound_to(lake) or SuppressionList.of(self.settings)
        try:
            info = erased.audit_path.stat()
            stamp = (info.st_mtime, info.st_size)
        except FileNotFoundError:
            stamp = (0.0, 0)
        if self._screen is None or stamp != self._stamp:
            self._screen, self._stamp = Screen(erased), stamp
        self._screen.rows = 0
        return self._screen


class EventProcessor:
    """Validate, screen, apply and stage live events; flush them into the lake.

    Parameters
    ----------
    settings : Settings
        The project (lake, quarantine, online store, time zone, ``streaming:``).
    project : str
        Feast project name (prefix of the streaming tables or keys).
    source : str
        Name recorded as ``source_file`` of quarantine records.

    Examples
    --------
    >>> processor = EventProcessor(load_settings())  # doctest: +SKIP
    >>> result = processor.process([{"customer_id": "C1", "event_type": "page_view",
    ...     "event_timestamp": "2026-06-01T10:00:00Z", "event_id": "e1"}])  # doctest: +SKIP
    >>> result.accepted, result.rejected  # doctest: +SKIP
    (1, [])
    """

    def __init__(
        self, settings: Settings, *, project: str | None = None, source: str = "POST /events"
    ) -> None:
        self.settings = settings
        self.source = source
        self.lake = EventLake(settings.path(settings.lake_dir))
        self.quarantine_dir = settings.path(settings.quarantine_dir)
        self.tiles = tile_store(settings, project)
        self._suppressed = _Suppressed(settings)
        self._flush_lock = threading.Lock()
        self._staged_since: float | None = None
        self._last_expiry = 0.0
        self._flusher: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def from_project(cls, project: Project, **kwargs: Any) -> EventProcessor:
        """The processor of a :class:`~propensity.project.Project`."""
        return cls(project.settings, **kwargs)

    # -- processing ------------------------------------------------------------

    def process(
        self, records: Sequence[Any], *, received_at: datetime | None = None, changes: bool = True
    ) -> ProcessResult:
        """Process one batch of canonical events; durable when it returns.

        Parameters
        ----------
        records : sequence of dict
            Events in the canonical schema (JSON values: text ids, ISO 8601
            timestamps, numbers); optionally ``consent`` (false withdraws the
            customer: their events are dropped).
        received_at : datetime, optional
            The clock for the future-timestamp rule and flush timing (default: now).
        changes : bool
            Mark the customers changed for the trigger runner (its own exposures
            are not: they are its decisions, not behavior to evaluate again).

        Returns
        -------
        ProcessResult
        """
        result = ProcessResult()
        if not records:
            return result
        now = received_at or datetime.now(UTC)
        checked = validate_records(
            records,
            source=self.source,
            timezone=self.settings.timezone,
            now=now,
            screen=self._suppressed.screen(),
        )
        result.suppressed = checked.consent_removed
        rejected = checked.rejected
        for index, fld, rule, reason in zip(
            rejected.column("row_number").to_pylist(),
            rejected.column("field").to_pylist(),
            rejected.column("rule").to_pylist(),
            rejected.column("reason").to_pylist(),
            strict=True,
        ):
            result.rejected.append(
                Rejection(int(index) - 1, fld, rule, f"row {int(index) - 1}: {fld}: {reason}")
            )
        if rejected.num_rows:
            self._quarantine(rejected)
        valid = checked.valid.select(_CANONICAL)
        if valid.num_rows:
            applied = self.tiles.apply(valid, changes=changes)
            result.accepted, result.duplicates = applied.applied, applied.duplicates
            if applied.applied and self._staged_since is None:
                self._staged_since = time.monotonic()
            self._start_flusher()
        return result

    def _quarantine(self, rejected: pa.Table) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        final = self.quarantine_dir / f"quarantine-events-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = final.with_name("." + final.name + ".tmp")
        pq.write_table(rejected.cast(QUARANTINE_SCHEMA), tmp)
        tmp.replace(final)

    # -- the lake ----------------------------------------------------------------

    def _start_flusher(self) -> None:
        # Started by the first batch, in the process that applies it (a server
        # worker, the consumer), so a processor only read from has no thread.
        if self._flusher is None and not self._closed.is_set():
            self._flusher = threading.Thread(
                target=self._flush_when_due, name="propensity-lake-flush", daemon=True
            )
            self._flusher.start()
            _FLUSHING.add(self)

    def _stop_flusher(self) -> None:
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join()

    def _flush_when_due(self) -> None:
        poll = min(_FLUSH_POLL_SECONDS, self.settings.streaming.flush_seconds)
        while not self._closed.wait(poll):
            try:
                self.maybe_flush()
            except Exception as exc:  # the events stay staged: the next look retries
                _log.warning("events: flush to the lake failed (%s); retrying", exc)

    def close(self) -> None:
        """Stop the background flusher, then flush what is staged."""
        self._stop_flusher()
        self.flush()

    def maybe_flush(self) -> int:
        """Flush when ``flush_rows`` events wait or the oldest waited ``flush_seconds``."""
        cfg = self.settings.streaming
        since = self._staged_since
        due = since is not None and time.monotonic() - since >= cfg.flush_seconds
        if not due and self.tiles.staged_rows() < cfg.flush_rows:
            return 0
        return self.flush()

    def flush(self) -> int:
        """Move every staged event into the event lake, exactly once by ``event_id``.

        The lake commit comes first and the unstaging second: a crash between
        them leaves the events staged, and the next flush finds them in the
        lake already (the lake dedupes by ``event_id``), so nothing is lost and
        nothing is stored twice. Returns the events added to the lake.
        """
        added = 0
        with self._flush_lock:
            self._staged_since = None
            # What is staged now, not what arrives meanwhile: chasing a producer that keeps
            # pace appended a small lake file per few batches, and their fixed costs (a
            # DuckDB dedupe, a Parquet file, a manifest commit, the unstage's wait for the
            # write lock) took most of a core at 20,000 events/s.
            due = self.tiles.staged_rows()
            while due > 0:
                last, table = self.tiles.staged(self.settings.streaming.flush_rows)
                if table is None:
                    break
                added += self.lake.append(table)
                self.tiles.unstage(last)
                due -= table.num_rows
            self._expire()
        return added

    def _expire(self) -> None:
        # Tiles older than the retention can no longer be read at a current clock.
        if time.monotonic() - self._last_expiry < 60:
            return
        self._last_expiry = time.monotonic()
        hours = self.settings.streaming.retention_hours
        now_us = clock_micros(datetime.now(UTC))
        self.tiles.expire(now_us // TILE_US - int(hours * 60))

    def read(self, customer_ids: Sequence[str], clock: datetime | None = None) -> Any:
        """Streaming feature values (the tile store's ``read``) at ``clock`` (default now)."""
        return self.tiles.read(customer_ids, clock_micros(clock or datetime.now(UTC)))
