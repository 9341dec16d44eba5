"""Behavioral event simulator with exact ground truth.

Customers follow a latent process (engagement with a trend, conversion,
feature adoption, friction, and an absorbing alive -> fading -> dormant chain:
disengagement shows as a decline over about a week before dormancy, and
dormant customers come back for a rare visit) and emit the canonical events.
Weekly campaign waves assign a random share of recently active customers
one of :data:`ACTIONS` with logged, covariate-dependent probabilities; the
true effects (on the hazard, the conversion, the visits and the return of
abandoned carts) differ by segment.

The truth is computed from the latent process, not from outcomes:

* ``customer_daily``: for each customer and each midnight T after signup,
  ``p_churn`` = P(no session_start and no purchase in [T, T + churn horizon))
  and ``p_purchase`` = P(at least one purchase in [T, T + purchase horizon)),
  given the state at T (including campaigns already sent) and no later
  campaign exposure;
* ``exposures``: for every exposure and every action, the same two
  probabilities from the exposure's midnight had that action been assigned.

With ``cart_returns`` (in-session intent, ``_sim_intent``) both count the
purchases and visits of abandoned carts that come back, the carts still open
at T among them; ``cart_recovery`` acts only through them (it multiplies the
return probability of the carts abandoned while it is in effect), so without
intent it has no effect.

:func:`simulate` returns everything in memory (tests, small runs);
:func:`simulate_to` streams block after block to disk for large runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from propensity.events import _sim_block as blk
from propensity.events import _sim_latent as lat
from propensity.events._sim_arrow import coded_strings, fixed_width_ids, nullable_floats
from propensity.events.schema import ARROW_SCHEMA

__all__ = [
    "ACTIONS",
    "FEATURES",
    "SimulationConfig",
    "Simulation",
    "Truth",
    "simulate",
    "simulate_to",
    "write_simulation",
    "load_truth",
]

ACTIONS = lat.ACTIONS
FEATURES = lat.FEATURES
_BLOCK = 4096  # customers simulated together; part of the definition of a seed's output
_PART_ROWS = 2_000_000
_WORKERS = 2
_TRAITS = (
    "engagement",
    "drift",
    "conversion",
    "conversion_drift",
    "price_sensitivity",
    "value_level",
    "friction",
    "adoption_ceiling",
    "adoption_days",
    "email_affinity",
    "items_mean",
)


class SimulationConfig(BaseModel):
    """Size, seed and behavioral knobs of a simulation.

    Examples
    --------
    >>> SimulationConfig(customers=1_000, days=60).purchase_horizon_days
    14
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    customers: int = Field(default=20_000, gt=0, le=9_999_999)
    days: int = Field(default=180, gt=0)
    seed: int = Field(default=42, ge=0)
    start: date = date(2026, 1, 1)
    churn_horizon_days: int = Field(default=30, gt=0)
    purchase_horizon_days: int = Field(default=14, gt=0)
    #: Share of customers already signed up before ``start``.
    initial_share: float = Field(default=0.6, ge=0.0, le=1.0)
    #: Oldest signup of the initial base, in days before ``start``.
    history_days: int = Field(default=720, gt=0)
    #: Scale of the daily alive -> fading hazard.
    hazard_base: float = Field(default=0.004, gt=0.0, lt=0.25)
    #: Share of eligible customers touched by each weekly campaign wave.
    campaign_share: float = Field(default=0.08, ge=0.0, le=1.0)
    #: Weekday of the waves (0 = Monday).
    campaign_weekday: int = Field(default=0, ge=0, le=6)
    #: Waves target customers with a session in this many days before.
    eligibility_days: int = Field(default=30, gt=0)
    #: Keep the daily truth only every n-th day (1 = every day).
    truth_every_days: int = Field(default=1, gt=0)
    #: In-session intent: abandoned carts come back to buy within hours (see ``_sim_intent``);
    #: the only channel of ``cart_recovery``'s effect.
    cart_returns: bool = False


@dataclass
class Truth:
    """Ground truth tables of a simulation (see the module docstring)."""

    customers: pd.DataFrame
    customer_daily: pd.DataFrame
    exposures: pd.DataFrame
    #: One row per abandoned cart (only with ``cart_returns``): its true return probability.
    cart_abandonments: pd.DataFrame = field(default_factory=lambda: _abandonment_frame([]))


