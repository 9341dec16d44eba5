"""Training and scoring frames, assembled once for every model.

Two shapes, one core: rows keyed by customer and time go to Feast's
point-in-time retrieval (:func:`historical_features`) after the feature
snapshots they need are built (:func:`ensure_snapshots`).

* propensity models: cutoffs → labeled entity frame → features → time split
  (:func:`propensity_dataset`);
* next-best-action: logged exposures with outcomes → features at each
  exposure's midnight (:func:`nba_dataset`);
* bulk scoring: the population at an as-of date → features
  (:func:`scoring_frame`), or every customer of the latest offline snapshot read
  straight from the feature tables (:func:`latest_snapshot`, the fast path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.features.definitions import FEATURES, request_features
from propensity.features.snapshots import TIMESTAMP, build_features, feature_table_path
from propensity.features.streaming_offline import with_streaming_features
from propensity.features.tiles import STREAMING_NAMES
from propensity.labels import (
    SplitSpec,
    choose_cutoffs,
    data_window,
    entity_frame,
    population_frame,
    to_cutoff,
)
from propensity.models.arbitration import ActionCatalog
from propensity.models.spec import ModelSpec

__all__ = [
    "KEYS",
    "SAMPLE_WEIGHT",
    "Dataset",
    "ExposureDataset",
    "TimeSplit",
    "ensure_snapshots",
    "exposure_log",
    "exposure_truth",
    "feature_adapter",
    "historical_features",
    "holdout_customers",
    "labeled_frame",
    "latest_snapshot",
    "model_features",
    "stored_columns_by_view",
    "nba_dataset",
    "propensity_dataset",
    "scoring_frame",
    "split_cutoffs",
    "training_frame",
]

#: Identify a training row: the customer and the cutoff.
KEYS = ("customer_id", "event_timestamp")
#: Column of a sampled row's weight (1 / its class's sampling fraction; Spark engine).
SAMPLE_WEIGHT = "sample_weight"


@dataclass(frozen=True)
class TimeSplit:
    """Cutoffs of each part of a time-based split.

    ``train``, ``validation`` and ``test`` select the model; ``purged`` were left out
    of selection (their label windows overlap the first test cutoff); ``refit`` is
    every labelled cutoff, the final model's training cutoffs.
    """

    train: tuple[pd.Timestamp, ...]
    validation: tuple[pd.Timestamp, ...]
    test: tuple[pd.Timestamp, ...]
    purged: tuple[pd.Timestamp, ...] = ()
    refit: tuple[pd.Timestamp, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        """ISO dates of every part, for logging."""
        parts = {"train": self.train, "validation": self.validation, "test": self.test}
        parts["purged"] = self.purged
        parts["refit"] = self.refit
        return {k: [str(c.date()) for c in v] for k, v in parts.items()}

    def describe(self, horizon_days: int) -> list[str]:
        """Lines for the training summary: the cutoffs of each part, the purged and why."""

        def span(cuts: Sequence[pd.Timestamp]) -> str:
            if not cuts:
                return "none"
            dates = [str(c.date()) for c in cuts]
            return dates[0] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]} ({len(dates)})"

        lines = [
            f"  selection: train {span(self.train)}; validation {span(self.validation)}; "
            f"test {span(self.test)}",
            f"  refit: {span(self.refit)}",
        ]
        if self.purged:
            lines.append(
                f"  purged from selection: {', '.join(str(c.date()) for c in self.purged)} "
                f"(their {horizon_days}-day label windows overlap the test cutoff "
                f"{self.test[0].date()}); the refit uses them"
            )
        return lines


def split_cutoffs(
    cutoffs: Sequence[pd.Timestamp], split: SplitSpec, horizon_days: int
) -> TimeSplit:
    """Split cutoffs in time: train on the earliest, validate and test on the latest.

    With ``split.purge`` a train or validation cutoff is kept only if its label
    window closes by the first test cutoff: on the test date a model in production
    could not know any later outcome, so the evaluation must not either.

    Examples
    --------
    >>> cuts = list(pd.date_range("2024-01-01", periods=10, freq="7D", tz="UTC"))
    >>> s = split_cutoffs(cuts, SplitSpec(n_cutoffs=10), 14)
    >>> [len(s.train), len(s.validation), len(s.test), len(s.purged)]
    [7, 1, 1, 1]
    """
    cuts = sorted(pd.Timestamp(c) for c in cutoffs)
    horizon = pd.Timedelta(days=horizon_days)
    test = cuts[-split.test_cutoffs :]
    rest = cuts[: -split.test_cutoffs]
    if split.purge:
        rest = [c for c in rest if c + horizon <= test[0]]
    validation = rest[-split.validation_cutoffs :]
    train = rest[: -split.validation_cutoffs] if len(rest) > split.validation_cutoffs else []
    if not train or len(validation) < split.validation_cutoffs:
        raise ValueError(
            f"{len(cuts)} cutoffs ({cuts[0].date()} .. {cuts[-1].date()}) leave "
            f"{len(train)} train and {len(validation)} validation cutoffs with a "
            f"{horizon_days}-day horizon; need more history or a larger split.n_cutoffs"
        )
    purged = tuple(c for c in cuts if c not in set(train) | set(validation) | set(test))
    return TimeSplit(tuple(train), tuple(validation), tuple(test), purged, tuple(cuts))


def holdout_customers(customer_ids: pd.Series, share: float) -> np.ndarray:
    """Mask of the customers held out of fitting: a stable hash of the id below ``share``.

    The same customer is held out at every cutoff and in every run.

    Examples
    --------
    >>> mask = holdout_customers(pd.Series([f"C{i}" for i in range(1000)]), 0.25)
    >>> 0.2 < mask.mean() < 0.3
    True
    """
    hashed = pd.util.hash_pandas_object(customer_ids.astype(str), index=False).to_numpy()
    return np.asarray((hashed % np.uint64(10_000)) < np.uint64(round(share * 10_000)))


def _lake(settings: Settings) -> EventLake:
    return EventLake(settings.path(settings.lake_dir))


def ensure_snapshots(
    settings: Settings, stamps: Sequence[pd.Timestamp], view: str = "session"
) -> list[pd.Timestamp]:
    """Build the feature snapshots missing at ``stamps`` (checked in ``view``'s table).

    Feast joins each row to the latest snapshot at or before its timestamp, so a row
    off the snapshot grid would silently get days-old features. Returns those built.
    """
    have: set[pd.Timestamp] = set()
    if settings.engine == "spark":
        from propensity.spark.features import spark_snapshots

        have = spark_snapshots(settings, view)
    elif (path := feature_table_path(settings.path(settings.features_dir), view)).exists():
        column = pq.read_table(path, columns=["event_timestamp"])["event_timestamp"]
        have = {pd.Timestamp(t).tz_convert("UTC") for t in pd.unique(column.to_pandas())}
    missing = sorted(set(stamps) - have)
    if missing:
        build_features(settings, missing)
    return missing


def feature_adapter(settings: Settings) -> Any:
    """The project's Feast adapter, its repo applied by the adapter's one rule."""
    from propensity.features.store import FeatureStoreAdapter  # Feast: loaded on first use

    adapter = FeatureStoreAdapter(settings)
    adapter.ensure_applied()
    return adapter


def historical_features(
    settings: Settings, entity: pd.DataFrame, service: str
) -> tuple[pd.DataFrame, list[str]]:
    """Point-in-time features of ``service`` joined to ``entity`` rows (``KEYS`` columns).

    Returns the frame and the service's feature names. Through Feast's offline
    store, or with ``engine: spark`` the same join on Spark
    (:func:`propensity.spark.training.training_frame_spark`).
    """
    adapter = feature_adapter(settings)
    names = list(adapter.service_features(service))
    if settings.engine == "spark":
        from propensity.spark.training import historical_features_spark

        return historical_features_spark(settings, adapter, entity, service), names
    return adapter.historical(entity, service), names


def training_frame(
    settings: Settings, spec: ModelSpec, entity: pd.DataFrame
) -> tuple[pd.DataFrame, list[str]]:
    """Point-in-time features of ``spec``'s service joined to ``entity`` rows, via Feast.

    Returns the frame and the model's feature names (the service's features less
    ``spec.exclude_features``), cast to float64.
    """
    frame, names = historical_features(settings, entity, spec.feature_service)
    return model_features(frame, names, spec)


def model_features(
    frame: pd.DataFrame, names: Sequence[str], spec: ModelSpec
) -> tuple[pd.DataFrame, list[str]]:
    """The model's features of a service's frame: ``names`` less the spec's exclusions,
    checked numeric and cast to float64 (in place)."""
    unknown = sorted(set(spec.exclude_features) - set(names))
    if unknown:
        raise ValueError(
            f"exclude_features {unknown} of spec {spec.name} are not in {spec.feature_service}"
        )
    names = [n for n in names if n not in set(spec.exclude_features)]
    bad = [n for n in names if not pd.api.types.is_numeric_dtype(frame[n])]
    if bad:
        raise TypeError(f"feature service {spec.feature_service} returned non-numeric {bad}")
    frame[names] = frame[names].astype("float64")
    return frame, names


@dataclass
class Dataset:
    """A propensity model's labeled, featured rows, split in time."""

    spec: ModelSpec
    split: TimeSplit
    frame: pd.DataFrame
    features: list[str]
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    #: Feature snapshots this assembly had to build.
    built: list[pd.Timestamp]
    #: The final fit's rows: every labelled cutoff (held-out customers' only where
    #: their label windows closed before the latest cutoff).
    refit: pd.DataFrame | None = None
    #: The final fit's calibration rows: the held-out customers at the latest cutoff.
    refit_calibration: pd.DataFrame | None = None
    #: How the rows were sampled (Spark engine), else None: then they carry
    #: :data:`SAMPLE_WEIGHT`, which every fit and metric applies.
    sampling: dict[str, Any] | None = None

    @property
    def rows(self) -> dict[str, int]:
        """Rows of each part of the split (and of the refit, when assembled)."""
        rows = {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }
        if self.refit is not None and self.refit_calibration is not None:
            rows["refit"] = len(self.refit)
            rows["refit_calibration"] = len(self.refit_calibration)
        return rows


