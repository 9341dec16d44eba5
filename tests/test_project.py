"""The notebook-facing API: Project, the exploration plots and the lazy package root.

Fast tests use a tiny real simulation ingested into a real event lake; the slow
test trains a real model (DuckDB, Feast, LightGBM, MLflow on SQLite) and checks the
notebook helpers reproduce what training measured.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure

import propensity
from propensity import plots
from propensity.events.lake import EventLake
from propensity.models.uplift import qini_score
from propensity.pipeline.binary import TrainingResult
from propensity.pipeline.dataset import TimeSplit
from propensity.pipeline.gates import GateResult
from propensity.pipeline.nba import NBAResult
from propensity.project import Project


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Project:
    project = Project.create(tmp_path_factory.mktemp("small") / "project")
    project.simulate(customers=150, days=45, seed=3)
    return project


# -- package root -------------------------------------------------------------------------------


def test_import_propensity_loads_no_heavy_dependency():
    code = (
        "import sys, propensity; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'feast', 'mlflow', 'lightgbm', 'bentoml', 'pandas', 'duckdb', 'sklearn'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_exported_name_resolves_lazily():
    for name in propensity.__all__:
        assert getattr(propensity, name) is not None, name
    assert propensity.Project is Project
    assert set(propensity.__all__) - {"__version__"} == set(propensity._LAZY)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = propensity.nope  # type: ignore[attr-defined]


# -- creating and opening -----------------------------------------------------------------------


def test_create_writes_a_self_contained_project(tmp_path):
    project = Project.create(tmp_path / "p", settings={"horizons": {"churn_days": 45}})
    root = (tmp_path / "p").resolve()
    assert project.root == root
    assert (root / "models" / "churn.yaml").exists()
    assert (root / "models" / "actions.yaml").exists()
    # next-best-action has its own spec; the catalog no longer holds its training settings
    assert (root / "models" / "next_best_action.yaml").exists()
    assert "training" not in yaml.safe_load((root / "models" / "actions.yaml").read_text())
    assert (root / "feature_repo" / "repo.py").exists()
    data = yaml.safe_load((root / "propensity.yaml").read_text())
    assert data["lake_dir"] == "data/lake" and data["horizons"] == {"churn_days": 45}
    reopened = Project.open(root)
    assert reopened.settings.horizons.churn_days == 45
    assert reopened.settings.path(reopened.settings.lake_dir) == root / "data" / "lake"
    assert reopened.settings.tracking_uri == f"sqlite:///{root / 'data' / 'mlflow.db'}"
    assert Project.open(reopened.settings).settings is reopened.settings
    assert reopened.truth_dir is None


def test_create_refuses_an_existing_project_and_a_bad_template(tmp_path):
    Project.create(tmp_path / "p")
    with pytest.raises(FileExistsError, match="propensity.yaml already exists"):
        Project.create(tmp_path / "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="models/churn.yaml"):
        Project.create(tmp_path / "q", template=tmp_path / "empty")


def test_create_copies_specs_from_a_template(tmp_path):
    first = Project.create(tmp_path / "first")
    spec = yaml.safe_load((first.root / "models" / "churn.yaml").read_text())
    spec["description"] = "edited in the template"
    (first.root / "models" / "churn.yaml").write_text(yaml.safe_dump(spec))
    second = Project.create(tmp_path / "second", template=first.root)
    assert second.spec("churn").description == "edited in the template"


# -- events -------------------------------------------------------------------------------------


def test_simulate_ingests_every_event_and_keeps_the_truth(small):
    lake = EventLake(small.settings.path(small.settings.lake_dir))
    written = sum(
        pd.read_parquet(p, columns=["event_id"]).shape[0]
        for p in (small.simulation_dir / "events").glob("*.parquet")
    )
    assert lake.count() == written > 0
    assert small.truth_dir == small.simulation_dir


def test_events_reads_columns_and_a_half_open_time_slice(small):
    everything = small.events()
    assert list(everything.columns) == list(propensity.events.schema.ARROW_SCHEMA.names)
    start, end = "2026-01-10", pd.Timestamp("2026-01-20", tz="UTC")
    part = small.events(["customer_id", "event_timestamp"], start=start, end=end)
    assert list(part.columns) == ["customer_id", "event_timestamp"]
    assert part["event_timestamp"].min() >= pd.Timestamp(start, tz="UTC")
    assert part["event_timestamp"].max() < end
    stamps = everything["event_timestamp"]
    expected = ((stamps >= pd.Timestamp(start, tz="UTC")) & (stamps < end)).sum()
    assert len(part) == expected
    assert part["event_timestamp"].is_monotonic_increasing


def test_events_rejects_an_unknown_column(small):
    with pytest.raises(ValueError, match=r"unknown event column\(s\) \['colour'\]"):
        small.events(["customer_id", "colour"])


# -- comparison tables --------------------------------------------------------------------------


def _result(name: str, auc: dict[str, float]) -> TrainingResult:
    metrics = {k: {"roc_auc": v, "pr_auc": v / 2, "rows": 100.0} for k, v in auc.items()}
    cut = (pd.Timestamp("2026-03-02", tz="UTC"),)
    return TrainingResult(
        model=name,
        run_id="r",
        version=1,
        promoted=False,
        gates=GateResult(),
        split=TimeSplit(cut, cut, cut),
        rows={"train": 1, "validation": 1, "test": 1},
        metrics=metrics,
    )


def test_compare_puts_models_baselines_and_oracle_side_by_side():
    churn = _result("churn", {"model": 0.8, "logistic": 0.75, "recency": 0.7, "oracle": 0.9})
    purchase = _result("purchase_propensity", {"model": 0.7, "logistic": 0.72})
    table = Project.compare([churn, purchase])
    assert table.loc[("churn", "oracle"), "roc_auc"] == 0.9
    assert table.loc[("purchase_propensity", "logistic"), "pr_auc"] == 0.36
    assert ("purchase_propensity", "oracle") not in table.index
    assert np.isnan(table.loc[("churn", "recency"), "ece"])  # absent metric, not dropped row
    assert len(Project.compare(churn)) == 4


def test_policy_table_reads_the_nba_report():
    report = {
        "policies": {"learned": {"dr": 1.5, "true": None}, "random": {"dr": 0.2, "true": 0.1}}
    }
    result = NBAResult(report, None, None, False, GateResult(), model=None)  # type: ignore[arg-type]
    table = Project.policy_table(result)
    assert table.loc["learned", "dr"] == 1.5 and np.isnan(table.loc["learned", "true"])
    assert table["dr"].dtype == np.float64


# -- plots --------------------------------------------------------------------------------------


def _events(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [r[0] for r in rows],
            "event_timestamp": pd.to_datetime([r[1] for r in rows], utc=True),
            "event_type": [r[2] for r in rows],
        }
    )


def test_cohort_retention_counts_only_observed_periods():
    events = _events(
        [
            ("a", "2026-01-01", "session_start"),  # cohort Jan, active weeks 0 and 2
            ("a", "2026-01-15", "purchase"),
            ("b", "2026-01-03", "session_start"),  # cohort Jan, active week 0 only
            ("b", "2026-01-04", "page_view"),  # not an activity event
            ("c", "2026-02-01", "session_start"),  # cohort Feb, observed 1 whole week
            ("c", "2026-02-09", "session_start"),  # week 1 is not over when the data ends
            ("e", "2026-02-02", "email_open"),  # cohort Feb, never active
            ("d", "2026-02-14", "email_open"),  # data end: d has no whole week observed
        ]
    )
    share = plots.cohort_retention(events, cohort_freq="M", period_days=7)
    jan, feb = pd.Timestamp("2026-01-01"), pd.Timestamp("2026-02-01")
    assert share.loc[jan, 0] == 1.0 and share.loc[jan, 1] == 0.0 and share.loc[jan, 2] == 0.5
    assert share.loc[feb, 0] == 0.5  # c of c and e; d is left out of the denominator
    assert np.isnan(share.loc[feb, 1])  # nobody of February was observed 2 whole weeks
    assert share.attrs["sizes"].to_dict() == {jan: 2, feb: 3}


def test_figures_are_drawn_and_shown_as_png():
    events = _events([("a", "2026-01-01", "purchase"), ("b", "2026-01-09", "session_start")])
    figures = [
        plots.event_volume_figure(events),
        plots.cohort_retention_figure(plots.cohort_retention(events), min_size=1),
        plots.feature_distribution_figure(
            pd.DataFrame({"x": [1.0, 2.0, np.nan, 4.0], "label": [0, 0, 1, 1]}), ["x"]
        ),
    ]
    rng = np.random.default_rng(0)
    treated = rng.random(400) < 0.5
    y = (rng.random(400) < 0.2 + 0.2 * treated).astype(float)
    figures.append(
        plots.qini_figure({"discount": qini_score(rng.random(400), treated, y, n_boot=5)})
    )
    table = pd.DataFrame(
        {"dr": [0.5, 0.1], "dr_low": [0.2, 0.0], "dr_high": [0.8, 0.3], "true": [0.6, np.nan]},
        index=["learned", "random"],
    )
    figures.append(plots.policy_value_figure(table))
    for fig in figures:
        assert isinstance(fig, Figure) and fig.axes
    assert len(figures[0].axes[0].lines) == 2  # one line per event type
    image = plots.show(figures[-1])
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"


def test_feature_distribution_names_the_missing_column():
    with pytest.raises(ValueError, match=r"needs column\(s\) \['y'\]"):
        plots.feature_distribution_figure(pd.DataFrame({"x": [1.0], "label": [0]}), ["y"])


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_frame_and_predictions_reproduce_the_training_run(tmp_path):
    project = Project.create(tmp_path / "project")
    project.simulate(customers=1500, days=120, seed=5)
    project.build_features()
    spec = project.spec("churn")
    spec = spec.model_copy(update={"shap_sample": 0})
    cutoffs = project.cutoffs(spec)
    frame = project.training_frame(spec, cutoffs[-2:])
    assert set(frame["event_timestamp"]) == set(cutoffs[-2:])
    assert not frame.duplicated(["customer_id", "event_timestamp"]).any()
    assert set(frame.attrs["features"]) <= set(frame.columns)
    assert "last_event_epoch" not in frame.attrs["features"]  # excluded by the spec

    result = project.train(spec)
    predictions = project.predictions(result)
    assert len(predictions) == result.rows["test"]
    # the same rows, the same registered model: the notebook sees what training measured
    metrics = propensity.evaluation.binary_metrics(predictions["label"], predictions["model"])
    assert metrics["roc_auc"] == pytest.approx(result.metrics["model"]["roc_auc"], abs=1e-9)
    oracle = propensity.evaluation.ranking_metrics(predictions["label"], predictions["oracle"])
    assert oracle["roc_auc"] == pytest.approx(result.metrics["oracle"]["roc_auc"], abs=1e-9)
    table = Project.compare(result)
    assert table.loc[("churn", "model"), "roc_auc"] > table.loc[("churn", "recency"), "roc_auc"]
    for fig in (project.plot_calibration(result), project.plot_gain(result)):
        assert isinstance(fig, Figure)
    scores = project.score("churn")
    assert scores["score"].between(0, 1).all() and scores.attrs["version"] == result.version