@dataclass
class Simulation:
    """Events in the canonical schema plus their ground truth."""

    events: pa.Table
    truth: Truth
    config: SimulationConfig


def _product_prices(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 10**6])
    base = rng.lognormal(3.0, 0.5, len(lat.CATEGORIES))
    spread = rng.lognormal(0.0, 0.45, (len(lat.CATEGORIES), blk.PRODUCTS_PER_CATEGORY))
    return np.round(base[:, None] * spread, 2).ravel()


def _settings(config: SimulationConfig) -> blk.BlockSettings:
    return blk.BlockSettings(
        days=config.days,
        start=config.start,
        churn_horizon=config.churn_horizon_days,
        purchase_horizon=config.purchase_horizon_days,
        initial_share=config.initial_share,
        history_days=config.history_days,
        hazard_base=config.hazard_base,
        campaign_share=config.campaign_share,
        campaign_weekday=config.campaign_weekday,
        eligibility_days=config.eligibility_days,
        truth_every=config.truth_every_days,
        product_prices=_product_prices(config.seed),
        cart_returns=config.cart_returns,
    )


def _campaign_names(start: date, length: int) -> list[str]:
    waves = [f"wave-{start + timedelta(days=k)}" for k in range(length)]
    letters = [f"newsletter-{start + timedelta(days=k)}" for k in range(-6, length)]
    return waves + letters


class _Counters:
    def __init__(self) -> None:
        self.events = 0
        self.sessions = 0
        self.orders = 0


def _event_table(
    res: blk.BlockResult, first_customer: int, start_us: int, names: list[str], c: _Counters
) -> tuple[pa.Table, np.ndarray]:
    ev = res.events
    n = ev["customer"].size
    ids = c.events + np.arange(n)
    session, order, product = ev["session"], ev["order"], ev["product"]
    arrays = [
        fixed_width_ids("C", first_customer + ev["customer"], 7),
        fixed_width_ids("E", ids, 10),
        pa.array(start_us + ev["ts"], pa.timestamp("us", tz="UTC")),
        coded_strings(ev["type"], blk.EVENT_CODES),
        fixed_width_ids("S", c.sessions + session, 9, valid=session >= 0),
        fixed_width_ids("P", product, 5, valid=product >= 0),
        coded_strings(ev["category"], lat.CATEGORIES),
        nullable_floats(ev["price"]),
        nullable_floats(ev["quantity"]),
        fixed_width_ids("O", c.orders + order, 9, valid=order >= 0),
        coded_strings(ev["feature"], lat.FEATURES),
        coded_strings(ev["channel"], blk.CHANNELS),
        coded_strings(ev["device"], blk.DEVICES),
        coded_strings(ev["campaign"], names),
        coded_strings(ev["action"], lat.ACTIONS),
        nullable_floats(ev["propensity"]),
    ]
    # Event ids of exposures, in the order of the block's exposure records.
    at = np.flatnonzero(ev["exposure"] >= 0)
    exposure_ids = np.empty(at.size, dtype=np.int64)
    exposure_ids[ev["exposure"][at]] = ids[at]
    c.events += n
    c.sessions += res.sessions
    c.orders += res.orders
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA), exposure_ids


@dataclass
class _BlockOutput:
    """One block, ready to write: Arrow events and daily truth, small frames."""

    events: pa.Table
    customers: pd.DataFrame
    daily: pa.Table
    exposures: dict[str, np.ndarray]
    abandonments: pd.DataFrame


