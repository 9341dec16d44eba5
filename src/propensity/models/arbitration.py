"""The action catalog and arbitration: which action, if any, each customer gets.

For every customer and every action, expected incremental value is
``uplift × value − cost`` (uplift on the action's own outcome). Arbitration
keeps the actions the customer is eligible for (declarative feature
conditions), drops them all when the contact policy caps the customer or a
cooldown is running, and picks the best one if it pays, else ``no_action``.
A deterministic share of customers (a hash of ``customer_id``) is held out
untreated so the campaign's effect stays measurable. Every decision carries
a reason and the ranked alternatives.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "Condition",
    "ActionSpec",
    "ContactPolicy",
    "ActionCatalog",
    "load_catalog",
    "in_holdout",
    "eligibility",
    "choose",
    "decide",
    "NO_ACTION",
]

NO_ACTION = "no_action"

#: The comparison operators of eligibility rules and audience filters.
COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Strict):
    """A rule the customer's feature must satisfy: ``feature op value``."""

    feature: str
    op: Literal["<", "<=", ">", ">=", "==", "!=", "in", "not_in"]
    value: float | str | list[float | str]

    def describe(self) -> str:
        return f"{self.feature} {self.op} {self.value}"

    def holds(self, column: pd.Series) -> np.ndarray:
        """True where the rule holds; a missing feature value never satisfies it."""
        if self.op in ("in", "not_in"):
            values = self.value if isinstance(self.value, list) else [self.value]
            inside = column.isin(values).to_numpy()
            result = inside if self.op == "in" else ~inside
        else:
            result = np.asarray(COMPARISONS[self.op](column, self.value), dtype=bool)
        return result & column.notna().to_numpy()


class ActionSpec(_Strict):
    """One action: its economics, its channel and who may receive it."""

    cost: float = Field(ge=0)
    value: float = Field(gt=0, description="Value of one unit of the outcome (margin, retention).")
    outcome: Literal["purchase", "retention"]
    channel: str = "email"
    cooldown_days: int = Field(
        default=0, ge=0, description="Days before the same action may be repeated."
    )
    eligibility: list[Condition] = []
    description: str = ""


class ContactPolicy(_Strict):
    """How often a customer may be contacted, read from features or a history."""

    max_contacts_7d: int = Field(default=2, ge=0)
    max_contacts_30d: int = Field(default=4, ge=0)
    cooldown_days: int = Field(
        default=3, ge=0, description="Days after any contact with no new contact."
    )
    contacts_7d_feature: str = "exposures_7d"
    contacts_30d_feature: str = "exposures_30d"
    days_since_last_feature: str = "days_since_last_exposure"


class ActionCatalog(_Strict):
    """All actions, the control arm, the contact policy and the hold-out share."""

    actions: dict[str, ActionSpec]
    control: str = "control"
    contact_policy: ContactPolicy = ContactPolicy()
    holdout_share: float = Field(default=0.05, ge=0, lt=1)
    holdout_salt: str = "nba-holdout"

    @model_validator(mode="after")
    def _names(self) -> ActionCatalog:
        for reserved in (self.control, NO_ACTION):
            if reserved in self.actions:
                raise ValueError(
                    f"action id {reserved!r} is reserved and cannot be a catalog action"
                )
        if not self.actions:
            raise ValueError("the catalog lists no actions")
        return self

    @property
    def names(self) -> list[str]:
        return list(self.actions)

    def costs(self, actions: list[str] | None = None) -> np.ndarray:
        return np.array([self.actions[a].cost for a in actions or self.names])

    def values(self, actions: list[str] | None = None) -> np.ndarray:
        return np.array([self.actions[a].value for a in actions or self.names])


