"""The ``propensity`` command line: thin commands, each one call into the library."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from propensity.config import PROJECT_FILE, ConfigError, Settings, load_settings
from propensity.progress import rich_progress

__all__ = ["app"]

app = typer.Typer(
    help="Churn, purchase-propensity and next-best-action models on behavioral events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _quiet_dependencies() -> None:
    """Keep third-party chatter out of command output (errors still show)."""
    # MLflow sets its loggers' level from this variable when it is first imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Project file (default: ./propensity.yaml)."),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        _fail(str(exc))
        raise  # unreachable; keeps type checkers happy


@contextlib.contextmanager
def _needs_project(settings: Settings) -> Iterator[None]:
    """Missing project parts (feature repo, lake, tables) end in one line with a hint."""
    try:
        yield
    except (FileNotFoundError, LookupError) as exc:
        hint = ""
        if not (settings.root / PROJECT_FILE).exists():
            hint = f" ({settings.root} holds no {PROJECT_FILE}: start one with `propensity init`)"
        _fail(f"{exc}{hint}")


def _fail(message: str, code: int = 2) -> None:
    # soft_wrap: one line however long, so scripts can grep it.
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            _fail(f"--map expects SOURCE=TARGET, got {pair!r}")
        if mapping.get(source, target) != target:
            _fail(f"--map renames {source!r} twice: to {mapping[source]!r} and {target!r}")
        mapping[source] = target
    return mapping


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="The new project's folder (created if absent).")],
) -> None:
    """Start a project in FOLDER: propensity.yaml, model specs (models/), Feast repo."""
    from propensity.project import Project

    try:
        project = Project.create(folder)
    except (FileExistsError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(
        f"created {project.root / PROJECT_FILE}, models/ and feature_repo/; next: "
        f"propensity ingest FILE... --config {folder}, then propensity features build"
    )


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("data/simulated"),
    customers: Annotated[int, typer.Option(min=1)] = 20_000,
    days: Annotated[int, typer.Option(min=1)] = 180,
    seed: Annotated[int, typer.Option()] = 42,
    start: Annotated[str, typer.Option(help="First simulated day (YYYY-MM-DD).")] = "2026-01-01",
) -> None:
    """Simulate behavioral events with ground truth into OUT."""
    from propensity.events.simulator import SimulationConfig, simulate_to

    config = SimulationConfig(
        customers=customers, days=days, seed=seed, start=date.fromisoformat(start)
    )
    with rich_progress(console) as progress:
        meta = simulate_to(
            config, out, progress=lambda done, total: progress("simulate", done, total)
        )
    console.print(f"wrote {meta['events']:,} events and the ground truth to {out}")


@app.command()
def ingest(
    paths: Annotated[
        list[Path], typer.Argument(help="CSV, Parquet, JSON Lines or Excel (.xlsx) files.")
    ],
    map_: Annotated[
        list[str], typer.Option("--map", help="Rename a source column: SOURCE=TARGET.")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    orders_only: Annotated[
        bool,
        typer.Option(
            help="Transaction log: customer, date/time, amount (or unit price)[, quantity]."
        ),
    ] = False,
    consent: Annotated[
        Path | None, typer.Option(help="File of customers who withdrew consent.")
    ] = None,
    timestamp_format: Annotated[
        str | None,
        typer.Option(
            help="How timestamps are written: strptime codes (%Y%m%d, '%d/%m/%Y %H:%M') "
            "or epoch_s / epoch_ms (also for numeric columns). Default: the project's "
            "events.timestamp_format, else ISO 8601."
        ),
    ] = None,
    keep_identical_rows: Annotated[
        bool,
        typer.Option(
            help="Keep identical rows of a file apart (their row number enters the derived id) "
            "instead of storing them once."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Validate event files and add them to the event lake."""
    from propensity.events.ingest import IngestError, ingest
    from propensity.events.lake import EventLake
    from propensity.jobs.erasure import suppression_list

    settings = _settings(config)
    mapping = _parse_mapping(map_)
    lake = EventLake(settings.path(settings.lake_dir))
    try:
        with rich_progress(console) as progress:
            report = ingest(
                paths,
                lake,
                settings.path(settings.quarantine_dir),
                mapping=mapping,
                orders_only=orders_only,
                consent_file=consent,
                suppression=suppression_list(settings),
                timezone=settings.timezone,
                # the flag overrides the project's events.timestamp_format
                timestamp_format=timestamp_format or settings.events.timestamp_format,
                keep_identical_rows=keep_identical_rows,
                progress=progress,
            )
    except IngestError as exc:
        _fail(str(exc))
    except OSError as exc:
        # Unwritable lake or quarantine folder, full disk: one line, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")
    else:
        console.print(report.to_rich())


