"""Benchmark: ``propensity triggers report`` on the simulator, beside the true effect.

For each seed, the simulator (with in-session intent) gives every abandoned
cart and its true return probability ``q``. The ``abandoned_cart`` trigger
(``models/triggers.yaml``, its hold-out share raised to ``--holdout``) fires 30
minutes after the last cart add when the cart has not been bought by then, once
per customer and UTC day; its hold-out is the trigger's own hash.

The reminder's effect follows the simulator's law for ``cart_recovery``: it
multiplies the chance that the open cart is still bought, ``r`` (the posterior of
``q`` given no purchase by the firing), by ``RECOVERY_BOOST`` (capped at
``RETURN_CAP``), with the simulator's return delay. A treated cart that the
simulated customer did not buy after the firing is bought with probability
``(min(boost * r, cap) - r) / (1 - r)``: an extra purchase event. Hold-outs keep
the simulated events as they are.

The lake gets the simulated events, one ``campaign_exposure`` per firing and the
extra purchases; ``measure_triggers`` (the command's code) estimates the uplift of
"a purchase within 24 hours". The true effect is counted on the same firings: the
extra purchases are drawn for every firing, hold-outs included, and the truth is
the share of firings converted with them (all customers treated) minus without
(none treated). Printed per seed: the firings, the estimate with its 95% interval, the
truth, and an A/A run (boost 1: the truth is 0).

    python benchmarks/bench_trigger_measurement.py [--customers 20000] [--days 60]
        [--seeds 1 2 3] [--holdout 0.5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from propensity.activation.measure import TriggerOutcome, measure_triggers
from propensity.activation.runner import load_project_triggers
from propensity.config import load_settings
from propensity.events import _sim_intent as intent
from propensity.events._sim_latent import RECOVERY_BOOST
from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA
from propensity.events.simulator import SimulationConfig, simulate

REPO = Path(__file__).resolve().parents[1]
DELAY = pd.Timedelta(minutes=30)
HOURS = 24.0
MEAN_S = intent.RETURN_MEAN_HOURS * 3600
#: Mean seconds from a return visit's start to its purchase.
BUY_S = float(np.mean(intent.RETURN_BUY_SECONDS))


def _firings(carts: pd.DataFrame) -> pd.DataFrame:
    """Carts still not bought 30 minutes after the last add, one per customer and day."""
    fired_at = carts["abandoned_at"] + DELAY
    bought_at = carts["returned_at"] + pd.Timedelta(seconds=BUY_S)
    open_then = bought_at.isna() | (bought_at > fired_at)
    out = carts.assign(fired_at=fired_at, bought_at=bought_at)[open_then]
    day = out["fired_at"].dt.floor("D")
    return out.loc[~pd.DataFrame({"c": out["customer_id"], "d": day}).duplicated()].reset_index(
        drop=True
    )


def _still_bought(q: np.ndarray) -> np.ndarray:
    """r: P(the cart is bought after the firing | not bought by it), under the delay law."""
    tail = np.exp(-(DELAY.total_seconds() - BUY_S) / MEAN_S)
    return q * tail / (1.0 - q + q * tail)


def _outcomes(buys: pd.DataFrame, fired: pd.DataFrame) -> np.ndarray:
    """Whether each firing's customer has one of ``buys`` in (fired_at, fired_at + H]."""
    pairs = fired[["customer_id", "fired_at"]].reset_index().merge(buys, on="customer_id")
    inside = (pairs["event_timestamp"] > pairs["fired_at"]) & (
        pairs["event_timestamp"] <= pairs["fired_at"] + pd.Timedelta(hours=HOURS)
    )
    hit = np.zeros(len(fired), bool)
    hit[pairs.loc[inside, "index"].to_numpy()] = True
    return hit


