"""Time and memory of the simulator.

Usage: python benchmarks/bench_simulate.py [--customers 100000] [--days 365]
       [--truth-every 1] [--cart-returns] [--out DIR] [--in-memory]

By default times ``simulate_to`` (streaming blocks to ``--out``, a temporary
folder if not given); ``--in-memory`` times ``simulate`` instead;
``--cart-returns`` turns in-session intent on. Prints events, seconds, CPU
seconds (all threads: steadier than wall time on a shared machine), events per
second, the load average and peak RSS (sampled with psutil across all threads,
and the kernel's high-water mark).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time

import psutil

from propensity.events.simulator import SimulationConfig, simulate, simulate_to


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
    parser.add_argument("--cart-returns", action="store_true", help="in-session intent on")
    parser.add_argument("--out", default=None, help="output folder of simulate_to")
    parser.add_argument("--in-memory", action="store_true", help="time simulate() instead")
    args = parser.parse_args()
    config = SimulationConfig(
        customers=args.customers,
        days=args.days,
        seed=args.seed,
        truth_every_days=args.truth_every,
        cart_returns=args.cart_returns,
    )
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample_peak, args=(stop, peak), daemon=True)
    sampler.start()
    load_before = os.getloadavg()[0]
    began, cpu_began = time.perf_counter(), time.process_time()
    if args.in_memory:
        sim = simulate(config)
        rows, exposures = sim.events.num_rows, len(sim.truth.exposures)
        mode = "simulate (in memory)"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            meta = simulate_to(config, args.out or tmp)
        rows, exposures = meta["events"], meta["exposures"]
        mode = "simulate_to (streaming to disk)"
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    stop.set()
    sampler.join()
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"mode={mode} customers={args.customers} days={args.days}", end=" ")
    print(f"cart_returns={args.cart_returns}")
    print(f"events={rows:,} exposures={exposures:,}")
    print(f"seconds={seconds:.1f} cpu_seconds={cpu:.1f} events_per_second={rows / seconds:,.0f}")
    print(f"load_average_1min before={load_before:.1f} after={os.getloadavg()[0]:.1f}")
    print(f"peak_rss_mb={peak[0] / 2**20:,.0f} (sampled) {high_water:,.0f} (ru_maxrss)")


if __name__ == "__main__":
    main()
