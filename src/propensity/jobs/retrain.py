"""Scheduled retraining: landing files → lake → features → online store → challengers → gates.

One :func:`retrain` call, safe to run from cron or a Kubernetes CronJob:

1. take the jobs lock (a second run at the same time exits at once, doing nothing);
2. ingest new landing files (``settings.landing_dir``; ``processed/`` and
   hidden files are skipped). A file that cannot be read at all is moved to
   ``<quarantine>/files/`` with a ``.reason.txt`` and the run goes on without
   it; rows that fail validation are quarantined by the ingest as usual. Each
   ingested file's SHA-256 is recorded in the state file, then the file moves
   to ``<landing>/processed/``. Rows of customers erased by ``forget`` are
   dropped by the ingest (suppression list), removed from the processed copy,
   and swept from the lake;
3. nothing new (the lake, the model specs and the landing folder as at the
   last successful run) → return ``up_to_date`` without touching anything;
4. rebuild the feature tables, write the new snapshot to the online store
   (incremental: only rows after the last materialized time);
5. measure drift of the current champions (:func:`~propensity.jobs.drift.drift_report`);
6. train a challenger for every model through
   :func:`propensity.pipeline.train.train` (registered, gated, never promoted
   there), each evaluated together with the champion on the challenger's (most
   recent labeled) test window;
7. move ``champion`` for each challenger that passes its spec's gates *and*
   the run's gates (data validation, drift), then record every decision —
   promoted or not, with the reasons — as a run of the MLflow experiment
   ``retrain`` and in the returned report.

Each stage is recorded, with the run's pid, in ``retrain_status.json`` in the
jobs folder (:func:`read_status`, ``propensity retrain --status``).

A run killed at any point leaves the champions and the lake intact: the lake
commits atomically, aliases move only in step 7, and the state file is
written last, so the next run redoes what is missing. Any error is recorded in
MLflow (status ``failed``) and raised as :class:`RetrainError`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from propensity import registry
from propensity.config import Settings, load_settings
from propensity.events._readers import SUFFIXES, IngestError
from propensity.events.ingest import IngestReport, ingest
from propensity.events.lake import MANIFEST_NAME, EventLake
from propensity.events.suppression import Screen
from propensity.features.snapshots import build_features
from propensity.jobs.drift import DEFAULT_MODELS, DriftReport, drift_report
from propensity.jobs.erasure import scrub_copy, suppression_list
from propensity.jobs.lock import LockBusyError, job_dir, jobs_lock
from propensity.models.spec import REGISTERED_MODELS
from propensity.pipeline.binary import TrainingResult
from propensity.pipeline.dataset import feature_adapter
from propensity.pipeline.gates import Check
from propensity.pipeline.train import train
from propensity.progress import ProgressCallback, report

__all__ = [
    "ModelDecision",
    "RetrainError",
    "RetrainPolicy",
    "retrained_models",
    "RetrainReport",
    "retrain",
    "RETRAIN_EXPERIMENT",
    "STATE_FILE",
    "STATUS_FILE",
    "read_status",
]

RETRAIN_EXPERIMENT = "retrain"
STATE_FILE = "retrain_state.json"
NBA = "next_best_action"
PROCESSED = "processed"
#: The running (or last) run's stage, pid and times, in the jobs folder (``retrain --status``).
STATUS_FILE = "retrain_status.json"
_STEPS = 7


class RetrainError(RuntimeError):
    """A retrain run failed; the champions were left as they were."""


class RetrainPolicy(BaseModel):
    """Run-level gates and options (the per-model gates live in each model spec).

    Examples
    --------
    >>> RetrainPolicy(models=("churn",)).max_quarantine_share
    0.01
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Models to retrain, in order.
    models: tuple[str, ...] = ("churn", "purchase_propensity", NBA)
    #: Models retrained after those only once they have a champion (a first version
    #: trained by the quickstart or by hand): a project that never served one is not
    #: made to train it.
    when_served: tuple[str, ...] = ("purchase_24h",)
    #: Data validation gate: no promotion when more than this share of the rows read
    #: in this run was quarantined, or when a whole landing file was unreadable.
    max_quarantine_share: float = Field(default=0.01, ge=0, le=1)
    #: PSI above which a feature or a champion's score is reported as drifted.
    drift_threshold: float = Field(default=0.25, gt=0)
    #: Fewer new lake rows than this since the last training: refresh features and the
    #: online store but keep the models, unless drift exceeds ``force_retrain_psi``.
    min_new_rows: int = Field(default=1, ge=0)
    #: Drift (largest PSI of a champion's scores) that forces training even without
    #: enough new rows (once per lake state). None disables.
    force_retrain_psi: float | None = Field(default=0.25, gt=0)
    #: Drift (largest score PSI) so large that no challenger is promoted automatically
    #: (usually a broken feed; a human should look). None disables.
    block_promotion_psi: float | None = Field(default=None, gt=0)