def _blocks(
    config: SimulationConfig, progress: Callable[[int, int], None] | None
) -> Iterator[_BlockOutput]:
    """Simulate block after block; at most ``_WORKERS`` blocks are in flight."""
    s = _settings(config)
    names = _campaign_names(config.start, s.length)
    start_dt = datetime(config.start.year, config.start.month, config.start.day, tzinfo=UTC)
    start_us = int(start_dt.timestamp()) * 1_000_000
    counters = _Counters()
    firsts = list(range(0, config.customers, _BLOCK))

    def run(b: int) -> blk.BlockResult:
        n = min(_BLOCK, config.customers - firsts[b])
        return blk.simulate_block(np.random.default_rng([config.seed, b]), s, n)

    # numpy and arrow release the GIL: the next block simulates while this one
    # is converted to Arrow; results are consumed in block order.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        pending = {b: pool.submit(run, b) for b in range(min(_WORKERS, len(firsts)))}
        for b, first in enumerate(firsts):
            res = pending.pop(b).result()
            if b + _WORKERS < len(firsts):
                pending[b + _WORKERS] = pool.submit(run, b + _WORKERS)
            n = res.traits.signup_day.size
            abandoned = _abandonments(res, first + 1, start_us, counters.sessions)
            table, exposure_ids = _event_table(res, first + 1, start_us, names, counters)
            res.exposures["customer"] = res.exposures["customer"] + first
            res.exposures["event"] = exposure_ids
            out = _BlockOutput(
                events=table,
                customers=_customer_frame(res.traits, first, config.start),
                daily=_daily_table(res.daily, first, n, config.start),
                exposures=res.exposures,
                abandonments=abandoned,
            )
            del res
            yield out
            if progress is not None:
                progress(first + n, config.customers)


def simulate(
    config: SimulationConfig | None = None, progress: Callable[[int, int], None] | None = None
) -> Simulation:
    """Simulate events and ground truth in memory.

    For large runs prefer :func:`simulate_to`, which streams blocks to disk.

    Parameters
    ----------
    config : SimulationConfig, optional
        Defaults to ``SimulationConfig()`` (20,000 customers, 180 days, seed 42).
    progress : callable, optional
        Called as ``progress(customers_done, customers_total)`` after each block.

    Returns
    -------
    Simulation
        ``events`` (pyarrow Table in ``ARROW_SCHEMA``, sorted by customer then time)
        and ``truth`` (customers, customer_daily, exposures).

    Examples
    --------
    >>> sim = simulate(SimulationConfig(customers=200, days=30, seed=1))
    >>> sim.events.schema == ARROW_SCHEMA
    True
    """
    config = config or SimulationConfig()
    tables: list[pa.Table] = []
    customers: list[pd.DataFrame] = []
    daily: list[pa.Table] = []
    exposures: list[dict[str, np.ndarray]] = []
    abandoned: list[pd.DataFrame] = []
    for out in _blocks(config, progress):
        tables.append(out.events)
        customers.append(out.customers)
        daily.append(out.daily)
        exposures.append(out.exposures)
        abandoned.append(out.abandonments)
    truth = Truth(
        customers=pd.concat(customers, ignore_index=True),
        customer_daily=_daily_frame(pa.concat_tables(daily)),
        exposures=_exposure_frame(exposures, config.start),
        cart_abandonments=_abandonment_frame(abandoned),
    )
    return Simulation(pa.concat_tables(tables), truth, config)