def labeled_frame(
    settings: Settings, spec: ModelSpec, cutoffs: Sequence[pd.Timestamp]
) -> tuple[pd.DataFrame, list[str], list[pd.Timestamp], dict[str, Any] | None]:
    """Labeled entity rows at ``cutoffs`` with their point-in-time features.

    Returns the frame, the model's feature names, the snapshots that had to be
    built and, with ``engine: spark``, how the frame was sampled (its rows then
    carry :data:`SAMPLE_WEIGHT`; see
    :func:`propensity.spark.training.labeled_frame_spark`), else ``None``.
    """
    if settings.engine == "spark":
        from propensity.spark.training import labeled_frame_spark

        frame, features, built, sample = labeled_frame_spark(settings, spec, cutoffs)
        return frame, features, built, sample.describe()
    entity = entity_frame(_lake(settings), list(cutoffs), spec.label, spec.population)
    built = ensure_snapshots(settings, cutoffs)
    frame, features = training_frame(settings, spec, entity)
    return frame, features, built, None


def propensity_dataset(
    settings: Settings, spec: ModelSpec, as_of: str | pd.Timestamp | None = None
) -> Dataset:
    """Cutoffs → labeled entity rows → point-in-time features → selection split and refit.

    ``as_of`` is the date the data runs to (default: the data end); the latest
    labelled cutoff is ``as_of - horizon`` (:func:`~propensity.labels.choose_cutoffs`).
    Selection: train on the earliest cutoffs, validate on the next, test on the latest;
    the validation rows are the held-out customers' (:func:`holdout_customers`), whose
    rows enter a fit only where their label windows closed before the validation
    cutoff. Refit: every labelled cutoff, the held-out customers' rows at the latest
    cutoff calibrating it (and their rows with windows closed before it training).
    """
    lake = _lake(settings)
    horizon = spec.label.horizon_days
    cutoffs = choose_cutoffs(data_window(lake), horizon, spec.split, as_of=as_of)
    split = split_cutoffs(cutoffs, spec.split, horizon)
    frame, features, built, sampling = labeled_frame(settings, spec, list(split.refit))
    held = holdout_customers(frame["customer_id"], spec.split.validation_customers)

    stamps = frame["event_timestamp"]
    ends = stamps + pd.Timedelta(days=horizon)

    def part(cuts: Sequence[pd.Timestamp], mask: np.ndarray | None = None) -> pd.DataFrame:
        rows = stamps.isin(list(cuts)).to_numpy()
        return frame[rows if mask is None else rows & mask].reset_index(drop=True)

    def fit_rows(scored_at: pd.Timestamp) -> np.ndarray:
        # a held-out customer's row may train when its label window closed before the
        # rows it is scored on begin: nothing it teaches is about those labels
        return np.asarray(~held | (ends <= scored_at).to_numpy())

    return Dataset(
        spec,
        split,
        frame,
        features,
        train=part(split.train, fit_rows(split.validation[0])),
        validation=part(split.validation, held),
        test=part(split.test),
        built=built,
        refit=part(split.refit, fit_rows(split.refit[-1])),
        refit_calibration=part(split.refit[-1:], held),
        sampling=sampling,
    )


