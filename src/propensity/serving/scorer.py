"""The scoring core: online features in, scores, actions and reasons out.

Pure Python and numpy (no web framework), so it is tested and benchmarked
in-process and the HTTP layer stays a thin shell. Everything it depends on
enters through three small interfaces:

* a :class:`FeatureReader` turns customer ids into a float64 matrix (NaN for
  a missing value, exactly as LightGBM saw it in training), the feature
  timestamps and a found mask;
* a :class:`ModelBundle` predicts probabilities and per-feature
  contributions from such a matrix (single-threaded online);
* an :class:`NBAPolicy` turns features into arbitrated decisions.

A :class:`Scorer` is immutable once built: hot reload builds a new one and
swaps the reference, so a request in flight finishes on the models it
started with.

Speed (``/score`` budget: 3 ms p50 including HTTP): one SQLite query per
request on a per-thread connection; LightGBM's single-row C path for every
one-row prediction (:mod:`propensity.serving.single_row`); batches are
scored with one call per model over all rows, split across cores by
:func:`predict_rows`; no pandas anywhere on the request path.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from propensity.models.attribution import PathAttribution
from propensity.serving.single_row import SingleRowPredictor

__all__ = [
    "FeatureBatch",
    "FeatureReader",
    "ModelBundle",
    "NBAPolicy",
    "BoosterBundle",
    "ReasonsMethod",
    "FeastOnlineReader",
    "SqliteOnlineReader",
    "entity_key_bytes",
    "predict_rows",
    "Scorer",
    "CHURN",
    "PURCHASE",
    "NBA",
]

CHURN = "churn"
PURCHASE = "purchase_propensity"
NBA = "next_best_action"
_TOP_REASONS = 3
#: From this many rows, LightGBM calls are split over every core.
MULTI_THREAD_ROWS = 64
#: Batches from this size run next-best-action in a thread beside the models.
_OVERLAP_ROWS = 64


@dataclass(frozen=True)
class FeatureBatch:
    """Online features of some customers, aligned with the requested ids.

    Attributes
    ----------
    matrix : ndarray, shape (n, n_features)
        float64; NaN where a value is missing (or the customer is unknown).
    timestamps : ndarray, shape (n,)
        Epoch seconds of the oldest feature row of each customer; NaN when none.
    found : ndarray of bool, shape (n,)
        The online store holds at least one feature row for the customer.
    stale : ndarray of bool, shape (n,)
        Some feature row is older than its feature view's TTL.
    """

    matrix: np.ndarray
    timestamps: np.ndarray
    found: np.ndarray
    stale: np.ndarray


@runtime_checkable
class FeatureReader(Protocol):
    """Reads online features; ``feature_names`` gives the matrix columns."""

    feature_names: list[str]

    def read(self, customer_ids: Sequence[str]) -> FeatureBatch: ...


@runtime_checkable
class ModelBundle(Protocol):
    """A fitted binary model ready to serve."""

    name: str
    version: str
    feature_names: list[str]

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    def contributions(self, X: np.ndarray) -> np.ndarray: ...

    def predict_with_contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class NBAPolicy(Protocol):
    """Next-best-action: features (columns ``feature_names``) to decisions.

    ``decide`` returns one dict per row with ``action``, ``expected_value``,
    ``reason``, ``holdout`` and ``alternatives`` (ranked dicts with
    ``action``, ``expected_value``, ``eligible``, ``reason``).
    """

    version: str
    feature_names: list[str]

    def decide(self, customer_ids: Sequence[str], X: np.ndarray) -> list[dict[str, Any]]: ...


_CORES = os.cpu_count() or 1  # read once: os.cpu_count() costs ~20 µs a call
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_CORES, thread_name_prefix="lightgbm")
        return _POOL


_POLICY_THREADS: ThreadPoolExecutor | None = None


_READ_THREADS: ThreadPoolExecutor | None = None


def _read_pool() -> ThreadPoolExecutor:
    """Threads that read online-store views in parallel, one SQLite connection each."""
    global _READ_THREADS
    with _POOL_LOCK:
        if _READ_THREADS is None:
            _READ_THREADS = ThreadPoolExecutor(_CORES, thread_name_prefix="sqlite")
        return _READ_THREADS


def _policy_thread() -> ThreadPoolExecutor:
    """Threads that run next-best-action beside the models (never LightGBM pool workers,
    since the policy itself submits to that pool)."""
    global _POLICY_THREADS
    with _POOL_LOCK:
        if _POLICY_THREADS is None:
            _POLICY_THREADS = ThreadPoolExecutor(_CORES, thread_name_prefix="policy")
        return _POLICY_THREADS


def predict_rows(
    fn: Callable[[np.ndarray, int], np.ndarray], X: np.ndarray, num_threads: int = 1
) -> np.ndarray:
    """Run ``fn(X, num_threads)`` once for small inputs, else over row chunks on every core.

    ``num_threads=0`` (all cores) on 64 rows or more splits the rows into
    one chunk per core, each predicted single-threaded on a shared thread
    pool (LightGBM releases the GIL). That beats LightGBM's own OpenMP
    threads on a busy machine, where their spin-waits lose whole time
    slices; results are identical, row by row.

    Examples
    --------
    >>> predict_rows(lambda X, t: X.sum(axis=1), np.ones((100, 2)), num_threads=0)[:2]
    array([2., 2.])
    """
    workers = _CORES
    if num_threads != 0 or len(X) < MULTI_THREAD_ROWS or workers == 1:
        return fn(X, num_threads)
    bounds = np.linspace(0, len(X), workers + 1).astype(int)
    parts = [X[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    return np.concatenate(list(_pool().map(lambda part: fn(part, 1), parts)))


#: How ``reasons`` are computed: path attribution (fast, the default) or TreeSHAP.
ReasonsMethod = Literal["path", "shap"]


class BoosterBundle:
    """Serve a fitted model exposing ``predict(X, num_threads)`` and ``booster_``.

    Wraps :class:`propensity.models.pipeline.CalibratedBooster` with a fixed
    thread count: one thread online, where LightGBM's thread start-up costs
    more than the prediction, all cores in bulk. One-row calls go through
    LightGBM's single-row C path.

    Parameters
    ----------
    name, version : str
        Registered model name and version.
    model : object
        The fitted estimator (``feature_names_``, ``booster_``,
        ``best_iteration_``, ``calibrator_``, ``predict`` and ``contributions``).
    num_threads : int
        LightGBM threads per call (0 = LightGBM's default, all cores).
    reasons : {"path", "shap"}
        ``contributions`` by path attribution
        (:class:`~propensity.models.attribution.PathAttribution`, about the
        cost of a prediction) or by TreeSHAP (exact Shapley values, ~50x
        slower on a 600-tree model).

    Examples
    --------
    >>> bundle = BoosterBundle("churn", "3", calibrated_booster)  # doctest: +SKIP
    >>> bundle.predict_proba(X[:1])  # doctest: +SKIP
    array([0.42])
    """

    def __init__(
        self,
        name: str,
        version: str,
        model: Any,
        num_threads: int = 1,
        reasons: ReasonsMethod = "path",
    ) -> None:
        if reasons not in ("path", "shap"):
            raise ValueError(f"reasons must be 'path' or 'shap', not {reasons!r}")
        self.name = name
        self.version = str(version)
        self.model = model
        self.num_threads = num_threads
        self.reasons = reasons
        self.feature_names: list[str] = [str(c) for c in model.feature_names_]
        booster, iteration = model.booster_, model.best_iteration_
        self._value_row = SingleRowPredictor(booster, iteration)
        if reasons == "path":
            self._attribution = PathAttribution(booster, iteration)
            self._contrib_row = SingleRowPredictor(booster, iteration, output="leaf")
        else:
            self._contrib_row = SingleRowPredictor(booster, iteration, output="contrib")

    def _threads(self, X: np.ndarray) -> int:
        # Thread start-up dominates small inputs; large batches gain from every core.
        return 0 if len(X) >= MULTI_THREAD_ROWS else self.num_threads

    def _predict(self, X: np.ndarray, num_threads: int) -> np.ndarray:
        if len(X) == 1 and num_threads == 1:
            raw = self._value_row(X[0])
            return np.clip(self.model.calibrator_.transform(raw), 0.0, 1.0)
        return np.asarray(self.model.predict(X, num_threads=num_threads), dtype=np.float64)

    def _contributions(self, X: np.ndarray, num_threads: int) -> np.ndarray:
        one_row = len(X) == 1 and num_threads == 1
        if self.reasons == "shap":
            if one_row:
                return self._contrib_row(X[0])[None, :]
            return np.asarray(self.model.contributions(X, num_threads=num_threads))
        leaves = self._contrib_row(X[0]) if one_row else self._attribution.leaves(X, num_threads)
        return self._attribution.from_leaves(leaves)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated P(y=1), shape (n,)."""
        return predict_rows(self._predict, X, self._threads(X))

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Per-feature log-odds contributions plus the bias column, shape (n, f + 1)."""
        return predict_rows(self._contributions, X, self._threads(X))

    def predict_with_contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``predict_proba`` and ``contributions`` together.

        With path attribution the probability follows from the contributions
        (they add up to the raw score), so the trees are walked once.
        """
        contributions = self.contributions(X)
        if self.reasons != "path" or self._attribution.sigmoid is None:
            return self.predict_proba(X), contributions
        p = self._attribution.probability(contributions)
        return np.clip(self.model.calibrator_.transform(p), 0.0, 1.0), contributions

    def with_threads(self, num_threads: int) -> BoosterBundle:
        """The same model with another thread count (bulk scoring uses all cores)."""
        bundle = copy.copy(self)  # shares the model and its tabulated attribution
        bundle.num_threads = num_threads
        return bundle


def _proto_value(value: Any) -> float:
    kind = value.WhichOneof("val")
    if kind is None:
        return math.nan
    raw = getattr(value, kind)
    try:
        return float(raw)
    except (TypeError, ValueError):
        return math.nan


def _feature_names(
    feature_refs: Sequence[str], derived: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """Served feature names (``view:name`` refs stripped) and the matrix columns.

    Derived (request-time) features not served by a view come last.
    """
    base = [ref.split(":", 1)[1] for ref in feature_refs]
    dupes = sorted({n for n in base if base.count(n) > 1})
    if dupes:
        raise ValueError(f"feature names {dupes} appear in more than one view")
    return base, base + [n for n in derived if n not in base]


class FeastOnlineReader:
    """Read features from a Feast store's online store in one call.

    The store is passed in (it is opened by the feature-store adapter, the
    only module importing Feast); this class relies only on
    ``get_online_features`` and the response proto. Features are matched by
    name (Feast does not keep the requested order), values that are null or
    absent become NaN, and ``stale`` compares each feature row's timestamp
    with its view's TTL.

    Parameters
    ----------
    store : feast.FeatureStore
        An open store.
    feature_refs : list of str
        ``"view:feature"`` references; feature names must be unique.
    ttls : mapping of view name to seconds, optional
        TTL of each view (0 or missing: never stale).
    entity_key : str
        The join key.
    derived : mapping of name to callable, optional
        Features computed at request time from the others (on-demand
        features), ``fn(columns: dict[str, ndarray], now: float) -> ndarray``.
    clock : callable
        Returns the current epoch seconds (injectable for tests).

    Examples
    --------
    >>> reader = FeastOnlineReader(store, ["session:sessions_7d"])  # doctest: +SKIP
    >>> reader.read(["C0000001"]).matrix.shape  # doctest: +SKIP
    (1, 1)
    """

    def __init__(
        self,
        store: Any,
        feature_refs: Sequence[str],
        *,
        ttls: Mapping[str, float] | None = None,
        entity_key: str = "customer_id",
        derived: Mapping[str, Callable[[dict[str, np.ndarray], float], np.ndarray]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.feature_refs = list(feature_refs)
        self.entity_key = entity_key
        self.derived = dict(derived or {})
        self.clock = clock
        base, self.feature_names = _feature_names(self.feature_refs, self.derived)
        self._column = {name: j for j, name in enumerate(self.feature_names)}
        views = [ref.split(":", 1)[0] for ref in self.feature_refs]
        # Per feature: the TTL of its view (inf when none), so staleness is one vector op.
        self._ttl_by_name = {
            name: float((ttls or {}).get(view) or math.inf)
            for name, view in zip(base, views, strict=True)
        }

    def read(self, customer_ids: Sequence[str]) -> FeatureBatch:
        ids = list(customer_ids)
        n = len(ids)
        matrix = np.full((n, len(self.feature_names)), np.nan)
        oldest = np.full(n, np.inf)
        found = np.zeros(n, dtype=bool)
        stale = np.zeros(n, dtype=bool)
        now = self.clock()
        response = self.store.get_online_features(
            features=self.feature_refs, entity_rows={self.entity_key: ids}
        )
        proto = response.proto
        for name, vector in zip(proto.metadata.feature_names.val, proto.results, strict=True):
            j = self._column.get(name)
            if j is None or name in self.derived:
                continue
            ttl = self._ttl_by_name.get(name, math.inf)
            column = matrix[:, j]
            for i, (value, stamp) in enumerate(
                zip(vector.values, vector.event_timestamps, strict=True)
            ):
                column[i] = _proto_value(value)
                seconds = stamp.seconds
                if seconds:
                    found[i] = True
                    if seconds < oldest[i]:
                        oldest[i] = seconds
                    if now - seconds > ttl:
                        stale[i] = True
        if self.derived:
            columns = {name: matrix[:, j] for name, j in self._column.items()}
            for name, fn in self.derived.items():
                matrix[:, self._column[name]] = fn(columns, now)
        timestamps = np.where(np.isfinite(oldest), oldest, np.nan)
        return FeatureBatch(matrix=matrix, timestamps=timestamps, found=found, stale=stale)


def entity_key_bytes(name: str, value: str) -> bytes:
    """Feast's serialized entity key (version 3) of one string join key.

    Examples
    --------
    >>> entity_key_bytes("customer_id", "C1")[:4]
    b'\\x01\\x00\\x00\\x00'
    """
    # Layout: key count, then per key (type STRING=2, length, name), then per value
    # (type STRING=2, length, bytes); all little-endian uint32.
    key = name.encode("utf8")
    raw = value.encode("utf8")
    return struct.pack("<III", 1, 2, len(key)) + key + struct.pack("<II", 2, len(raw)) + raw


_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")


def _decode_value(blob: bytes, feature: str) -> float:
    """A Feast ``ValueProto`` holding one number, without protobuf."""
    if not blob:
        return math.nan  # the empty message: a null (or NaN) value
    tag = blob[0]
    if tag == 0x29 and len(blob) == 9:  # double_val
        return float(_DOUBLE.unpack_from(blob, 1)[0])
    if tag == 0x35 and len(blob) == 5:  # float_val
        return float(_FLOAT.unpack_from(blob, 1)[0])
    if tag in (0x18, 0x20, 0x38):  # int32 / int64 / bool varints
        result, shift = 0, 0
        for byte in blob[1:]:
            result |= (byte & 0x7F) << shift
            shift += 7
        if result >= 1 << 63:
            result -= 1 << 64
        return float(result)
    raise ValueError(f"feature {feature!r}: online value of protobuf tag {tag:#x} is not numeric")


_DOUBLE_RECORD = np.dtype([("tag", "u1"), ("value", "<f8")])
_DOUBLE_TAG = 0x29
_NAN_HEX = "29" + struct.pack("<d", math.nan).hex().upper()
#: Batches from this size read one row per view, views in parallel, instead of one per value.
_GROUPED_ROWS = 16
#: How much of the online store each reader connection maps into memory.
_MMAP_BYTES = 1 << 30


def _decode_values(blobs: Sequence[bytes], features: Sequence[str]) -> np.ndarray:
    """Decode many ``ValueProto`` blobs; doubles (the common case) in one numpy pass."""
    count = len(blobs)
    lengths = np.fromiter(map(len, blobs), dtype=np.intp, count=count)
    doubles = lengths == 9
    values = np.full(count, np.nan)
    if doubles.any():
        packed = b"".join(itertools.compress(blobs, doubles.tolist()))
        records = np.frombuffer(packed, dtype=_DOUBLE_RECORD)
        values[doubles] = records["value"]
        doubles[np.flatnonzero(doubles)[records["tag"] != _DOUBLE_TAG]] = False
    # Everything else (nulls, floats, ints, a 9-byte varint) takes the general decoder.
    for k in np.flatnonzero(~doubles).tolist():
        values[k] = _decode_value(blobs[k], features[k])
    return values


@dataclass(frozen=True)
class _ViewValues:
    """One view's served values for a batch, parsed, as requested-row positions."""

    rows: np.ndarray
    columns: np.ndarray
    values: np.ndarray
    stamped: np.ndarray  # requested rows with a served timestamp in this view
    seconds: np.ndarray  # the oldest such timestamp of each
    retry: np.ndarray  # requested rows to re-read value by value

    @classmethod
    def retry_all(cls, rows: np.ndarray) -> _ViewValues:
        empty = rows[:0]
        return cls(empty, empty, np.zeros(0), empty, np.zeros(0), rows)


class SqliteOnlineReader:
    """Read features straight from a Feast SQLite online store.

    Reads the layout Feast's SQLite store (and the project's bulk writer)
    uses: one table ``<project>_<view>`` with a row per (entity key,
    feature). Feast's own reader issues one query per view and converts
    every timestamp in Python, which costs more than the whole HTTP request;
    this reader answers a few customers with one ``UNION ALL`` query. From
    16 customers on, each view is one query returning one row (the view's
    values for the whole batch, concatenated), the views run in parallel on
    read threads with their own connections, and numpy parses each result
    in a few calls (Python objects per value were most of a 1,000-customer
    read). Connections map the database into memory.

    Parameters
    ----------
    path : path
        The SQLite database.
    feature_refs : list of str
        ``"view:feature"`` references; feature names must be unique.
    project : str
        Feast project (table prefix).
    ttls, entity_key, derived, clock
        As in :class:`FeastOnlineReader`.

    Examples
    --------
    >>> reader = SqliteOnlineReader("online_store.db", ["session:sessions_7d"])  # doctest: +SKIP
    >>> reader.read(["C0000001"]).matrix.shape  # doctest: +SKIP
    (1, 1)
    """

    def __init__(
        self,
        path: Any,
        feature_refs: Sequence[str],
        *,
        project: str = "propensity",
        ttls: Mapping[str, float] | None = None,
        entity_key: str = "customer_id",
        derived: Mapping[str, Callable[[dict[str, np.ndarray], float], np.ndarray]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.feature_refs = list(feature_refs)
        self.entity_key = entity_key
        self.derived = dict(derived or {})
        self.clock = clock
        _, self.feature_names = _feature_names(self.feature_refs, self.derived)
        self._column = {name: j for j, name in enumerate(self.feature_names)}
        views = list(dict.fromkeys(ref.split(":", 1)[0] for ref in self.feature_refs))
        self._views = views
        self._ttl = [float((ttls or {}).get(v) or math.inf) for v in views]
        self._tables = [f"{project}_{v}" for v in views]
        self._local = threading.local()
        self._sql_cache: dict[int, str] = {}
        # Grouped reads split feature-name lists on commas.
        self._groupable = not any("," in r for r in self.feature_refs)
        self._names_sql = [
            ",".join(
                "'" + r.split(":", 1)[1].replace("'", "''") + "'"
                for r in self.feature_refs
                if r.split(":", 1)[0] == v
            )
            for v in views
        ]
        # View index of each served column, and -1 last, for features nobody asked for.
        view_index = {v: k for k, v in enumerate(views)}
        by_name = {r.split(":", 1)[1]: view_index[r.split(":", 1)[0]] for r in self.feature_refs}
        self._view_of_column = np.array(
            [by_name.get(name, -2) for name in self.feature_names] + [-1], dtype=np.intp
        )
        # Per view, the matrix column of each feature it serves.
        self._view_columns = [
            {
                r.split(":", 1)[1]: self._column[r.split(":", 1)[1]]
                for r in self.feature_refs
                if r.split(":", 1)[0] == v
            }
            for v in views
        ]

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Read-only, one connection per thread; the writer uses WAL, so reads never block.
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            # Pages read through a memory map skip a system call and a copy each.
            conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            existing = {
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            missing = [t for t in self._tables if t not in existing]
            if missing:
                conn.close()
                raise LookupError(
                    f"online store {self.path} has no table(s) {missing}; "
                    "materialize features first"
                )
            self._local.conn = conn
        return conn

    def _lookup(self, name: str) -> int:
        return self._column.get(name, -1)

    def _fill(
        self,
        rows: list[tuple[Any, ...]],
        row_of: dict[bytes, int],
        matrix: np.ndarray,
        oldest: np.ndarray,
        found: np.ndarray,
        stale: np.ndarray,
        now: float,
    ) -> None:
        """Scatter the fetched (view, key, feature, value, timestamp) rows, vectorized."""
        views, keys, features, blobs, stamps = zip(*rows, strict=True)
        count = len(rows)
        view = np.fromiter(views, dtype=np.intp, count=count)
        j = np.fromiter(map(self._lookup, features), dtype=np.intp, count=count)
        wanted = self._view_of_column[j] == view  # j = -1 (not served) maps to view -1
        if not wanted.all():
            keep = wanted.tolist()
            keys, features, blobs, stamps = (
                tuple(itertools.compress(c, keep)) for c in (keys, features, blobs, stamps)
            )
            view, j, count = view[wanted], j[wanted], int(wanted.sum())
            if not count:
                return
        i = np.fromiter(map(row_of.__getitem__, keys), dtype=np.intp, count=count)
        matrix[i, j] = _decode_values(blobs, features)
        seconds = np.array(stamps, dtype=np.float64)  # None (no timestamp) becomes NaN
        found[i] = True
        np.minimum.at(oldest, i, np.where(np.isnan(seconds), np.inf, seconds))
        ttl = np.asarray(self._ttl)[view]
        with np.errstate(invalid="ignore"):
            stale[i[(now - seconds) > ttl]] = True

    def _view_sql(self, view: int, n_keys: int, per_customer: bool = False) -> str:
        """One row for a whole view: its values for every requested customer, concatenated.

        SQLite then steps once per view with the GIL released (sqlite3 retakes
        it per row returned, and grouping per customer costs more than the
        read). All concatenations of one aggregate visit the rows in the same
        order, so the requested row, feature name and value blob (an empty
        one, Feast's null, as a NaN double) of every stored value line up.
        Timestamps come back as their range and count over all the view's
        rows, cheaper than testing each feature name; ``per_customer`` asks
        instead for each customer's oldest served timestamp, for views whose
        rows differ.
        """
        requested = ",".join(f"({i},?)" for i in range(n_keys))
        joined = f'FROM requested JOIN "{self._tables[view]}" ON entity_key = requested.key'
        if per_customer:
            stamp = f"CASE WHEN feature_name IN ({self._names_sql[view]}) THEN event_ts END"
            selected = f"requested.row, min({stamp}) {joined} GROUP BY requested.row"
        else:
            value = f"CASE WHEN length(value) = 0 THEN x'{_NAN_HEX}' ELSE value END"
            selected = (
                "group_concat(requested.row), group_concat(feature_name), "
                f"CAST(group_concat({value}, '') AS BLOB), "
                f"min(event_ts), max(event_ts), count(event_ts) {joined}"
            )
        return f"WITH requested(row, key) AS (VALUES {requested}) SELECT {selected}"

    def _read_view(self, view: int, keys: list[bytes]) -> _ViewValues | None:
        """Fetch and parse one view for many customers; runs on a read thread."""
        conn = self._connection()
        rows_csv, names_csv, blob, first, last, dated = conn.execute(
            self._view_sql(view, len(keys)), keys
        ).fetchone()
        if rows_csv is None:
            return None  # nobody in the batch has this view
        rows = np.fromstring(rows_csv, dtype=np.intp, sep=",")
        names = names_csv.split(",")
        columns = np.fromiter(
            map(self._view_columns[view].get, names, itertools.repeat(-1)),
            dtype=np.intp,
            count=len(names),
        )
        # A feature name holding a comma, or a value other than a double, breaks the
        # alignment of names and values: then the customers are re-read value by value.
        if len(columns) != len(rows) or len(blob) != _DOUBLE_RECORD.itemsize * len(rows):
            return _ViewValues.retry_all(np.unique(rows))
        records = np.frombuffer(blob, dtype=_DOUBLE_RECORD)
        served = columns >= 0
        retry = np.unique(rows[records["tag"] != _DOUBLE_TAG])
        if len(retry):
            served &= ~np.isin(rows, retry)
        if first is not None and first == last and dated == len(rows):
            stamped = np.unique(rows[columns >= 0])  # one snapshot: every customer shares it
            seconds = np.full(len(stamped), float(first))
        else:
            oldest = [
                (row, float(ts))
                for row, ts in conn.execute(self._view_sql(view, len(keys), True), keys)
                if ts is not None
            ]
            stamped = np.array([row for row, _ in oldest], dtype=np.intp)
            seconds = np.array([ts for _, ts in oldest], dtype=np.float64)
        return _ViewValues(
            rows[served], columns[served], records["value"][served], stamped, seconds, retry
        )

    def _read_grouped(
        self,
        keys: list[bytes],
        matrix: np.ndarray,
        oldest: np.ndarray,
        found: np.ndarray,
        stale: np.ndarray,
        now: float,
    ) -> list[bytes]:
        """Read many customers with one query per view, views in parallel; returns keys to re-read.

        Each view is one SQLite step on a read thread's own connection, and
        Python parses its result with a few numpy calls, never per value.
        Customers holding a value that is not a double (or null) are re-read
        value by value, which is idempotent for the parts already written.
        """
        retry: set[int] = set()
        views = range(len(self._tables))
        for view, part in zip(
            views, _read_pool().map(lambda v: self._read_view(v, keys), views), strict=True
        ):
            if part is None:
                continue
            matrix[part.rows, part.columns] = part.values
            found[part.rows] = True
            np.minimum.at(oldest, part.stamped, part.seconds)
            stale[part.stamped[(now - part.seconds) > self._ttl[view]]] = True
            retry.update(part.retry.tolist())
        return [keys[i] for i in sorted(retry)]

    def _sql(self, n_keys: int) -> str:
        cached = self._sql_cache.get(n_keys)
        if cached is not None:
            return cached
        marks = ",".join("?" * n_keys)
        # No feature_name filter in SQL: it makes SQLite probe the primary key per
        # (key, feature) pair, 1.6x slower than reading the key's rows; unwanted
        # features are dropped in _fill.
        parts = [
            f'SELECT {k}, entity_key, feature_name, value, event_ts FROM "{table}" '
            f"WHERE entity_key IN ({marks})"
            for k, table in enumerate(self._tables)
        ]
        sql = " UNION ALL ".join(parts)
        if n_keys <= 8:  # the same text each call lets sqlite3 reuse its prepared statement
            self._sql_cache[n_keys] = sql
        return sql

    def read(self, customer_ids: Sequence[str]) -> FeatureBatch:
        ids = [str(c) for c in customer_ids]
        unique = list(dict.fromkeys(ids))
        keys = [entity_key_bytes(self.entity_key, c) for c in unique]
        row_of = {key: i for i, key in enumerate(keys)}
        n = len(unique)
        matrix = np.full((n, len(self.feature_names)), np.nan)
        oldest = np.full(n, np.inf)
        found = np.zeros(n, dtype=bool)
        stale = np.zeros(n, dtype=bool)
        now = self.clock()
        if n >= _GROUPED_ROWS and self._groupable:
            retry = self._read_grouped(keys, matrix, oldest, found, stale, now)
            if retry:
                params = retry * len(self._tables)
                again = self._connection().execute(self._sql(len(retry)), params).fetchall()
                self._fill(again, row_of, matrix, oldest, found, stale, now)
        elif n:
            rows = self._connection().execute(self._sql(n), keys * len(self._tables)).fetchall()
            if rows:
                self._fill(rows, row_of, matrix, oldest, found, stale, now)
        if self.derived and n:
            columns = {name: matrix[:, j] for name, j in self._column.items()}
            for name, fn in self.derived.items():
                matrix[:, self._column[name]] = fn(columns, now)
        timestamps = np.where(np.isfinite(oldest), oldest, np.nan)
        batch = FeatureBatch(matrix=matrix, timestamps=timestamps, found=found, stale=stale)
        if len(unique) == len(ids):
            return batch
        index = np.array([row_of[entity_key_bytes(self.entity_key, c)] for c in ids], dtype=np.intp)
        return FeatureBatch(
            matrix=matrix[index],
            timestamps=timestamps[index],
            found=found[index],
            stale=stale[index],
        )


def _iso(seconds: float) -> str | None:
    if not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def _reasons(
    contributions: np.ndarray, values: np.ndarray, names: list[str]
) -> list[list[dict[str, Any]]]:
    """Top contributions of every row, largest magnitude first (ties: feature order)."""
    # The last column is the bias (expected value), not a feature.
    per_feature = contributions[:, :-1]
    k = min(_TOP_REASONS, per_feature.shape[1])
    top = np.argsort(-np.abs(per_feature), axis=1, kind="stable")[:, :k]
    rows = np.arange(len(per_feature))[:, None]
    picked = per_feature[rows, top].tolist()
    picked_values = values[rows, top].tolist()
    out = []
    for js, cs, vs in zip(top.tolist(), picked, picked_values, strict=True):
        out.append(
            [
                {
                    "feature": names[j],
                    "value": None if v != v else v,  # NaN is the only value unequal to itself
                    "contribution": c,
                    "direction": "increases" if c >= 0 else "decreases",
                }
                for j, c, v in zip(js, cs, vs, strict=True)
            ]
        )
    return out


def _missing_names(matrix: np.ndarray, names: list[str]) -> list[list[str]]:
    """Names of the NaN columns of every row, from one pass over the matrix."""
    out: list[list[str]] = [[] for _ in range(len(matrix))]
    rows, columns = np.nonzero(np.isnan(matrix))
    for i, j in zip(rows.tolist(), columns.tolist(), strict=True):
        out[i].append(names[j])
    return out


@dataclass
class Scorer:
    """All online scores for a batch of customers.

    Parameters
    ----------
    reader : FeatureReader
        Online features; must cover every model's ``feature_names``.
    churn, purchase : ModelBundle
    policy : NBAPolicy, optional
        Next-best-action; ``None`` serves scores without an action.

    Examples
    --------
    >>> scorer = Scorer(reader, churn_bundle, purchase_bundle, policy)  # doctest: +SKIP
    >>> scorer.score(["C0000001"])[0]["churn_probability"]  # doctest: +SKIP
    0.31
    """

    reader: FeatureReader
    churn: ModelBundle
    purchase: ModelBundle
    policy: NBAPolicy | None = None
    _columns: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        available = {name: j for j, name in enumerate(self.reader.feature_names)}
        self._columns = {}
        parts: list[tuple[str, list[str]]] = [
            (self.churn.name, self.churn.feature_names),
            (self.purchase.name, self.purchase.feature_names),
        ]
        if self.policy is not None:
            parts.append((NBA, self.policy.feature_names))
        for name, features in parts:
            missing = [f for f in features if f not in available]
            if missing:
                raise ValueError(
                    f"model {name!r} needs features {missing} that the online reader does not serve"
                )
            self._columns[name] = np.array([available[f] for f in features], dtype=np.intp)

    @property
    def versions(self) -> dict[str, str]:
        """Registered version of every model served."""
        out = {self.churn.name: self.churn.version, self.purchase.name: self.purchase.version}
        if self.policy is not None:
            out[NBA] = self.policy.version
        return out

    def _model_input(self, name: str, matrix: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(matrix[:, self._columns[name]])

    def score(
        self, customer_ids: Sequence[str], reasons: bool = True
    ) -> list[dict[str, Any] | None]:
        """Score customers; ``None`` for a customer the online store does not know.

        Everything is computed once per batch: one LightGBM call per model
        (probabilities and contributions for the reasons together), one
        policy call. ``reasons=False`` skips the contributions and returns
        empty ``reasons``.

        Returns
        -------
        list
            One :class:`propensity.serving.schemas.ScoreResponse`-shaped dict
            (or ``None``) per id, in request order.
        """
        ids = list(customer_ids)
        batch = self.reader.read(ids)
        rows = np.flatnonzero(batch.found)
        out: list[dict[str, Any] | None] = [None] * len(ids)
        if rows.size == 0:
            return out
        matrix = batch.matrix if rows.size == len(ids) else batch.matrix[rows]
        decisions: list[dict[str, Any] | None] = [None] * len(rows)
        pending: Future[list[dict[str, Any]]] | None = None
        if self.policy is not None:
            known = [ids[i] for i in rows.tolist()]
            X_policy = self._model_input(NBA, matrix)
            if len(rows) >= _OVERLAP_ROWS:
                # The policy's arbitration is Python (it holds the GIL) while the models
                # below run in LightGBM (which releases it): overlapping them keeps both
                # cores busy. One row is faster without the hand-off.
                pending = _policy_thread().submit(self.policy.decide, known, X_policy)
            else:
                decisions = list(self.policy.decide(known, X_policy))
        scores: dict[str, list[float]] = {}
        top: dict[str, list[list[dict[str, Any]]]] = {}
        for bundle in (self.churn, self.purchase):
            X = self._model_input(bundle.name, matrix)
            if reasons:
                proba, contributions = bundle.predict_with_contributions(X)
                top[bundle.name] = _reasons(contributions, X, bundle.feature_names)
            else:
                proba = bundle.predict_proba(X)
            scores[bundle.name] = np.clip(proba, 0.0, 1.0).tolist()
        if pending is not None:
            decisions = list(pending.result())
        versions = self.versions
        missing = _missing_names(matrix, self.reader.feature_names)
        stamps: dict[float, str | None] = {}  # rows of one snapshot share a timestamp
        churn, purchase = scores[self.churn.name], scores[self.purchase.name]
        churn_name, purchase_name = self.churn.name, self.purchase.name
        churn_reasons = top.get(churn_name, [])
        purchase_reasons = top.get(purchase_name, [])
        timestamps = batch.timestamps[rows].tolist()
        stale = batch.stale[rows].tolist()
        for k, i in enumerate(rows.tolist()):
            stamp = timestamps[k]
            iso = stamps.get(stamp)
            if iso is None:
                iso = stamps[stamp] = _iso(stamp)
            out[i] = {
                "customer_id": ids[i],
                "churn_probability": churn[k],
                "purchase_propensity": purchase[k],
                "next_best_action": decisions[k],
                "reasons": (
                    {churn_name: churn_reasons[k], purchase_name: purchase_reasons[k]}
                    if reasons
                    else {}
                ),
                "model_versions": versions,
                "features_timestamp": iso,
                "stale": stale[k],
                "missing_features": missing[k],
            }
        return out