def simulate_to(
    config: SimulationConfig | None,
    out_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Simulate and write block by block, never holding all events in memory.

    Writes the same layout as :func:`write_simulation` (and, for the same
    configuration, the same tables as ``write_simulation(simulate(config))``).

    Parameters
    ----------
    config : SimulationConfig, optional
        Defaults to ``SimulationConfig()``.
    out_dir : path
        Output folder; existing event parts in it are replaced.
    progress : callable, optional
        Called as ``progress(customers_done, customers_total)`` after each block.

    Returns
    -------
    dict
        The metadata written to ``simulation.json`` (config, horizons,
        actions, features, counts of events and exposures).

    Examples
    --------
    >>> meta = simulate_to(SimulationConfig(customers=50_000, days=365), "out")  # doctest: +SKIP
    >>> meta["events"]  # doctest: +SKIP
    9876543
    """
    config = config or SimulationConfig()
    out = _prepare(out_dir)
    customers: list[pd.DataFrame] = []
    exposures: list[dict[str, np.ndarray]] = []
    abandoned: list[pd.DataFrame] = []
    with (
        _PartWriter(out / "events") as events,
        _DailyWriter(out / "truth" / "customer_daily.parquet") as daily,
    ):
        for block in _blocks(config, progress):
            events.write(block.events)
            daily.write(block.daily)
            customers.append(block.customers)
            exposures.append(block.exposures)
            abandoned.append(block.abandonments)
            del block
    frame = _exposure_frame(exposures, config.start)
    _write_frame(pd.concat(customers, ignore_index=True), out / "truth" / "customers.parquet")
    _write_frame(frame, out / "truth" / "exposures.parquet")
    _write_frame(_abandonment_frame(abandoned), out / "truth" / "cart_abandonments.parquet")
    return _write_meta(out, config, events.rows, len(frame))


def _customer_frame(traits: lat.Traits, first: int, start: date) -> pd.DataFrame:
    n = traits.signup_day.size
    frame = pd.DataFrame(
        {
            "customer_id": fixed_width_ids("C", np.arange(first + 1, first + n + 1), 7)
            .to_numpy(zero_copy_only=False)
            .astype(object),
            "signup_date": np.datetime64(start, "D") + traits.signup_day.astype("timedelta64[D]"),
            "initially_alive": traits.initially_alive,
        }
    )
    for name in _TRAITS:
        frame[name] = getattr(traits, name).astype(np.float32)
    frame["fade_days"] = traits.fade_days.astype(np.int16)
    frame["signup_date"] = frame["signup_date"].dt.date
    return frame


def _daily_table(cols: dict[str, np.ndarray], first: int, n: int, start: date) -> pa.Table:
    """Daily truth of one block: dictionary-encoded ids, date32, float32 values."""
    ids = fixed_width_ids("C", np.arange(first + 1, first + n + 1), 7)
    epoch_day = (start - date(1970, 1, 1)).days
    arrays: dict[str, pa.Array] = {
        "customer_id": pa.DictionaryArray.from_arrays(pa.array(cols["customer"]), ids),
        "date": pa.array((cols["day"] + epoch_day).astype(np.int32)).cast(pa.date32()),
    }
    for key, values in cols.items():
        if key not in ("customer", "day"):
            arrays[key] = pa.array(values)
    return pa.table(arrays)


def _daily_frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas(date_as_object=False)
    frame["date"] = frame["date"].astype("datetime64[s]")
    return frame


def _exposure_frame(parts: list[dict[str, np.ndarray]], start: date) -> pd.DataFrame:
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    start_dt = datetime(start.year, start.month, start.day, tzinfo=UTC)
    start_us = int(start_dt.timestamp()) * 1_000_000
    ts = start_us + (cols["day"] * 86_400 + cols["second"]) * 1_000_000
    frame = pd.DataFrame(
        {
            "customer_id": _strings("C", cols["customer"] + 1, 7),
            "event_id": _strings("E", cols["event"], 10),
            "exposure_timestamp": pd.to_datetime(ts, unit="us", utc=True),
            "action": np.array(ACTIONS, dtype=object)[cols["action"]],
            "propensity": cols["propensity"],
            "tenure_days": cols["tenure"],
            "alive": cols["alive"],
            "fading": cols["state"] == 1,
        }
    )
    for outcome in ("purchase", "churn"):
        for a in ACTIONS:
            frame[f"p_{outcome}_{a}"] = cols[f"p_{outcome}_{a}"]
    return frame.sort_values(["exposure_timestamp", "customer_id"], ignore_index=True)


def _abandonments(
    res: blk.BlockResult, first_customer: int, start_us: int, first_session: int
) -> pd.DataFrame:
    """The block's abandoned carts with global ids and UTC times."""
    a = res.abandonments
    if a is None:
        return _abandonment_frame([])

    def times(us: np.ndarray) -> pd.Series:
        stamps = pd.Series(pd.to_datetime(start_us + us, unit="us", utc=True))
        return stamps.where(us >= 0)

    return pd.DataFrame(
        {
            "customer_id": _strings("C", first_customer + a.customer, 7),
            "session_id": _strings("S", first_session + a.session, 9),
            "abandoned_at": times(a.abandoned_at),
            "p_return": a.p_return,
            "returned_at": times(a.returned_at),
        }
    )


def _abandonment_frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
    columns = {
        "customer_id": "object",
        "session_id": "object",
        "abandoned_at": "datetime64[us, UTC]",
        "p_return": "float64",
        "returned_at": "datetime64[us, UTC]",
    }
    frames = [p for p in parts if len(p)]
    if not frames:
        return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})
    frame = pd.concat(frames, ignore_index=True).astype(columns)
    return frame.sort_values(["abandoned_at", "customer_id"], ignore_index=True)


