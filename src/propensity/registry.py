"""MLflow tracking and model registry: the only module that imports mlflow.

One experiment per model (``churn``, ``purchase_propensity``...), tracking on the
project's SQLite database. A training run logs its spec, lineage, metrics and plots,
and a pyfunc model whose ``predict`` returns P(y=1) for float64 inputs. Each run also
stores the fitted estimator itself (``estimator/estimator.joblib``) so serving can load
the raw LightGBM booster and calibrator without pyfunc overhead.

The ``champion`` alias marks the version serving uses. Every registered version
carries a ``status`` tag: ``pending`` from registration until a decision is
recorded, then ``champion``, ``rejected`` (with the failed gates as
``status_reason``) or ``abandoned`` (its run was killed before deciding).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from sklearn.base import ClassifierMixin

__all__ = [
    "CHAMPION",
    "LoggedRun",
    "RegistryError",
    "ProbabilityModel",
    "log_run",
    "set_champion",
    "set_status",
    "version_status",
    "abandon_pending",
    "champion_version",
    "why_no_champion",
    "load_estimator",
    "version_info",
    "git_commit",
    "log_record",
    "find_records",
]

# Download progress bars would spam CLI and job logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CHAMPION = "champion"
STATUS_TAG = "status"
PENDING = "pending"
_REASON_TAG = "status_reason"
_PID_TAG = "registered_by_pid"
_ESTIMATOR_PATH = "estimator/estimator.joblib"
# Pinned here instead of inferred: inference imports the model in a subprocess and
# costs seconds per run.
_PIP_REQUIREMENTS = ["propensity", "lightgbm", "scikit-learn", "pandas", "numpy", "joblib"]


class RegistryError(LookupError):
    """A registered model, version or alias does not exist."""


@dataclass(frozen=True)
class LoggedRun:
    """Where a training run landed in MLflow."""

    run_id: str
    experiment_id: str
    model_name: str | None
    version: int | None


class ProbabilityModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """Pyfunc wrapper whose ``predict`` returns P(y=1) as float64.

    MLflow's LightGBM flavour predicts labels; serving and bulk scoring need
    calibrated probabilities, so a classifier's ``predict_proba`` column 1 is
    returned instead (another estimator's ``predict``, e.g. the uplift matrix).
    """

    def load_context(self, context: Any) -> None:
        self.estimator = joblib.load(context.artifacts["estimator"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        return _pyfunc_output(self.estimator, pd.DataFrame(model_input))


_MODEL_CODE = """\
import mlflow

from propensity.registry import ProbabilityModel

mlflow.models.set_model(ProbabilityModel())
"""


def _pyfunc_output(estimator: Any, frame: pd.DataFrame) -> np.ndarray:
    """What the pyfunc returns: P(y=1) of a classifier, else the estimator's ``predict``."""
    if isinstance(estimator, ClassifierMixin):
        return np.asarray(estimator.predict_proba(frame)[:, 1], dtype=np.float64)
    return np.asarray(estimator.predict(frame), dtype=np.float64)


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[MlflowClient]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous)


def _artifact_root(uri: str) -> str | None:
    # Keep artifacts next to the SQLite database, not in the caller's working directory.
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix) :]).parent / "mlartifacts").resolve().as_uri()
    return None


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    root = _artifact_root(uri)
    location = f"{root}/{name}" if root else None
    return str(client.create_experiment(name, artifact_location=location))


