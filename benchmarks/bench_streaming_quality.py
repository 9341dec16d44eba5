"""Benchmark: what the streaming features add, on the simulator with in-session intent.

For each seed: simulate (``cart_returns`` on, the truth for a 1-day purchase
horizon), ingest, build features, then train ``purchase_24h`` twice, on
``purchase_v1`` (batch features only) and on ``purchase_v2`` (plus the
streaming features), changing nothing else; print test AUC, log loss and mean
prediction of each beside the oracle's (the simulator's true probabilities on
the same rows). Quality figures: contention does not change them.

Usage: python benchmarks/bench_streaming_quality.py [--seeds 42] [--customers 20000] [--days 180]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from propensity import Project

SERVICES = ("purchase_v1", "purchase_v2")


def _line(label: str, m: dict[str, float]) -> str:
    return (
        f"  {label:<28} AUC {m['roc_auc']:.4f}  log loss {m['log_loss']:.4f}  "
        f"mean prediction {m['mean_prediction']:.4f}"
    )


def run(seed: int, customers: int, days: int, root: Path) -> None:
    t = time.perf_counter()
    project = Project.create(root)
    project.simulate(
        customers=customers, days=days, seed=seed, cart_returns=True, purchase_horizon_days=1
    )
    project.build_features()
    print(f"seed {seed}: {customers:,} customers x {days} days ready in "
          f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
    spec = root / "models" / "purchase_24h.yaml"
    text = spec.read_text()
    oracle = None
    for service in SERVICES:
        spec.write_text(re.sub(r"feature_service: \S+", f"feature_service: {service}", text))
        t = time.perf_counter()
        metrics = project.train("purchase_24h").metrics
        oracle = metrics["oracle"]
        print(f"{_line(service, metrics['model'])}  ({time.perf_counter() - t:.0f} s)", flush=True)
    assert oracle is not None
    print(_line("oracle", oracle), f"(test rows {oracle['rows']:,.0f}, rate "
          f"{oracle['base_rate']:.4f})", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=180)
    args = parser.parse_args()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run(seed, args.customers, args.days, Path(tmp) / "project")


if __name__ == "__main__":
    main()