def exposure_log(settings: Settings, catalog: ActionCatalog) -> tuple[pd.DataFrame, int]:
    """Logged exposures with outcomes; drops (and counts) those whose windows are still open.

    Outcome windows start at the exposure's midnight, like the features' snapshot:
    purchase = a purchase in [T, T + purchase_days); retention = a session_start
    or purchase in [T, T + churn_days).
    """
    import duckdb

    lake = _lake(settings)
    hp, hc = settings.horizons.purchase_days, settings.horizons.churn_days
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    scan = lake.duckdb_scan()
    try:
        end = (con.execute(f"SELECT max(event_timestamp) FROM {scan}").fetchone() or [None])[0]
        frame = con.execute(
            f"""
            WITH exp AS (
                SELECT customer_id, event_id, event_timestamp AS exposure_timestamp,
                       date_trunc('day', event_timestamp) AS day, action, propensity
                FROM {scan} WHERE event_type = 'campaign_exposure'
            ), act AS (
                SELECT customer_id, event_timestamp, event_type = 'purchase' AS is_purchase
                FROM {scan} WHERE event_type IN ('purchase', 'session_start')
            )
            SELECT e.customer_id, e.event_id, e.exposure_timestamp, e.day, e.action, e.propensity,
                   coalesce(bool_or(a.is_purchase
                                     AND a.event_timestamp < e.day + INTERVAL {hp} DAY),
                            false)::INT AS purchase,
                   coalesce(bool_or(a.event_timestamp < e.day + INTERVAL {hc} DAY), false)::INT
                       AS retention
            FROM exp e LEFT JOIN act a
              ON a.customer_id = e.customer_id AND a.event_timestamp >= e.day
             AND a.event_timestamp < e.day + INTERVAL {max(hp, hc)} DAY
            GROUP BY ALL
            ORDER BY e.exposure_timestamp, e.customer_id
            """
        ).df()
    finally:
        con.close()
    if frame.empty:
        raise ValueError(f"the event lake at {lake.root} holds no campaign_exposure events")
    frame["exposure_timestamp"] = pd.to_datetime(frame["exposure_timestamp"], utc=True)
    frame["day"] = pd.to_datetime(frame["day"], utc=True)
    closed = frame["day"] + pd.Timedelta(days=max(hp, hc)) <= pd.Timestamp(end).tz_convert("UTC")
    unknown = ~frame["action"].isin([*catalog.names, catalog.control])
    if unknown.any():
        row = frame[unknown].iloc[0]
        raise ValueError(
            f"exposure {row['event_id']}: action {row['action']!r} is not in the catalog "
            f"({catalog.names} + {catalog.control!r})"
        )
    return frame[closed].reset_index(drop=True), int((~closed).sum())


