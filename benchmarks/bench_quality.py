"""Benchmark: model quality against the simulator's ground truth, per seed.

For each seed it prints

- **quickstart data** (simulate → ingest → features → train, as the quickstart does):
  churn test AUC beside the oracle's (the simulator's true probabilities on the same
  rows) and the gap; the next-best-action policy's true value beside the oracle
  policy's (the share captured) and beside the best single action, with the DR
  estimates and their 90% intervals on the held-out waves;
- **campaign tables** (:func:`propensity.events.campaign_table.simulate_campaign_table`,
  heterogeneous and null-effect variants): the learned policy's DR value and the
  best single arm's, each with its 90% interval, their paired difference, the
  heterogeneity gate's verdict and the true values.

Figures are quality, not speed, so contention on a shared machine does not
change them. The quickstart runs 20,000 customers × 180 days; ``--customers``
and ``--days`` shrink it; ``--cart-returns`` simulates it with in-session intent
(abandoned carts come back to buy, the channel of ``cart_recovery``) and adds
how often the learned policy sends ``cart_recovery`` where the truth says it is
the best action.

Usage: python benchmarks/bench_quality.py [--seeds 42 43 44] [--customers 20000] [--days 180]
       [--cart-returns] [--campaign-rows 20000] [--skip-quickstart]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from propensity import Project
from propensity.events.campaign_table import simulate_campaign_table
from propensity.models.nba import fit_tabular
from propensity.models.spec import NBATraining
from propensity.pipeline.nba import NBAResult

_KEEP = ["customer", "recency", "history", "mens", "womens", "newbie", "channel", "noise"]


def _ci(row: dict[str, float], key: str) -> str:
    return f"{row[key]:+.3f} [{row[f'{key}_low']:+.3f}, {row[f'{key}_high']:+.3f}]"


def _quickstart(seed: int, customers: int, days: int, root: Path, cart_returns: bool) -> None:
    started = time.perf_counter()
    project = Project.create(root / f"seed{seed}")
    project.simulate(customers=customers, days=days, seed=seed, cart_returns=cart_returns)
    project.build_features()
    churn = project.train("churn")
    model, oracle = churn.metrics["model"]["roc_auc"], churn.metrics["oracle"]["roc_auc"]
    print(
        f"seed {seed}: churn AUC {model:.4f} vs oracle {oracle:.4f} "
        f"(gap {oracle - model:.4f}; target <= 0.01)",
        flush=True,
    )
    nba = project.train_nba()
    report = nba.report
    policies = report["policies"]
    best = report["best_single_action_policy"]
    learned, single = policies["learned"], policies[best]
    print(
        f"seed {seed}: NBA true value learned {learned['true']:.3f}, oracle "
        f"{policies['oracle']['true']:.3f} (captured {report['captured_oracle_fraction']:.1%}; "
        f"target >= 90%), best single {best.removeprefix('all_')} {single['true']:.3f}",
        flush=True,
    )
    print(
        f"seed {seed}: NBA DR learned {_ci(learned, 'dr')}, best single {_ci(single, 'dr')}, "
        f"learned - best {_ci(learned, 'dr_diff')} on {report['n_test_rows']} held-out "
        f"exposures ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    if cart_returns:
        print(f"seed {seed}: {_cart_recovery_targeting(project, nba)}", flush=True)


def _cart_recovery_targeting(project: Project, nba: NBAResult) -> str:
    """Who the learned policy sends cart_recovery to, against who the truth says should get it."""
    evaluation = project.evaluate_nba(nba, n_boot=0)
    assert evaluation.actions is not None and evaluation.oracle_actions is not None
    truly = evaluation.oracle_actions == "cart_recovery"
    sent = evaluation.actions == "cart_recovery"
    return (
        f"cart_recovery truly best for {truly.mean():.1%} of held-out exposures; sent to "
        f"{sent[truly].mean():.1%} of those and {sent[~truly].mean():.1%} of the others; "
        f"{truly[sent].mean():.1%} of those sent it are truly best with it"
    )


def _campaign(seed: int, rows: int, heterogeneous: bool, root: Path) -> None:
    table, truth = simulate_campaign_table(rows, seed=seed, heterogeneous=heterogeneous)
    source = root / f"campaign_{seed}_{heterogeneous}.csv"
    table[[*_KEEP, "arm", "propensity", "visit"]].to_csv(source, index=False)
    result = fit_tabular(
        source,
        "arm",
        "visit",
        out_dir=root / f"out_{seed}_{heterogeneous}",
        propensity_col="propensity",
        id_col="customer",
        value=10.0,
        cost=0.1,
        training=NBATraining(gate_level=0.9, n_boot=300, seed=seed),
        truth=truth,
    )
    report = result.report
    policies = report["policies"]
    best = report["best_single_action_policy"]
    learned, single = policies["learned"], policies[best]
    kind = "heterogeneous" if heterogeneous else "null-effect  "
    below = learned["dr_diff_high"] < 0
    print(
        f"seed {seed}: campaign {kind} DR learned {_ci(learned, 'dr')}, best single "
        f"{best.removeprefix('all_')} {_ci(single, 'dr')}, learned - best "
        f"{_ci(learned, 'dr_diff')}{' BELOW' if below else ''}; true learned "
        f"{learned['true']:.3f} vs best single {single['true']:.3f} vs oracle "
        f"{policies['oracle']['true']:.3f}; gate: "
        f"{'kept per-row uplifts' if result.model.average_uplift_ is None else 'fell back'}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--campaign-rows", type=int, default=20_000)
    parser.add_argument("--cart-returns", action="store_true")
    parser.add_argument("--skip-quickstart", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"seeds {args.seeds}; quickstart data {args.customers} customers x {args.days} days; "
        f"campaign tables {args.campaign_rows} rows (value 10, cost 0.1)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in args.seeds:
            for heterogeneous in (True, False):
                _campaign(seed, args.campaign_rows, heterogeneous, root)
        if not args.skip_quickstart:
            for seed in args.seeds:
                _quickstart(seed, args.customers, args.days, root, args.cart_returns)


if __name__ == "__main__":
    main()
