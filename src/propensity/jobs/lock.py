"""A single-run lock for scheduled jobs.

The lock is an ``flock`` on a file: the kernel releases it when the holder
exits or is killed, so a crashed run never leaves a stale lock behind and the
next scheduled run proceeds. The file also records who holds it (pid, host,
start time) so the refusal message says which run is in the way.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = ["JobLock", "LockBusyError", "job_dir", "jobs_lock", "LOCK_FILE"]

#: One lock for every job that writes the lake or the stores (retrain, forget).
LOCK_FILE = "jobs.lock"


def job_dir(settings: Settings) -> Path:
    """Folder of the jobs' lock, state and audit files (``settings.jobs_dir``).

    Examples
    --------
    >>> job_dir(load_settings())  # doctest: +SKIP
    PosixPath('/srv/project/data/jobs')
    """
    return settings.path(settings.jobs_dir)


def jobs_lock(settings: Settings, job: str) -> JobLock:
    """The project's jobs lock (shared by retrain and forget), named ``job`` in messages."""
    return JobLock(job_dir(settings) / LOCK_FILE, job)


class LockBusyError(RuntimeError):
    """Another run holds the lock."""


class JobLock:
    """Exclusive, non-blocking lock held for the lifetime of a ``with`` block.

    Parameters
    ----------
    path : Path
        The lock file (created with its folder when missing).
    job : str
        Name used in messages, e.g. ``"retrain"``.

    Examples
    --------
    >>> with JobLock(tmp_path / "retrain.lock", "retrain"):  # doctest: +SKIP
    ...     run_the_job()
    """

    def __init__(self, path: str | Path, job: str = "job") -> None:
        self.path = Path(path)
        self.job = job
        self._handle: IO[str] | None = None

    def holder(self) -> dict[str, object]:
        """What the lock file says about the current (or last) holder."""
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self, wait_seconds: float = 0.0) -> JobLock:
        """Take the lock, waiting up to ``wait_seconds``, else raise :class:`LockBusyError`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
            handle.close()
            who = self.holder()
            raise LockBusyError(
                f"another {self.job} run is in progress (pid {who.get('pid', '?')} on "
                f"{who.get('host', '?')} since {who.get('started', '?')}; lock {self.path}); "
                "this run did nothing"
            ) from None
        handle.seek(0)
        handle.truncate()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        handle.write(json.dumps(record))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Release the lock (a no-op when not held)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> JobLock:
        # ``with lock.acquire(wait_seconds=...):`` holds it already.
        return self if self._handle is not None else self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
