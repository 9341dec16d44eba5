"""Behavioral event simulator with exact ground truth.

Customers follow a latent process (engagement with a trend, conversion,
feature adoption, friction, an absorbing turn to dormancy) and emit the
canonical events. Weekly campaign waves assign a random share of recently
active customers one of :data:`ACTIONS` with logged, covariate-dependent
probabilities; the true effects differ by segment.

The truth is computed from the latent process, not from outcomes:

* ``customer_daily``: for each customer and each midnight T after signup,
  ``p_churn`` = P(no session_start and no purchase in [T, T + churn horizon))
  and ``p_purchase`` = P(at least one purchase in [T, T + purchase horizon)),
  given the state at T (including campaigns already sent) and no later
  campaign exposure;
* ``exposures``: for every exposure and every action, the same two
  probabilities from the exposure's midnight had that action been assigned.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

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
    #: Scale of the daily alive -> dormant hazard.
    hazard_base: float = Field(default=0.004, gt=0.0, lt=0.25)
    #: Share of eligible customers touched by each weekly campaign wave.
    campaign_share: float = Field(default=0.08, ge=0.0, le=1.0)
    #: Weekday of the waves (0 = Monday).
    campaign_weekday: int = Field(default=0, ge=0, le=6)
    #: Waves target customers with a session in this many days before.
    eligibility_days: int = Field(default=30, gt=0)
    #: Keep the daily truth only every n-th day (1 = every day).
    truth_every_days: int = Field(default=1, gt=0)


@dataclass
class Truth:
    """Ground truth tables of a simulation (see the module docstring)."""

    customers: pd.DataFrame
    customer_daily: pd.DataFrame
    exposures: pd.DataFrame


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


def simulate(
    config: SimulationConfig | None = None, progress: Callable[[int, int], None] | None = None
) -> Simulation:
    """Simulate events and ground truth.

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
    s = _settings(config)
    names = _campaign_names(config.start, s.length)
    start_dt = datetime(config.start.year, config.start.month, config.start.day, tzinfo=UTC)
    start_us = int(start_dt.timestamp()) * 1_000_000
    counters = _Counters()
    tables: list[pa.Table] = []
    customers: list[pd.DataFrame] = []
    daily: list[dict[str, np.ndarray]] = []
    exposures: list[dict[str, np.ndarray]] = []
    firsts = list(range(0, config.customers, _BLOCK))

    def run(b: int) -> blk.BlockResult:
        n = min(_BLOCK, config.customers - firsts[b])
        return blk.simulate_block(np.random.default_rng([config.seed, b]), s, n)

    # numpy and arrow release the GIL: two blocks simulate while the previous
    # one is converted to Arrow; results are consumed in block order.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        pending = {b: pool.submit(run, b) for b in range(min(_WORKERS, len(firsts)))}
        for b, first in enumerate(firsts):
            res = pending.pop(b).result()
            if b + _WORKERS < len(firsts):
                pending[b + _WORKERS] = pool.submit(run, b + _WORKERS)
            n = res.traits.signup_day.size
            table, exposure_ids = _event_table(res, first + 1, start_us, names, counters)
            tables.append(table)
            customers.append(_customer_frame(res.traits, first, config.start))
            res.daily["customer"] = res.daily["customer"] + first
            daily.append(res.daily)
            res.exposures["customer"] = res.exposures["customer"] + first
            res.exposures["event"] = exposure_ids
            exposures.append(res.exposures)
            del res
            if progress is not None:
                progress(first + n, config.customers)
    ids = pd.Index([f"C{i:07d}" for i in range(1, config.customers + 1)])
    truth = Truth(
        customers=pd.concat(customers, ignore_index=True),
        customer_daily=_daily_frame(daily, ids, config.start),
        exposures=_exposure_frame(exposures, ids, start_us),
    )
    return Simulation(pa.concat_tables(tables), truth, config)


def _customer_frame(traits: lat.Traits, first: int, start: date) -> pd.DataFrame:
    n = traits.signup_day.size
    frame = pd.DataFrame(
        {
            "customer_id": [f"C{i:07d}" for i in range(first + 1, first + n + 1)],
            "signup_date": np.datetime64(start, "D") + traits.signup_day.astype("timedelta64[D]"),
            "initially_alive": traits.initially_alive,
        }
    )
    for name in _TRAITS:
        frame[name] = getattr(traits, name).astype(np.float32)
    frame["signup_date"] = frame["signup_date"].dt.date
    return frame


