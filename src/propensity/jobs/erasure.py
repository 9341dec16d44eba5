"""Erasure ("right to be forgotten"): remove customers from every store the project keeps.

:func:`forget` removes, for each customer id:

* their events from the event lake (atomic rewrite of the affected files);
* their rows from every feature table (each file replaced atomically);
* their entity rows from the online store: SQLite (rows of every view table
  with their entity key) and Redis (their hash key), read by Feast and serving;
* rows of quarantine files that carry their id (the raw row is kept there);
* ingested landing files (``<landing>/processed/``) that mention them: the
  events are in the lake already, so the whole raw copy is deleted.

It then appends an audit record to ``<jobs dir>/erasure_audit.jsonl``: when,
who (OS user and host, or the ``actor`` given), the SHA-256 of each id (never
the id itself) and the counts per store. The same hashes act as a suppression
list: :func:`propensity.jobs.retrain.retrain` erases any customer whose id hash
is listed right after each ingest, so a late file cannot bring them back.

Not covered: MLflow holds no customer ids (runs log features, metrics and
five anonymous example rows), but exports a user made (score files, notebooks)
are outside the project's stores.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import sqlite3
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.features.definitions import ENTITY, VIEWS
from propensity.features.snapshots import feature_table_path
from propensity.jobs.lock import job_dir, jobs_lock

__all__ = ["ErasureReport", "forget", "erased_hashes", "id_hash", "AUDIT_FILE"]

AUDIT_FILE = "erasure_audit.jsonl"
_PROJECT = "propensity"  # the Feast project name (FeatureStoreAdapter's default)


def id_hash(customer_id: str) -> str:
    """SHA-256 (hex) of a customer id, as written in the audit log.

    Ids with a guessable format can be re-identified by hashing candidates;
    the audit log is pseudonymous, not anonymous, and should be access-controlled.

    Examples
    --------
    >>> id_hash("C0000001")[:12]
    '08ff16851f5a'
    """
    return hashlib.sha256(customer_id.encode("utf8")).hexdigest()


@dataclass
class ErasureReport:
    """What :func:`forget` removed, per store (counts only, no personal data)."""

    customers: int
    lake_events: int = 0
    feature_rows: dict[str, int] = field(default_factory=dict)
    online_sqlite_rows: int = 0
    online_redis_keys: int = 0
    quarantine_rows: int = 0
    landing_files: int = 0
    audit_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Counts as a JSON-ready dict (what the audit record holds)."""
        out = asdict(self)
        out["audit_path"] = str(self.audit_path) if self.audit_path else None
        return out

    def summary(self) -> str:
        """One line per store."""
        return "\n".join(
            [
                f"erased {self.customers} customer(s)",
                f"  event lake: {self.lake_events} events",
                f"  feature tables: {sum(self.feature_rows.values())} rows "
                + ", ".join(f"{k}={v}" for k, v in self.feature_rows.items()),
                f"  online store: {self.online_sqlite_rows} SQLite rows, "
                f"{self.online_redis_keys} Redis keys",
                f"  quarantine: {self.quarantine_rows} rows; landing copies: "
                f"{self.landing_files} files",
                f"  audit: {self.audit_path}",
            ]
        )


def _entity_key(customer_id: str) -> bytes:
    # Feast's serialize_entity_key, version 3, for the one string join key
    # (tests check it against Feast's own encoder).
    key, raw = ENTITY.encode("utf8"), customer_id.encode("utf8")
    return struct.pack("<III", 1, 2, len(key)) + key + struct.pack("<II", 2, len(raw)) + raw


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
    return out


def _erase_sqlite(path: Path, keys: list[bytes]) -> int:
    if not path.exists():
        return 0
    con = sqlite3.connect(path, timeout=60)
    try:
        tables = [
            row[0]
            for row in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?",
                (f"{_PROJECT}_%",),
            )
        ]
        marks = ", ".join("?" * len(keys))
        removed = 0
        with con:  # one transaction: a reader never sees a half-erased customer
            for table in tables:
                quoted = '"' + table.replace('"', '""') + '"'
                cursor = con.execute(f"DELETE FROM {quoted} WHERE entity_key IN ({marks})", keys)
                removed += cursor.rowcount
        return removed
    finally:
        con.close()


def _redis_client(url: str) -> Any:
    import redis

    from propensity.features.store import redis_connection_string

    host_port, *options = redis_connection_string(url).split(",")
    host, _, port = host_port.partition(":")
    kwargs: dict[str, Any] = {"host": host or "localhost", "port": int(port or 6379)}
    for option in options:
        name, _, value = option.partition("=")
        if name == "db":
            kwargs["db"] = int(value)
        elif name == "password":
            kwargs["password"] = value
        elif name == "ssl":
            kwargs["ssl"] = value.lower() == "true"
    return redis.Redis(**kwargs)