features_app = typer.Typer(help="Build feature snapshots, apply the Feast repo, materialize.")
app.add_typer(features_app, name="features")


@features_app.command("build")
def features_build(config: ConfigOption = None) -> None:
    """Compute feature snapshots from the event lake into the feature tables."""
    from propensity.features.snapshots import build_features

    settings = _settings(config)
    with _needs_project(settings), console.status("building feature snapshots") as status:
        report = build_features(settings, progress=lambda message: status.update(message))
    console.print(
        f"{report.rows:,} rows over {len(report.snapshots)} snapshots "
        f"({report.snapshots[0]:%Y-%m-%d} … {report.snapshots[-1]:%Y-%m-%d})"
    )


@features_app.command("apply")
def features_apply(config: ConfigOption = None) -> None:
    """Register the Feast feature repo (entities, views, services)."""
    from propensity.features.store import FeatureStoreAdapter

    settings = _settings(config)
    with _needs_project(settings), console.status("feast apply"):
        applied = FeatureStoreAdapter(settings).ensure_applied()
    console.print("feature repo applied" if applied else "feature repo already up to date")


@features_app.command("materialize")
def features_materialize(config: ConfigOption = None) -> None:
    """Load the latest snapshot of every customer into the online store."""
    from propensity.features.store import FeatureStoreAdapter

    settings = _settings(config)
    with _needs_project(settings), rich_progress(console) as progress:
        written = FeatureStoreAdapter(settings).materialize(progress=progress)
    for view in written:
        console.print(
            f"{view.feature_view}: {view.entities_written:,} customers, "
            f"{view.values_written:,} values in {view.seconds:.1f} s"
        )


Model = Annotated[str, typer.Argument(help="churn, purchase, nba or all.")]
AsOf = Annotated[
    str | None,
    typer.Option(
        help="The date the data runs to (YYYY-MM-DD; default: the data end). train: the "
        "latest labelled cutoff is this date minus the horizon; score: features from "
        "events before it."
    ),
]
Horizon = Annotated[int | None, typer.Option(help="Label horizon in days.", min=1)]
TruthDir = Annotated[
    Path | None, typer.Option(help="Simulator output folder: report the oracle beside the model.")
]


@app.command()
def train(
    model: Model,
    horizon_days: Horizon = None,
    as_of: AsOf = None,
    truth: TruthDir = None,
    config: ConfigOption = None,
) -> None:
    """Train, evaluate and register a model; promote it when its gates pass."""
    from propensity.models.spec import SpecError, registered_name
    from propensity.pipeline.train import train as train_one

    settings = _settings(config)
    names = ["churn", "purchase", "nba"] if model == "all" else [model]
    for name in names:
        try:
            registered_name(name)
        except SpecError:
            _fail(f"unknown model {name!r}: choose churn, purchase, nba or all")
    with rich_progress(console) as progress:
        for name in names:
            try:
                result = train_one(
                    settings,
                    name,
                    as_of=as_of,
                    horizon_days=horizon_days,
                    truth_dir=truth,
                    progress=progress,
                )
            except (ValueError, LookupError) as exc:
                _fail(str(exc))
                return
            console.print(result)


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="churn, purchase or nba (or the registered name).")],
    version: Annotated[int, typer.Option(help="Version to make champion.")],
    config: ConfigOption = None,
) -> None:
    """Move the `champion` alias of MODEL to VERSION."""
    from propensity.models.spec import SpecError, registered_name
    from propensity.pipeline.train import promote as promote_version
    from propensity.registry import RegistryError

    settings = _settings(config)
    try:
        name = registered_name(model)
        promote_version(settings, name, version)
    except (SpecError, RegistryError) as exc:
        _fail(str(exc))
    console.print(f"{name} version {version} is now champion")


