"""Drift monitoring: PSI of each feature and of each champion's scores.

The reference is a model's training window (the ``train`` cutoffs its MLflow run
recorded), the current sample the latest snapshot of the feature tables. Both
are read straight from the offline feature tables (every customer with history
at that snapshot), the streaming features computed from the lake at each
snapshot as training computes them, so the two samples are built the same way.

PSI (population stability index) over ``bins`` quantile bins of the reference,
plus one bin for missing values::

    PSI = sum_b (cur_b - ref_b) * ln(cur_b / ref_b)

Rule of thumb: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 a shift
worth acting on (the default ``threshold``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity import registry
from propensity.config import Settings
from propensity.features.definitions import (
    ENTITY,
    FEATURES,
    ON_DEMAND_FEATURES,
    VIEWS,
    request_features,
)
from propensity.features.snapshots import TIMESTAMP, feature_table_path
from propensity.features.streaming_offline import with_streaming_features
from propensity.features.tiles import STREAMING_NAMES

__all__ = ["DriftReport", "drift_report", "psi", "DEFAULT_MODELS", "DRIFT_EXPERIMENT"]

#: Models whose champions are checked by default (probability outputs; those without one skipped).
DEFAULT_MODELS: tuple[str, ...] = ("churn", "purchase_propensity", "purchase_24h")
#: MLflow experiment that receives drift reports.
DRIFT_EXPERIMENT = "drift"
# Absolute clocks drift by construction; they only feed on-demand features.
_CLOCKS = {"last_event_epoch"}
_EPS = 1e-4


def psi(reference: Any, current: Any, *, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``.

    Bin edges are quantiles of the reference; values above its maximum and missing
    values get a bin each, so a feed that starts sending nulls or out-of-range
    values shows up as drift.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> round(psi(rng.normal(size=5000), rng.normal(size=5000)), 3) < 0.01
    True
    >>> psi(rng.normal(size=5000), rng.normal(1.0, 1.0, size=5000)) > 0.25
    True
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if not len(ref) or not len(cur):
        return float("nan")
    ref_ok, cur_ok = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    # Bins (-inf, e1], (e1, e2], ..., (max, inf): right-closed, so a discrete or constant
    # feature keeps its values apart, and values beyond the reference range get a bin.
    edges = (
        np.unique(np.quantile(ref_ok, np.linspace(0, 1, bins + 1)[1:]))
        if len(ref_ok)
        else np.array([])
    )

    def shares(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=len(edges) + 1)
        full = np.append(counts, len(values) - len(finite)).astype(np.float64)
        return np.clip(full / len(values), _EPS, None)

    p, q = shares(ref, ref_ok), shares(cur, cur_ok)
    return float(np.sum((q - p) * np.log(q / p)))


@dataclass
class DriftReport:
    """PSI per feature and per model score, reference window vs current snapshot.

    Attributes
    ----------
    reference : list of str
        Snapshot dates of the reference sample.
    current : str
        Snapshot date of the current sample.
    features : dict
        Feature name -> PSI.
    scores : dict
        Model name -> PSI of its champion's scores (reference vs current).
    champions : dict
        Model name -> champion version scored.
    threshold : float
        PSI above which a feature or score counts as drifted.
    run_id : str, optional
        The MLflow run holding the JSON report and the plot.
    """

    reference: list[str]
    current: str
    features: dict[str, float]
    scores: dict[str, float] = field(default_factory=dict)
    champions: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    threshold: float = 0.25
    run_id: str | None = None

    @property
    def max_psi(self) -> float:
        """Largest PSI over features and scores (0 when nothing was measured)."""
        values = [v for v in [*self.features.values(), *self.scores.values()] if v == v]
        return max(values, default=0.0)

    @property
    def max_score_psi(self) -> float:
        """Largest PSI of a champion's scores; the feature maximum when none was scored.

        Decisions use this: features such as ``tenure_days`` shift by construction as
        the customer base ages, while a shift of the scores is what changes actions.
        """
        values = [v for v in self.scores.values() if v == v]
        return max(values) if values else self.max_psi

    @property
    def drifted(self) -> list[str]:
        """Features (by name) and scores (``score:<model>``) above the threshold."""
        out = [n for n, v in self.features.items() if v > self.threshold]
        return out + [f"score:{m}" for m, v in self.scores.items() if v > self.threshold]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what is logged as ``drift.json``)."""
        return {
            **asdict(self),
            "max_psi": self.max_psi,
            "max_score_psi": self.max_score_psi,
            "drifted": self.drifted,
        }

    def summary(self, top: int = 5) -> str:
        """A few lines for the terminal: the largest shifts first."""
        window = f"{self.reference[0]}..{self.reference[-1]}" if self.reference else "?"
        lines = [
            f"drift: current snapshot {self.current} vs reference {window}"
            f"; max PSI {self.max_psi:.3f} (threshold {self.threshold})"
        ]
        for model, value in self.scores.items():
            lines.append(f"  score {model} v{self.champions.get(model)}: PSI {value:.3f}")
        ranked = sorted(self.features.items(), key=lambda kv: -np.nan_to_num(kv[1]))
        for name, value in ranked[:top]:
            lines.append(f"  feature {name}: PSI {value:.3f}")
        if self.drifted:
            more = len(self.drifted) - 8
            names = ", ".join(self.drifted[:8]) + (f" (+{more} more)" if more > 0 else "")
            lines.append(f"  drifted: {names}")
        return "\n".join(lines)


