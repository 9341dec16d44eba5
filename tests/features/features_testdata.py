"""Hand-built and small seeded event sets for the feature tests (imported by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from propensity.events.schema import ARROW_SCHEMA

REPO_FEATURE_REPO = Path(__file__).resolve().parents[2] / "feature_repo"


def _utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def events_table(rows: list[tuple[Any, ...]], id_prefix: str = "e") -> pa.Table:
    """Rows of (customer_id, timestamp, event_type, {optional fields}) -> canonical table."""
    records = []
    for i, row in enumerate(rows):
        customer, ts, kind = row[:3]
        extra = row[3] if len(row) > 3 else {}
        record: dict[str, Any] = {f.name: None for f in ARROW_SCHEMA}
        record.update(
            customer_id=customer,
            event_id=f"{id_prefix}{i:05d}",
            event_timestamp=_utc(ts),
            event_type=kind,
            **extra,
        )
        records.append(record)
    return pa.Table.from_pylist(records, schema=ARROW_SCHEMA)


def random_events(customers: int, events: int, days: int, seed: int) -> pa.Table:
    """Seeded random events of every type over ``days`` from 2024-01-01 (ids unique per seed)."""
    rng = np.random.default_rng(seed)
    kinds = np.array(
        [
            "session_start",
            "page_view",
            "add_to_cart",
            "checkout_start",
            "purchase",
            "feature_use",
            "email_open",
            "email_click",
            "support_ticket",
            "campaign_exposure",
        ]
    )
    cust = rng.integers(0, customers, events)
    offset = rng.integers(0, days * 86_400, events)
    kind = kinds[rng.integers(0, len(kinds), events)]
    rows = []
    for i in range(events):
        k = str(kind[i])
        extra: dict[str, Any] = {"session_id": f"S{cust[i]}-{offset[i] // 7200}"}
        if k == "purchase":
            extra.update(
                order_id=f"O{cust[i]}-{offset[i] // 3600}",
                price=float(rng.integers(1, 100)),
                quantity=float(rng.integers(1, 4)),
            )
        elif k == "feature_use":
            extra["feature_name"] = f"f{rng.integers(0, 6)}"
        elif k == "campaign_exposure":
            extra["action"] = ["discount", "control", "loyalty_points"][rng.integers(0, 3)]
        ts = pd.Timestamp("2024-01-01") + pd.Timedelta(seconds=int(offset[i]))
        rows.append((f"C{cust[i]:07d}", ts, k, extra))
    return events_table(rows, id_prefix=f"r{seed}-")


def late_customers(events: pa.Table, start: pd.Timestamp) -> pa.Table:
    """The same events moved to new customers whose history starts at ``start``."""
    frame = events.to_pandas()
    frame["customer_id"] = "L" + frame["customer_id"].str[1:]
    frame["event_id"] = "late-" + frame["event_id"]
    frame["event_timestamp"] = start + (frame["event_timestamp"] - frame["event_timestamp"].min())
    return pa.Table.from_pandas(frame, schema=events.schema, preserve_index=False)
