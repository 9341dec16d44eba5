"""Live events processed in a child process, off the scoring server's interpreter.

The scoring server runs its routes in one Python process, under one GIL.
Processing a batch of events there (validation, the tile write, the lake
flush) holds that GIL for tens of milliseconds at a time, and every ``/score``
arriving meanwhile waits for it: at 5,000 events/s ``/score``'s p99 went from
5 to 35 ms in ``benchmarks/bench_serving_load.py``. :class:`EventWorker` runs
the same :class:`~propensity.streaming.processor.EventProcessor` in a child
process instead; the server only hands it the parsed batch and waits for the
answer, on the other core.

Nothing changes for the caller: ``process`` returns once the events are
durable and visible to ``/score`` (the child's write is committed before it
answers). A child that dies (killed, out of memory) is replaced and the batch
handed again: the processor is idempotent by ``event_id``, so a batch the dead
child had applied counts as duplicates, not twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

from .processor import EventProcessor, ProcessResult

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = ["EventWorker"]

_log = logging.getLogger(__name__)

#: How often the child checks that the server that started it is still there.
_PARENT_POLL_SECONDS = 1.0
#: The child's processor (one per child process).
_PROCESSOR: EventProcessor | None = None


def _start(settings: Settings) -> None:
    global _PROCESSOR
    # A stop of the server's process group reaches the child too: the parent ends it
    # (after its final flush, :meth:`EventWorker.close`), not the signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _PROCESSOR = EventProcessor(settings)


def _exit_with_parent(parent: int) -> None:
    # A server killed outright (SIGKILL, out of memory) cannot end its child: the child
    # notices it was orphaned and exits, as abruptly (every write it makes is atomic).
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_SECONDS)
    os._exit(0)


def _child() -> EventProcessor:
    if _PROCESSOR is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("the event worker's processor was not started")
    return _PROCESSOR


def _process(records: Sequence[Any], received_at: datetime | None) -> ProcessResult:
    return _child().process(records, received_at=received_at)


def _flush() -> int:
    return _child().flush()


def _close() -> None:
    _child().close()


class EventWorker:
    """An :class:`~propensity.streaming.processor.EventProcessor` in a child process.

    Parameters
    ----------
    settings : Settings
        The project's settings, handed to the child.

    Examples
    --------
    >>> worker = EventWorker(load_settings())  # doctest: +SKIP
    >>> worker.process([{"event_id": "e1", ...}]).accepted  # doctest: +SKIP
    1
    >>> worker.close()  # doctest: +SKIP
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the server's threads and sockets stay out of the child.
                self._pool = ProcessPoolExecutor(
                    1,
                    mp_context=get_context("spawn"),
                    initializer=_start,
                    initargs=(self.settings,),
                )
            return self._pool

    def _call(self, fn: Any, *args: Any) -> Any:
        for attempt in (1, 2):
            pool = self._executor()
            try:
                return pool.submit(fn, *args).result()
            except BrokenProcessPool:
                if attempt == 2:
                    raise
                _log.warning("events: the event worker process died; starting another")
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        raise AssertionError("unreachable")

    def start(self) -> EventWorker:
        """Start the child now (its imports take a second or two), not on the first batch."""
        self._executor().submit(int).result()
        return self

    def process(
        self, records: Sequence[Any], *, received_at: datetime | None = None
    ) -> ProcessResult:
        """:meth:`EventProcessor.process <propensity.streaming.processor.EventProcessor.process>`
        in the child; durable and visible when it returns."""
        result: ProcessResult = self._call(_process, list(records), received_at)
        return result

    def flush(self) -> int:
        """Flush the child's staged events into the lake now."""
        return int(self._call(_flush))

    def close(self) -> None:
        """Stop the child's flusher, flush, and end the child."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            pool.submit(_close).result()
        except BrokenProcessPool:
            _log.warning("events: the event worker process died before its final flush")
        finally:
            pool.shutdown(wait=True)
