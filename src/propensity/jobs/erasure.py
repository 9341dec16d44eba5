"""Erasure ("right to be forgotten"): remove customers from every file the project keeps.

:func:`forget` takes each id exactly as given (no trimming: ingest rejects ids
with surrounding whitespace, so such an id is warned about but still erased
where older data holds it exactly) and:

1. puts it on the suppression list (:mod:`propensity.events.suppression`)
   first, so an ingest from then on drops the customer's rows, on every path;
2. deletes their streaming state (tiles, sessions, applied event ids, events
   staged for the lake: the ``forget`` of :func:`~propensity.features.online.tile_store`'s
   store; the SQLite file's too when a Redis project keeps one)
   and their entity rows from the online store
   (:meth:`~propensity.features.store.FeatureStoreAdapter.forget`): SQLite with
   ``secure_delete`` (freed bytes are zeroed), then a WAL checkpoint that
   truncates the log, then ``VACUUM`` if the main file still holds their key
   bytes (a copy of the main file alone must not hold them); Redis hash keys;
   then, when the project streams (:func:`propensity.jobs.stream.erase_stream`),
   their events still in the Redis Stream (entries rewritten without them) and
   their dead letters; a stream that cannot be reached is reported as a trace;
   when the project runs triggers, their pending timers, live-segment
   memberships, fired marks, contacts and the decisions naming them still in
   the outbound stream (:meth:`~propensity.activation.state.ActivationState.forget`);
3. removes their events from the event lake (atomic rewrite of the affected
   files; the lake's staged leftovers of killed writers go too) and their rows
   from every feature table;
4. rewrites, without the rows that hold the id, the quarantine Parquet files,
   the whole files moved aside to ``<quarantine>/files/`` and the ingested
   copies in ``<landing>/processed/`` (a file that cannot be read but holds the
   id is deleted, and counted); deletes the temporary files of killed runs
   under the lake, quarantine and feature folders;
5. appends an audit record to ``<jobs dir>/erasure_audit.jsonl``: when, who,
   the counts per store and keyed hashes of the ids (never the ids);
6. scans every file of the project for the ids
   (:func:`propensity.jobs.erasure_scan.find_traces`) and reports what is left.

MLflow holds no customer ids (runs log metrics, plots, reports and five
feature rows without ids as the model's input example); the scan covers its
database and artifacts anyway. Outside the project's files: exports a user
made elsewhere, Redis persistence files (RDB/AOF) until Redis rewrites them,
and the disk blocks of deleted files.
"""

from __future__ import annotations

import getpass
import gzip
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.events.suppression import AUDIT_FILE, SuppressionList
from propensity.features.definitions import ENTITY, VIEWS
from propensity.features.snapshots import feature_table_path
from propensity.jobs.erasure_scan import IdPattern, Trace, find_traces
from propensity.jobs.lock import jobs_lock

__all__ = ["AUDIT_FILE", "ErasureReport", "check_ids", "forget", "suppression_list"]

_PARQUET = (".parquet", ".pq")
_log = logging.getLogger(__name__)
# A killed ingest, build or erasure leaves these behind; a live one is younger.
_TMP = re.compile(r"(\.tmp$|^\..*\.tmp-(?P<pid>\d+)$|^\..*\.erase-(?P<epid>\d+)$)")


def suppression_list(settings: Settings) -> SuppressionList:
    """The project's suppression list, plain digests of older releases converted on disk.

    Examples
    --------
    >>> suppression_list(load_settings()).hashes()  # doctest: +SKIP
    frozenset({...})
    """
    erased = SuppressionList.of(settings)
    converted = erased.migrate()
    if converted:
        _log.info("erasure audit: %d plain SHA-256 digests rewritten as keyed hashes", converted)
    return erased