@dataclass
class ModelDecision:
    """What happened to one model in a retrain run."""

    model: str
    promoted: bool
    #: Every gate checked: the model's own, then the run's (data validation, drift).
    reasons: list[Check]
    challenger_version: int | None = None
    champion_before: int | None = None
    champion_after: int | None = None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One line: the verdict and the first failing reason."""
        was = "none" if self.champion_before is None else f"v{self.champion_before}"
        if self.promoted:
            verdict = f"promoted v{self.challenger_version} (champion was {was})"
        elif self.challenger_version is not None:
            verdict = f"kept {was}; challenger v{self.challenger_version} rejected"
        else:
            verdict = f"kept {was}; no challenger"
        failed = [c for c in self.reasons if not c.passed]
        return f"{self.model}: {verdict}" + (f" — {failed[0]}" if failed else "")


@dataclass
class RetrainReport:
    """What one :func:`retrain` run did.

    ``status`` is ``up_to_date`` (nothing new: nothing done), ``refreshed``
    (features and online store updated, models kept) or ``trained``.
    """

    status: str
    reason: str
    ingested_files: list[str] = field(default_factory=list)
    rejected_files: dict[str, str] = field(default_factory=dict)
    ingest: IngestReport | None = None
    suppressed_events: int = 0
    abandoned_versions: list[tuple[str, int]] = field(default_factory=list)
    new_rows: int = 0
    validation_passed: bool = True
    validation_reasons: list[Check] = field(default_factory=list)
    #: Things an operator should know that gate nothing (e.g. drift not measured).
    notes: list[str] = field(default_factory=list)
    drift: DriftReport | None = None
    decisions: dict[str, ModelDecision] = field(default_factory=dict)
    fingerprint: str = ""
    run_id: str | None = None
    seconds: float = 0.0

    @property
    def promoted(self) -> list[str]:
        """Models whose champion moved in this run."""
        return [m for m, d in self.decisions.items() if d.promoted]

    @property
    def exit_code(self) -> int:
        """0 when all went well; 2 when a landing file was rejected (needs a look)."""
        return 2 if self.rejected_files else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``decision.json`` in MLflow holds)."""
        out = asdict(self)
        out["ingest"] = None if self.ingest is None else self.ingest.summary()
        out["drift"] = None if self.drift is None else self.drift.to_dict()
        return out

    def summary(self) -> str:
        """What the CLI prints: status, data, drift and one line per model decision."""
        lines = [f"retrain: {self.status} — {self.reason}"]
        if self.ingested_files:
            lines.append(f"  ingested {len(self.ingested_files)} file(s)")
        if self.ingest is not None:
            lines += ["  " + row for row in self.ingest.summary().splitlines()]
        for name, why in self.rejected_files.items():
            lines.append(f"  REJECTED file {name}: {why}")
        if self.suppressed_events:
            lines.append(f"  erased again (forgotten customers): {self.suppressed_events} events")
        for model, version in self.abandoned_versions:
            lines.append(f"  marked abandoned: {model} version {version} (its run was stopped)")
        lines += [f"  validation: {r}" for r in self.validation_reasons]
        lines += [f"  note: {n}" for n in self.notes]
        if self.drift is not None:
            lines += ["  " + row for row in self.drift.summary().splitlines()]
        lines += ["  " + d.line() for d in self.decisions.values()]
        for d in self.decisions.values():
            lines += [f"    {d.model} gate: {r}" for r in d.reasons]
        if self.run_id:
            lines.append(
                f"  recorded in MLflow experiment {RETRAIN_EXPERIMENT!r}, run {self.run_id}"
            )
        return "\n".join(lines)


