"""Ingest source files into the event lake: read, validate, quarantine, dedupe, store.

Counts always add up, overall and per file::

    read = accepted + duplicates + quarantined + consent_removed

Memory is bounded whatever the size of the sources: files are read in batches,
each batch is validated and its accepted rows staged as Parquet in the lake's
staging area; the staged rows are then deduped (within the run, and against
the lake month by month) and committed in one manifest replace.

Consent is applied first: every row of a customer who withdrew consent (in the
consent file, or a ``consent`` value that is false in any source row) is
dropped and counted in ``consent_removed`` (not quarantined, so their data is
not kept anywhere), and their events already in the lake are erased
(``erased_from_lake``). Customers on the suppression list (erased by
``forget``) are dropped the same way, counted in ``consent_removed`` and, of
those, in ``suppressed``.
"""

from __future__ import annotations

import gzip
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.events._readers import (
    BATCH_ROWS,
    IngestError,
    expand_paths,
    iter_source,
    read_source,
    source_columns,
)
from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA
from propensity.events.suppression import Screen, SuppressionList
from propensity.events.validation import (
    ORDER_TIME_COLUMNS,
    QUARANTINE_SCHEMA,
    validate_events,
    withdrawn_customers,
)
from propensity.progress import ProgressCallback, report

__all__ = ["FileCounts", "IngestError", "IngestReport", "ingest", "read_consent"]

_FILE = "__file__"
_ROW = "__row__"


@dataclass
class FileCounts:
    """Row counts of one source file."""

    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    consent_removed: int = 0


@dataclass
class IngestReport:
    """What one ingest run did.

    ``read == accepted + duplicates + quarantined + consent_removed`` holds
    overall and for every entry of ``files``.
    """

    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    consent_removed: int = 0
    erased_from_lake: int = 0
    suppressed: int = 0  # of consent_removed: rows of customers on the suppression list
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    quarantine_path: Path | None = None
    files: dict[str, FileCounts] = field(default_factory=dict)

    def summary(self) -> str:
        """Plain-text summary, one line per file and a total.

        Examples
        --------
        >>> print(IngestReport(read=3, accepted=3).summary())  # doctest: +NORMALIZE_WHITESPACE
        file   read  accepted  duplicates  quarantined  consent_removed
        total     3         3           0            0                0
        """
        header = ("file", "read", "accepted", "duplicates", "quarantined", "consent_removed")
        rows = [
            (name, c.read, c.accepted, c.duplicates, c.quarantined, c.consent_removed)
            for name, c in self.files.items()
        ]
        total = ("total", self.read, self.accepted, self.duplicates, self.quarantined)
        rows.append((*total, self.consent_removed))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                str(v).ljust(w) if i == 0 else str(v).rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [header, *rows]
        ]
        for reason, n in sorted(self.quarantined_by_reason.items()):
            lines.append(f"quarantined {reason}: {n}")
        if self.erased_from_lake:
            lines.append(f"erased from the lake (consent withdrawn): {self.erased_from_lake}")
        if self.suppressed:
            lines.append(f"dropped (customers erased earlier): {self.suppressed}")
        if self.quarantine_path is not None:
            lines.append(f"quarantine: {self.quarantine_path}")
        return "\n".join(lines)

    def to_rich(self) -> object:
        """The summary as a ``rich.table.Table`` for terminal display."""
        from rich.table import Table

        table = Table(title="ingest")
        for name in ("file", "read", "accepted", "duplicates", "quarantined", "consent removed"):
            if name == "file":
                table.add_column(name, overflow="fold")
            else:
                table.add_column(name, justify="right")
        for name, c in self.files.items():
            counts = (c.read, c.accepted, c.duplicates, c.quarantined, c.consent_removed)
            table.add_row(name, *(f"{n:,}" for n in counts))
        totals = (self.read, self.accepted, self.duplicates, self.quarantined, self.consent_removed)
        table.add_row("total", *(f"{n:,}" for n in totals), style="bold")
        notes = [f"quarantined {r}: {n:,}" for r, n in sorted(self.quarantined_by_reason.items())]
        if self.erased_from_lake:
            notes.append(f"erased from the lake (consent withdrawn): {self.erased_from_lake:,}")
        if self.quarantine_path is not None:
            notes.append(f"quarantine: {self.quarantine_path}")
        table.caption = "\n".join(notes) or None
        return table