def check_ids(customer_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Ids to erase, exactly as given, and warnings about them.

    Raises ``ValueError`` for an empty or whitespace-only id (ingest treats
    those as missing: no customer has one).

    Examples
    --------
    >>> ids, warnings = check_ids(["C1", " C2"])
    >>> ids, len(warnings)
    ([' C2', 'C1'], 1)
    """
    ids, warnings = [], []
    for position, value in enumerate(customer_ids, start=1):
        text = str(value)
        if not text.strip():
            raise ValueError(f"customer id #{position} is empty or whitespace: nothing to erase")
        if text != text.strip():
            warnings.append(
                f"{text!r} has surrounding whitespace: ingest rejects such ids, so only older "
                "data can hold it exactly; erasing it exactly as given"
            )
        ids.append(text)
    if not ids:
        raise ValueError("no customer id given to forget")
    return sorted(set(ids)), warnings


@dataclass
class ErasureReport:
    """What :func:`forget` removed, per store (counts only, no personal data)."""

    customers: int
    lake_events: int = 0
    feature_rows: dict[str, int] = field(default_factory=dict)
    online_sqlite_rows: int = 0
    online_sqlite_vacuumed: bool = False
    online_redis_keys: int = 0
    stream_events: int = 0
    stream_entries: int = 0
    stream_dead_letters: int = 0
    streaming_rows: int = 0
    activation_keys: int = 0
    quarantine_rows: int = 0
    quarantine_files: int = 0
    landing_rows: int = 0
    landing_files: int = 0
    deleted_files: int = 0
    temp_files: int = 0
    warnings: list[str] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    audit_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Counts as a JSON-ready dict (what the audit record holds)."""
        out = asdict(self)
        out["audit_path"] = str(self.audit_path) if self.audit_path else None
        out["traces"] = len(self.traces)
        out.pop("warnings")  # they quote the ids
        return out

    def summary(self) -> str:
        """One line per store, then the audit scan."""
        lines = [f"warning: {w}" for w in self.warnings]
        lines += [
            f"erased {self.customers} customer(s)",
            f"  event lake: {self.lake_events} events",
            f"  feature tables: {sum(self.feature_rows.values())} rows "
            + ", ".join(f"{k}={v}" for k, v in self.feature_rows.items()),
            f"  online store: {self.online_sqlite_rows} SQLite rows"
            + (" (file vacuumed)" if self.online_sqlite_vacuumed else "")
            + f", {self.online_redis_keys} Redis keys",
            f"  stream: {self.stream_events} events in {self.stream_entries} entries, "
            f"{self.stream_dead_letters} dead letters",
            f"  streaming state: {self.streaming_rows} tiles, sessions, applied ids and "
            "staged events",
            f"  activation: {self.activation_keys} timers, segment memberships, fired marks, "
            "contacts and pending decisions",
            f"  quarantine: {self.quarantine_rows} rows in {self.quarantine_files} files; "
            f"landing copies: {self.landing_rows} rows in {self.landing_files} files; "
            f"{self.deleted_files} unreadable files deleted; {self.temp_files} temp files deleted",
            f"  audit: {self.audit_path}",
        ]
        if self.traces:
            lines.append(f"  scan: the id is still in {len(self.traces)} place(s):")
            lines += [f"    {t}" for t in self.traces]
        else:
            lines.append("  scan: no file of the project holds the id")
        return "\n".join(lines)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.erase-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _erase_features(settings: Settings, wanted: pa.Array) -> dict[str, int]:
    out = {}
    for view in VIEWS:
        path = feature_table_path(settings.path(settings.features_dir), view)
        if not path.exists():
            continue
        table = pq.read_table(path)
        hit = pc.is_in(table[ENTITY], value_set=wanted)
        removed = int(pc.sum(hit).as_py() or 0)
        if removed:
            _write_atomic(table.filter(pc.invert(hit)), path)
        out[view] = removed
    # The Spark engine's tables (engine: spark): partitioned folders of Parquet parts.
    from propensity.spark.features import spark_table_path

    pattern = IdPattern(wanted.to_pylist())
    for view in VIEWS:
        folder = spark_table_path(settings.path(settings.features_dir), view)
        if folder.exists():
            out[f"spark/{view}"] = _scrub_folder(folder, pattern, recursive=True).rows
    return out


@dataclass
class _Scrubbed:
    rows: int = 0
    files: int = 0
    deleted: int = 0


def _scrub_parquet(path: Path, ids: IdPattern) -> int | None:
    """Rewrite a Parquet file without its rows holding an id; ``None`` if unreadable."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    hit: Any = pa.array(np.zeros(table.num_rows, dtype=bool))
    for f in table.schema:
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            hit = pc.or_(hit, ids.arrow_mask(table[f.name]))
    removed = int(pc.sum(hit).as_py() or 0)
    if removed:
        _write_atomic(table.filter(pc.invert(hit)), path)
    return removed


def _scrub_text(path: Path, ids: IdPattern) -> int | None:
    """Rewrite a text file (CSV, JSON Lines, reasons; gzipped or not) without the id's lines."""
    zipped = path.read_bytes()[:2] == b"\x1f\x8b"
    try:
        data = gzip.decompress(path.read_bytes()) if zipped else path.read_bytes()
    except (OSError, EOFError):
        return None
    if b"\x00" in data[:8192]:
        return None  # binary: not a format we can rewrite line by line
    lines = data.splitlines(keepends=True)
    kept = [line for line in lines if not ids.search_bytes(line)]
    removed = len(lines) - len(kept)
    if removed:
        tmp = path.with_name(f".{path.name}.erase-{os.getpid()}")
        out = b"".join(kept)
        tmp.write_bytes(gzip.compress(out) if zipped else out)
        os.replace(tmp, path)
    return removed


def _scrub_folder(folder: Path, ids: IdPattern, *, recursive: bool) -> _Scrubbed:
    """Remove the id from every file of ``folder``: rows, lines, or the whole unreadable file."""
    done = _Scrubbed()
    if not folder.exists():
        return done
    files = folder.rglob("*") if recursive else folder.glob("*")
    return _scrub_folder_files(sorted(p for p in files if p.is_file()), ids)


def _scrub_folder_files(paths: Iterable[Path], ids: IdPattern) -> _Scrubbed:
    done = _Scrubbed()
    for path in (p for p in paths if not _TMP.search(p.name)):
        if path.name.lower().endswith(_PARQUET):
            removed = _scrub_parquet(path, ids)
        else:
            removed = _scrub_text(path, ids)
        if removed is None:
            if _file_holds(path, ids):
                path.unlink()
                done.deleted += 1
            continue
        if removed:
            done.rows += removed
            done.files += 1
    return done


def _file_holds(path: Path, ids: IdPattern) -> bool:
    data = path.read_bytes()
    return ids.search_bytes(data) or any(k in data for k in ids.keys)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _erase_temp_files(folders: Iterable[Path], grace_seconds: float) -> int:
    """Delete temporary files of killed runs (never committed data).

    A file named after a process id goes when that process is gone; any other
    when untouched for ``grace_seconds`` (a live ingest writes its quarantine
    file as it goes).
    """
    removed = 0
    now = time.time()
    for folder in folders:
        if not folder.exists():
            continue
        for path in folder.rglob("*"):
            match = _TMP.search(path.name)
            if match is None or not path.is_file():
                continue
            pid = match.group("pid") or match.group("epid")
            if pid is not None and int(pid) == os.getpid():
                continue
            dead = pid is not None and not _alive(int(pid))
            if dead or now - path.stat().st_mtime > grace_seconds:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def scrub_copy(settings: Settings, path: Path) -> int:
    """Remove the rows of suppressed customers from one raw file; return the rows removed.

    For ingested copies whose erased rows ingest dropped: only the customer id
    column is read to find whom to remove.
    """
    from propensity.events._readers import IngestError, iter_source
    from propensity.events.suppression import Screen

    screen = Screen(SuppressionList.of(settings))
    found: set[str] = set()
    try:
        for batch in iter_source(path, (ENTITY,), columns=[ENTITY]):
            found |= screen.suppressed(batch.table.column(ENTITY))
    except (IngestError, KeyError, pa.ArrowException):
        return 0
    if not found:
        return 0
    scrubbed = _scrub_folder_files([path], IdPattern(found))
    return scrubbed.rows


def forget(
    settings: Settings,
    customer_ids: Iterable[str],
    *,
    actor: str | None = None,
    wait_seconds: float = 3600.0,
    temp_grace_seconds: float = 600.0,
    scan: bool = True,
) -> ErasureReport:
    """Remove customers from every file of the project, list them as suppressed, audit it.

    Runs under the jobs lock, so it never interleaves with a retrain (which
    could otherwise write a customer back online from features built before).

    Parameters
    ----------
    settings : Settings
    customer_ids : iterable of str
        Ids to erase, exactly as stored (see :func:`check_ids`); unknown ids
        are fine (counted as zero everywhere).
    actor : str, optional
        Who asked, for the audit record (default ``user@host``).
    wait_seconds : float
        How long to wait for a running job to finish before giving up.
    temp_grace_seconds : float
        Temporary files untouched for longer than this are leftovers of killed
        runs and are deleted.
    scan : bool
        Scan every file of the project for the ids afterwards (``traces``).

    Returns
    -------
    ErasureReport

    Examples
    --------
    >>> print(forget(load_settings(), ["C0000042"]).summary())  # doctest: +SKIP
    """
    ids, warnings = check_ids(customer_ids)
    for warning in warnings:
        _log.warning(warning)
    pattern = IdPattern(ids)
    wanted = pa.array(ids, pa.string())
    report = ErasureReport(customers=len(ids), warnings=warnings)
    actor = actor or f"{getpass.getuser()}@{socket.gethostname()}"
    with jobs_lock(settings, "forget").acquire(wait_seconds):
        erased = suppression_list(settings)
        # Suppressed before anything is erased: an ingest from now on drops them.
        erased.add(ids, {"at": _now(), "actor": actor, "status": "started"})
        erased.bind(settings.path(settings.lake_dir))  # every later ingest into the lake applies it
        # Online first: once a customer is gone from serving, the rest is offline cleanup.
        from propensity.features.online import tile_store
        from propensity.features.online.tiles import SqliteTileStore
        from propensity.features.store import PROJECT, FeatureStoreAdapter

        tiles = tile_store(settings)
        report.streaming_rows = tiles.forget(ids)
        tiles.close()
        if not isinstance(tiles, SqliteTileStore):
            # A project that moved to Redis may keep the streaming tables of its SQLite file.
            left = SqliteTileStore(settings.path(settings.online_store.sqlite_path), PROJECT)
            report.streaming_rows += left.forget(ids)
            left.close()
        online = FeatureStoreAdapter(settings).forget(ids)
        report.online_sqlite_rows = online.sqlite_rows
        report.online_sqlite_vacuumed = online.sqlite_vacuumed
        report.online_redis_keys = online.redis_keys
        _erase_stream(settings, ids, report)
        _erase_activation(settings, ids, report)
        report.lake_events = EventLake(settings.path(settings.lake_dir)).erase_customers(ids)
        report.feature_rows = _erase_features(settings, wanted)
        quarantine = settings.path(settings.quarantine_dir)
        report.temp_files = _erase_temp_files(
            [settings.path(settings.lake_dir), quarantine, settings.path(settings.features_dir)],
            temp_grace_seconds,
        )
        rows = _scrub_folder(quarantine, pattern, recursive=True)
        report.quarantine_rows, report.quarantine_files = rows.rows, rows.files
        copies = _scrub_folder(
            settings.path(settings.landing_dir) / "processed", pattern, recursive=True
        )
        report.landing_rows, report.landing_files = copies.rows, copies.files
        report.deleted_files = rows.deleted + copies.deleted
        if scan:
            report.traces += find_traces(settings, ids)
        report.audit_path = erased.audit_path
        counts = {k: v for k, v in report.to_dict().items() if k != "audit_path"}
        erased.add(ids, {"at": _now(), "actor": actor, "status": "done", "counts": counts})
    return report


def _erase_stream(settings: Settings, ids: list[str], report: ErasureReport) -> None:
    """The customers' pending messages and dead letters; an unreachable stream is a trace."""
    from propensity.jobs.stream import erase_stream

    try:
        erased = erase_stream(settings, ids)
    except ConnectionError as exc:
        report.traces.append(Trace(settings.path(settings.jobs_dir), str(exc)))
        return
    if erased is not None:
        report.stream_events = erased.events
        report.stream_entries = erased.entries
        report.stream_dead_letters = erased.dead_letters


def _erase_activation(settings: Settings, ids: list[str], report: ErasureReport) -> None:
    """Pending timers, segment memberships and decisions, when the project runs triggers."""
    from propensity.activation.state import MARKER_FILE

    if not (settings.path(settings.jobs_dir) / MARKER_FILE).exists():
        return
    from propensity.activation.runner import load_project_triggers
    from propensity.activation.state import ActivationState
    from propensity.jobs.redis_stream import TransportError

    config = settings.activation
    try:
        state = ActivationState(
            settings.activation_url,
            config.prefix,
            config.outbound_key,
            dead_letter_key=config.webhook.dead_letter_key,
        )
        report.activation_keys = state.forget(ids, load_project_triggers(settings).triggers)
    except TransportError as exc:
        where = f"activation state at {settings.activation_url} not reachable: {exc}"
        report.traces.append(Trace(settings.path(settings.jobs_dir), where))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
