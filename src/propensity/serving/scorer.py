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
"""

from __future__ import annotations

import math
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "FeatureBatch",
    "FeatureReader",
    "ModelBundle",
    "NBAPolicy",
    "BoosterBundle",
    "FeastOnlineReader",
    "SqliteOnlineReader",
    "entity_key_bytes",
    "Scorer",
    "CHURN",
    "PURCHASE",
    "NBA",
]

CHURN = "churn"
PURCHASE = "purchase_propensity"
NBA = "next_best_action"
_TOP_REASONS = 3
_MULTI_THREAD_ROWS = 64


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


class BoosterBundle:
    """Serve a fitted model exposing ``predict(X, num_threads)`` and ``contributions``.

    Wraps :class:`propensity.models.pipeline.CalibratedBooster` (or anything with
    the same two methods and ``feature_names_``) with a fixed thread count:
    one thread online, where LightGBM's thread start-up costs more than the
    prediction, all cores in bulk.

    Parameters
    ----------
    name, version : str
        Registered model name and version.
    model : object
        The fitted estimator.
    num_threads : int
        LightGBM threads per call (0 = LightGBM's default, all cores).

    Examples
    --------
    >>> bundle = BoosterBundle("churn", "3", calibrated_booster)  # doctest: +SKIP
    >>> bundle.predict_proba(X[:1])  # doctest: +SKIP
    array([0.42])
    """

    def __init__(self, name: str, version: str, model: Any, num_threads: int = 1) -> None:
        self.name = name
        self.version = str(version)
        self.model = model
        self.num_threads = num_threads
        self.feature_names: list[str] = [str(c) for c in model.feature_names_]

    def _threads(self, X: np.ndarray) -> int:
        # Thread start-up dominates small inputs; large batches gain from every core.
        return 0 if len(X) >= _MULTI_THREAD_ROWS else self.num_threads

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated P(y=1), shape (n,)."""
        return np.asarray(self.model.predict(X, num_threads=self._threads(X)), dtype=np.float64)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Per-feature log-odds contributions plus the bias column, shape (n, f + 1)."""
        return np.asarray(self.model.contributions(X, num_threads=self._threads(X)))

    def with_threads(self, num_threads: int) -> BoosterBundle:
        """The same model with another thread count (bulk scoring uses all cores)."""
        return BoosterBundle(self.name, self.version, self.model, num_threads)


def _proto_value(value: Any) -> float:
    kind = value.WhichOneof("val")
    if kind is None:
        return math.nan
    raw = getattr(value, kind)
    try:
        return float(raw)
    except (TypeError, ValueError):
        return math.nan


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
        base = [ref.split(":", 1)[1] for ref in self.feature_refs]
        dupes = sorted({n for n in base if base.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names {dupes} appear in more than one view")
        self.feature_names: list[str] = base + [n for n in self.derived if n not in base]
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


class SqliteOnlineReader:
    """Read features straight from a Feast SQLite online store, one query per call.

    Reads the layout Feast's SQLite store (and the project's bulk writer)
    uses: one table ``<project>_<view>`` with a row per (entity key,
    feature). Feast's own reader issues one query per view and converts
    every timestamp in Python, which costs more than the whole HTTP request;
    this reader answers the same values with one ``UNION ALL`` query.

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
        base = [ref.split(":", 1)[1] for ref in self.feature_refs]
        dupes = sorted({n for n in base if base.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names {dupes} appear in more than one view")
        self.feature_names: list[str] = base + [n for n in self.derived if n not in base]
        self._column = {name: j for j, name in enumerate(self.feature_names)}
        views = list(dict.fromkeys(ref.split(":", 1)[0] for ref in self.feature_refs))
        self._views = views
        self._ttl = [float((ttls or {}).get(v) or math.inf) for v in views]
        self._tables = [f"{project}_{v}" for v in views]
        self._local = threading.local()
        # Features of a view that no model reads are filtered in SQL, not in Python.
        self._wanted = {
            v: [r.split(":", 1)[1] for r in self.feature_refs if r.split(":", 1)[0] == v]
            for v in views
        }

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Read-only, one connection per thread; the writer uses WAL, so reads never block.
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
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

    def _sql(self, n_keys: int) -> str:
        marks = ",".join("?" * n_keys)
        parts = []
        for k, (table, view) in enumerate(zip(self._tables, self._views, strict=True)):
            names = ",".join("'" + n.replace("'", "''") + "'" for n in self._wanted[view])
            parts.append(
                f'SELECT {k}, entity_key, feature_name, value, event_ts FROM "{table}" '
                f"WHERE entity_key IN ({marks}) AND feature_name IN ({names})"
            )
        return " UNION ALL ".join(parts)

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
        if n:
            conn = self._connection()
            rows = conn.execute(self._sql(n), keys * len(self._tables)).fetchall()
            column = self._column
            ttl = self._ttl
            for view, key, feature, blob, stamp in rows:
                i = row_of[key]
                matrix[i, column[feature]] = _decode_value(blob, feature)
                seconds = float(stamp) if stamp is not None else math.nan
                found[i] = True
                if seconds < oldest[i]:
                    oldest[i] = seconds
                if now - seconds > ttl[view]:
                    stale[i] = True
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
) -> list[dict[str, Any]]:
    # The last column is the bias (expected value), not a feature.
    per_feature = contributions[:-1]
    top = np.argsort(-np.abs(per_feature), kind="stable")[:_TOP_REASONS]
    out = []
    for j in top:
        c = float(per_feature[j])
        v = float(values[j])
        out.append(
            {
                "feature": names[j],
                "value": None if math.isnan(v) else v,
                "contribution": c,
                "direction": "increases" if c >= 0 else "decreases",
            }
        )
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

    def score(self, customer_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Score customers; ``None`` for a customer the online store does not know.

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
        matrix = batch.matrix[rows]
        known = [ids[i] for i in rows]
        scores: dict[str, np.ndarray] = {}
        reasons: dict[str, list[list[dict[str, Any]]]] = {}
        for bundle in (self.churn, self.purchase):
            X = self._model_input(bundle.name, matrix)
            scores[bundle.name] = np.clip(bundle.predict_proba(X), 0.0, 1.0)
            contrib = bundle.contributions(X)
            reasons[bundle.name] = [
                _reasons(contrib[k], X[k], bundle.feature_names) for k in range(len(rows))
            ]
        decisions: list[dict[str, Any] | None] = [None] * len(rows)
        if self.policy is not None:
            decisions = list(self.policy.decide(known, self._model_input(NBA, matrix)))
        versions = self.versions
        missing_names = np.asarray(self.reader.feature_names, dtype=object)
        for k, i in enumerate(rows):
            absent = np.isnan(batch.matrix[i])
            out[i] = {
                "customer_id": ids[i],
                "churn_probability": float(scores[self.churn.name][k]),
                "purchase_propensity": float(scores[self.purchase.name][k]),
                "next_best_action": decisions[k],
                "reasons": {name: reasons[name][k] for name in reasons},
                "model_versions": versions,
                "features_timestamp": _iso(float(batch.timestamps[i])),
                "stale": bool(batch.stale[i]),
                "missing_features": missing_names[absent].tolist() if absent.any() else [],
            }
        return out
