"""The ``propensity`` command line: thin commands, each one call into the library."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from propensity.config import ConfigError, Settings, load_settings
from propensity.progress import rich_progress

__all__ = ["app"]

app = typer.Typer(
    help="Churn, purchase-propensity and next-best-action models on behavioral events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

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


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            _fail(f"--map expects SOURCE=TARGET, got {pair!r}")
        mapping[source] = target
    return mapping


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("data/simulated"),
    customers: Annotated[int, typer.Option(min=1)] = 20_000,
    days: Annotated[int, typer.Option(min=1)] = 180,
    seed: Annotated[int, typer.Option()] = 42,
    start: Annotated[str, typer.Option(help="First simulated day (YYYY-MM-DD).")] = "2026-01-01",
) -> None:
    """Simulate behavioral events with ground truth into OUT."""
    from propensity.events.simulator import SimulationConfig, simulate, write_simulation

    config = SimulationConfig(
        customers=customers, days=days, seed=seed, start=date.fromisoformat(start)
    )
    with console.status(f"simulating {customers:,} customers × {days} days"):
        sim = simulate(config)
        write_simulation(sim, out)
    console.print(f"wrote {sim.events.num_rows:,} events and the ground truth to {out}")


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="CSV, Parquet or JSON Lines files.")],
    map_: Annotated[
        list[str], typer.Option("--map", help="Rename a source column: SOURCE=TARGET.")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    orders_only: Annotated[
        bool, typer.Option(help="Transaction log: customer, date/time, amount[, quantity].")
    ] = False,
    consent: Annotated[
        Path | None, typer.Option(help="File of customers who withdrew consent.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Validate event files and add them to the event lake."""
    from propensity.events.ingest import IngestError, ingest
    from propensity.events.lake import EventLake

    settings = _settings(config)
    lake = EventLake(settings.path(settings.lake_dir))
    try:
        report = ingest(
            paths,
            lake,
            settings.path(settings.quarantine_dir),
            mapping=_parse_mapping(map_),
            orders_only=orders_only,
            consent_file=consent,
            timezone=settings.timezone,
        )
    except IngestError as exc:
        _fail(str(exc))
    else:
        console.print(report.summary())


@app.command()
def quickstart(
    customers: Annotated[int, typer.Option(min=100)] = 20_000,
    days: Annotated[int, typer.Option(min=60)] = 180,
    seed: Annotated[int, typer.Option()] = 42,
    config: ConfigOption = None,
) -> None:
    """Run every stage on simulated data: simulate → ingest → features → models → scores."""
    from propensity.quickstart import run_quickstart

    settings = _settings(config)
    with rich_progress(console) as progress:
        run_quickstart(settings, customers=customers, days=days, seed=seed, progress=progress)


if __name__ == "__main__":  # pragma: no cover
    app()
