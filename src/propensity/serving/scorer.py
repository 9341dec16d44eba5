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
request (:mod:`propensity.serving.online`); the models compiled to native code
when they were loaded (:mod:`propensity.models._compiled`), else LightGBM's
single-row C path for every one-row prediction (:mod:`propensity.models._lightgbm`);
the leaves the reasons are tabulated by from the compiled leaf model
(:func:`~propensity.models._compiled.compile_leaves`, else LightGBM); batches are
scored with one call per model over all rows, split across cores by
:func:`predict_rows`; no pandas anywhere on the request path.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from propensity.features.online import OnlineRows
from propensity.models._lightgbm import SingleRowPredictor
from propensity.models.attribution import PathAttribution

__all__ = [
    "FeatureReader",
    "ModelBundle",
    "NBAPolicy",
    "BoosterBundle",
    "ReasonsMethod",
    "predict_rows",
    "thread_pool",
    "Scorer",
    "ScoredBatch",
    "iso_timestamp",
    "CHURN",
    "PURCHASE",
    "PURCHASE_24H",
    "NBA",
    "SCORE_FIELDS",
]

CHURN = "churn"
PURCHASE = "purchase_propensity"
PURCHASE_24H = "purchase_24h"
NBA = "next_best_action"
#: The binary models a response carries and the field of each. Churn and purchase
#: are always served; the 24-hour purchase model when it has a champion (else null).
SCORE_FIELDS: dict[str, str] = {
    CHURN: "churn_probability",
    PURCHASE: "purchase_propensity",
    PURCHASE_24H: "purchase_24h_probability",
}
_TOP_REASONS = 3
#: From this many rows, LightGBM calls are split over every core.
MULTI_THREAD_ROWS = 64
#: Batches from this size run next-best-action in a thread beside the models.
_OVERLAP_ROWS = 64


class FeatureReader(Protocol):
    """Reads online features; ``feature_names`` gives the matrix columns."""

    feature_names: list[str]

    def read(self, customer_ids: Sequence[str]) -> OnlineRows: ...


class ModelBundle(Protocol):
    """A fitted binary model ready to serve."""

    name: str
    version: str
    feature_names: list[str]

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    def contributions(self, X: np.ndarray) -> np.ndarray: ...

    def predict_with_contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def with_threads(self, num_threads: int) -> ModelBundle:
        """The same model predicting on ``num_threads`` threads (0: all cores, for bulk)."""
        ...


