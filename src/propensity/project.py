"""A project as one object: the notebook-friendly front of the package.

:class:`Project` wraps the project settings and delegates every step to the same
library functions the command line calls (simulate, ingest, build features, train,
score, next-best-action), so a notebook and ``propensity train churn`` produce the
same runs. It adds no modelling logic of its own: it only remembers where things
are (the settings, the simulator's ground truth) and reshapes results into
DataFrames and figures.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from propensity.config import PROJECT_FILE, Settings, load_settings

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from propensity.events.ingest import IngestReport
    from propensity.features.snapshots import BuildReport
    from propensity.models.spec import ModelSpec
    from propensity.pipeline.binary import TrainingResult
    from propensity.pipeline.nba import NBAResult
    from propensity.progress import ProgressCallback

__all__ = ["Project", "NBAEvaluation", "SIMULATION_DIR"]

#: Where :meth:`Project.simulate` writes events and ground truth (as the quickstart does).
SIMULATION_DIR = Path("data/simulated")
_SCORERS = ("model", "logistic", "rfm_lightgbm", "bgnbd", "recency", "oracle")
_METRICS = ("roc_auc", "pr_auc", "lift_at_10", "capture_at_10", "log_loss", "brier", "ece")


def _source_checkout() -> Path:
    # src/propensity/project.py -> the checkout root that holds models/ and feature_repo/
    return Path(__file__).resolve().parents[2]


def _template_dirs(template: str | Path | Settings | None) -> tuple[Path, Path]:
    """The ``models`` and ``feature_repo`` folders a new project copies."""
    if isinstance(template, Settings):
        candidates = [template]
    elif template is not None:
        candidates = [load_settings(Path(template), environ={})]
    else:
        # The project of the working directory if it has specs, else the source checkout.
        candidates = [load_settings(environ={}), load_settings(_source_checkout(), environ={})]
    for settings in candidates:
        models, repo = settings.path(settings.models_dir), settings.path(settings.feature_repo)
        if (models / "churn.yaml").exists() and (repo / "repo.py").exists():
            return models, repo
    where = ", ".join(str(s.root) for s in candidates)
    raise FileNotFoundError(
        f"no project template with models/churn.yaml and feature_repo/repo.py under {where}; "
        "pass template= a project folder"
    )


@dataclass
class NBAEvaluation:
    """Held-out policy evaluation of a next-best-action model.

    ``table`` holds the policy values (IPS, DR with intervals, and the true value on
    simulated data) by policy; ``qini`` maps each action to its
    :class:`~propensity.models.uplift.QiniResult`; ``uplift`` is the predicted uplift
    of every action on every test exposure, ``actions`` the learned policy's action
    of each and, on simulated data, ``oracle_actions`` the oracle's.
    """

    table: pd.DataFrame
    qini: dict[str, Any]
    uplift: pd.DataFrame
    best_single: str
    choices: dict[str, float]
    captured: float | None
    actions: np.ndarray | None = None
    oracle_actions: np.ndarray | None = None


class Project:
    """One propensity project: settings plus the steps of the pipeline as methods.

    Parameters
    ----------
    settings : Settings
        The project's settings (use :meth:`open` or :meth:`create` to get one).

    Examples
    --------
    >>> project = Project.create("my-project")  # doctest: +SKIP
    >>> project.simulate(customers=2_000, days=120)  # doctest: +SKIP
    >>> churn = project.train("churn")  # doctest: +SKIP
    >>> project.compare([churn])  # doctest: +SKIP
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._predictions: dict[str, pd.DataFrame] = {}
        self._specs: dict[str, ModelSpec] = {}

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path_or_settings: str | Path | Settings | None = None) -> Project:
        """Open an existing project.

        Parameters
        ----------
        path_or_settings : path or Settings, optional
            A ``propensity.yaml``, the folder holding one, or ready settings.
            Defaults to ``$PROPENSITY_CONFIG`` or ``./propensity.yaml``.

        Examples
        --------
        >>> project = Project.open("my-project")  # doctest: +SKIP
        """
        if isinstance(path_or_settings, Settings):
            return cls(path_or_settings)
        return cls(load_settings(path_or_settings))

    @classmethod
    def create(
        cls,
        folder: str | Path,
        *,
        template: str | Path | Settings | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Project:
        """Create a fresh project folder and open it.

        Writes ``propensity.yaml`` (local data folders under ``data/``, MLflow on
        SQLite in ``data/mlflow.db``) and copies the model specs (``models/``) and the
        Feast definitions (``feature_repo/``) from ``template``, so the project can be
        edited without touching the template.

        Parameters
        ----------
        folder : path
            The new project's root; it may exist but must not hold a ``propensity.yaml``.
        template : path or Settings, optional
            Project whose ``models/`` and ``feature_repo/`` are copied. Defaults to
            the project of the working directory, else the package's source checkout.
        settings : mapping, optional
            Extra keys of ``propensity.yaml`` (e.g. ``{"horizons": {"churn_days": 45}}``).

        Examples
        --------
        >>> project = Project.create("my-project")  # doctest: +SKIP
        >>> (project.root / "propensity.yaml").exists()  # doctest: +SKIP
        True
        """
        root = Path(folder).resolve()
        file = root / PROJECT_FILE
        if file.exists():
            raise FileExistsError(f"{file} already exists: use Project.open({str(root)!r})")
        models, repo = _template_dirs(template)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(models, root / "models", dirs_exist_ok=True)
        shutil.copytree(
            repo, root / "feature_repo", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__py*")
        )
        data: dict[str, Any] = {
            "lake_dir": "data/lake",
            "quarantine_dir": "data/quarantine",
            "features_dir": "data/features",
            "landing_dir": "data/landing",
            "feature_repo": "feature_repo",
            "models_dir": "models",
            "mlflow_tracking_uri": "sqlite:///data/mlflow.db",
            "online_store": {"kind": "sqlite", "sqlite_path": "data/online_store.db"},
            **dict(settings or {}),
        }
        file.write_text(yaml.safe_dump(data, sort_keys=False))
        return cls(load_settings(file))

    @property
    def root(self) -> Path:
        """The project folder."""
        return self.settings.path(Path("."))

    @property
    def simulation_dir(self) -> Path:
        """Where :meth:`simulate` writes events and the ground truth."""
        return self.settings.path(SIMULATION_DIR)

    @property
    def truth_dir(self) -> Path | None:
        """The simulator's output folder when this project was simulated, else ``None``."""
        folder = self.simulation_dir
        return folder if (folder / "truth" / "customer_daily.parquet").exists() else None

    def _lake(self) -> Any:
        from propensity.events.lake import EventLake

        return EventLake(self.settings.path(self.settings.lake_dir))

    # -- events -----------------------------------------------------------------------------

    def simulate(
        self,
        customers: int = 2_000,
        days: int = 120,
        seed: int = 42,
        *,
        start: date | str | None = None,
        progress: ProgressCallback | None = None,
        **config: Any,
    ) -> IngestReport:
        """Simulate events with their ground truth, then ingest them into the lake.

        The events and truth go to ``data/simulated/`` (see
        :func:`propensity.events.simulator.simulate_to`); later :meth:`train` and
        :meth:`train_nba` calls report the oracle from that truth.

        Parameters
        ----------
        customers, days, seed : int
            Size and seed of the simulation.
        start : date or str, optional
            First simulated day (default: the simulator's).
        progress : callable, optional
            Ingestion progress, see :mod:`propensity.progress`.
        **config
            Other :class:`~propensity.events.simulator.SimulationConfig` fields, e.g.
            ``campaign_share=0.3`` for more campaign exposures.

        Returns
        -------
        IngestReport
            Rows read, accepted, quarantined and duplicated.

        Examples
        --------
        >>> project.simulate(customers=2_000, days=120, seed=7)  # doctest: +SKIP
        """
        from propensity.events.simulator import SimulationConfig, simulate_to

        options: dict[str, Any] = {"customers": customers, "days": days, "seed": seed, **config}
        if start is not None:
            options["start"] = date.fromisoformat(start) if isinstance(start, str) else start
        simulate_to(SimulationConfig(**options), self.simulation_dir)
        return self.ingest(
            sorted((self.simulation_dir / "events").glob("*.parquet")), progress=progress
        )

    def ingest(self, paths: str | Path | Sequence[str | Path], **options: Any) -> IngestReport:
        """Validate event files and add them to the lake (:func:`propensity.events.ingest.ingest`).

        Parameters
        ----------
        paths : path or sequence of paths
            CSV, Parquet, JSON Lines or Excel files, or folders of them.
        **options
            ``mapping``, ``orders_only``, ``consent_file``, ``timestamp_format``
            (default: the project's ``events.timestamp_format``), ``progress``... as
            for :func:`~propensity.events.ingest.ingest`.

        Examples
        --------
        >>> project.ingest("exports/events.csv", mapping={"user": "customer_id"})  # doctest: +SKIP
        """
        from propensity.events.ingest import ingest
        from propensity.events.suppression import SuppressionList

        options.setdefault("timezone", self.settings.timezone)
        options.setdefault("timestamp_format", self.settings.events.timestamp_format)
        options.setdefault("suppression", SuppressionList.of(self.settings))
        return ingest(
            paths, self._lake(), self.settings.path(self.settings.quarantine_dir), **options
        )

    def events(
        self,
        columns: Sequence[str] | None = None,
        start: Any = None,
        end: Any = None,
    ) -> pd.DataFrame:
        """Events of the lake as a DataFrame, optionally a time slice and some columns.

        Parameters
        ----------
        columns : sequence of str, optional
            Canonical columns to read (default: all).
        start, end : datetime-like, optional
            Keep ``start <= event_timestamp < end`` (naive values are UTC).

        Returns
        -------
        DataFrame
            Sorted by ``event_timestamp`` then ``event_id``.

        Examples
        --------
        >>> project.events(["customer_id", "event_type"], start="2026-03-01")  # doctest: +SKIP
        """
        import duckdb

        from propensity.events.schema import ARROW_SCHEMA

        names = list(columns) if columns is not None else list(ARROW_SCHEMA.names)
        unknown = [c for c in names if c not in ARROW_SCHEMA.names]
        if unknown:
            raise ValueError(f"unknown event column(s) {unknown}; known: {ARROW_SCHEMA.names}")
        where, params = [], []
        for op, value in ((">=", start), ("<", end)):
            if value is not None:
                ts = pd.Timestamp(value)
                ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
                where.append(f"event_timestamp {op} ?")
                params.append(ts.to_pydatetime())
        order = [c for c in ("event_timestamp", "event_id") if c in names]
        sql = (
            f"SELECT {', '.join(names)} FROM {self._lake().duckdb_scan()}"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + (f" ORDER BY {', '.join(order)}" if order else "")
        )
        con = duckdb.connect()
        try:
            con.execute("SET TimeZone = 'UTC'")
            frame = con.execute(sql, params).df()
        finally:
            con.close()
        if "event_timestamp" in frame:
            frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
        return frame

    # -- features ---------------------------------------------------------------------------

    def build_features(
        self, snapshot_times: Sequence[Any] | None = None, *, materialize: bool = False
    ) -> BuildReport:
        """Compute the feature snapshots and register the Feast repo.

        Delegates to :func:`propensity.features.snapshots.build_features` and
        :meth:`FeatureStoreAdapter.ensure_applied`; with ``materialize`` the latest snapshot is
        also written to the online store.

        Examples
        --------
        >>> report = project.build_features()  # doctest: +SKIP
        >>> report.rows  # doctest: +SKIP
        """
        from propensity.features.snapshots import build_features
        from propensity.pipeline.dataset import feature_adapter

        report = build_features(self.settings, snapshot_times)
        adapter = feature_adapter(self.settings)
        if materialize:
            adapter.materialize()
        return report

    def spec(self, model: str) -> ModelSpec:
        """The model spec of ``churn`` or ``purchase`` (``models/<name>.yaml``).

        Examples
        --------
        >>> project.spec("churn").label.horizon_days  # doctest: +SKIP
        30
        """
        from propensity.models.spec import load_spec

        return load_spec(model, self.settings.path(self.settings.models_dir))

    def _spec(self, model: str | ModelSpec) -> ModelSpec:
        return model if not isinstance(model, str) else self.spec(model)

    def cutoffs(self, model: str | ModelSpec, *, as_of: Any = None) -> list[pd.Timestamp]:
        """The weekly cutoffs a model trains on (:func:`propensity.labels.choose_cutoffs`).

        Examples
        --------
        >>> project.cutoffs("churn")[-1]  # doctest: +SKIP
        Timestamp('2026-03-30 00:00:00+0000', tz='UTC')
        """
        from propensity.labels import choose_cutoffs, data_window

        spec = self._spec(model)
        window = data_window(self._lake())
        return choose_cutoffs(window, spec.label.horizon_days, spec.split, as_of=as_of)

    def training_frame(
        self, model: str | ModelSpec, cutoffs: Iterable[Any] | None = None
    ) -> pd.DataFrame:
        """Labelled, point-in-time correct rows: one per eligible customer and cutoff.

        Labels come from :func:`propensity.labels.entity_frame`; features from the
        model's Feast feature service through historical retrieval (missing snapshots
        are built first), exactly as :func:`~propensity.pipeline.binary.train_model`
        builds them.

        Parameters
        ----------
        model : str or ModelSpec
            ``churn``, ``purchase`` or a spec.
        cutoffs : iterable of dates, optional
            Midnights UTC; defaults to :meth:`cutoffs`.

        Returns
        -------
        DataFrame
            ``customer_id``, ``event_timestamp`` (the cutoff), ``label``,
            ``days_since_last`` and the service's features (float64). The feature
            names are in ``frame.attrs["features"]``.

        Examples
        --------
        >>> frame = project.training_frame("churn", ["2026-03-02", "2026-03-09"])  # doctest: +SKIP
        >>> frame.groupby("event_timestamp")["label"].mean()  # doctest: +SKIP
        """
        from propensity.labels import to_cutoff
        from propensity.pipeline.dataset import labeled_frame

        spec = self._spec(model)
        cuts = self.cutoffs(spec) if cutoffs is None else sorted({to_cutoff(c) for c in cutoffs})
        frame, features, _, _ = labeled_frame(self.settings, spec, cuts)
        frame.attrs["features"] = features
        return frame

    # -- models -----------------------------------------------------------------------------

    def train(self, model: str | ModelSpec, **options: Any) -> TrainingResult:
        """Train, evaluate, log and (when the gates pass) promote a model.

        Delegates to :func:`propensity.pipeline.binary.train_model`; the simulator's
        truth, when present, is passed as ``truth_dir`` so the oracle is reported.

        Parameters
        ----------
        model : str or ModelSpec
            ``churn``, ``purchase`` or a spec (e.g. an edited copy of :meth:`spec`).
        **options
            ``as_of``, ``horizon_days``, ``truth_dir``, ``promote``, ``progress``.

        Examples
        --------
        >>> churn = project.train("churn")  # doctest: +SKIP
        >>> print(churn.summary())  # doctest: +SKIP
        """
        from propensity.pipeline.binary import train_model

        spec = self._spec(model).with_horizon(options.pop("horizon_days", None))
        options.setdefault("truth_dir", self.truth_dir)
        result = train_model(self.settings, spec, **options)
        # predictions() must rebuild the test rows with this spec, not the YAML one
        self._specs[result.run_id] = spec
        return result

    @staticmethod
    def compare(results: TrainingResult | Sequence[TrainingResult]) -> pd.DataFrame:
        """Test-window metrics of models against their baselines and the oracle.

        Parameters
        ----------
        results : TrainingResult or sequence of them

        Returns
        -------
        DataFrame
            Indexed by (``model``, ``scorer``) where scorer is ``model``,
            ``logistic``, ``rfm_lightgbm``, ``bgnbd`` (purchase models), ``recency``
            (a ranking rule: no calibration metrics) and ``oracle`` (the simulator's
            true probabilities, when known); columns are the metrics.

        Examples
        --------
        >>> Project.compare([churn, purchase])["roc_auc"]  # doctest: +SKIP
        """
        items = [results] if not isinstance(results, Sequence) else list(results)
        rows = []
        for result in items:
            for scorer in _SCORERS:
                metrics = result.metrics.get(scorer)
                if metrics is not None:
                    rows.append(
                        {"model": result.model, "scorer": scorer}
                        | {m: metrics.get(m, float("nan")) for m in _METRICS}
                        | {"rows": metrics.get("rows", float("nan"))}
                    )
        return pd.DataFrame(rows).set_index(["model", "scorer"])

    def predictions(self, result: TrainingResult) -> pd.DataFrame:
        """Test-window rows of a run with the registered model's scores beside references.

        Rebuilds the run's test rows (same cutoffs, same feature service), scores them
        with the run's selection model (the one its metrics measured; the registered
        version when the result came without it), the recency rule and, on simulated
        data, the true probability (``oracle``).

        Returns
        -------
        DataFrame
            ``customer_id``, ``event_timestamp``, ``label``, the features, then
            ``model``, ``recency`` and (when known) ``oracle`` columns.

        Examples
        --------
        >>> project.predictions(churn)[["label", "model", "oracle"]].head()  # doctest: +SKIP
        """
        if result.run_id in self._predictions:
            return self._predictions[result.run_id]
        from propensity.models.baselines import RecencyRule

        spec = self._specs.get(result.run_id) or self.spec(result.model)
        frame = self.training_frame(spec, result.split.test)
        estimator = self._estimator(result)
        frame["model"] = estimator.predict_proba(frame[estimator.feature_names_])[:, 1]
        rule = RecencyRule(higher_is_positive=spec.label.kind == "churn")
        frame["recency"] = rule.fit(frame).predict(frame)
        oracle = self._oracle(spec, frame)
        if oracle is not None:
            frame["oracle"] = oracle
        self._predictions[result.run_id] = frame
        return frame

    def _estimator(self, result: TrainingResult) -> Any:
        from propensity import registry

        if result.selection_model is not None:
            # the test rows are the selection model's held-out rows; the registered
            # refit trained on them, so only the selection model reproduces the metrics
            return result.selection_model
        version = result.version if result.version is not None else registry.CHAMPION
        return registry.load_estimator(self.settings.tracking_uri, result.model, version)

    def _oracle(self, spec: ModelSpec, frame: pd.DataFrame) -> Any:
        truth = self.truth_dir
        if truth is None:
            return None
        import pyarrow.parquet as pq

        column = "p_churn" if spec.label.kind == "churn" else "p_purchase"
        daily = pq.read_table(
            truth / "truth" / "customer_daily.parquet", columns=["customer_id", "date", column]
        ).to_pandas()
        daily["event_timestamp"] = pd.to_datetime(daily["date"]).dt.tz_localize("UTC")
        rows = frame[["customer_id", "event_timestamp"]].merge(
            daily[["customer_id", "event_timestamp", column]],
            on=["customer_id", "event_timestamp"],
            how="left",
        )
        # The truth is for the simulator's horizon; another horizon has no oracle.
        return None if rows[column].isna().any() else rows[column].to_numpy()

    def _scores(self, result: TrainingResult, calibrated_only: bool = False) -> dict[str, Any]:
        frame = self.predictions(result)
        names = ["model", "oracle"] if calibrated_only else ["model", "recency", "oracle"]
        return {n: frame[n].to_numpy() for n in names if n in frame}

    def _labels(self, result: TrainingResult) -> Any:
        return self.predictions(result)["label"].to_numpy()

    def plot_roc(self, result: TrainingResult) -> Figure:
        """ROC curves of the model, the recency rule and the oracle on the test window."""
        from propensity import evaluation as ev

        return ev.roc_figure(self._labels(result), self._scores(result), f"ROC — {result.model}")

    def plot_calibration(self, result: TrainingResult) -> Figure:
        """Reliability diagram of the model (and the oracle) on the test window.

        Examples
        --------
        >>> fig = project.plot_calibration(churn)  # doctest: +SKIP
        """
        from propensity import evaluation as ev

        return ev.calibration_figure(
            self._labels(result),
            self._scores(result, calibrated_only=True),
            title=f"Reliability — {result.model}",
        )

    def plot_gain(self, result: TrainingResult) -> Figure:
        """Cumulative gain chart of the model, the recency rule and the oracle.

        Examples
        --------
        >>> fig = project.plot_gain(churn)  # doctest: +SKIP
        """
        from propensity import evaluation as ev

        return ev.gain_figure(
            self._labels(result), self._scores(result), f"Cumulative gain — {result.model}"
        )

    def plot_importance(self, result: TrainingResult, top: int = 20) -> Figure:
        """Gain importance of the registered model's features."""
        from propensity import evaluation as ev

        return ev.importance_figure(self._estimator(result).feature_importance(), top=top)

    def plot_shap(self, result: TrainingResult, sample: int = 1000, top: int = 15) -> Figure:
        """SHAP beeswarm of the registered model on a seeded sample of test rows.

        Examples
        --------
        >>> fig = project.plot_shap(churn, sample=500)  # doctest: +SKIP
        """
        import warnings

        import numpy as np
        import shap

        from propensity import evaluation as ev

        estimator = self._estimator(result)
        frame = self.predictions(result)[estimator.feature_names_]
        rows = frame.sample(min(sample, len(frame)), random_state=self.settings.seed)
        with warnings.catch_warnings():
            # shap warns that its LightGBM output format changed; both formats are handled
            warnings.simplefilter("ignore", UserWarning)
            values = shap.TreeExplainer(estimator.booster_).shap_values(rows)
        values = values[1] if isinstance(values, list) else values
        return ev.shap_figure(np.asarray(values), rows, top=top, title=f"SHAP — {result.model}")

    def score(self, model: str, as_of: Any = None, **options: Any) -> pd.DataFrame:
        """Score every known customer with the champion model.

        Delegates to :func:`propensity.pipeline.score.score_customers`.

        Examples
        --------
        >>> project.score("churn").nlargest(5, "score")  # doctest: +SKIP
        """
        from propensity.pipeline.score import score_customers

        return score_customers(self.settings, model, as_of, **options)

    # -- next-best-action -------------------------------------------------------------------

    def train_nba(self, **options: Any) -> NBAResult:
        """Train, evaluate and register the next-best-action model.

        Delegates to :func:`propensity.pipeline.nba.train_nba`; the simulator's truth,
        when present, adds the oracle policy.

        Examples
        --------
        >>> nba = project.train_nba()  # doctest: +SKIP
        >>> nba.report["policies"]["learned"]["dr"]  # doctest: +SKIP
        """
        from propensity.pipeline.nba import train_nba

        options.setdefault("truth_dir", self.truth_dir)
        return train_nba(self.settings, **options)

    @staticmethod
    def policy_table(result: NBAResult) -> pd.DataFrame:
        """Policy values of an NBA run (learned, random, best single action, oracle...).

        Values are incremental value per customer against no action on the held-out
        exposures: ``ips`` and ``dr`` estimates with intervals, ``true`` on simulated data.

        Examples
        --------
        >>> Project.policy_table(nba)[["dr", "true"]]  # doctest: +SKIP
        """
        policies = result.report["policies"]
        return pd.DataFrame.from_dict(policies, orient="index").astype("float64")

    def evaluate_nba(self, result: NBAResult, n_boot: int = 100) -> NBAEvaluation:
        """Re-evaluate an NBA model on its held-out exposures, keeping curves and uplift.

        Uses :func:`propensity.models.nba_report.evaluate_policy` on the exposures of the run's
        test days (features at exposure time from Feast, truth when simulated).

        Examples
        --------
        >>> evaluation = project.evaluate_nba(nba)  # doctest: +SKIP
        >>> evaluation.uplift.mean()  # doctest: +SKIP
        """
        from propensity.models.arbitration import load_catalog
        from propensity.models.nba_report import evaluate_policy
        from propensity.pipeline.dataset import nba_dataset

        catalog = load_catalog(self.settings.path(self.settings.models_dir) / "actions.yaml")
        test_days = [pd.Timestamp(d, tz="UTC") for d in result.report["test_days"]]
        data = nba_dataset(
            self.settings, catalog, result.report["feature_service"], self.truth_dir, test_days
        )
        log, truth = data.log, data.truth
        seed = int(result.model.random_state)
        evaluation = evaluate_policy(result.model, log, truth=truth, n_boot=n_boot, seed=seed)
        uplift = result.model.action_uplift(log[result.model.feature_names_])
        return NBAEvaluation(
            table=evaluation["table"],
            qini=evaluation["qini"],
            uplift=uplift,
            best_single=evaluation["best_single"],
            choices=evaluation["choices"],
            captured=evaluation.get("captured"),
            actions=evaluation["actions"],
            oracle_actions=evaluation.get("oracle_actions"),
        )

    def plot_qini(self, evaluation: NBAEvaluation) -> Figure:
        """Qini curves of every action (see :func:`propensity.plots.qini_figure`)."""
        from propensity.plots import qini_figure

        return qini_figure(evaluation.qini)

    def plot_policy_values(self, result: NBAResult | NBAEvaluation) -> Figure:
        """Policy values with intervals and true values (see :mod:`propensity.plots`)."""
        from propensity.plots import policy_value_figure

        table = result.table if isinstance(result, NBAEvaluation) else self.policy_table(result)
        return policy_value_figure(table)
