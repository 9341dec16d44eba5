"""Ingest source files into the event lake: read, validate, quarantine, dedupe, store.

Counts always add up, overall and per file::

    read = accepted + duplicates + quarantined + consent_removed

``conflicts`` (an ``event_id`` seen again with other content) are part of
``quarantined``: the first version is kept and the other is quarantined with
the rule ``conflicting_duplicate``. Quarantine records are keyed by the source
file's content hash, row number and rule, so re-ingesting a file counts its
bad rows again but does not store their records twice (``already_quarantined``).

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

import hashlib
import json
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
    RESERVED_COLUMNS,
    IngestError,
    expand_paths,
    iter_source,
    mentions_key,
    read_source,
    source_columns,
)
from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA
from propensity.events.suppression import Screen, SuppressionList
from propensity.events.timestamps import check_format, expected, guess_format
from propensity.events.validation import (
    ORDER_TIME_COLUMNS,
    QUARANTINE_SCHEMA,
    RULES,
    check_mapping,
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
    conflicts: int = 0
    identical_rows: int = 0  # of duplicates: identical to an earlier row of this file
    timestamp_failures: int = 0  # rows quarantined for their time field's format or type


@dataclass
class IngestReport:
    """What one ingest run did.

    ``read == accepted + duplicates + quarantined + consent_removed`` holds
    overall and for every entry of ``files``; ``conflicts`` (an event_id
    seen again with other content) are among the quarantined rows, and
    ``already_quarantined`` counts quarantined rows whose record an earlier
    run had stored (not written again). ``identical_rows`` are among the
    duplicates: rows identical to an earlier row of the same file, merged into
    it (a source without ``event_id``/``order_id`` gives them one derived id;
    ``keep_identical_rows`` keeps them apart). ``hints`` suggest a
    ``--timestamp-format`` for files most of whose timestamps were rejected.
    """

    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    consent_removed: int = 0
    conflicts: int = 0
    identical_rows: int = 0
    already_quarantined: int = 0
    erased_from_lake: int = 0
    suppressed: int = 0  # of consent_removed: rows of customers on the suppression list
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    quarantine_path: Path | None = None
    files: dict[str, FileCounts] = field(default_factory=dict)
    hints: list[str] = field(default_factory=list)

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
        lines += self._notes()
        return "\n".join(lines)

    def _notes(self) -> list[str]:
        notes = [f"quarantined {r}: {n:,}" for r, n in sorted(self.quarantined_by_reason.items())]
        if self.conflicts:
            notes.append(f"conflicts (event_id seen with other content): {self.conflicts:,}")
        if self.identical_rows:
            notes.append(
                f"of duplicates, identical rows merged within a file: {self.identical_rows:,} "
                "(use --keep-identical-rows, or give each row an event_id, to keep them)"
            )
        if self.already_quarantined:
            notes.append(
                f"already in the quarantine, not stored again: {self.already_quarantined:,}"
            )
        if self.erased_from_lake:
            notes.append(f"erased from the lake (consent withdrawn): {self.erased_from_lake:,}")
        if self.suppressed:
            notes.append(f"dropped (customers erased earlier): {self.suppressed:,}")
        if self.quarantine_path is not None:
            notes.append(f"quarantine: {self.quarantine_path}")
        return notes + [f"hint: {hint}" for hint in self.hints]

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
        table.caption = "\n".join(self._notes()) or None
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


def _withdrawn_in(path: Path, mapping: Mapping[str, str], text_columns: set[str]) -> set[str]:
    """Customers a source file withdraws through a false ``consent`` value.

    Only files with a consent column are read, and only two of their columns.
    """
    consent = _source_names("consent", mapping)
    customer = _source_names("customer_id", mapping)
    columns = source_columns(path)
    if columns is None:
        if not mentions_key(path, consent):
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


_RULE_INDEX = {rule: i for i, rule in enumerate(RULES)}


def _record_keys(records: pa.Table) -> pa.Array:
    """One integer per quarantine record: its row number and rule."""
    rules = [_RULE_INDEX.get(r, len(_RULE_INDEX)) for r in records.column("rule").to_pylist()]
    rows = records.column("row_number").combine_chunks().to_numpy(zero_copy_only=False)
    return pa.array(rows.astype(np.int64) * 64 + np.asarray(rules, np.int64))


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _QuarantineSink:
    """Quarantine records streamed to one Parquet file, published only when complete.

    A record already stored for the same source content, row and rule (by an
    earlier run, or earlier in this one) is counted but not written again.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows = 0
        self.already = 0
        self.by_reason: dict[str, int] = {}
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._hashes: dict[Path, str] = {}
        self._known: dict[str, pa.Array] = {}

    def _known_keys(self, digest: str) -> pa.Array:
        if digest not in self._known:
            parts = [pa.array([], pa.int64())]
            for path in sorted(self.folder.glob("*.parquet")) if self.folder.exists() else []:
                if "source_sha256" not in pq.read_schema(path).names:
                    continue  # written before records were keyed
                stored = pq.read_table(
                    path,
                    columns=["row_number", "rule"],
                    filters=[("source_sha256", "=", digest)],
                )
                parts.append(_record_keys(stored))
            self._known[digest] = pa.concat_arrays(parts)
        return self._known[digest]

    def write(self, path: Path, rejected: pa.Table) -> None:
        if not rejected.num_rows:
            return
        for item in pc.value_counts(rejected.column("rule")).to_pylist():
            reason = str(item["values"])
            self.by_reason[reason] = self.by_reason.get(reason, 0) + int(item["counts"])
        # Hashing a source costs a read of it: only sources with bad rows pay it.
        if path not in self._hashes:
            self._hashes[path] = _sha256(path)
        digest = self._hashes[path]
        keys = _record_keys(rejected)
        known = self._known_keys(digest)
        fresh = pc.invert(pc.is_in(keys, value_set=known))
        new = rejected.filter(fresh)
        self.already += rejected.num_rows - new.num_rows
        self._known[digest] = pa.concat_arrays([known, keys.filter(fresh)])
        if not new.num_rows:
            return
        digests = pa.array([digest] * new.num_rows, pa.string())
        new = new.set_column(new.schema.get_field_index("source_sha256"), "source_sha256", digests)
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".quarantine-{uuid.uuid4().hex}.parquet.tmp"
            self._writer = pq.ParquetWriter(self._tmp, QUARANTINE_SCHEMA)
        self._writer.write_table(new)
        self.rows += new.num_rows

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


