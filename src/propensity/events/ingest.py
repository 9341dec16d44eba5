"""Ingest source files into the event lake: read, validate, quarantine, dedupe, store.

Counts always add up, overall and per file::

    read = accepted + duplicates + quarantined + consent_removed

Consent is applied first: every row of a customer who withdrew consent (in the
consent file, or a ``consent`` value that is false in any source row) is
dropped and counted in ``consent_removed`` (not quarantined, so their data is
not kept anywhere), and their events already in the lake are erased
(``erased_from_lake``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.events._readers import IngestError, expand_paths, read_source
from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA
from propensity.events.validation import (
    ORDER_TIME_COLUMNS,
    QUARANTINE_SCHEMA,
    validate_events,
    withdrawn_customers,
)

__all__ = ["FileCounts", "IngestError", "IngestReport", "ingest", "read_consent"]

Progress = Callable[[str, int], None]
_FILE = "__file__"


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
        if self.quarantine_path is not None:
            lines.append(f"quarantine: {self.quarantine_path}")
        return "\n".join(lines)

    def to_rich(self) -> object:
        """The summary as a ``rich.table.Table`` for terminal display."""
        from rich.table import Table

        table = Table(title="ingest")
        for name in ("file", "read", "accepted", "duplicates", "quarantined", "consent removed"):
            table.add_column(name, justify="left" if name == "file" else "right")
        for name, c in self.files.items():
            table.add_row(
                name,
                *map(str, (c.read, c.accepted, c.duplicates, c.quarantined, c.consent_removed)),
            )
        totals = (self.read, self.accepted, self.duplicates, self.quarantined, self.consent_removed)
        table.add_row("total", *map(str, totals), style="bold")
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


def ingest(
    paths: Sequence[str | Path] | str | Path,
    lake: EventLake | str | Path,
    quarantine_dir: str | Path,
    *,
    mapping: Mapping[str, str] | None = None,
    orders_only: bool = False,
    consent_file: str | Path | None = None,
    timezone: str = "UTC",
    now: datetime | None = None,
    progress: Progress | None = None,
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
    timezone : str
        IANA zone in which naive timestamps are read.
    now : datetime, optional
        Reference time for rejecting future timestamps (default: the clock).
    progress : callable, optional
        Called as ``progress(description, rows)`` after each step, ``rows``
        being the rows that step handled.

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
    notify = progress or (lambda _description, _rows: None)
    store = lake if isinstance(lake, EventLake) else EventLake(Path(lake))
    mapping = dict(mapping or {})
    files = expand_paths([paths] if isinstance(paths, str | Path) else paths)
    # Read everything first: a consent value in the last file can withdraw a
    # customer whose events sit in the first one.
    tables = []
    for path in files:
        table = read_source(path, _text_columns(mapping))
        tables.append(table)
        notify(f"read {path.name}", table.num_rows)
    withdrawn = read_consent(consent_file, mapping) if consent_file is not None else set()
    for table in tables:
        withdrawn |= withdrawn_customers(table, mapping)

    report = IngestReport()
    valid_parts, rejected_parts = [], []
    for index, (path, table) in enumerate(zip(files, tables, strict=True)):
        try:
            result = validate_events(
                table,
                source=str(path),
                mapping=mapping,
                orders_only=orders_only,
                timezone=timezone,
                now=now,
                withdrawn=withdrawn,
            )
        except IngestError as exc:
            raise IngestError(f"{path}: {exc}") from None
        tables[index] = pa.table({})  # release the source rows early
        del table
        counts = FileCounts(
            read=result.read,
            quarantined=result.rejected.num_rows,
            consent_removed=result.consent_removed,
        )
        report.files[str(path)] = counts
        valid_parts.append(
            result.valid.append_column(_FILE, pa.array([index] * result.valid.num_rows, pa.int32()))
        )
        rejected_parts.append(result.rejected)
        notify(f"validated {path.name}", result.read)

    batch = pa.concat_tables(valid_parts) if valid_parts else None
    valid_parts.clear()
    added = None
    if batch is not None and batch.num_rows:
        added = store.append_new(batch, returning=[_FILE])
    per_file_added = _per_file(added)
    for index, path in enumerate(files):
        counts = report.files[str(path)]
        counts.accepted = per_file_added.get(index, 0)
        counts.duplicates = (
            counts.read - counts.accepted - counts.quarantined - counts.consent_removed
        )
    notify("stored", 0 if added is None else added.num_rows)
    if withdrawn:
        report.erased_from_lake = store.erase_customers(withdrawn)
        notify("erased withdrawn customers", report.erased_from_lake)

    for counts in report.files.values():
        report.read += counts.read
        report.accepted += counts.accepted
        report.duplicates += counts.duplicates
        report.quarantined += counts.quarantined
        report.consent_removed += counts.consent_removed
    rejected = (
        pa.concat_tables(rejected_parts) if rejected_parts else QUARANTINE_SCHEMA.empty_table()
    )
    if rejected.num_rows:
        report.quarantined_by_reason = {
            str(item["values"]): int(item["counts"])
            for item in pc.value_counts(rejected.column("rule")).to_pylist()
        }
        report.quarantine_path = _write_quarantine(rejected, Path(quarantine_dir))
    return report


def _per_file(added: pa.Table | None) -> dict[int, int]:
    if added is None or not added.num_rows:
        return {}
    counts = pc.value_counts(added.column(_FILE)).to_pylist()
    return {int(item["values"]): int(item["counts"]) for item in counts}


def _write_quarantine(rejected: pa.Table, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"quarantine-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(rejected, tmp)
    tmp.replace(path)
    return path


def _main(argv: Iterable[str]) -> None:
    """Minimal runner: ``python -m propensity.events.ingest LAKE QUARANTINE FILE...``."""
    lake, quarantine, *sources = list(argv)
    print(ingest(sources, EventLake(lake), quarantine).summary())


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