# -- state ----------------------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"ingested": {}}
    state: dict[str, Any] = json.loads(path.read_text())
    state.setdefault("ingested", {})
    return state


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _specs_hash(settings: Settings, models: Sequence[str]) -> str:
    """The model specs and the list of models retrained: a change means retraining."""
    digest = hashlib.sha256(",".join(models).encode())
    models_dir = settings.path(settings.models_dir)
    for spec in sorted(models_dir.glob("*.yaml")) if models_dir.exists() else []:
        digest.update(spec.name.encode() + spec.read_bytes())
    return digest.hexdigest()[:20]


def _fingerprint(settings: Settings, models: Sequence[str]) -> str:
    """The lake's committed files and the model specs: what a training run depends on."""
    manifest = settings.path(settings.lake_dir) / MANIFEST_NAME
    files = json.loads(manifest.read_text())["files"] if manifest.exists() else []
    digest = hashlib.sha256(json.dumps([(f["path"], f["rows"]) for f in files]).encode())
    digest.update(_specs_hash(settings, models).encode())
    return digest.hexdigest()[:20]


def _enter(folder: Path, stage: str, started: str) -> str:
    """Record the stage this run is in (what an operator, or a test, watches); return it."""
    body = {"stage": stage, "pid": os.getpid(), "started": started, "updated": _now()}
    _write_state(folder / STATUS_FILE, body)
    return stage


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_status(settings: Settings) -> dict[str, Any] | None:
    """The last stage a retrain run recorded (``None`` if none ran).

    ``stage`` is the step in progress, ``done`` or ``failed during <step>``; a
    stage other than those with no live ``pid`` means the run was killed there.

    Examples
    --------
    >>> read_status(load_settings())  # doctest: +SKIP
    {'stage': 'done', 'pid': 4242, 'started': '2026-03-02T03:00:00+00:00', ...}
    """
    path = job_dir(settings) / STATUS_FILE
    if not path.exists():
        return None
    status: dict[str, Any] = json.loads(path.read_text())
    return status


# -- steps ----------------------------------------------------------------------------------------


def _pending(landing: Path) -> list[Path]:
    if not landing.exists():
        return []
    skip = {PROCESSED}
    return sorted(
        p
        for p in landing.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(SUFFIXES)
        and not p.name.startswith((".", "_"))
        and not skip & set(p.relative_to(landing).parts[:-1])
    )


def _reject(settings: Settings, path: Path, reason: str) -> None:
    """Move an unreadable landing file to ``<quarantine>/files/`` with the reason beside it."""
    folder = settings.path(settings.quarantine_dir) / "files"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = folder / f"{stamp}-{path.name}"
    shutil.move(str(path), target)
    target.with_name(target.name + ".reason.txt").write_text(reason + "\n")


def _ingest(
    settings: Settings, files: list[Path], rejected: dict[str, str]
) -> tuple[IngestReport | None, list[Path]]:
    """Ingest ``files``; an unreadable file is rejected and the rest retried."""
    remaining = list(files)
    while remaining:
        try:
            result = ingest(
                remaining,
                EventLake(settings.path(settings.lake_dir)),
                settings.path(settings.quarantine_dir),
                suppression=suppression_list(settings),
                timezone=settings.timezone,
                timestamp_format=settings.events.timestamp_format,
            )
            return result, remaining
        except IngestError as exc:
            # The ingest stored nothing; its message starts with the file it failed on.
            culprit = next((p for p in remaining if str(exc).startswith(str(p))), None)
            if culprit is None:
                raise
            _reject(settings, culprit, str(exc))
            rejected[culprit.name] = str(exc)
            remaining.remove(culprit)
    return None, []