def _conflict_records(conflicts: pa.Table, files: list[Path]) -> dict[int, pa.Table]:
    """Quarantine records of conflicting duplicates, by source file index.

    The source row itself is not at hand any more: ``raw`` holds the
    canonical row that was not stored.
    """
    by_file: dict[int, dict[str, list[object]]] = {}
    for row in conflicts.to_pylist():
        records = by_file.setdefault(
            int(row.pop(_FILE)), {name: [] for name in QUARANTINE_SCHEMA.names}
        )
        records["row_number"].append(row.pop(_ROW))
        records["field"].append("event_id")
        records["rule"].append("conflicting_duplicate")
        records["value"].append(row["event_id"])
        records["rules"].append("event_id:conflicting_duplicate")
        records["raw"].append(json.dumps(row, default=str))
        records["source_sha256"].append(None)
        records["reason"].append(RULES["conflicting_duplicate"])
    out = {}
    for index, records in by_file.items():
        records["source_file"] = [str(files[index])] * len(records["row_number"])
        out[index] = pa.table(records, schema=QUARANTINE_SCHEMA)
    return out


def _check_sources(path: Path, mapping: Mapping[str, str], columns: Iterable[str]) -> None:
    """A mapped source column must be in every file the mapping is applied to."""
    present = set(columns)
    absent = sorted(source for source in mapping if source not in present)
    if absent:
        raise IngestError(
            f"{path}: mapped column(s) {absent} not found; columns are {sorted(present)}"
        )


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
    timestamp_format: str | None = None,
    keep_identical_rows: bool = False,
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
    timestamp_format : str, optional
        How text timestamps are written, as strptime codes (``%Y%m%d``,
        ``%d/%m/%Y %H:%M``), or ``epoch_s`` / ``epoch_ms`` for seconds or
        milliseconds since 1970 (text or numeric columns). Default: ISO 8601.
        When most timestamps of a file are rejected, ``hints`` of the report
        suggests a format guessed from them.
    keep_identical_rows : bool
        Keep identical rows of a file apart (the source row number enters
        their derived ids) instead of storing them once; re-ingesting the
        same file still adds nothing.
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
    check_mapping(mapping)
    check_format(timestamp_format)
    files = expand_paths([paths] if isinstance(paths, str | Path) else paths)
    text_columns = _text_columns(mapping)
    # Consent first, over all files: a consent value in the last file can
    # withdraw a customer whose events sit in the first one.
    withdrawn = read_consent(consent_file, mapping) if consent_file is not None else set()
    for path in files:
        columns = source_columns(path)
        if columns is not None:
            _check_sources(path, mapping, columns)
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
                # JSON Lines has no header: a line lacking a field misses it.
                declared = source_columns(path) is not None
                seen: set[str] = set()
                samples: list[str] = []
                for batch in iter_source(path, text_columns, batch_rows=batch_rows):
                    if batch.table.num_rows:
                        seen.update(batch.table.column_names)
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
                            unparsed=batch.problems,
                            columns_required=declared,
                            timestamp_format=timestamp_format,
                            keep_identical_rows=keep_identical_rows,
                        )
                    except IngestError as exc:
                        raise IngestError(f"{path}: {exc}") from None
                    counts.read += checked.read
                    counts.quarantined += checked.rejected.num_rows
                    counts.consent_removed += checked.consent_removed
                    counts.timestamp_failures += _time_failures(checked.rejected, samples)
                    quarantine.write(path, checked.rejected)
                    valid = checked.valid
                    if valid.num_rows:
                        tag = pa.array(np.full(valid.num_rows, index, np.int32))
                        stage.write(valid.append_column(_FILE, tag))
                    report(progress, f"ingest {path.name}", batch.done, batch.total)
                if seen and not declared:
                    # JSON Lines: its keys are only known once it is read.
                    _check_sources(path, mapping, seen - set(RESERVED_COLUMNS))
                hint = _format_hint(path, counts, samples, timestamp_format)
                if hint:
                    result.hints.append(hint)
            added = stage.commit(returning=[_FILE], progress=progress, repeats_within=_FILE)
            for index, repeats in stage.repeats.items():
                result.files[str(files[index])].identical_rows = repeats
            conflicts = stage.conflicts
        if conflicts is not None and conflicts.num_rows:
            for index, records in sorted(_conflict_records(conflicts, files).items()):
                counts = result.files[str(files[index])]
                counts.conflicts += records.num_rows
                counts.quarantined += records.num_rows
                quarantine.write(files[index], records)
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
        result.conflicts += counts.conflicts
        result.identical_rows += counts.identical_rows
    result.quarantined_by_reason = dict(quarantine.by_reason)
    result.suppressed = screen.rows
    result.already_quarantined = quarantine.already
    return result