def git_commit(path: str | Path = ".") -> str | None:
    """The HEAD commit of the git repository holding ``path``, or None outside git.

    Examples
    --------
    >>> git_commit("/")  # doctest: +SKIP
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_run(
    tracking_uri: str,
    experiment: str,
    *,
    estimator: Any,
    input_example: pd.DataFrame,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    artifacts_dir: str | Path | None = None,
    register_as: str | None = None,
    run_name: str | None = None,
) -> LoggedRun:
    """Log one training run: params, metrics, tags, artifacts and the probability model.

    Parameters
    ----------
    tracking_uri : str
        MLflow tracking URI (``settings.tracking_uri``).
    experiment : str
        Experiment name (one per model); created on first use.
    estimator : object
        Fitted estimator whose ``predict(DataFrame)`` returns P(y=1); pickled with
        joblib under ``estimator/`` and wrapped as a pyfunc model.
    input_example : DataFrame
        A few rows of model input; cast to float64 to fix the signature to what
        serving sends (JSON numbers).
    params, metrics, tags : dict, optional
        Logged as-is (params as strings, metrics as floats; NaN metrics skipped and
        tagged so nothing silently disappears).
    artifacts_dir : path, optional
        Folder whose files (plots, reports) are logged as run artifacts.
    register_as : str, optional
        Registered model name; a new version is created from this run.

    Returns
    -------
    LoggedRun

    Examples
    --------
    >>> run = log_run(settings.tracking_uri, "churn", estimator=model,
    ...               input_example=X.head(5), register_as="churn")  # doctest: +SKIP
    """
    example = input_example.astype("float64")
    output = _pyfunc_output(estimator, example)
    signature = infer_signature(example, output)
    with _tracking(tracking_uri) as client, tempfile.TemporaryDirectory() as tmp:
        experiment_id = _experiment_id(client, experiment, tracking_uri)
        est_path = Path(tmp) / "estimator.joblib"
        joblib.dump(estimator, est_path)
        # MLflow's models-from-code: the pyfunc is defined by a file, not a cloudpickled
        # object (which MLflow warns may execute arbitrary code when loaded).
        code_path = Path(tmp) / "probability_model.py"
        code_path.write_text(_MODEL_CODE)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
            if params:
                mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            clean = {k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)}
            skipped = sorted(set(metrics or {}) - set(clean))
            mlflow.log_metrics(clean)
            all_tags = dict(tags or {})
            if skipped:
                all_tags["metrics_not_finite"] = ",".join(skipped)
            if all_tags:
                mlflow.set_tags(all_tags)
            mlflow.log_artifact(str(est_path), artifact_path="estimator")
            booster = getattr(estimator, "booster_", None)
            if booster is not None:
                booster_path = Path(tmp) / "booster.txt"
                booster.save_model(str(booster_path))
                mlflow.log_artifact(str(booster_path), artifact_path="estimator")
            if artifacts_dir is not None:
                mlflow.log_artifacts(str(artifacts_dir))
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code_path),
                artifacts={"estimator": str(est_path)},
                signature=signature,
                input_example=example,
                pip_requirements=_PIP_REQUIREMENTS,
                registered_model_name=register_as,
            )
        version = info.registered_model_version
        if register_as is not None and version is not None:
            # "pending" until a decision is recorded; a run killed before that leaves
            # the version pending, and the next retrain marks it abandoned.
            with _tracking(tracking_uri) as client:
                client.set_model_version_tag(register_as, str(version), STATUS_TAG, PENDING)
                client.set_model_version_tag(register_as, str(version), _PID_TAG, str(os.getpid()))
        return LoggedRun(
            run_id=run.info.run_id,
            experiment_id=experiment_id,
            model_name=register_as,
            version=int(version) if version is not None else None,
        )


def _model_version(client: MlflowClient, model: str, version: int | str) -> Any:
    try:
        if isinstance(version, str) and not version.isdigit():
            return client.get_model_version_by_alias(model, version)
        return client.get_model_version(model, str(version))
    except MlflowException as exc:
        message = f"model {model!r} has no version or alias {version!r}"
        if version == CHAMPION:
            message = _why_no_champion(client, model)
        raise RegistryError(message) from exc


def why_no_champion(tracking_uri: str, model: str) -> str:
    """Why ``model`` has no champion and what to do, in one sentence.

    Examples
    --------
    >>> why_no_champion(settings.tracking_uri, "churn")  # doctest: +SKIP
    "model 'churn' has no champion: its latest version 2 is rejected (fail: …); …"
    """
    with _tracking(tracking_uri) as client:
        return _why_no_champion(client, model)


def _why_no_champion(client: MlflowClient, model: str) -> str:
    """Say why a model has no champion and what to do, from its latest version's status."""
    try:
        versions = list(client.search_model_versions(f"name = '{model}'"))
    except MlflowException:
        versions = []
    if not versions:
        return f"model {model!r} has no champion: no version is registered yet (train it first)"
    latest = max(versions, key=lambda mv: int(mv.version))
    status = latest.tags.get(STATUS_TAG, "registered")
    reason = latest.tags.get(_REASON_TAG)
    because = f" ({reason})" if reason else ""
    return (
        f"model {model!r} has no champion: its latest version {latest.version} is {status}"
        f"{because}; to serve it anyway: propensity promote {model} --version {latest.version}"
    )


def set_champion(tracking_uri: str, model: str, version: int) -> None:
    """Point the ``champion`` alias of ``model`` at ``version``.

    Examples
    --------
    >>> set_champion(settings.tracking_uri, "churn", 3)  # doctest: +SKIP
    """
    with _tracking(tracking_uri) as client:
        _model_version(client, model, version)
        client.set_registered_model_alias(model, CHAMPION, str(version))
        client.set_model_version_tag(model, str(version), STATUS_TAG, "champion")


def set_status(tracking_uri: str, model: str, version: int, status: str, reason: str = "") -> None:
    """Record a version's fate (``rejected``, ``abandoned``…) and why, as version tags.

    Examples
    --------
    >>> set_status(settings.tracking_uri, "churn", 4, "rejected", "fail: AUC")  # doctest: +SKIP
    """
    with _tracking(tracking_uri) as client:
        _model_version(client, model, version)
        client.set_model_version_tag(model, str(version), STATUS_TAG, status)
        if reason:
            client.set_model_version_tag(model, str(version), _REASON_TAG, reason[:5000])