def read_consent(path: str | Path, mapping: Mapping[str, str] | None = None) -> set[str]:
    """Customers who withdrew consent according to a consent file.

    The file (CSV, Parquet or JSON Lines) has ``customer_id`` and optionally a
    boolean ``consent`` column; without that column every listed customer has
    withdrawn, with it the rows where it is false.

    Examples
    --------
    >>> read_consent("consent.csv")  # doctest: +SKIP
    {'C0000042'}
    """
    path = Path(path)
    table = read_source(path, text_columns=("customer_id", "consent"))
    renames = {k: v for k, v in (mapping or {}).items() if k in table.column_names}
    table = table.rename_columns([renames.get(n, n) for n in table.column_names])
    if "customer_id" not in table.column_names:
        raise IngestError(
            f"{path}: consent file needs a customer_id column; has {table.column_names}"
        )
    if "consent" not in table.column_names:
        ids = pc.utf8_trim_whitespace(table.column("customer_id").cast(pa.string()))
        return {i for i in ids.to_pylist() if i}
    return withdrawn_customers(table)


def _text_columns(mapping: Mapping[str, str]) -> set[str]:
    wanted = {f.name for f in ARROW_SCHEMA if pa.types.is_string(f.type)}
    wanted |= {"event_timestamp", "consent", *ORDER_TIME_COLUMNS}
    return wanted | {src for src, dst in mapping.items() if dst in wanted}


def _source_names(canonical: str, mapping: Mapping[str, str]) -> set[str]:
    """Source column names that become ``canonical`` under ``mapping``."""
    names = {src for src, dst in mapping.items() if dst == canonical}
    return names | ({canonical} if canonical not in mapping else set())


def _mentions(path: Path, names: Iterable[str]) -> bool:
    """Whether a JSON Lines file holds one of ``names`` as a key (a cheap byte scan)."""
    pattern = re.compile(b"|".join(b'"' + re.escape(n.encode()) + rb'"\s*:' for n in names))
    tail = b""
    for batch in _raw_blocks(path):
        if pattern.search(tail + batch):
            return True
        tail = batch[-256:]
    return False


def _raw_blocks(path: Path, size: int = 32 << 20) -> Iterable[bytes]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        while block := handle.read(size):
            yield block


def _withdrawn_in(path: Path, mapping: Mapping[str, str], text_columns: set[str]) -> set[str]:
    """Customers a source file withdraws through a false ``consent`` value.

    Only files with a consent column are read, and only two of their columns.
    """
    consent = _source_names("consent", mapping)
    customer = _source_names("customer_id", mapping)
    columns = source_columns(path)
    if columns is None:
        if not _mentions(path, consent):
            return set()
        wanted = None
    else:
        if not consent & set(columns):
            return set()
        wanted = [c for c in columns if c in consent | customer]
    found: set[str] = set()
    for batch in iter_source(path, text_columns, columns=wanted):
        found |= withdrawn_customers(batch.table, mapping)
    return found


