"""Time and memory of the simulator.

Usage: python benchmarks/bench_simulate.py [--customers 100000] [--days 365]
       [--truth-every 1] [--out DIR]

Prints events, seconds, events per second and peak RSS (sampled with psutil
across all threads, and the kernel's high-water mark).
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import psutil

from propensity.events.simulator import SimulationConfig, simulate, write_simulation


def _sample_peak(stop: threading.Event, peak: list[int]) -> None:
    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--truth-every", type=int, default=1)
    parser.add_argument("--out", default=None, help="also time write_simulation into this folder")
    args = parser.parse_args()
    config = SimulationConfig(
        customers=args.customers,
        days=args.days,
        seed=args.seed,
        truth_every_days=args.truth_every,
    )
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample_peak, args=(stop, peak), daemon=True)
    sampler.start()
    began = time.perf_counter()
    sim = simulate(config)
    seconds = time.perf_counter() - began
    rows = sim.events.num_rows
    print(f"customers={args.customers} days={args.days} truth_every={args.truth_every}")
    print(f"events={rows:,} daily_truth_rows={len(sim.truth.customer_daily):,}")
    print(f"exposures={len(sim.truth.exposures):,}")
    print(f"simulate_seconds={seconds:.1f} events_per_second={rows / seconds:,.0f}")
    if args.out:
        began = time.perf_counter()
        write_simulation(sim, args.out)
        print(f"write_seconds={time.perf_counter() - began:.1f}")
    stop.set()
    sampler.join()
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak_rss_mb={peak[0] / 2**20:,.0f} (sampled) {high_water:,.0f} (ru_maxrss)")


if __name__ == "__main__":
    main()