def closed_loop(
    seed: int, *, customers: int, days: int, holdout: float, boost: float
) -> tuple[TriggerOutcome, float, float]:
    """Simulate, fire, respond and measure: ``(the report, the true effect, seconds)``."""
    root = Path(tempfile.mkdtemp(prefix="bench-measure-"))
    try:
        (root / "models").mkdir()
        shutil.copy(REPO / "models" / "actions.yaml", root / "models")
        spec = yaml.safe_load((REPO / "models" / "triggers.yaml").read_text())
        spec["triggers"]["abandoned_cart"]["holdout_share"] = holdout
        (root / "models" / "triggers.yaml").write_text(yaml.safe_dump(spec))
        settings = load_settings(root, environ={})
        trigger = load_project_triggers(settings).triggers["abandoned_cart"]

        config = SimulationConfig(customers=customers, days=days, seed=seed, cart_returns=True)
        sim = simulate(config)
        events = sim.events.select(["customer_id", "event_type", "event_timestamp"]).to_pandas()
        fired = _firings(sim.truth.cart_abandonments)
        held = trigger.in_holdout(fired["customer_id"].tolist())
        r = _still_bought(fired["p_return"].to_numpy())
        extra_p = (np.minimum(boost * r, intent.RETURN_CAP) - r) / (1.0 - r)
        not_bought_after = fired["bought_at"].isna().to_numpy()
        rng = np.random.default_rng([seed, 7])
        # Every firing's extra purchase is drawn, the hold-outs' too (never written): the
        # potential outcomes under "treated" of every customer the trigger fired for.
        bought = not_bought_after & (rng.random(len(fired)) < extra_p)
        delay_us = ((rng.exponential(MEAN_S, len(fired)) + BUY_S) * 1e6).astype(np.int64)
        extra_at = fired["fired_at"] + pd.to_timedelta(delay_us, unit="us")
        extra = ~held & bought

        # The true effect on these firings: a customer's extra purchases can land in the
        # window of their other firings too, so both outcomes are counted, not modelled.
        buys = events[events["event_type"] == "purchase"][["customer_id", "event_timestamp"]]
        untreated = _outcomes(buys, fired)
        extras = pd.DataFrame({"customer_id": fired["customer_id"], "event_timestamp": extra_at})
        treated = untreated | _outcomes(extras[bought], fired)
        truth = float(np.mean(treated) - np.mean(untreated))

        rows = []
        for i, row in enumerate(fired.itertuples()):
            rows.append(
                {
                    "event_id": f"exposure:abandoned_cart:{row.customer_id}:{i}",
                    "customer_id": row.customer_id,
                    "event_type": "campaign_exposure",
                    "event_timestamp": row.fired_at.to_pydatetime(),
                    "campaign_id": "abandoned_cart",
                    "action": "control" if held[i] else "cart_recovery",
                }
            )
            if extra[i]:
                rows.append(
                    {
                        "event_id": f"recovered:{row.customer_id}:{i}",
                        "customer_id": row.customer_id,
                        "event_type": "purchase",
                        "event_timestamp": extra_at[i].to_pydatetime(),
                        "order_id": f"recovered-{i}",
                        "price": 20.0,
                    }
                )
        lake = EventLake(root / "data" / "lake")
        lake.append(sim.events)
        lake.append(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA))
        end = datetime.fromtimestamp(lake.max_timestamp().timestamp(), UTC)
        t1 = time.perf_counter()
        [m] = measure_triggers(
            settings, load_project_triggers(settings), names=["abandoned_cart"], as_of=end
        )
        return m, truth, time.perf_counter() - t1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--holdout", type=float, default=0.5)
    args = parser.parse_args()
    print(
        f"{args.customers:,} customers, {args.days} days, hold-out {args.holdout:.0%}, outcome "
        f"a purchase within {HOURS:g} h of the firing, 95% intervals",
        flush=True,
    )
    for seed in args.seeds:
        for boost in (RECOVERY_BOOST, 1.0):
            t0 = time.perf_counter()
            m, truth, seconds = closed_loop(
                seed, customers=args.customers, days=args.days, holdout=args.holdout, boost=boost
            )
            covered = "covered" if m.low <= truth <= m.high else "NOT covered"
            print(
                f"seed {seed}, boost {boost:g}: {m.treated:,} treated / {m.held_out:,} held out "
                f"({m.pending:,} pending); rate {m.treated_rate:.2%} vs {m.held_out_rate:.2%}; "
                f"uplift {m.uplift:+.2%} [{m.low:+.2%}, {m.high:+.2%}], true {truth:+.2%} "
                f"({covered}); measured in {seconds:.2f} s of {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    sys.exit(0)


if __name__ == "__main__":
    main()