def _suppress(settings: Settings) -> int:
    """Rows of erased customers kept out of the lake in this run.

    Ingest drops them; a sweep of the lake also erases any that an older
    release (or a direct lake write) let in.
    """
    screen = Screen(suppression_list(settings))
    lake = EventLake(settings.path(settings.lake_dir))
    if not lake.files():
        return 0
    import duckdb

    con = duckdb.connect()
    try:
        ids = con.sql(f"SELECT DISTINCT customer_id FROM {lake.duckdb_scan()}").to_arrow_table()
    finally:
        con.close()
    back = screen.suppressed(ids.column(0))
    return lake.erase_customers(back) if back else 0


def _materialize(settings: Settings) -> None:
    adapter = feature_adapter(settings)
    # The adapter's one path: each customer written atomically across views; incremental,
    # so only rows after each view's last materialized end (the new snapshot) are written.
    adapter.materialize(incremental=True)


def _challenge(
    settings: Settings,
    name: str,
    progress: ProgressCallback | None,
    run_gates: list[Check],
    as_of: str | None = None,
) -> ModelDecision:
    """Train and gate one challenger, never promoting it: ``champion_after`` is set
    when it may be promoted (its gates and the run's passed)."""
    before = registry.champion_version(settings.tracking_uri, name)
    result = train(settings, name, progress=progress, promote=False, as_of=as_of)
    checks = [*result.gates.checks, *run_gates]
    decision = ModelDecision(name, False, checks, result.version, before, before, result.run_id)
    if isinstance(result, TrainingResult):
        decision.metrics = {k: float(v) for k, v in result.metrics.get("model", {}).items()}
        if result.gates.champion_value is not None:
            decision.metrics["champion_roc_auc"] = float(result.gates.champion_value)
    if result.version is not None and all(c.passed for c in checks):
        decision.champion_after = result.version
    return decision


def _close_undecided(settings: Settings, result: RetrainReport, why: str) -> None:
    """Mark this run's challengers that are still pending as rejected, with the reasons."""
    for decision in result.decisions.values():
        version = decision.challenger_version
        if version is None or decision.promoted:
            continue
        if registry.version_status(settings.tracking_uri, decision.model, version) == "pending":
            reasons = [str(c) for c in decision.reasons if not c.passed]
            registry.set_status(
                settings.tracking_uri,
                decision.model,
                version,
                "rejected",
                "; ".join([why, *reasons]),
            )


def _record(settings: Settings, result: RetrainReport, error: str | None = None) -> str | None:
    tags = {
        "status": result.status if error is None else "failed",
        "reason": result.reason[:4000],
        "fingerprint": result.fingerprint,
        "validation_passed": str(result.validation_passed),
        "promoted": ",".join(result.promoted) or "none",
        "rejected_files": ",".join(result.rejected_files) or "none",
    }
    for name, d in result.decisions.items():
        tags[f"decision.{name}"] = d.line()[:4000]
        tags[f"challenger.{name}"] = str(d.challenger_version)
    if result.drift is not None and result.drift.run_id:
        tags["drift_run_id"] = result.drift.run_id
    if error is not None:
        tags["error"] = error[:4000]
    metrics = {"new_rows": float(result.new_rows), "seconds": result.seconds}
    if result.ingest is not None:
        metrics.update(read=result.ingest.read, quarantined=result.ingest.quarantined)
    if result.drift is not None:
        metrics["max_psi"] = result.drift.max_psi
        metrics["max_score_psi"] = result.drift.max_score_psi
    for name, d in result.decisions.items():
        metrics[f"promoted.{name}"] = float(d.promoted)
    with tempfile.TemporaryDirectory() as tmp:
        body = result.to_dict()
        if error is not None:
            body["error"] = error
        (Path(tmp) / "decision.json").write_text(json.dumps(body, indent=2, default=str))
        return registry.log_record(
            settings.tracking_uri,
            RETRAIN_EXPERIMENT,
            metrics=metrics,
            tags=tags,
            artifacts_dir=tmp,
            run_name=f"retrain-{datetime.now(UTC):%Y%m%dT%H%M%SZ}",
        )