def exposure_features(
    settings: Settings, log: pd.DataFrame, service: str
) -> tuple[pd.DataFrame, list[str]]:
    """Point-in-time features of each exposure (the snapshot at its midnight), via Feast."""
    ensure_snapshots(settings, sorted(set(log["day"])), view="exposure")
    entity = log.rename(columns={"exposure_timestamp": "event_timestamp"})
    frame, names = historical_features(settings, entity, service)
    frame = frame.rename(columns={"event_timestamp": "exposure_timestamp"})
    frame[names] = frame[names].astype("float64")
    return frame, names


def exposure_truth(truth_dir: str | Path, log: pd.DataFrame) -> pd.DataFrame:
    """Row-aligned true probabilities ``p_<outcome>_<arm>`` of each logged exposure.

    Reads ``truth/exposures.parquet`` of a simulation; every exposure must have a row.
    """
    exposures = pd.read_parquet(Path(truth_dir) / "truth" / "exposures.parquet")
    truth = log[["event_id"]].merge(exposures, on="event_id", how="left")
    lost = truth["p_purchase_control"].isna()
    if lost.any():
        raise ValueError(
            f"{int(lost.sum())} exposures (first {truth.loc[lost, 'event_id'].iloc[0]}) "
            f"have no truth row in {truth_dir}"
        )
    return truth


@dataclass
class ExposureDataset:
    """Next-best-action rows: logged exposures, their outcomes and features."""

    log: pd.DataFrame
    features: list[str]
    #: Exposures left out because an outcome window is still open.
    still_open: int
    #: Row-aligned simulated truth (:func:`exposure_truth`), when a truth dir was given.
    truth: pd.DataFrame | None = None


