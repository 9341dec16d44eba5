"""Typed promotion gates and the one rule that promotes (or rejects) a registered version.

Every check is a :class:`Check` (its name, verdict, observed value and
threshold, and a sentence for people); code reads the fields, never the text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from propensity import registry
from propensity.config import Settings
from propensity.models.spec import Gates, NBATraining

__all__ = ["Check", "GateResult", "nba_checks", "propensity_checks", "settle"]


@dataclass(frozen=True)
class Check:
    """One gate: did ``observed`` meet ``threshold``, in words in ``text``.

    Examples
    --------
    >>> str(Check("min_auc", False, 0.55, 0.6, "AUC 0.5500 >= 0.6"))
    'fail: AUC 0.5500 >= 0.6'
    """

    name: str
    passed: bool
    observed: float | None = None
    threshold: float | None = None
    text: str = ""

    @property
    def verdict(self) -> str:
        """``pass`` or ``fail``."""
        return "pass" if self.passed else "fail"

    def __str__(self) -> str:
        return f"{self.verdict}: {self.text}"


@dataclass(frozen=True)
class GateResult:
    """Every check of one challenger, and the champion it was compared with."""

    checks: tuple[Check, ...] = ()
    champion_version: int | None = None
    #: The champion's score on the challenger's test rows (AUC, or DR policy value).
    champion_value: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """All checks passed."""
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]


def propensity_checks(
    metrics: dict[str, float], gates: Gates, champion_auc: float | None = None
) -> tuple[Check, ...]:
    """Check a challenger's test metrics against a propensity spec's gates.

    Examples
    --------
    >>> checks = propensity_checks({"roc_auc": 0.8, "ece": 0.01, "rows": 5000}, Gates(), 0.803)
    >>> all(c.passed for c in checks), [c.name for c in checks]
    (True, ['min_rows', 'min_auc', 'max_ece', 'max_auc_drop'])
    """
    auc, ece, rows = metrics["roc_auc"], metrics["ece"], metrics["rows"]
    checks = [
        Check("min_rows", rows >= gates.min_rows, rows, gates.min_rows,
              f"test rows {rows:.0f} >= {gates.min_rows}"),
        Check("min_auc", auc >= gates.min_auc, auc, gates.min_auc,
              f"AUC {auc:.4f} >= {gates.min_auc}"),
        Check("max_ece", ece <= gates.max_ece, ece, gates.max_ece,
              f"ECE {ece:.4f} <= {gates.max_ece}"),
    ]  # fmt: skip
    if champion_auc is not None:
        checks.append(
            _against_champion("max_auc_drop", "AUC", auc, champion_auc, gates.max_auc_drop)
        )
    return tuple(checks)


def nba_checks(
    evaluation: dict[str, Any], training: NBATraining, champion_value: float | None
) -> tuple[Check, ...]:
    """Check the learned policy's DR value against no action, the best single action
    and the champion (same test rows)."""
    table = evaluation["table"]
    learned = float(table.loc["learned", "dr"])
    best = evaluation["best_single"]
    single = float(table.loc[best, "dr"])
    rows = float(evaluation["n_rows"])
    checks = [
        Check("min_test_rows", rows >= training.min_test_rows, rows, training.min_test_rows,
              f"test rows {evaluation['n_rows']} >= {training.min_test_rows}"),
        Check("beats_no_action", learned > 0, learned, 0.0,
              f"learned DR value {learned:.4f} > 0 (beats no action)"),
        Check("beats_best_single", learned >= single, learned, single,
              f"learned DR value {learned:.4f} >= best single action {best} {single:.4f}"),
    ]  # fmt: skip
    if champion_value is not None:
        checks.append(
            _against_champion(
                "max_value_drop",
                "learned DR value",
                learned,
                champion_value,
                training.max_value_drop,
            )
        )
    return tuple(checks)


def _against_champion(name: str, label: str, value: float, champion: float, drop: float) -> Check:
    """The challenger may trail the champion (on the same rows) by at most ``drop``."""
    floor = champion - drop
    return Check(
        name,
        value >= floor,
        value,
        floor,
        f"{label} {value:.4f} >= champion {champion:.4f} - {drop}",
    )


def settle(
    settings: Settings,
    model: str,
    version: int | None,
    checks: Iterable[Check],
    *,
    promote: bool,
) -> bool:
    """The one promotion rule: champion when every check passed and ``promote``.

    A version that failed a check is marked ``rejected`` with the failures; one
    that passed but is not promoted stays ``pending`` for its caller (the
    retraining job promotes only after every challenger was trained). Returns
    whether the version became champion.
    """
    if version is None:
        return False
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "; ".join(str(c) for c in failed)
        registry.set_status(settings.tracking_uri, model, version, "rejected", reason)
        return False
    if promote:
        registry.set_champion(settings.tracking_uri, model, version)
    return promote