def retrain(
    settings: Settings,
    *,
    progress: ProgressCallback | None = None,
    policy: RetrainPolicy | None = None,
    force: bool = False,
    as_of: str | None = None,
) -> RetrainReport:
    """Ingest new landing files, refresh features, train challengers and gate promotion.

    Parameters
    ----------
    settings : Settings
        Reads ``landing_dir``, writes the lake, feature tables, online store and
        MLflow; job state, lock and audit files live in ``data/jobs`` (see
        :func:`~propensity.jobs.lock.job_dir`).
    progress : callable, optional
        ``progress(description, completed, total)`` after each step.
    policy : RetrainPolicy, optional
        Run-level gates and options.
    force : bool
        Train even when nothing is new.
    as_of : date, optional
        The date the data runs to, as for ``propensity train`` (default: the data
        end): the propensity challengers' latest labelled cutoff is as-of minus
        their horizon.

    Returns
    -------
    RetrainReport

    Raises
    ------
    LockBusyError
        Another retrain or forget is running; this run did nothing.
    RetrainError
        Any step failed; the failure is recorded in MLflow and the champions
        were not moved by this run (models promoted before the failing step
        passed all their gates).

    Examples
    --------
    >>> result = retrain(load_settings())  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    """
    policy = policy or RetrainPolicy()
    started = time.perf_counter()
    folder = job_dir(settings)
    state_path = folder / STATE_FILE
    with jobs_lock(settings, "retrain"):
        result = RetrainReport(status="running", reason="")
        began = _now()
        stage = _enter(folder, "locked", began)
        try:
            # Versions a killed run registered but never decided on.
            result.abandoned_versions = registry.abandon_pending(
                settings.tracking_uri, REGISTERED_MODELS
            )
            state = _read_state(state_path)
            policy = policy.model_copy(update={"models": retrained_models(settings, policy)})
            report(progress, "retrain: ingest", 0, _STEPS)
            stage = _enter(folder, "ingest", began)
            landing = settings.path(settings.landing_dir)
            pending = _pending(landing)
            hashes = {p: _sha256(p) for p in pending}
            new = [p for p in pending if hashes[p] not in state["ingested"]]
            if new:
                result.ingest, ingested = _ingest(settings, new, result.rejected_files)
                now = datetime.now(UTC).isoformat(timespec="seconds")
                for path in ingested:
                    counts = result.ingest.files.get(str(path)) if result.ingest else None
                    state["ingested"][hashes[path]] = {
                        "name": path.name,
                        "at": now,
                        "accepted": counts.accepted if counts else 0,
                    }
                result.ingested_files = [p.name for p in ingested]
                dropped = result.ingest.suppressed if result.ingest else 0
                result.suppressed_events = dropped + _suppress(settings)
                _write_state(state_path, state)
            # Files whose hash is recorded were ingested (now or by an earlier, killed run).
            for path in pending:
                if path.exists() and hashes[path] in state["ingested"]:
                    target = landing / PROCESSED / path.relative_to(landing)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                    if result.ingest is not None and result.ingest.suppressed:
                        # The raw copy still holds the erased customers' rows.
                        scrub_copy(settings, target)

            result.validation_reasons = _validation(result, policy)
            result.validation_passed = all(c.passed for c in result.validation_reasons)

            lake = EventLake(settings.path(settings.lake_dir))
            result.fingerprint = _fingerprint(settings, policy.models)
            result.new_rows = lake.count() - int(state.get("trained_rows", 0))
            if not force and result.fingerprint == state.get("trained_fingerprint"):
                result.status = "up_to_date"
                result.reason = "no new data and no spec change since the last successful run"
                result.seconds = time.perf_counter() - started
                if result.rejected_files:
                    result.run_id = _record(settings, result)
                _enter(folder, "done", began)
                return result
            if not lake.count():
                raise RetrainError(
                    f"the event lake at {lake.root} is empty and no landing file in "
                    f"{landing} could be ingested"
                )

            stage = _enter(folder, "features", began)
            report(progress, "retrain: features", 1, _STEPS)
            build_features(settings)
            stage = _enter(folder, "materialize", began)
            report(progress, "retrain: online store", 2, _STEPS)
            _materialize(settings)

            stage = _enter(folder, "drift", began)
            report(progress, "retrain: drift", 3, _STEPS)
            result.drift = _drift(settings, policy, result)
            missing = [
                m
                for m in policy.models
                if registry.champion_version(settings.tracking_uri, m) is None
            ]
            psi = result.drift.max_score_psi if result.drift is not None else 0.0
            forced_by_drift = (
                policy.force_retrain_psi is not None
                and psi > policy.force_retrain_psi
                and state.get("drift_forced") != result.fingerprint
            )
            specs = _specs_hash(settings, policy.models)
            if force:
                result.reason = "forced"
            elif missing:
                result.reason = f"no champion yet for {', '.join(missing)}"
            elif policy.models and specs != state.get("trained_specs"):
                result.reason = "the model specs (or the models retrained) changed"
            elif result.new_rows >= max(policy.min_new_rows, 1):
                result.reason = f"{result.new_rows} new events since the last training"
            elif forced_by_drift:
                result.reason = f"drift: score PSI {psi:.3f} > {policy.force_retrain_psi}"
                state["drift_forced"] = result.fingerprint
            else:
                result.status = "refreshed"
                result.reason = (
                    f"{result.new_rows} new events (< {policy.min_new_rows}) and no drift "
                    "above the threshold: features refreshed, models kept"
                )

            if result.status != "refreshed":
                run_gates = [] if result.validation_passed else [_BLOCKED_BY_VALIDATION]
                if policy.block_promotion_psi is not None and psi > policy.block_promotion_psi:
                    run_gates.append(
                        Check(
                            "drift",
                            False,
                            psi,
                            policy.block_promotion_psi,
                            f"blocked: drift score PSI {psi:.3f} > {policy.block_promotion_psi}",
                        )
                    )
                failures = []
                for k, name in enumerate(policy.models):
                    report(progress, f"retrain: train {name}", 4 + k / len(policy.models), _STEPS)
                    stage = _enter(folder, f"train {name}", began)
                    try:
                        result.decisions[name] = _challenge(
                            settings, name, progress, run_gates, as_of
                        )
                    except Exception as exc:  # one model failing must not stop the others
                        failures.append(f"{name}: {type(exc).__name__}: {exc}")
                        before = registry.champion_version(settings.tracking_uri, name)
                        error = f"error: {type(exc).__name__}: {exc}"
                        result.decisions[name] = ModelDecision(
                            name,
                            False,
                            [Check("trained", False, text=error)],
                            None,
                            before,
                            before,
                        )
                result.status = "trained"
                if failures:
                    raise RetrainError("training failed for " + "; ".join(failures))
                # Aliases move only now, after every challenger was trained and gated.
                stage = _enter(folder, "promote", began)
                report(progress, "retrain: promote", 5, _STEPS)
                for decision in result.decisions.values():
                    version = decision.champion_after
                    if (
                        not decision.promoted
                        and version is not None
                        and version != decision.champion_before
                    ):
                        registry.set_champion(settings.tracking_uri, decision.model, version)
                        decision.promoted = True
                _close_undecided(settings, result, "not promoted")

            report(progress, "retrain: record", 6, _STEPS)
            state["trained_fingerprint"] = result.fingerprint
            if result.status == "trained":
                # A refresh keeps counting new rows from the last training, so trickles add up.
                state["trained_specs"] = _specs_hash(settings, policy.models)
                state["trained_rows"] = lake.count()
            state["last_success"] = datetime.now(UTC).isoformat(timespec="seconds")
            result.seconds = time.perf_counter() - started
            result.run_id = _record(settings, result)
            # Written last: a run killed before this point is redone by the next one.
            _write_state(state_path, state)
            _enter(folder, "done", began)
            report(progress, "retrain: record", _STEPS, _STEPS)
            return result
        except Exception as exc:
            result.seconds = time.perf_counter() - started
            message = f"retrain failed during {stage}: {type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):  # the failure itself must surface
                _enter(folder, f"failed during {stage}", began)
            with contextlib.suppress(Exception):  # the failure itself must surface
                _close_undecided(settings, result, f"the run failed: {message}")
            try:
                result.run_id = _record(settings, result, message + "\n" + traceback.format_exc())
            except Exception as log_exc:  # the failure itself must still surface
                message += f" (and recording it in MLflow failed: {log_exc})"
            raise RetrainError(message + "; the champions keep serving") from exc