def version_status(tracking_uri: str, model: str, version: int) -> str | None:
    """The ``status`` tag of a version (None for versions registered before statuses)."""
    with _tracking(tracking_uri) as client:
        return _model_version(client, model, version).tags.get(STATUS_TAG)


def abandon_pending(tracking_uri: str, models: Iterable[str]) -> list[tuple[str, int]]:
    """Mark ``abandoned`` the pending versions whose registering process is gone.

    Returns the ``(model, version)`` pairs marked.

    Examples
    --------
    >>> abandon_pending(settings.tracking_uri, ["churn"])  # doctest: +SKIP
    [('churn', 7)]
    """
    import psutil

    marked = []
    with _tracking(tracking_uri) as client:
        for model in models:
            try:
                found = client.search_model_versions(
                    f"name = '{model}' and tags.{STATUS_TAG} = '{PENDING}'"
                )
            except MlflowException:
                continue  # no such registered model yet
            for mv in found:
                pid = mv.tags.get(_PID_TAG, "")
                if pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
                    continue  # its run is still deciding
                client.set_model_version_tag(model, mv.version, STATUS_TAG, "abandoned")
                client.set_model_version_tag(
                    model, mv.version, _REASON_TAG, "the run that registered it stopped first"
                )
                marked.append((model, int(mv.version)))
    return sorted(marked)


def champion_version(tracking_uri: str, model: str) -> int | None:
    """The version number the ``champion`` alias points at, or None.

    Examples
    --------
    >>> champion_version(settings.tracking_uri, "churn")  # doctest: +SKIP
    2
    """
    with _tracking(tracking_uri) as client:
        try:
            return int(client.get_model_version_by_alias(model, CHAMPION).version)
        except MlflowException:
            return None


def version_info(tracking_uri: str, model: str, version: int | str = CHAMPION) -> dict[str, Any]:
    """Run id, version, metrics, params and tags of a model version (or alias).

    Examples
    --------
    >>> version_info(settings.tracking_uri, "churn")["metrics"]["test_roc_auc"]  # doctest: +SKIP
    """
    with _tracking(tracking_uri) as client:
        mv = _model_version(client, model, version)
        run = client.get_run(mv.run_id)
        return {
            "model": model,
            "version": int(mv.version),
            "run_id": mv.run_id,
            "aliases": list(mv.aliases),
            "metrics": dict(run.data.metrics),
            "params": dict(run.data.params),
            "tags": dict(run.data.tags),
        }


def load_estimator(tracking_uri: str, model: str, version: int | str = CHAMPION) -> Any:
    """Load the fitted estimator object of a model version (default: the champion).

    For the project's propensity models this is a
    :class:`~propensity.models.pipeline.CalibratedBooster`: ``booster_``,
    ``calibrator_``, ``feature_names_``, ``predict_proba(X, num_threads=1)`` and
    ``contributions(X)``. The estimator is downloaded once per call; cache it.

    Examples
    --------
    >>> est = load_estimator(settings.tracking_uri, "churn")  # doctest: +SKIP
    >>> est.predict_proba(X, num_threads=1)[:, 1]  # doctest: +SKIP
    """
    with _tracking(tracking_uri) as client, tempfile.TemporaryDirectory() as tmp:
        mv = _model_version(client, model, version)
        local = client.download_artifacts(mv.run_id, _ESTIMATOR_PATH, tmp)
        estimator = joblib.load(local)
    estimator.registry_version_ = int(mv.version)
    return estimator


def log_record(
    tracking_uri: str,
    experiment: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    artifacts_dir: str | Path | None = None,
    run_name: str | None = None,
) -> str:
    """Log a run that holds no model (a job's decision, a drift report); return its id.

    Examples
    --------
    >>> log_record(settings.tracking_uri, "retrain", tags={"decision": "kept"})  # doctest: +SKIP
    """
    with _tracking(tracking_uri) as client:
        experiment_id = _experiment_id(client, experiment, tracking_uri)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
            if params:
                mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            clean = {k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)}
            mlflow.log_metrics(clean)
            if tags:
                mlflow.set_tags(tags)
            if artifacts_dir is not None:
                mlflow.log_artifacts(str(artifacts_dir))
        return str(run.info.run_id)


def find_records(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Runs of an experiment, newest first: run id, name, tags, metrics, params.

    Examples
    --------
    >>> find_records(settings.tracking_uri, "retrain")[0]["tags"]["status"]  # doctest: +SKIP
    """
    with _tracking(tracking_uri) as client:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
        return [
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "tags": dict(r.data.tags),
                "metrics": dict(r.data.metrics),
                "params": dict(r.data.params),
                "artifact_uri": r.info.artifact_uri,
            }
            for r in runs
        ]