def _snapshot_frame(settings: Settings, times: Sequence[pd.Timestamp]) -> pd.DataFrame:
    """All views' rows at ``times`` joined on customer and snapshot, plus on-demand and
    streaming features."""
    features_dir = settings.path(settings.features_dir)
    wanted = pa.array([t.to_pydatetime() for t in times], pa.timestamp("us", tz="UTC"))
    frame: pd.DataFrame | None = None
    for view in VIEWS:
        path = feature_table_path(features_dir, view)
        if not path.exists():
            raise FileNotFoundError(f"feature table missing: {path}; build features first")
        table = pq.read_table(path)
        table = table.filter(pc.is_in(table[TIMESTAMP], value_set=wanted)).to_pandas()
        frame = table if frame is None else frame.merge(table, on=[ENTITY, TIMESTAMP], how="outer")
    assert frame is not None
    seconds = (pd.to_datetime(frame[TIMESTAMP], utc=True) - pd.Timestamp(0, tz="UTC")).dt
    extra = request_features(
        {
            "request_time": list(seconds.total_seconds()),
            "last_event_epoch": list(frame["last_event_epoch"].astype(float)),
        }
    )
    for name in ON_DEMAND_FEATURES:
        frame[name] = np.array([np.nan if v is None else v for v in extra[name]], float)
    return with_streaming_features(settings, frame, STREAMING_NAMES)


def _snapshots(features_dir: Path) -> list[pd.Timestamp]:
    path = feature_table_path(features_dir, next(iter(VIEWS)))
    if not path.exists():
        raise FileNotFoundError(f"feature table missing: {path}; build features first")
    stamps = pq.read_table(path, columns=[TIMESTAMP])[TIMESTAMP].to_pandas()
    return sorted(pd.Timestamp(t).tz_convert("UTC") for t in pd.unique(stamps))


def _champion_window(settings: Settings, model: str) -> list[pd.Timestamp]:
    info = registry.version_info(settings.tracking_uri, model)
    cutoffs = json.loads(info["tags"].get("cutoffs", "{}"))
    return [pd.Timestamp(c, tz="UTC") for c in cutoffs.get("train", [])]


