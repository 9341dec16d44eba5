"""CPU seconds to ingest an orders-only CSV: ISO dates by default, `%Y%m%d` dates with the format.

Usage: ``python benchmarks/bench_ingest_formats.py [ROWS]`` (default 1,000,000, seed 0).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.events.ingest import ingest


def _orders(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    days = pd.Timestamp("2023-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D")
    return pd.DataFrame(
        {
            "customer_id": [f"C{i:07d}" for i in rng.integers(0, 100_000, rows)],
            "date": days,
            "amount": np.round(rng.gamma(2.0, 20.0, rows), 2),
        }
    )


def main(rows: int) -> None:
    frame = _orders(rows)
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, fmt in (
            ("ISO, no format", "%Y-%m-%d", None),
            ("%Y%m%d", "%Y%m%d", "%Y%m%d"),
        ):
            path = Path(tmp) / f"orders-{shape.replace('%', '')}.csv"
            frame.assign(date=frame["date"].dt.strftime(shape)).to_csv(path, index=False)
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            report = ingest(
                path,
                Path(tmp) / f"lake-{shape}",
                Path(tmp) / "q",
                orders_only=True,
                timestamp_format=fmt,
            )
            cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
            print(
                f"{name:16s} rows={rows:,} accepted={report.accepted:,} "
                f"identical={report.identical_rows:,} quarantined={report.quarantined:,} "
                f"cpu={cpu:.1f}s wall={wall:.1f}s"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