@app.command()
def score(
    out: Annotated[Path, typer.Option(help="CSV or Parquet file to write.")],
    model: Annotated[str | None, typer.Argument(help="churn or purchase; omit with --all.")] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="All three champions on the latest snapshot, in bulk.")
    ] = False,
    as_of: AsOf = None,
    config: ConfigOption = None,
) -> None:
    """Score every customer and write the scores to a file."""
    from propensity.pipeline.score import score_all, score_customers, write_scores

    settings = _settings(config)
    if not all_ and model not in ("churn", "purchase"):
        _fail("name a model (churn or purchase) or pass --all")
        return
    try:
        if all_:
            with rich_progress(console) as progress:
                rows = score_all(settings, out, progress=progress)["rows"]
        else:
            scores = score_customers(settings, str(model), as_of=as_of)
            write_scores(scores, out)
            rows = len(scores)
    except (ValueError, LookupError) as exc:
        _fail(str(exc))
        return
    console.print(f"scored {rows:,} customers → {out}")


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 3000,
    config: ConfigOption = None,
) -> None:
    """Start the scoring API (BentoML) on the champions; key from PROPENSITY_SERVING__API_KEY."""
    from propensity.serving.service import serve as run_server

    try:
        process = run_server(_settings(config), host=host, port=port)
    except ValueError as exc:  # e.g. an empty API key: refused before the server starts
        _fail(str(exc))
        return
    if process.returncode and process.returncode > 0:  # the server failed (not stopped)
        raise typer.Exit(process.returncode)