def _plot(report: DriftReport, out: Path) -> Path:
    import matplotlib.pyplot as plt

    from propensity.evaluation import save_figure

    items = sorted(report.features.items(), key=lambda kv: np.nan_to_num(kv[1]))
    items += [(f"score:{m}", v) for m, v in report.scores.items()]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(items))))
    colors = ["tab:red" if v > report.threshold else "tab:blue" for _, v in items]
    ax.barh([n for n, _ in items], [np.nan_to_num(v) for _, v in items], color=colors)
    ax.axvline(report.threshold, color="black", linestyle="--", linewidth=0.8, label="threshold")
    ax.set_xlabel("PSI (reference training window vs current snapshot)")
    ax.set_title(f"Drift at {report.current}")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def drift_report(
    settings: Settings,
    *,
    reference: Iterable[Any] | None = None,
    current: Any = None,
    models: Sequence[str] = DEFAULT_MODELS,
    threshold: float = 0.25,
    bins: int = 10,
    log: bool = True,
) -> DriftReport:
    """Measure drift of features and champion scores; log a JSON report and a plot.

    Parameters
    ----------
    settings : Settings
        Reads the feature tables and the MLflow registry.
    reference : iterable of dates, optional
        Snapshot dates of the reference sample. Default: the training cutoffs of
        the first of ``models`` that has a champion.
    current : date, optional
        Snapshot of the current sample; default the latest in the feature tables.
    models : sequence of str
        Models whose champion scores are compared (those without a champion are
        skipped).
    threshold : float
        PSI above which a feature or a score is reported as drifted.
    bins : int
        Quantile bins of the reference.
    log : bool
        Record the report (metrics ``psi_<name>``, ``drift.json``, ``drift.png``)
        as a run of the MLflow experiment ``drift``.

    Returns
    -------
    DriftReport

    Raises
    ------
    ValueError
        No reference given and no champion to take it from, or a requested
        snapshot is absent from the feature tables.

    Examples
    --------
    >>> report = drift_report(load_settings())  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    features_dir = settings.path(settings.features_dir)
    available = _snapshots(features_dir)
    champions = {
        m: v
        for m in models
        if (v := registry.champion_version(settings.tracking_uri, m)) is not None
    }
    if reference is None:
        if not champions:
            raise ValueError(f"no reference window given and none of {list(models)} has a champion")
        ref_times = _champion_window(settings, next(iter(champions)))
    else:
        ref_times = [pd.Timestamp(r) for r in reference]
        ref_times = [t.tz_localize("UTC") if t.tzinfo is None else t for t in ref_times]
    cur_time = available[-1] if current is None else pd.Timestamp(current)
    if cur_time.tzinfo is None:
        cur_time = cur_time.tz_localize("UTC")
    missing = sorted({*ref_times, cur_time} - set(available))
    if missing or not ref_times:
        raise ValueError(
            f"snapshots {[str(m.date()) for m in missing] or 'reference (empty)'} are not in "
            f"the feature tables under {features_dir}; rebuild features for those dates"
        )
    ref = _snapshot_frame(settings, ref_times)
    cur = _snapshot_frame(settings, [cur_time])
    names = [f.name for f in FEATURES if f.name not in _CLOCKS]
    names += [*ON_DEMAND_FEATURES, *STREAMING_NAMES]
    report = DriftReport(
        reference=[str(t.date()) for t in sorted(ref_times)],
        current=str(cur_time.date()),
        features={n: psi(ref[n], cur[n], bins=bins) for n in names},
        rows={"reference": len(ref), "current": len(cur)},
        threshold=threshold,
    )
    for model, version in champions.items():
        estimator = registry.load_estimator(settings.tracking_uri, model, version)
        columns = list(estimator.feature_names_)
        report.scores[model] = psi(
            estimator.predict_proba(ref[columns])[:, 1],
            estimator.predict_proba(cur[columns])[:, 1],
            bins=bins,
        )
        report.champions[model] = int(version)
    if log:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "drift.json").write_text(json.dumps(report.to_dict(), indent=2))
            _plot(report, out / "drift.png")
            metrics = {f"psi_{n}": v for n, v in report.features.items()}
            metrics.update({f"psi_score_{m}": v for m, v in report.scores.items()})
            metrics["max_psi"] = report.max_psi
            metrics["max_score_psi"] = report.max_score_psi
            report.run_id = registry.log_record(
                settings.tracking_uri,
                DRIFT_EXPERIMENT,
                metrics=metrics,
                params={"threshold": threshold, "bins": bins},
                tags={
                    "current_snapshot": report.current,
                    "reference": ",".join(report.reference),
                    "drifted": ",".join(report.drifted) or "none",
                    "champions": json.dumps(report.champions),
                },
                artifacts_dir=out,
                run_name=f"drift-{report.current}",
            )
    return report