def _erase_redis(url: str, keys: list[bytes]) -> int:
    # Feast's Redis store keeps one hash per entity: serialized key + project name.
    client = _redis_client(url)
    try:
        return int(client.delete(*[k + _PROJECT.encode("utf8") for k in keys]))
    finally:
        client.close()


def _mentions(raw: str | None, ids: set[str]) -> bool:
    if not raw:
        return False
    try:
        data = json.loads(raw)
    except ValueError:
        return any(i in raw for i in ids)
    if isinstance(data, dict):
        return any(str(v) in ids for v in data.values() if v is not None)
    return any(i in raw for i in ids)


def _erase_quarantine(folder: Path, ids: set[str]) -> int:
    removed = 0
    for path in sorted(folder.glob("*.parquet")) if folder.exists() else []:
        table = pq.read_table(path)
        if "raw" not in table.column_names:
            continue
        hit = [_mentions(r, ids) for r in table["raw"].to_pylist()]
        if any(hit):
            mask = pa.array([not h for h in hit])
            _write_atomic(table.filter(mask), path)
            removed += sum(hit)
    return removed


def _erase_landing_copies(folder: Path, ids: set[str]) -> int:
    from propensity.events._readers import IngestError, expand_paths, read_source

    if not folder.exists():
        return 0
    try:
        files = expand_paths([folder])
    except IngestError:
        return 0
    removed = 0
    wanted = pa.array(sorted(ids), pa.string())
    for path in files:
        try:
            table = read_source(path, text_columns=(ENTITY,))
        except IngestError:
            continue
        if (
            ENTITY in table.column_names
            and pc.any(pc.is_in(table[ENTITY].cast(pa.string()), value_set=wanted)).as_py()
        ):
            path.unlink()
            removed += 1
    return removed


def erased_hashes(settings: Settings) -> set[str]:
    """Id hashes of every customer erased so far (the suppression list).

    Examples
    --------
    >>> id_hash("C0000042") in erased_hashes(load_settings())  # doctest: +SKIP
    True
    """
    path = job_dir(settings) / AUDIT_FILE
    if not path.exists():
        return set()
    out: set[str] = set()
    for line in path.read_text().splitlines():
        if line.strip():
            out.update(json.loads(line).get("id_sha256", []))
    return out


def _append_audit(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def forget(
    settings: Settings,
    customer_ids: Iterable[str],
    *,
    actor: str | None = None,
    wait_seconds: float = 3600.0,
) -> ErasureReport:
    """Remove customers from the lake, feature tables, online store and raw copies.

    Runs under the jobs lock, so it never interleaves with a retrain (which
    could otherwise write a customer back online from features built before).

    Parameters
    ----------
    settings : Settings
    customer_ids : iterable of str
        Ids to erase; unknown ids are fine (counted as zero everywhere).
    actor : str, optional
        Who asked, for the audit record (default ``user@host``).
    wait_seconds : float
        How long to wait for a running job to finish before giving up.

    Returns
    -------
    ErasureReport

    Examples
    --------
    >>> print(forget(load_settings(), ["C0000042"]).summary())  # doctest: +SKIP
    """
    ids = sorted({str(c).strip() for c in customer_ids if str(c).strip()})
    if not ids:
        raise ValueError("no customer id given to forget")
    wanted = pa.array(ids, pa.string())
    folder = job_dir(settings)
    report = ErasureReport(customers=len(ids))
    with jobs_lock(settings, "forget").acquire(wait_seconds):
        # Online first: once a customer is gone from serving, the rest is offline cleanup.
        keys = [_entity_key(c) for c in ids]
        online = settings.online_store
        report.online_sqlite_rows = _erase_sqlite(settings.path(online.sqlite_path), keys)
        if online.kind == "redis":
            report.online_redis_keys = _erase_redis(online.redis_url, keys)
        report.lake_events = EventLake(settings.path(settings.lake_dir)).erase_customers(ids)
        report.feature_rows = _erase_features(settings, wanted)
        report.quarantine_rows = _erase_quarantine(settings.path(settings.quarantine_dir), set(ids))
        report.landing_files = _erase_landing_copies(
            settings.path(settings.landing_dir) / "processed", set(ids)
        )
        report.audit_path = folder / AUDIT_FILE
        record = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "actor": actor or f"{getpass.getuser()}@{socket.gethostname()}",
            "id_sha256": [id_hash(c) for c in ids],
            "counts": {k: v for k, v in report.to_dict().items() if k != "audit_path"},
        }
        _append_audit(report.audit_path, record)
    return report
