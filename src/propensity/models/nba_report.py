"""Policy evaluation and reporting of next-best-action models.

:func:`evaluate_policy` scores a fitted model's policy and its baselines
(random, each single action, no action and, on simulated data, the oracle) on
held-out logged exposures with IPS and DR estimates; :func:`policy_summary`
renders the resulting report as a short text table; the plots and the JSON
report of a run are built here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from propensity.models.arbitration import (
    NO_ACTION,
    ActionCatalog,
    ContactState,
    arbitrate,
    best_eligible,
)
from propensity.models.policy import evaluate_policies, incremental_scores, policy_matrix
from propensity.models.uplift import qini_score

if TYPE_CHECKING:
    from propensity.models.nba import NBAModel

__all__ = ["evaluate_policy", "policy_summary", "tabular_summary"]


def _valued_outcome_matrix(log: pd.DataFrame, catalog: ActionCatalog) -> np.ndarray:
    return np.column_stack(
        [log[s.outcome].to_numpy(float) * s.value for s in catalog.actions.values()]
    )


def _true_scores(truth: pd.DataFrame, catalog: ActionCatalog) -> np.ndarray:
    """True incremental value per action from simulator probabilities ``p_<outcome>_<arm>``."""
    columns = []
    for action, spec in catalog.actions.items():
        if spec.outcome == "purchase":
            lift = truth[f"p_purchase_{action}"] - truth[f"p_purchase_{catalog.control}"]
        else:
            lift = truth[f"p_churn_{catalog.control}"] - truth[f"p_churn_{action}"]
        columns.append(lift.to_numpy(float) * spec.value - spec.cost)
    return np.column_stack(columns)


def _argmax_policy(values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    best, best_value = best_eligible(values, allowed)
    pays = best_value > 0
    out = np.zeros_like(values)
    out[np.arange(len(values))[pays], best[pays]] = 1.0
    return out


def evaluate_policy(
    model: NBAModel,
    log: pd.DataFrame,
    *,
    truth: pd.DataFrame | None = None,
    n_boot: int = 300,
    seed: int = 0,
    contact_policy: bool = False,
) -> dict[str, Any]:
    """Off-policy value of the model's policy and baselines on held-out logged rows.

    Parameters
    ----------
    model : NBAModel
        Fitted on earlier rows.
    log : DataFrame
        Held-out rows: features, ``action``, ``propensity`` (NaN → estimated),
        and an outcome column per outcome the catalog uses.
    truth : DataFrame, optional
        Row-aligned true probabilities ``p_purchase_<arm>``, ``p_churn_<arm>``
        (simulator); adds the oracle policy and true values.
    contact_policy : bool
        Apply contact caps to every policy (eligibility rules always apply).

    Returns
    -------
    dict
        ``table`` (DataFrame by policy), ``qini`` (per action), ``best_single``,
        ``choices`` (learned action shares), ``actions`` (the learned action of
        each row, ``no_action`` included), ``n_rows`` and, on simulations,
        ``oracle_actions`` (the oracle's of each row) and ``captured`` (true
        learned / oracle value).

    Examples
    --------
    >>> result = evaluate_policy(model, test_log, n_boot=200)  # doctest: +SKIP
    >>> result["table"].loc["learned", ["dr", "dr_low", "dr_high"]]  # doctest: +SKIP
    """
    catalog = model.catalog
    names = catalog.names
    X = log[model.feature_names_]
    treatment = log["action"].astype(str).to_numpy()
    logged = pd.to_numeric(log.get("propensity"), errors="coerce") if "propensity" in log else None
    estimated = model.propensity(X, treatment)
    p = estimated if logged is None else np.where(logged.notna(), logged, estimated)
    outcome = _valued_outcome_matrix(log, catalog)
    mu_a, mu_c = model.valued_outcomes(X)
    ips = incremental_scores(treatment, p, names, outcome, catalog.costs(), control=catalog.control)
    dr = incremental_scores(
        treatment,
        p,
        names,
        outcome,
        catalog.costs(),
        control=catalog.control,
        mu_action=mu_a,
        mu_control=mu_c,
    )
    contacts = ContactState.from_features(log, catalog.contact_policy) if contact_policy else None
    learned = arbitrate(
        model.action_uplift(X)[names].to_numpy(float),
        log,
        [],
        catalog,
        contacts=contacts,
        holdout=False,
        reasons=False,
    )
    ok = learned.eligible
    policies: dict[str, np.ndarray] = {"learned": policy_matrix(learned.action, names)}
    policies["no_action"] = np.zeros((len(log), len(names)))
    # Uniform over the eligible actions and "no action".
    policies["random"] = ok / (ok.sum(axis=1, keepdims=True) + 1.0)
    single = {f"all_{a}": ok * (np.arange(len(names)) == j) for j, a in enumerate(names)}
    dr_single = {k: float((v * dr).sum(axis=1).mean()) for k, v in single.items()}
    best_single = max(dr_single, key=lambda k: dr_single[k])
    policies.update(single)
    true = None
    if truth is not None:
        true = _true_scores(truth, catalog)
        policies["oracle"] = _argmax_policy(true, ok)
    table = evaluate_policies(
        policies,
        ips_scores=ips,
        dr_scores=dr,
        true_scores=true,
        baseline=best_single,
        n_boot=n_boot,
        random_state=seed,
    )
    qini = {}
    for j, (action, spec) in enumerate(catalog.actions.items()):
        rows = np.isin(treatment, [action, catalog.control])
        # Inverse-propensity weights undo the confounded assignment within the pair.
        result = qini_score(
            model.action_uplift(X[rows])[action].to_numpy(),
            treatment[rows] == action,
            log.loc[rows, spec.outcome].to_numpy(float),
            weight=1.0 / p[rows],
            n_boot=min(n_boot, 200),
            random_state=seed + j,
        )
        qini[action] = result
    shares = (
        pd.Series(learned.action)
        .value_counts(normalize=True)
        .reindex([*names, NO_ACTION])
        .fillna(0)
    )
    out: dict[str, Any] = {
        "table": table,
        "qini": qini,
        "best_single": best_single,
        "choices": {k: float(v) for k, v in shares.items()},
        "actions": learned.action,
        "n_rows": int(len(log)),
    }
    gate = getattr(model, "gate_", None)
    if gate is not None:
        out["heterogeneity_gate"] = gate.describe()
    if true is not None:
        picked = policies["oracle"]
        out["oracle_actions"] = np.where(
            picked.any(axis=1), np.array(names)[picked.argmax(axis=1)], NO_ACTION
        )
        oracle = float(table.loc["oracle", "true"])
        out["captured"] = (
            float(table.loc["learned", "true"]) / oracle if oracle > 0 else float("nan")
        )
    return out


def report_json(evaluation: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    table = evaluation["table"]
    return {
        **extra,
        "n_test_rows": evaluation["n_rows"],
        "best_single_action_policy": evaluation["best_single"],
        "learned_action_shares": evaluation["choices"],
        "captured_oracle_fraction": evaluation.get("captured"),
        "policies": {
            name: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
            for name, row in table.iterrows()
        },
        "qini": {a: r.as_dict() for a, r in evaluation["qini"].items()},
        "heterogeneity_gate": evaluation.get("heterogeneity_gate"),
        "value_unit": "incremental value per customer vs no action",
    }


def plots(evaluation: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for action, result in evaluation["qini"].items():
        ax.plot(result.fraction, result.gain, label=f"{action} (qini {result.qini:.4f})")
        ax.plot([0, 1], [0, result.gain[-1]], linestyle=":", color="grey", linewidth=0.8)
    ax.set_xlabel("share targeted (highest predicted uplift first)")
    ax.set_ylabel("incremental outcomes per customer")
    ax.set_title("Qini curves (test window, IPS-weighted)")
    ax.legend(fontsize=8)
    paths.append(out_dir / "qini_curves.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    table = evaluation["table"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    y = np.arange(len(table))
    err = np.vstack([table["dr"] - table["dr_low"], table["dr_high"] - table["dr"]])
    ax.barh(y, table["dr"], xerr=err, color="tab:blue", alpha=0.7, label="DR estimate (90% CI)")
    if "true" in table:
        ax.scatter(table["true"], y, color="black", marker="x", zorder=3, label="true value")
    ax.set_yticks(y, table.index)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("incremental value per customer vs no action")
    ax.set_title("Policy value comparison (test window)")
    ax.legend(fontsize=8)
    paths.append(out_dir / "policy_values.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def _number(value: Any, width: int) -> str:
    return f"{'-':>{width}}" if value is None or pd.isna(value) else f"{value:>{width}.2f}"


def policy_summary(report: dict[str, Any]) -> str:
    """A short text table of policy values from a run's report (see :func:`report_json`).

    Rows: the learned policy, random assignment, the best single action, no
    action and (simulations only) the oracle; columns: the IPS and DR
    estimates with the DR 90% interval and, when known, the true value. The
    last line gives the share of the oracle's true value the learned policy
    captured.

    Examples
    --------
    >>> report = {"best_single_action_policy": "all_a", "policies": {
    ...     "learned": {"ips": 2.0, "dr": 2.1, "dr_low": 1.0, "dr_high": 3.0},
    ...     "all_a": {"ips": 1.0, "dr": 1.2, "dr_low": 0.5, "dr_high": 2.0}}}
    >>> print(policy_summary(report).splitlines()[2])
    learned                            2.00    2.10  [  1.00,   3.00]       -
    """
    policies = report["policies"]
    best = report.get("best_single_action_policy")
    single = f"best single ({str(best).removeprefix('all_')})"
    rows = [("learned", "learned"), ("random", "random"), (best, single)]
    rows += [("no_action", "no action"), ("oracle", "oracle (true effects)")]
    lines = [
        f"{'policy':<32}{'IPS':>7} {'DR':>7}  {'DR 90% CI':^16} {'true':>7}",
        "-" * 74,
    ]
    for key, label in rows:
        row = policies.get(key) if key is not None else None
        if row is None:
            continue
        interval = f"[{_number(row.get('dr_low'), 6)}, {_number(row.get('dr_high'), 6)}]"
        lines.append(
            f"{label[:32]:<32}{_number(row.get('ips'), 7)} {_number(row.get('dr'), 7)}  "
            f"{interval} {_number(row.get('true'), 7)}"
        )
    unit = report.get("value_unit", "incremental value per customer vs no action")
    lines.append(f"values: {unit}, on {report.get('n_test_rows', '?')} held-out exposures")
    if report.get("heterogeneity_gate"):
        lines.append(report["heterogeneity_gate"])
    captured = report.get("captured_oracle_fraction")
    if captured is not None and not pd.isna(captured):
        lines.append(f"learned policy captures {captured:.0%} of the oracle's true value")
    return "\n".join(lines)


def _interval(row: dict[str, Any], key: str) -> str:
    return (
        f"{_number(row.get(key), 7)}  [{_number(row.get(f'{key}_low'), 6)}, "
        f"{_number(row.get(f'{key}_high'), 6)}]"
    )


def tabular_summary(report: dict[str, Any]) -> str:
    """The readable summary of a campaign-table fit (see :func:`~.nba.fit_tabular`).

    The arms with their rows and outcome rates, the features used, any
    post-treatment warning, each policy's value (DR with its 90% interval,
    IPS, and the true value on simulated tables), the learned policy minus the
    best single arm with its paired interval, the heterogeneity gate, and the
    Qini per arm on this package's scale and on scikit-uplift's.

    Examples
    --------
    >>> print(tabular_summary(result.report))  # doctest: +SKIP
    """
    control = report.get("control", "control")
    lines = [f"{'arm':<24}{'rows':>9}{'outcome mean':>14}"]
    for arm, row in report.get("arms", {}).items():
        label = f"{arm} (control)" if arm == control else arm
        lines.append(f"{label[:24]:<24}{row['rows']:>9}{row['outcome_mean']:>14.4f}")
    features = report.get("features", [])
    lines.append(f"features ({len(features)}): {', '.join(features)}")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    policies = report["policies"]
    lines += [
        "",
        f"{'policy':<28}{'DR':>7}  {'DR 90% CI':^16}{'IPS':>8}{'true':>8}",
        "-" * 70,
    ]
    for name, row in policies.items():
        label = {"learned": "learned policy", "no_action": "no action"}.get(name, name)
        label = label.replace("all_", "everyone gets ")
        lines.append(
            f"{label[:28]:<28}{_interval(row, 'dr')}{_number(row.get('ips'), 8)}"
            f"{_number(row.get('true'), 8)}"
        )
    best = report.get("best_single_action_policy")
    learned = policies.get("learned", {})
    if best and learned.get("dr_diff") is not None:
        lines.append(
            f"learned - best single arm ({str(best).removeprefix('all_')}): "
            f"{_interval(learned, 'dr_diff')}"
        )
    if report.get("heterogeneity_gate"):
        lines.append(report["heterogeneity_gate"])
    unit = report.get("value_unit", "incremental value per customer vs no action")
    lines.append(f"values: {unit}, on {report.get('n_test_rows', '?')} held-out rows")
    qini = report.get("qini", {})
    if qini:
        lines.append("")
        lines.append(f"{'arm':<24}{'qini (ours)':>12}  {'90% CI':^16}{'qini (scikit-uplift)':>22}")
        for arm, q in qini.items():
            lines.append(
                f"{arm[:24]:<24}{q['qini']:>12.4f}  [{q['qini_low']:>6.4f}, {q['qini_high']:>6.4f}]"
                f"{_number(q.get('qini_normalized'), 22)}"
            )
    captured = report.get("captured_oracle_fraction")
    if captured is not None and not pd.isna(captured):
        lines.append(f"learned policy captures {captured:.0%} of the oracle's true value")
    return "\n".join(lines)