def load_catalog(path: str | Path) -> ActionCatalog:
    """Read an action catalog from YAML; errors name the file and the field.

    Examples
    --------
    >>> catalog = load_catalog("models/actions.yaml")  # doctest: +SKIP
    >>> catalog.names  # doctest: +SKIP
    ['discount', 'loyalty_points', 'onboarding_email', 'feature_tutorial']
    """
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a mapping")
        # The file's ``training`` section belongs to the NBA trainer, not to arbitration.
        data = {k: v for k, v in data.items() if k != "training"}
        return ActionCatalog.model_validate(data)
    except yaml.YAMLError as exc:
        raise ValueError(f"{file} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{file}: invalid action catalog: {problems}") from None


def in_holdout(customer_ids: Any, share: float, salt: str = "nba-holdout") -> np.ndarray:
    """Deterministic hold-out membership: the same customer always lands the same way.

    Examples
    --------
    >>> bool(in_holdout(["C0000001"], 0.0)[0])
    False
    """
    ids = [str(c) for c in np.asarray(customer_ids)]
    digests = [hashlib.sha256(f"{salt}:{c}".encode()).digest()[:8] for c in ids]
    draws = np.array([int.from_bytes(d, "big") / 2**64 for d in digests])
    return draws < share if len(ids) else np.zeros(0, dtype=bool)