class _QuarantineSink:
    """Quarantine records streamed to one Parquet file, published only when complete."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows = 0
        self.by_reason: dict[str, int] = {}
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None

    def write(self, rejected: pa.Table) -> None:
        if not rejected.num_rows:
            return
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".quarantine-{uuid.uuid4().hex}.parquet.tmp"
            self._writer = pq.ParquetWriter(self._tmp, QUARANTINE_SCHEMA)
        self._writer.write_table(rejected)
        self.rows += rejected.num_rows
        for item in pc.value_counts(rejected.column("rule")).to_pylist():
            reason = str(item["values"])
            self.by_reason[reason] = self.by_reason.get(reason, 0) + int(item["counts"])

    def publish(self) -> Path | None:
        if self._writer is None or self._tmp is None:
            return None
        self._writer.close()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = self.folder / f"quarantine-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        self._tmp.replace(path)
        return path

    def discard(self) -> None:
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


def ingest(
    paths: Sequence[str | Path] | str | Path,
    lake: EventLake | str | Path,
    quarantine_dir: str | Path,
    *,
    mapping: Mapping[str, str] | None = None,
    orders_only: bool = False,
    consent_file: str | Path | None = None,
    suppression: SuppressionList | None = None,
    timezone: str = "UTC",
    now: datetime | None = None,
    progress: ProgressCallback | None = None,
    batch_rows: int = BATCH_ROWS,
) -> IngestReport:
    """Validate source files and store their new, consented events in the lake.

    Parameters
    ----------
    paths : path or sequence of paths
        Files (``.csv``, ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``, CSV and
        JSON Lines optionally gzipped) or folders of them.
    lake : EventLake or path
        Destination lake.
    quarantine_dir : path
        Where this run's quarantine Parquet file goes (only written when some
        row is rejected).
    mapping : dict, optional
        ``{source_name: canonical_name}`` column renames, applied to every file.
    orders_only : bool
        Sources are orders logs (``customer_id``, ``timestamp|date|order_date``,
        ``amount``, optional ``quantity``); each row becomes a ``purchase``.
    consent_file : path, optional
        Customers who withdrew consent (see :func:`read_consent`).
    suppression : SuppressionList, optional
        Customers erased by ``forget``: their rows are dropped, never stored
        or quarantined. Default: the list bound to the lake
        (:meth:`SuppressionList.bind`, done by ``forget``), so an ingest that
        passes none still applies it.
    timezone : str
        IANA zone in which naive timestamps are read.
    now : datetime, optional
        Reference time for rejecting future timestamps (default: the clock).
    progress : callable, optional
        ``progress(description, completed, total)`` (see
        :mod:`propensity.progress`): per file ``"ingest <name>"`` with rows
        (Parquet) or bytes (CSV, JSON Lines) done of total, then ``"store"``
        with months done of months touched.
    batch_rows : int
        Most source rows read and validated at once; with the lake's DuckDB
        memory limit it bounds the memory of a run whatever the file sizes.

    Returns
    -------
    IngestReport

    Raises
    ------
    IngestError
        When a file cannot be read at all or lacks required columns; nothing
        is stored then.

    Examples
    --------
    >>> report = ingest(["events.csv"], EventLake("data/lake"), "data/quarantine")  # doctest: +SKIP
    >>> report.accepted + report.duplicates + report.quarantined  # doctest: +SKIP
    1000
    """
    store = lake if isinstance(lake, EventLake) else EventLake(Path(lake))
    mapping = dict(mapping or {})
    files = expand_paths([paths] if isinstance(paths, str | Path) else paths)
    text_columns = _text_columns(mapping)
    # Consent first, over all files: a consent value in the last file can
    # withdraw a customer whose events sit in the first one.
    withdrawn = read_consent(consent_file, mapping) if consent_file is not None else set()
    for path in files:
        withdrawn |= _withdrawn_in(path, mapping, text_columns)
    # The list bound to the lake applies whoever calls: no path can skip it.
    bound = SuppressionList.bound_to(store.root)
    screen = Screen(suppression or bound, _source_names("customer_id", mapping))

    result = IngestReport()
    quarantine = _QuarantineSink(Path(quarantine_dir))
    try:
        with store.staged_append() as stage:
            for index, path in enumerate(files):
                counts = result.files[str(path)] = FileCounts()
                for batch in iter_source(path, text_columns, batch_rows=batch_rows):
                    try:
                        checked = validate_events(
                            batch.table,
                            source=str(path),
                            mapping=mapping,
                            orders_only=orders_only,
                            timezone=timezone,
                            now=now,
                            withdrawn=screen.withdrawn(batch.table, withdrawn),
                            row_offset=batch.first_row,
                        )
                    except IngestError as exc:
                        raise IngestError(f"{path}: {exc}") from None
                    counts.read += checked.read
                    counts.quarantined += checked.rejected.num_rows
                    counts.consent_removed += checked.consent_removed
                    quarantine.write(checked.rejected)
                    valid = checked.valid.drop_columns([_ROW])
                    if valid.num_rows:
                        tag = pa.array(np.full(valid.num_rows, index, np.int32))
                        stage.write(valid.append_column(_FILE, tag))
                    report(progress, f"ingest {path.name}", batch.done, batch.total)
            added = stage.commit(returning=[_FILE], progress=progress)
        result.quarantine_path = quarantine.publish()
    except BaseException:
        quarantine.discard()
        raise

    per_file_added = _per_file(added)
    for index, path in enumerate(files):
        counts = result.files[str(path)]
        counts.accepted = per_file_added.get(index, 0)
        counts.duplicates = (
            counts.read - counts.accepted - counts.quarantined - counts.consent_removed
        )
    if withdrawn:
        result.erased_from_lake = store.erase_customers(withdrawn)
        report(progress, "erase withdrawn customers", 1, 1)

    for counts in result.files.values():
        result.read += counts.read
        result.accepted += counts.accepted
        result.duplicates += counts.duplicates
        result.quarantined += counts.quarantined
        result.consent_removed += counts.consent_removed
    result.quarantined_by_reason = dict(quarantine.by_reason)
    result.suppressed = screen.rows
    return result


def _per_file(added: pa.Table) -> dict[int, int]:
    if not added.num_rows:
        return {}
    counts = pc.value_counts(added.column(_FILE)).to_pylist()
    return {int(item["values"]): int(item["counts"]) for item in counts}


def _main(argv: Iterable[str]) -> None:
    """Minimal runner: ``python -m propensity.events.ingest LAKE QUARANTINE FILE...``."""
    lake, quarantine, *sources = list(argv)
    print(ingest(sources, EventLake(lake), quarantine).summary())


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