def _daily_frame(parts: list[dict[str, np.ndarray]], ids: pd.Index, start: date) -> pd.DataFrame:
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    customer = pd.Categorical.from_codes(cols.pop("customer").astype(np.int32), categories=ids)
    day = cols.pop("day")
    when = (np.datetime64(start, "D") + day.astype("timedelta64[D]")).astype("datetime64[s]")
    return pd.DataFrame({"customer_id": customer, "date": when, **cols})


def _exposure_frame(
    parts: list[dict[str, np.ndarray]], ids: pd.Index, start_us: int
) -> pd.DataFrame:
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ts = start_us + (cols["day"] * 86_400 + cols["second"]) * 1_000_000
    frame = pd.DataFrame(
        {
            "customer_id": ids[cols["customer"]].to_numpy(),
            "event_id": [f"E{i:010d}" for i in cols["event"]],
            "exposure_timestamp": pd.to_datetime(ts, unit="us", utc=True),
            "action": np.array(ACTIONS, dtype=object)[cols["action"]],
            "propensity": cols["propensity"],
            "tenure_days": cols["tenure"],
            "alive": cols["alive"],
        }
    )
    for outcome in ("purchase", "churn"):
        for a in ACTIONS:
            frame[f"p_{outcome}_{a}"] = cols[f"p_{outcome}_{a}"]
    return frame.sort_values(["exposure_timestamp", "customer_id"], ignore_index=True)


def write_simulation(sim: Simulation, out_dir: str | Path) -> None:
    """Write events and truth under ``out_dir``.

    Layout: ``events/part-*.parquet``, ``truth/customers.parquet``,
    ``truth/customer_daily.parquet`` (``date`` as date32, ids dictionary
    encoded), ``truth/exposures.parquet`` and ``simulation.json``.

    Examples
    --------
    >>> sim = simulate(SimulationConfig(customers=100, days=20))  # doctest: +SKIP
    >>> write_simulation(sim, "out")  # doctest: +SKIP
    """
    out = Path(out_dir)
    (out / "events").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for old in (out / "events").glob("part-*.parquet"):
        old.unlink()
    events = sim.events
    parts = max(1, -(-events.num_rows // _PART_ROWS))
    size = -(-events.num_rows // parts)
    for i in range(parts):
        pq.write_table(events.slice(i * size, size), out / "events" / f"part-{i:05d}.parquet")
    pq.write_table(
        pa.Table.from_pandas(sim.truth.customers, preserve_index=False),
        out / "truth" / "customers.parquet",
    )
    _write_daily(sim.truth.customer_daily, out / "truth" / "customer_daily.parquet")
    pq.write_table(
        pa.Table.from_pandas(sim.truth.exposures, preserve_index=False),
        out / "truth" / "exposures.parquet",
    )
    meta = {
        "config": sim.config.model_dump(mode="json"),
        "horizons": {
            "churn_days": sim.config.churn_horizon_days,
            "purchase_days": sim.config.purchase_horizon_days,
        },
        "actions": list(ACTIONS),
        "features": list(FEATURES),
        "events": events.num_rows,
        "exposures": len(sim.truth.exposures),
    }
    (out / "simulation.json").write_text(json.dumps(meta, indent=2))


def _write_daily(frame: pd.DataFrame, path: Path, chunk: int = 4_000_000) -> None:
    schema = None
    writer = None
    try:
        for lo in range(0, max(len(frame), 1), chunk):
            table = pa.Table.from_pandas(frame.iloc[lo : lo + chunk], preserve_index=False)
            table = table.set_column(
                table.schema.get_field_index("date"), "date", table["date"].cast(pa.date32())
            )
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table.cast(schema))
    finally:
        if writer is not None:
            writer.close()


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
    return Truth(
        customers=pq.read_table(folder / "customers.parquet").to_pandas(),
        customer_daily=daily,
        exposures=pq.read_table(folder / "exposures.parquet").to_pandas(),
    )