@app.command()
def stream(
    produce: Annotated[
        Path | None,
        typer.Option(help="Send this JSON Lines file of events into the stream, and stop."),
    ] = None,
    per_message: Annotated[int, typer.Option(min=1, help="Events per message (--produce).")] = 100,
    consumer: Annotated[
        str | None, typer.Option(help="This consumer's name in the group (default: host name).")
    ] = None,
    drain: Annotated[
        bool, typer.Option(help="Stop once nothing is left to read or pending.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Consume the Redis Stream of live events (stop with Ctrl-C or SIGTERM)."""
    import logging

    from propensity.jobs.redis_stream import TransportError
    from propensity.jobs.stream import ProduceError, run_stream
    from propensity.jobs.stream import produce as send_file

    settings = _settings(config)
    try:
        if produce is not None:
            with rich_progress(console) as progress:
                sent = send_file(
                    settings,
                    produce,
                    per_message=per_message,
                    progress=lambda done, total: progress("produce", done, total),
                )
            console.print(f"sent {sent:,} events to {settings.stream.key}")
            return
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        stats = run_stream(settings, consumer=consumer, stop_when_idle=drain)
    except (ProduceError, ValueError) as exc:
        _fail(str(exc))
        return
    except TransportError as exc:
        _fail(f"stream: cannot reach Redis: {exc}")
        return
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")
        return
    console.print(stats.line(), markup=False, soft_wrap=True)


@app.command()
def deliver(config: ConfigOption = None) -> None:
    """Deliver the triggered decisions to the webhook (stop with Ctrl-C or SIGTERM)."""
    import logging

    from propensity.activation.webhook import WebhookNotConfigured
    from propensity.activation.webhook import deliver as run_delivery
    from propensity.jobs.redis_stream import TransportError

    settings = _settings(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        stats = run_delivery(settings)
    except WebhookNotConfigured as exc:
        _fail(str(exc))
        return
    except TransportError as exc:
        _fail(f"deliver: cannot reach Redis: {exc}")
        return
    console.print(stats.line(), markup=False, soft_wrap=True)


@app.command()
def retrain(
    force: Annotated[bool, typer.Option(help="Retrain even when nothing changed.")] = False,
    status: Annotated[
        bool, typer.Option("--status", help="Print the stage the last run reached, and stop.")
    ] = False,
    as_of: AsOf = None,
    config: ConfigOption = None,
) -> None:
    """Ingest landing files, refresh features, train challengers, promote those that pass."""
    from propensity.jobs.lock import LockBusyError
    from propensity.jobs.retrain import RetrainError, read_status
    from propensity.jobs.retrain import retrain as run_retrain

    settings = _settings(config)
    if status:
        last = read_status(settings)
        if last is None:
            console.print("no retrain run recorded yet")
        else:
            console.print(
                f"stage {last['stage']} (pid {last['pid']}, started {last['started']}, "
                f"updated {last['updated']})",
                markup=False,
            )
        return
    try:
        with rich_progress(console) as progress:
            result = run_retrain(settings, progress=progress, force=force, as_of=as_of)
    except LockBusyError as exc:
        _fail(str(exc), 75)
        return
    except RetrainError as exc:
        _fail(str(exc), 1)
        return
    console.print(result.summary())
    raise typer.Exit(result.exit_code)


@app.command()
def drift(
    threshold: Annotated[float, typer.Option(help="PSI above which a score has drifted.")] = 0.25,
    config: ConfigOption = None,
) -> None:
    """PSI per feature and per champion score, training window vs latest snapshot."""
    from propensity.jobs.drift import drift_report

    try:
        console.print(drift_report(_settings(config), threshold=threshold).summary())
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def forget(
    customer_ids: Annotated[list[str], typer.Argument(help="Ids to erase, exactly as stored.")],
    check: Annotated[
        bool, typer.Option("--check", help="Only scan the project's files for the ids.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Erase customers from every file then scan for what is left (exit 1 if found)."""
    from propensity.jobs.erasure import check_ids
    from propensity.jobs.erasure import forget as run_forget
    from propensity.jobs.erasure_scan import find_traces

    settings = _settings(config)
    try:
        ids, warnings = check_ids(customer_ids)
    except ValueError as exc:
        _fail(str(exc))
        return
    if check:
        for warning in warnings:
            console.print(f"warning: {warning}", markup=False)
        with console.status("scanning the project's files"):
            traces = find_traces(settings, ids)
        for trace in traces:
            console.print(str(trace), markup=False)
        console.print(
            f"the id is still in {len(traces)} place(s)" if traces else "no file holds the id"
        )
    else:
        with console.status("erasing"):
            report = run_forget(settings, ids)
        console.print(report.summary(), markup=False)
        traces = report.traces
    if traces:
        raise typer.Exit(1)


triggers_app = typer.Typer(help="Triggered decisions and live segments from the event stream.")
app.add_typer(triggers_app, name="triggers")


@triggers_app.command("check")
def triggers_check(config: ConfigOption = None) -> None:
    """Check the triggers file against the features, scores and action catalog."""
    from propensity.activation.runner import load_project_triggers
    from propensity.activation.spec import TriggerFileError

    settings = _settings(config)
    try:
        spec = load_project_triggers(settings)
    except TriggerFileError as exc:
        _fail(str(exc))
        return
    console.print(
        f"{settings.activation.triggers_file}: {len(spec.triggers)} trigger(s), "
        f"{len(spec.segments)} segment(s), all valid",
        markup=False,
    )


@triggers_app.command("run")
def triggers_run(
    drain: Annotated[bool, typer.Option(help="Stop once a pass finds nothing to do.")] = False,
    config: ConfigOption = None,
) -> None:
    """Evaluate the triggers on live behavior; decisions to the outbound stream (Ctrl-C stops)."""
    import logging

    from propensity.activation.runner import run_triggers
    from propensity.activation.spec import TriggerFileError
    from propensity.jobs.lock import LockBusyError
    from propensity.jobs.redis_stream import TransportError

    settings = _settings(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        stats = run_triggers(settings, stop_when_idle=drain)
    except (TriggerFileError, LockBusyError, LookupError) as exc:
        _fail(str(exc))
        return
    except TransportError as exc:
        _fail(f"triggers: cannot reach Redis at {settings.activation_url}: {exc}")
        return
    console.print(stats.line(), markup=False, soft_wrap=True)


@triggers_app.command("report")
def triggers_report(
    trigger: Annotated[
        list[str] | None, typer.Argument(help="Triggers to report (default: every one that sends).")
    ] = None,
    outcome: Annotated[
        str, typer.Option(help="The event type that counts as success.")
    ] = "purchase",
    hours: Annotated[
        float | None,
        typer.Option(
            help="Outcome window after each firing (default: the trigger's window_hours).", min=0.0
        ),
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option(help="The date the data runs to (default: the lake's latest event)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per trigger.")] = False,
    config: ConfigOption = None,
) -> None:
    """Each trigger's incremental outcome from the lake: treated against hold-out."""
    import json

    import pandas as pd

    from propensity.activation.measure import measure_triggers, outcomes_table
    from propensity.activation.runner import load_project_triggers
    from propensity.activation.spec import TriggerFileError
    from propensity.events.schema import EVENT_TYPES

    settings = _settings(config)
    if outcome not in EVENT_TYPES:
        _fail(f"--outcome {outcome!r} is not an event type; one of: {', '.join(EVENT_TYPES)}")
    try:
        end = None if as_of is None else pd.Timestamp(as_of).to_pydatetime()
    except ValueError:
        _fail(f"--as-of {as_of!r} is not a date (YYYY-MM-DD or an ISO 8601 time)")
        return
    try:
        spec = load_project_triggers(settings)
        with _needs_project(settings):
            rows = measure_triggers(
                settings, spec, outcome=outcome, hours=hours, as_of=end, names=trigger
            )
    except (TriggerFileError, ValueError) as exc:
        _fail(str(exc))
        return
    if json_out:
        for row in rows:
            console.print_json(json.dumps(row.to_dict()))
    else:
        console.print(outcomes_table(rows))


nba_app = typer.Typer(help="Next-best-action from a randomized campaign table.")
app.add_typer(nba_app, name="nba")


@nba_app.command("tabular")
def nba_tabular(
    table: Annotated[Path, typer.Argument(help="CSV or Parquet: features, treatment, outcome.")],
    treatment: Annotated[str, typer.Option(help="Treatment arm column.")],
    outcome: Annotated[str, typer.Option(help="Outcome column (0/1 or value).")],
    out: Annotated[Path, typer.Option(help="Folder for the model, report and decisions.")],
    propensity_col: Annotated[
        str | None, typer.Option("--propensity", help="Logged assignment probability column.")
    ] = None,
    id_col: Annotated[str | None, typer.Option("--id", help="Customer id column.")] = None,
    control: Annotated[str, typer.Option(help="Name of the control arm.")] = "control",
    value: Annotated[float, typer.Option(help="Value of one unit of outcome.")] = 1.0,
    cost: Annotated[float, typer.Option(help="Cost of one treatment.")] = 0.0,
    features: Annotated[
        str | None,
        typer.Option(help="Comma-separated feature columns (default: every other column)."),
    ] = None,
    exclude: Annotated[
        str | None,
        typer.Option(help="Comma-separated columns to leave out (e.g. the campaign's outcomes)."),
    ] = None,
) -> None:
    """Fit, evaluate and export uplift models and a policy from a campaign table."""
    from propensity.models.nba import fit_tabular
    from propensity.models.nba_report import tabular_summary

    def names(option: str | None) -> list[str] | None:
        return None if option is None else [c.strip() for c in option.split(",") if c.strip()]

    try:
        result = fit_tabular(
            table,
            treatment,
            outcome,
            out_dir=out,
            propensity_col=propensity_col,
            control=control,
            id_col=id_col,
            value=value,
            cost=cost,
            feature_cols=names(features),
            exclude_cols=names(exclude),
        )
    except ValueError as exc:
        _fail(str(exc))
        return
    console.print(tabular_summary(result.report), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {result.model_path.parent}/ (model, decisions, report, plots)")


@app.command()
def quickstart(
    customers: Annotated[int, typer.Option(min=100)] = 20_000,
    days: Annotated[int, typer.Option(min=60)] = 180,
    seed: Annotated[int, typer.Option()] = 42,
    port: Annotated[int, typer.Option(help="Port of the scoring API started at the end.")] = 3000,
    config: ConfigOption = None,
) -> None:
    """Run every stage on simulated data: simulate → ingest → features → models → scores."""
    from propensity.quickstart import run_quickstart

    settings = _settings(config)
    with rich_progress(console) as progress:
        run_quickstart(
            settings,
            customers=customers,
            days=days,
            seed=seed,
            port=port,
            progress=progress,
            console=console,
        )


if __name__ == "__main__":  # pragma: no cover
    app()