def nba_dataset(
    settings: Settings,
    catalog: ActionCatalog,
    service: str,
    truth_dir: str | Path | None = None,
    days: Sequence[pd.Timestamp] | None = None,
) -> ExposureDataset:
    """Exposure log with outcomes → features at exposure time (→ simulated truth).

    ``days`` keeps only the exposures of those days (midnights UTC).
    """
    log, still_open = exposure_log(settings, catalog)
    if days is not None:
        log = log[log["day"].isin(list(days))].reset_index(drop=True)
    log, features = exposure_features(settings, log, service)
    truth = None if truth_dir is None else exposure_truth(truth_dir, log)
    return ExposureDataset(log, features, still_open, truth)


def scoring_frame(
    settings: Settings, service: str, as_of: str | pd.Timestamp | None = None
) -> tuple[pd.Timestamp, pd.DataFrame]:
    """Features of every customer known before ``as_of`` (default: after the last event).

    The snapshot at ``as_of`` is built first if missing, so the rows equal what
    training would have seen at that cutoff.
    """
    lake = _lake(settings)
    when = (
        to_cutoff(as_of)
        if as_of is not None
        else data_window(lake).end.floor("D") + pd.Timedelta(days=1)
    )
    population = population_frame(lake, when)
    ensure_snapshots(settings, [when])
    frame, _ = historical_features(settings, population, service)
    return when, frame


def stored_columns_by_view(feature_names: Sequence[str]) -> dict[str, list[str]]:
    """The stored columns each feature view must provide for ``feature_names``.

    The on-demand ``days_since_last_seen`` is computed from ``last_event_epoch``,
    so it asks for that column instead; streaming features are not stored (see
    :func:`~propensity.features.streaming_offline.with_streaming_features`). An
    unknown name is an error.
    """
    view_of = {f.name: f.view for f in FEATURES}
    base = [
        n
        for n in dict.fromkeys(feature_names)
        if n != "days_since_last_seen" and n not in STREAMING_NAMES
    ]
    if "days_since_last_seen" in feature_names and "last_event_epoch" not in base:
        base.append("last_event_epoch")
    unknown = [n for n in base if n not in view_of]
    if unknown:
        raise ValueError(f"features {unknown} are not defined in the feature registry")
    by_view: dict[str, list[str]] = {}
    for name in base:
        by_view.setdefault(view_of[name], []).append(name)
    return by_view


def latest_snapshot(
    settings: Settings, feature_names: list[str]
) -> tuple[pd.Timestamp, pd.DataFrame]:
    """Features of every customer at the latest snapshot in the offline feature tables.

    On-demand and streaming features are computed as offline training computes
    them (the request time, and the streaming clock, is the snapshot time).

    Returns
    -------
    snapshot : Timestamp
    frame : DataFrame
        ``customer_id`` then ``feature_names`` (float64), one row per customer.

    Examples
    --------
    >>> when, frame = latest_snapshot(settings, ["sessions_7d"])  # doctest: +SKIP
    """
    wanted = list(feature_names)
    by_view = stored_columns_by_view(wanted)
    features_dir = settings.path(settings.features_dir)
    latest = None
    tables = {}
    for view, names in by_view.items():
        path = feature_table_path(features_dir, view)
        if not path.exists():
            raise LookupError(f"feature table missing: {path}; build features first")
        table = pq.read_table(path, columns=["customer_id", TIMESTAMP, *names])
        tables[view] = table
        top = pc.max(table[TIMESTAMP]).as_py()
        latest = top if latest is None or (top is not None and top > latest) else latest
    if latest is None:
        raise LookupError(f"the feature tables under {features_dir} are empty")
    frame: pd.DataFrame | None = None
    for table in tables.values():
        rows = table.filter(pc.equal(table[TIMESTAMP], pa.scalar(latest, table[TIMESTAMP].type)))
        part = rows.drop_columns([TIMESTAMP]).to_pandas()
        frame = part if frame is None else frame.merge(part, on="customer_id", how="outer")
    assert frame is not None
    snapshot = pd.Timestamp(latest)
    snapshot = snapshot.tz_localize("UTC") if snapshot.tzinfo is None else snapshot
    if "days_since_last_seen" in wanted:
        seconds = snapshot.timestamp()
        last = frame["last_event_epoch"].to_numpy(np.float64)
        values = request_features(
            {"request_time": [seconds] * len(frame), "last_event_epoch": last.tolist()}
        )
        frame["days_since_last_seen"] = np.array(values["days_since_last_seen"], dtype=np.float64)
    frame[TIMESTAMP] = snapshot
    frame = with_streaming_features(settings, frame, wanted)
    out = frame[["customer_id", *wanted]].copy()
    out[wanted] = out[wanted].astype(np.float64)
    return snapshot, out.sort_values("customer_id", kind="stable").reset_index(drop=True)