_BLOCKED_BY_VALIDATION = Check("data_validation", False, text="blocked: data validation failed")


def retrained_models(settings: Settings, policy: RetrainPolicy) -> tuple[str, ...]:
    """``policy.models``, then each of ``policy.when_served`` that has a champion.

    Examples
    --------
    >>> retrained_models(load_settings(), RetrainPolicy())  # doctest: +SKIP
    ('churn', 'purchase_propensity', 'next_best_action', 'purchase_24h')
    """
    served = [
        m
        for m in policy.when_served
        if m not in policy.models
        and registry.champion_version(settings.tracking_uri, m) is not None
    ]
    return (*policy.models, *served)


def _validation(result: RetrainReport, policy: RetrainPolicy) -> list[Check]:
    """The run's data gates: no unreadable landing file, few rows quarantined."""
    checks = []
    if result.rejected_files:
        n = len(result.rejected_files)
        checks.append(
            Check(
                "landing_files",
                False,
                n,
                0,
                f"{n} landing file(s) unreadable and quarantined",
            )
        )
    if result.ingest is not None and result.ingest.read:
        share = result.ingest.quarantined / result.ingest.read
        checks.append(
            Check(
                "max_quarantine_share",
                share <= policy.max_quarantine_share,
                share,
                policy.max_quarantine_share,
                f"quarantined {result.ingest.quarantined} of {result.ingest.read} rows "
                f"({share:.2%}) <= {policy.max_quarantine_share:.2%}",
            )
        )
    return checks


def _drift(settings: Settings, policy: RetrainPolicy, result: RetrainReport) -> DriftReport | None:
    models = [m for m in policy.models if m in DEFAULT_MODELS]
    if not any(registry.champion_version(settings.tracking_uri, m) is not None for m in models):
        return None
    try:
        return drift_report(settings, models=models, threshold=policy.drift_threshold)
    except ValueError as exc:
        # e.g. the champion's training snapshots were dropped: measured next time instead
        result.notes.append(f"drift not measured: {exc}")
        return None


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m propensity.jobs.retrain [--config FILE] [--force] [--status]``; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m propensity.jobs.retrain")
    parser.add_argument("--config", default=None, help="propensity.yaml or its folder")
    parser.add_argument("--force", action="store_true", help="train even if nothing is new")
    parser.add_argument("--status", action="store_true", help="print the last run's stage")
    args = parser.parse_args(argv)
    if args.status:
        print(json.dumps(read_status(load_settings(args.config)), indent=1))
        return 0
    try:
        result = retrain(load_settings(args.config), force=args.force)
    except LockBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except RetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary(), flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(_main())