def _contact_state(
    features: pd.DataFrame,
    catalog: ActionCatalog,
    history: pd.DataFrame | None,
    as_of: pd.Timestamp | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Contacts in 7 and 30 days, days since last contact, days since each action."""
    policy = catalog.contact_policy
    n = len(features)
    since_action = {a: np.full(n, np.inf) for a in catalog.names}
    if history is None:
        needed = [
            policy.contacts_7d_feature,
            policy.contacts_30d_feature,
            policy.days_since_last_feature,
        ]
        missing = [c for c in needed if c not in features.columns]
        if missing:
            raise ValueError(
                f"contact policy needs feature columns {missing} (or pass an exposure history)"
            )
        c7 = features[policy.contacts_7d_feature].fillna(0).to_numpy(float)
        c30 = features[policy.contacts_30d_feature].fillna(0).to_numpy(float)
        since = features[policy.days_since_last_feature].fillna(np.inf).to_numpy(float)
        return c7, c30, since, since_action
    for column in ("customer_id", "action", "exposure_timestamp"):
        if column not in history.columns:
            raise ValueError(f"exposure history lacks column {column!r}")
    if as_of is None:
        raise ValueError(
            "as_of is required with an exposure history (contacts are counted before it)"
        )
    past = history[(history["exposure_timestamp"] < as_of) & (history["action"] != catalog.control)]
    age = (as_of - past["exposure_timestamp"]).dt.total_seconds() / 86400.0
    past = past.assign(age=age.to_numpy())
    ids = features["customer_id"].astype(str)
    grouped = past.groupby(past["customer_id"].astype(str))
    c7 = ids.map(grouped["age"].apply(lambda s: int((s < 7).sum()))).fillna(0).to_numpy(float)
    c30 = ids.map(grouped["age"].apply(lambda s: int((s < 30).sum()))).fillna(0).to_numpy(float)
    since = ids.map(grouped["age"].min()).fillna(np.inf).to_numpy(float)
    per_action = past.groupby([past["customer_id"].astype(str), "action"])["age"].min()
    for action in catalog.names:
        if action in per_action.index.get_level_values(1):
            since_action[action] = (
                ids.map(per_action.xs(action, level=1)).fillna(np.inf).to_numpy(float)
            )
    return c7, c30, since, since_action


def eligibility(
    features: pd.DataFrame,
    catalog: ActionCatalog,
    *,
    history: pd.DataFrame | None = None,
    as_of: Any = None,
    contact_policy: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which actions each customer may receive, and why not.

    Parameters
    ----------
    features : DataFrame
        One row per customer with ``customer_id`` and the features the rules name.
    catalog : ActionCatalog
    history : DataFrame, optional
        Past exposures (``customer_id``, ``action``, ``exposure_timestamp``);
        without it contact counts come from the contact-policy feature columns.
    as_of : timestamp, optional
        Decision time, required with ``history``.
    contact_policy : bool
        Apply contact caps and cooldowns (off when only eligibility matters).

    Returns
    -------
    eligible, blocked : DataFrame
        Boolean mask and the reason text ("" when eligible), one column per action.

    Examples
    --------
    >>> mask, why = eligibility(features, catalog)  # doctest: +SKIP
    """
    timestamp = None if as_of is None else pd.Timestamp(as_of)
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.tz_localize("UTC")
    n = len(features)
    eligible = pd.DataFrame(True, index=features.index, columns=catalog.names)
    blocked = pd.DataFrame("", index=features.index, columns=catalog.names)

    def block(action: str, mask: np.ndarray, reasons: Any) -> None:
        fresh = mask & eligible[action].to_numpy()
        if fresh.any():
            text = np.broadcast_to(np.asarray(reasons, dtype=object), (n,))
            blocked.loc[fresh, action] = text[fresh]
            eligible.loc[fresh, action] = False

    if contact_policy:
        policy = catalog.contact_policy
        c7, c30, since, since_action = _contact_state(features, catalog, history, timestamp)
        cap7 = c7 >= policy.max_contacts_7d
        cap30 = c30 >= policy.max_contacts_30d
        cooling = since < policy.cooldown_days
        for action, spec in catalog.actions.items():
            block(
                action,
                cap7,
                [
                    f"contact cap: {c:g} contacts in 7 days >= max {policy.max_contacts_7d}"
                    for c in c7
                ],
            )
            block(
                action,
                cap30,
                [
                    f"contact cap: {c:g} contacts in 30 days >= max {policy.max_contacts_30d}"
                    for c in c30
                ],
            )
            block(
                action,
                cooling,
                [
                    f"cooldown: last contact {s:.1f} days ago < {policy.cooldown_days}"
                    for s in since
                ],
            )
            repeat = since_action[action] < spec.cooldown_days
            block(
                action,
                repeat,
                [
                    f"cooldown: {action} {s:.1f} days ago < {spec.cooldown_days}"
                    for s in since_action[action]
                ],
            )
    for action, spec in catalog.actions.items():
        for rule in spec.eligibility:
            if rule.feature not in features.columns:
                raise ValueError(
                    f"action {action!r}: eligibility rule {rule.describe()!r} needs "
                    f"missing feature column {rule.feature!r}"
                )
            column = features[rule.feature]
            fails = ~rule.holds(column)
            block(
                action,
                fails,
                [
                    f"ineligible: {rule.describe()} fails ({rule.feature}={v})"
                    for v in column.tolist()
                ],
            )
    return eligible, blocked


class _UpliftModel(Protocol):
    def action_uplift(self, X: pd.DataFrame) -> pd.DataFrame: ...


def choose(
    uplift: pd.DataFrame,
    features: pd.DataFrame,
    catalog: ActionCatalog,
    *,
    history: pd.DataFrame | None = None,
    as_of: Any = None,
    contact_policy: bool = True,
    holdout: bool = True,
) -> pd.DataFrame:
    """Pick the best paying eligible action per customer from given uplifts.

    Parameters
    ----------
    uplift : DataFrame
        One column per catalog action, the uplift on that action's outcome,
        aligned row by row with ``features``.
    features, catalog, history, as_of, contact_policy
        As in :func:`eligibility`.
    holdout : bool
        Send the catalog's hold-out share to ``no_action``.

    Returns
    -------
    DataFrame
        ``customer_id``, ``action``, ``expected_value``, ``reason``,
        ``holdout``, ``alternatives`` (ranked list of dicts) and
        ``value_<action>`` per action (NaN when not eligible).

    Examples
    --------
    >>> choose(uplift_frame, features, catalog)  # doctest: +SKIP
    """
    missing = [a for a in catalog.names if a not in uplift.columns]
    if missing:
        raise ValueError(f"uplift lacks columns for catalog actions {missing}")
    if len(uplift) != len(features):
        raise ValueError(f"uplift has {len(uplift)} rows but features has {len(features)}")
    names = catalog.names
    up = uplift[names].to_numpy(float)
    values = up * catalog.values()[None, :] - catalog.costs()[None, :]
    mask, blocked = eligibility(
        features, catalog, history=history, as_of=as_of, contact_policy=contact_policy
    )
    ok = mask.to_numpy()
    masked = np.where(ok, values, -np.inf)
    best = masked.argmax(axis=1)
    best_value = masked[np.arange(len(up)), best]
    pays = best_value > 0
    ids = (
        features["customer_id"].astype(str).to_numpy()
        if "customer_id" in features.columns
        else np.array([str(i) for i in features.index])
    )
    held = (
        in_holdout(ids, catalog.holdout_share, catalog.holdout_salt)
        if holdout
        else np.zeros(len(ids), bool)
    )
    actions: list[str] = []
    reasons: list[str] = []
    expected: list[float] = []
    alternatives: list[list[dict[str, Any]]] = []
    blocked_rows = blocked.to_numpy()
    for i in range(len(up)):
        ranked = sorted(range(len(names)), key=lambda j: -values[i, j] if ok[i, j] else np.inf)
        alts: list[dict[str, Any]] = []
        for j in ranked:
            spec = catalog.actions[names[j]]
            why = (
                f"eligible; uplift {up[i, j]:.3f} x value {spec.value:g} "
                f"- cost {spec.cost:g} = {values[i, j]:.2f}"
                if ok[i, j]
                else blocked_rows[i, j]
            )
            alts.append(
                {
                    "action": names[j],
                    "expected_value": float(values[i, j]) if ok[i, j] else None,
                    "eligible": bool(ok[i, j]),
                    "reason": why,
                }
            )
        alternatives.append(alts)
        if held[i]:
            actions.append(NO_ACTION)
            expected.append(0.0)
            reasons.append(
                f"hold-out: customer in the {catalog.holdout_share:.0%} untreated measurement group"
            )
        elif pays[i]:
            actions.append(names[best[i]])
            expected.append(float(best_value[i]))
            reasons.append(str(alts[0]["reason"]))
        else:
            actions.append(NO_ACTION)
            expected.append(0.0)
            eligible_alts = [a for a in alts if a["eligible"]]
            reasons.append(
                "no eligible action pays: best "
                + eligible_alts[0]["reason"].removeprefix("eligible; ")
                if eligible_alts
                else "no eligible action: " + "; ".join(str(a["reason"]) for a in alts)
            )
    out = pd.DataFrame(
        {
            "customer_id": ids,
            "action": actions,
            "expected_value": expected,
            "reason": reasons,
            "holdout": held,
            "alternatives": alternatives,
        },
        index=features.index,
    )
    for j, name in enumerate(names):
        out[f"value_{name}"] = np.where(ok[:, j], values[:, j], np.nan)
    return out


def decide(
    features_df: pd.DataFrame,
    model: _UpliftModel,
    catalog: ActionCatalog,
    history: pd.DataFrame | None = None,
    *,
    as_of: Any = None,
    contact_policy: bool = True,
    holdout: bool = True,
) -> pd.DataFrame:
    """Score uplifts with ``model`` and arbitrate (see :func:`choose`).

    ``model`` is anything with ``action_uplift(features) -> DataFrame`` (a
    fitted :class:`propensity.models.nba.NBAModel`).

    Examples
    --------
    >>> decisions = decide(features, model, catalog)  # doctest: +SKIP
    >>> decisions[["customer_id", "action", "reason"]].head()  # doctest: +SKIP
    """
    uplift = model.action_uplift(features_df)
    return choose(
        uplift,
        features_df,
        catalog,
        history=history,
        as_of=as_of,
        contact_policy=contact_policy,
        holdout=holdout,
    )