@runtime_checkable
class NBAPolicy(Protocol):
    """Next-best-action: features (columns ``feature_names``) to decisions.

    ``decide`` returns one dict per row with ``action``, ``expected_value``,
    ``reason``, ``holdout`` and ``alternatives`` (ranked dicts with
    ``action``, ``expected_value``, ``eligible``, ``reason``);
    ``best_actions`` only the action and its value (bulk scoring);
    ``offered`` limits ``decide`` to some catalog actions (a trigger's), and
    ``catalog`` is the action catalog arbitrated with. Runtime-checkable:
    the registry may hold a ready policy or an uplift model
    (:func:`propensity.serving.champions.as_policy` tells them apart).
    """

    version: str
    feature_names: list[str]
    catalog: Any

    def decide(
        self,
        customer_ids: Sequence[str],
        X: np.ndarray,
        offered: Sequence[str] | None = None,
        must_pay: bool = True,
        holdout: bool = True,
    ) -> list[dict[str, Any]]: ...

    def best_actions(
        self, customer_ids: Sequence[str], X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


_CORES = os.cpu_count() or 1  # read once: os.cpu_count() costs ~20 µs a call
_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def thread_pool(name: str) -> ThreadPoolExecutor:
    """The process's pool of one thread per core for one kind of work, made on first use.

    Kinds never share a pool, so a task that waits on another kind's tasks
    cannot take the thread they need: ``"lightgbm"`` predicts row chunks,
    ``"policy"`` runs next-best-action beside the models (and submits its
    own chunks to ``"lightgbm"``), ``"sqlite"`` reads online-store views.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(_CORES, thread_name_prefix=name)
        return pool


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
    return np.concatenate(list(thread_pool("lightgbm").map(lambda part: fn(part, 1), parts)))


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
        compiled = getattr(model, "compiled_", None)  # set by the model's compile()
        self._value_row: Callable[[np.ndarray], np.ndarray] = (
            SingleRowPredictor(booster, iteration)
            if compiled is None
            else lambda row: np.array([compiled.predict_row(row)])
        )
        if reasons == "path":
            self._attribution = PathAttribution(booster, iteration)
            leaves = getattr(model, "compiled_leaves_", None)  # also set by compile()
            if leaves is not None and leaves.n_outputs == self._attribution.num_iteration:
                self._leaves: Callable[[np.ndarray, int], np.ndarray] = leaves.leaves
                self._contrib_row = lambda row: leaves.leaves(row[None, :], 1)
            else:
                self._leaves = self._attribution.leaves
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
        return np.asarray(self.model.predict_proba(X, num_threads=num_threads)[:, 1])

    def _contributions(self, X: np.ndarray, num_threads: int) -> np.ndarray:
        one_row = len(X) == 1 and num_threads == 1
        if self.reasons == "shap":
            if one_row:
                return self._contrib_row(X[0])[None, :]
            return np.asarray(self.model.contributions(X, num_threads=num_threads))
        leaves = self._contrib_row(X[0]) if one_row else self._leaves(X, num_threads)
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


def iso_timestamp(seconds: float) -> str | None:
    """Epoch seconds as ISO 8601 in UTC; ``None`` for NaN (unknown)."""
    if not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def _top_reasons(
    contributions: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns, contributions and feature values of every row's top reasons.

    Largest magnitude first (ties: feature order); each array has shape
    ``(n, k)`` with ``k`` at most three.
    """
    # The last column is the bias (expected value), not a feature.
    per_feature = contributions[:, :-1]
    k = min(_TOP_REASONS, per_feature.shape[1])
    top = np.argsort(-np.abs(per_feature), axis=1, kind="stable")[:, :k]
    rows = np.arange(len(per_feature))[:, None]
    return top, per_feature[rows, top], values[rows, top]


def _reason_dicts(
    top: np.ndarray, picked: np.ndarray, picked_values: np.ndarray, names: list[str]
) -> list[list[dict[str, Any]]]:
    """The reasons of :func:`_top_reasons` as the response's dicts."""
    out = []
    for js, cs, vs in zip(top.tolist(), picked.tolist(), picked_values.tolist(), strict=True):
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


@dataclass(frozen=True)
class ScoredBatch:
    """The scores of a batch, column by column, before they become a response.

    :meth:`Scorer.score` turns it into one dict per customer; the batch route
    encodes it straight to JSON (:func:`propensity.serving.encoding.batch_json`).

    Attributes
    ----------
    customer_ids : list of str
        As requested.
    rows : ndarray of int
        Positions in ``customer_ids`` of the customers the store knows; every
        array below has one entry per such row.
    scores : dict
        Model name to clipped P(y=1).
    reasons : dict
        Model name to ``(columns, contributions, values)`` of its top reasons
        (:func:`_top_reasons`); empty when reasons were not asked for.
    feature_names : dict
        Model name to its feature names (what ``columns`` index).
    decisions : list
        Next-best-action decision dicts, or ``None`` without a policy.
    versions : dict
    timestamps : ndarray of float
        Feature timestamps (epoch seconds; NaN: unknown).
    stale : ndarray of bool
    missing : list of list of str
        Names of the features missing in each row.
    matrix : ndarray
        The features of each row, in the reader's ``feature_names`` order
        (what the triggers' conditions read).
    """

    customer_ids: list[str]
    rows: np.ndarray
    scores: dict[str, np.ndarray]
    reasons: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    feature_names: dict[str, list[str]]
    decisions: list[dict[str, Any] | None]
    versions: dict[str, str]
    timestamps: np.ndarray
    stale: np.ndarray
    missing: list[list[str]]
    matrix: np.ndarray

    @property
    def unknown(self) -> list[str]:
        """Requested ids the online store does not know, in request order."""
        known = np.zeros(len(self.customer_ids), dtype=bool)
        known[self.rows] = True
        return [c for c, k in zip(self.customer_ids, known.tolist(), strict=True) if not k]


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
    purchase_24h : ModelBundle, optional
        Purchase in the next 24 hours; ``None`` answers its field with null.

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
    purchase_24h: ModelBundle | None = None
    _columns: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        available = {name: j for j, name in enumerate(self.reader.feature_names)}
        self._columns = {}
        parts = [(b.name, b.feature_names) for b in self.models]
        if self.policy is not None:
            parts.append((NBA, self.policy.feature_names))
        for name, features in parts:
            missing = [f for f in features if f not in available]
            if missing:
                raise ValueError(
                    f"model {name!r} needs features {missing} that the online reader does not serve"
                )
            self._columns[name] = np.array([available[f] for f in features], dtype=np.intp)

    @cached_property
    def models(self) -> tuple[ModelBundle, ...]:
        """The binary models served, in :data:`SCORE_FIELDS` order."""
        extra = () if self.purchase_24h is None else (self.purchase_24h,)
        return (self.churn, self.purchase, *extra)

    @cached_property
    def fields(self) -> list[tuple[str, str]]:
        """``(model, response field)`` of every score a response carries, served or not."""
        slots = (self.churn, self.purchase, self.purchase_24h)
        return [
            (key if bundle is None else bundle.name, name)
            for bundle, (key, name) in zip(slots, SCORE_FIELDS.items(), strict=True)
        ]

    @property
    def versions(self) -> dict[str, str]:
        """Registered version of every model served."""
        out = {b.name: b.version for b in self.models}
        if self.policy is not None:
            out[NBA] = self.policy.version
        return out

    def _model_input(self, name: str, matrix: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(matrix[:, self._columns[name]])

    def score_columns(
        self, customer_ids: Sequence[str], reasons: bool = True, *, decide: bool = True
    ) -> ScoredBatch:
        """Score customers into a :class:`ScoredBatch` (the arrays behind :meth:`score`).

        Everything is computed once per batch: one LightGBM call per model
        (probabilities and contributions for the reasons together), one
        policy call. ``reasons=False`` skips the contributions, ``decide=False``
        the policy (for callers that decide on their own, as the trigger runner).
        """
        ids = list(customer_ids)
        batch = self.reader.read(ids)
        rows = np.flatnonzero(batch.found)
        names = {b.name: b.feature_names for b in self.models}
        if rows.size == 0:
            empty = np.zeros(0)
            features = np.zeros((0, len(self.reader.feature_names)))
            return ScoredBatch(
                ids, rows, {}, {}, names, [], self.versions, empty, empty, [], features
            )
        matrix = batch.matrix if rows.size == len(ids) else batch.matrix[rows]
        decisions: list[dict[str, Any] | None] = [None] * len(rows)
        pending: Future[list[dict[str, Any]]] | None = None
        if self.policy is not None and decide:
            known = [ids[i] for i in rows.tolist()]
            X_policy = self._model_input(NBA, matrix)
            if len(rows) >= _OVERLAP_ROWS:
                # The policy's arbitration is Python (it holds the GIL) while the models
                # below run in LightGBM (which releases it): overlapping them keeps both
                # cores busy. One row is faster without the hand-off.
                pending = thread_pool("policy").submit(self.policy.decide, known, X_policy)
            else:
                decisions = list(self.policy.decide(known, X_policy))
        scores: dict[str, np.ndarray] = {}
        top: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for bundle in self.models:
            X = self._model_input(bundle.name, matrix)
            if reasons:
                proba, contributions = bundle.predict_with_contributions(X)
                top[bundle.name] = _top_reasons(contributions, X)
            else:
                proba = bundle.predict_proba(X)
            scores[bundle.name] = np.clip(proba, 0.0, 1.0)
        if pending is not None:
            decisions = list(pending.result())
        return ScoredBatch(
            customer_ids=ids,
            rows=rows,
            scores=scores,
            reasons=top,
            feature_names=names,
            decisions=decisions,
            versions=self.versions,
            timestamps=batch.timestamps[rows],
            stale=batch.stale[rows],
            missing=_missing_names(matrix, self.reader.feature_names),
            matrix=matrix,
        )

    def score(
        self, customer_ids: Sequence[str], reasons: bool = True
    ) -> list[dict[str, Any] | None]:
        """Score customers; ``None`` for a customer the online store does not know.

        ``reasons=False`` skips the contributions and returns empty ``reasons``.

        Returns
        -------
        list
            One :class:`propensity.serving.schemas.ScoreResponse`-shaped dict
            (or ``None``) per id, in request order.
        """
        return self.as_dicts(self.score_columns(customer_ids, reasons))

    def as_dicts(self, scored: ScoredBatch) -> list[dict[str, Any] | None]:
        """:meth:`score`'s dicts of a :class:`ScoredBatch` (``None`` for an unknown id)."""
        ids = scored.customer_ids
        out: list[dict[str, Any] | None] = [None] * len(ids)
        if scored.rows.size == 0:
            return out
        versions = scored.versions
        stamps: dict[float, str | None] = {}  # rows of one snapshot share a timestamp
        fields = self.fields
        none = [None] * scored.rows.size
        columns = [
            scored.scores[name].tolist() if name in scored.scores else none for name, _ in fields
        ]
        top = {
            name: _reason_dicts(*picked, scored.feature_names[name])
            for name, picked in scored.reasons.items()
        }
        timestamps = scored.timestamps.tolist()
        stale = scored.stale.tolist()
        for k, i in enumerate(scored.rows.tolist()):
            stamp = timestamps[k]
            iso = stamps.get(stamp)
            if iso is None:
                iso = stamps[stamp] = iso_timestamp(stamp)
            row: dict[str, Any] = {"customer_id": ids[i]}
            for (_, key), values in zip(fields, columns, strict=True):
                row[key] = values[k]
            row.update(
                next_best_action=scored.decisions[k],
                reasons={name: picked[k] for name, picked in top.items()},
                model_versions=versions,
                features_timestamp=iso,
                stale=stale[k],
                missing_features=scored.missing[k],
            )
            out[i] = row
        return out
