"""Timestamp formats of source files: the strict ISO default, a given format, a guess.

Without a format, text timestamps must be ISO 8601 (see :data:`ISO_SHAPE`), checked
by a regular expression before DuckDB parses them, because DuckDB's parser alone
also takes ``epoch``, ``infinity``, zone names and one-digit months. A format given
by the user is either strptime codes (``%Y%m%d``, ``%d/%m/%Y %H:%M``, read by
DuckDB's ``try_strptime``, vectorized) or one of :data:`EPOCH_FORMATS`, which read
text or numeric columns as seconds or milliseconds since 1970-01-01 UTC.
A numeric timestamp column is never read as epoch unless the format says which
unit: ``1706659200`` seconds and ``1706659200000`` milliseconds look alike to a
parser that guesses.

:func:`guess_format` looks at a sample of rejected values and names the format
they seem to have. It only suggests; nothing is ever parsed with a guessed format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

import duckdb

from propensity.events._readers import IngestError

__all__ = [
    "EPOCH_FORMATS",
    "ISO_EXPECTED",
    "ISO_SHAPE",
    "check_format",
    "expected",
    "guess_format",
    "number_sql",
    "text_sql",
]

#: Regular expression every text timestamp matches when no format is given.
ISO_SHAPE = r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-](0\d|1[0-4])(:?[0-5]\d)?)?)?"
ISO_EXPECTED = "ISO 8601 (YYYY-MM-DD[ HH:MM[:SS]][±HH:MM])"
#: Formats reading a number of seconds or milliseconds since 1970-01-01 UTC.
EPOCH_FORMATS: dict[str, int] = {"epoch_s": 1, "epoch_ms": 1_000}

# About ±200,000 years in seconds: inside DuckDB's timestamps, far from any
# plausible time, so a huge epoch value is rejected as implausible, not a crash.
_LIMIT_S = 200_000 * 365 * 86_400


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def check_format(fmt: str | None) -> None:
    """Reject a timestamp format DuckDB cannot use, naming it.

    Raises
    ------
    IngestError
        When ``fmt`` is empty, has no ``%`` code or an unknown one.

    Examples
    --------
    >>> check_format("%Y%m%d")
    >>> check_format("epoch_ms")
    >>> check_format("%Q")
    Traceback (most recent call last):
    ...
    propensity.events._readers.IngestError: timestamp format '%Q' is not usable: ...
    """
    if fmt is None or fmt in EPOCH_FORMATS:
        return
    if "%" not in fmt:
        raise IngestError(
            f"timestamp format {fmt!r} has no strptime code (such as %Y%m%d); "
            f"or use one of {', '.join(EPOCH_FORMATS)}"
        )
    con = duckdb.connect()
    try:
        con.execute("SELECT try_strptime('', ?)", [fmt])
    except duckdb.Error as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise IngestError(f"timestamp format {fmt!r} is not usable: {reason}") from None
    finally:
        con.close()


def expected(fmt: str | None) -> str:
    """What a timestamp was expected to look like, for a quarantine record's reason.

    Examples
    --------
    >>> expected(None)
    'expected ISO 8601 (YYYY-MM-DD[ HH:MM[:SS]][±HH:MM])'
    >>> expected("%Y%m%d")
    'expected %Y%m%d'
    """
    if fmt is None:
        return f"expected {ISO_EXPECTED}"
    if fmt in EPOCH_FORMATS:
        unit = "seconds" if fmt == "epoch_s" else "milliseconds"
        return f"expected {fmt} (a number of {unit} since 1970-01-01 UTC)"
    return f"expected {fmt}"


def _epoch(number: str, fmt: str) -> str:
    seconds = f"({number}) / {EPOCH_FORMATS[fmt]}"
    return (
        f"CASE WHEN isfinite({seconds}) "
        f"THEN to_timestamp(least(greatest({seconds}, -{_LIMIT_S}), {_LIMIT_S})) END"
    )


def text_sql(value: str, trimmed: str, fmt: str | None) -> str:
    """SQL reading a text column as ``TIMESTAMPTZ`` (null when it does not parse).

    ``value`` is the column, ``trimmed`` the column without surrounding
    whitespace. Naive results are read in the session's time zone.
    """
    if fmt is None:
        pattern = _lit(ISO_SHAPE)
        # The untrimmed value first: trimming every value costs more than the check.
        return (
            f"CASE WHEN regexp_full_match({value}, {pattern}) "
            f"THEN TRY_CAST({value} AS TIMESTAMPTZ) "
            f"WHEN regexp_full_match({trimmed}, {pattern}) "
            f"THEN TRY_CAST({trimmed} AS TIMESTAMPTZ) END"
        )
    if fmt in EPOCH_FORMATS:
        return _epoch(f"TRY_CAST({trimmed} AS DOUBLE)", fmt)
    # With %z the result is already aware; without, the cast reads it in the session zone.
    return f"CAST(try_strptime({trimmed}, {_lit(fmt)}) AS TIMESTAMPTZ)"


def number_sql(value: str, kind: str, fmt: str | None) -> str | None:
    """SQL reading an integer or float column as ``TIMESTAMPTZ``; None if ``fmt`` cannot.

    Epoch formats read both; strptime codes read an integer's digits (a
    Parquet column of ``20240131``); without a format a number is the wrong type.
    """
    if fmt is None:
        return None
    if fmt in EPOCH_FORMATS:
        return _epoch(f"CAST({value} AS DOUBLE)", fmt)
    if kind == "int":
        return f"CAST(try_strptime(CAST({value} AS VARCHAR), {_lit(fmt)}) AS TIMESTAMPTZ)"
    return None


_DATES = ("%Y%m%d", "%Y/%m/%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%Y-%m-%d")
_TIMES = ("", " %H:%M", " %H:%M:%S", "T%H:%M:%S", "%H%M%S")
_EPOCH_SHAPES = (
    ("epoch_s", re.compile(r"-?\d{9,11}(\.\d*)?")),
    ("epoch_ms", re.compile(r"-?\d{12,14}(\.\d*)?")),
)
_SAMPLE = 200


def _share(values: list[str], fmt: str) -> float:
    parsed = 0
    for text in values:
        try:
            datetime.strptime(text, fmt)
        except ValueError:
            continue
        parsed += 1
    return parsed / len(values)


def guess_format(values: Iterable[str | None], *, at_least: float = 0.9) -> list[str]:
    """Formats that read most of ``values``, best first; empty when none does.

    Only a suggestion for a hint: ``%d/%m/%Y`` and ``%m/%d/%Y`` both read
    ``01/02/2024``, so both are returned when the sample cannot tell them apart.

    Examples
    --------
    >>> guess_format(["20240131", "20240201"])
    ['%Y%m%d']
    >>> guess_format(["31/01/2024 10:00", "01/02/2024 11:30"])
    ['%d/%m/%Y %H:%M']
    >>> guess_format(["1706659200", "1706745600"])
    ['epoch_s']
    """
    sample = [v.strip() for v in values if v is not None and v.strip()][:_SAMPLE]
    if not sample:
        return []
    found = []
    for name, shape in _EPOCH_SHAPES:
        if sum(bool(shape.fullmatch(v)) for v in sample) >= at_least * len(sample):
            found.append(name)
    if found:
        return found
    for date in _DATES:
        for time in _TIMES:
            if time == "%H%M%S" and date != "%Y%m%d":
                continue
            if _share(sample, date + time) >= at_least:
                found.append(date + time)
    return found