def _strings(prefix: str, numbers: np.ndarray, digits: int) -> np.ndarray:
    return fixed_width_ids(prefix, numbers, digits).to_numpy(zero_copy_only=False).astype(object)


class _PartWriter:
    """Event parts of at most ``_PART_ROWS`` rows, written as blocks arrive."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_part = 0
        self._parts = 0

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    def write(self, table: pa.Table) -> None:
        at = 0
        while at < table.num_rows:
            if self._writer is None or self._in_part >= _PART_ROWS:
                if self._writer is not None:
                    self._writer.close()
                path = self.folder / f"part-{self._parts:05d}.parquet"
                self._writer = pq.ParquetWriter(path, ARROW_SCHEMA)
                self._parts += 1
                self._in_part = 0
            take = min(_PART_ROWS - self._in_part, table.num_rows - at)
            self._writer.write_table(table.slice(at, take))
            self._in_part += take
            at += take
        self.rows += table.num_rows


class _DailyWriter:
    """The daily truth file, one row group per block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _DailyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)


def _prepare(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    (out / "events").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for old in (out / "events").glob("part-*.parquet"):
        old.unlink()
    return out


def _write_frame(frame: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def _write_meta(out: Path, config: SimulationConfig, events: int, exposures: int) -> dict[str, Any]:
    meta = {
        "config": config.model_dump(mode="json"),
        "horizons": {
            "churn_days": config.churn_horizon_days,
            "purchase_days": config.purchase_horizon_days,
        },
        "actions": list(ACTIONS),
        "features": list(FEATURES),
        "events": events,
        "exposures": exposures,
    }
    (out / "simulation.json").write_text(json.dumps(meta, indent=2))
    return meta


def write_simulation(sim: Simulation, out_dir: str | Path) -> None:
    """Write events and truth under ``out_dir``.

    Layout: ``events/part-*.parquet``, ``truth/customers.parquet``,
    ``truth/customer_daily.parquet`` (``date`` as date32, ids dictionary
    encoded, probabilities float32), ``truth/exposures.parquet`` and
    ``simulation.json``.

    Examples
    --------
    >>> sim = simulate(SimulationConfig(customers=100, days=20))  # doctest: +SKIP
    >>> write_simulation(sim, "out")  # doctest: +SKIP
    """
    out = _prepare(out_dir)
    with _PartWriter(out / "events") as events:
        for batch in sim.events.to_batches(max_chunksize=_BLOCK * 256):
            events.write(pa.Table.from_batches([batch]))
    _write_frame(sim.truth.customers, out / "truth" / "customers.parquet")
    daily = pa.Table.from_pandas(sim.truth.customer_daily, preserve_index=False)
    daily = daily.set_column(1, "date", daily["date"].cast(pa.date32()))
    pq.write_table(daily, out / "truth" / "customer_daily.parquet")
    _write_frame(sim.truth.exposures, out / "truth" / "exposures.parquet")
    _write_frame(sim.truth.cart_abandonments, out / "truth" / "cart_abandonments.parquet")
    _write_meta(out, sim.config, sim.events.num_rows, len(sim.truth.exposures))


def load_truth(out_dir: str | Path) -> Truth:
    """Read the truth tables written by :func:`write_simulation`.

    Examples
    --------
    >>> truth = load_truth("out")  # doctest: +SKIP
    >>> truth.customer_daily.columns[:4].tolist()  # doctest: +SKIP
    ['customer_id', 'date', 'p_churn', 'p_purchase']
    """
    folder = Path(out_dir) / "truth"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: run write_simulation first")
    daily = pq.read_table(folder / "customer_daily.parquet").to_pandas(date_as_object=False)
    carts = folder / "cart_abandonments.parquet"
    return Truth(
        customers=pq.read_table(folder / "customers.parquet").to_pandas(),
        customer_daily=daily,
        exposures=pq.read_table(folder / "exposures.parquet").to_pandas(),
        # Written by every version that simulates intent; older folders have none.
        cart_abandonments=(
            pq.read_table(carts).to_pandas() if carts.exists() else _abandonment_frame([])
        ),
    )