_TIME_FIELDS = frozenset({"event_timestamp", *ORDER_TIME_COLUMNS})
_TIME_RULES = ("unparseable_timestamp", "wrong_type")
_SAMPLE = 200


def _time_failures(rejected: pa.Table, samples: list[str]) -> int:
    """Rejected rows whose time field has the wrong format or type; keep a sample of values."""
    if not rejected.num_rows:
        return 0
    mask = pc.and_(
        pc.is_in(rejected.column("field"), pa.array(sorted(_TIME_FIELDS))),
        pc.is_in(rejected.column("rule"), pa.array(_TIME_RULES)),
    )
    failed = rejected.filter(mask)
    if len(samples) < _SAMPLE:
        values = failed.column("value").slice(0, _SAMPLE - len(samples)).to_pylist()
        samples.extend(v for v in values if v is not None)
    return failed.num_rows


def _format_hint(path: Path, counts: FileCounts, samples: list[str], fmt: str | None) -> str | None:
    """A suggestion of ``--timestamp-format`` when most of a file's timestamps failed."""
    if not counts.read or counts.timestamp_failures * 2 <= counts.read:
        return None
    failed = f"{path.name}: {counts.timestamp_failures:,} of {counts.read:,} timestamps rejected"
    failed += f" ({expected(fmt)}, e.g. {samples[0]!r})" if samples else f" ({expected(fmt)})"
    guesses = [g for g in guess_format(samples) if g != fmt]
    if not guesses:
        return f"{failed}; give their format with --timestamp-format (strptime codes)"
    also = f" (or {', '.join(repr(g) for g in guesses[1:])})" if len(guesses) > 1 else ""
    return f"{failed}; they look like --timestamp-format {guesses[0]!r}{also}"


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
