"""The action catalog and arbitration: which action, if any, each customer gets.

One kernel, :func:`arbitrate` (numpy in, numpy out, with
:func:`eligible_mask` and :func:`best_eligible`), makes every decision:
serving, bulk scoring and policy evaluation call it on arrays, and
:func:`eligibility`, :func:`choose` and :func:`decide` wrap it for frames.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ArbitrationPlan",
    "Condition",
    "ActionSpec",
    "ContactPolicy",
    "ActionCatalog",
    "load_catalog",
    "catalog_features",
    "in_holdout",
    "ContactState",
    "eligible_mask",
    "best_eligible",
    "Arbitration",
    "arbitrate",
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

    def holds(self, column: pd.Series | np.ndarray) -> np.ndarray:
        """True where the rule holds; a missing feature value never satisfies it."""
        if (
            isinstance(column, np.ndarray)
            and column.dtype.kind == "f"
            and self.op in COMPARISONS
            and isinstance(self.value, (int, float))
            and not isinstance(self.value, bool)
        ):
            # A float matrix column (serving): numpy alone, no Series built per call.
            return np.asarray(COMPARISONS[self.op](column, float(self.value)), dtype=bool) & ~(
                np.isnan(column)
            )
        column = pd.Series(column) if isinstance(column, np.ndarray) else column
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
    ['discount', 'loyalty_points', 'onboarding_email', 'feature_tutorial', 'cart_recovery']
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


def catalog_features(catalog: ActionCatalog) -> list[str]:
    """Feature columns the catalog's eligibility rules and contact policy read.

    Examples
    --------
    >>> catalog_features(load_catalog("models/actions.yaml"))[:2]  # doctest: +SKIP
    ['exposures_7d', 'exposures_30d']
    """
    policy = catalog.contact_policy
    names = [
        policy.contacts_7d_feature,
        policy.contacts_30d_feature,
        policy.days_since_last_feature,
    ]
    for spec in catalog.actions.values():
        names += [rule.feature for rule in spec.eligibility]
    return list(dict.fromkeys(names))


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


#: Columns by feature name: a DataFrame, or a mapping of names to 1-d arrays.
Columns: TypeAlias = Mapping[str, Any] | pd.DataFrame


@dataclass(frozen=True)
class ContactState:
    """Per customer: contacts in 7 and 30 days, days since the last contact and since each action.

    An action absent from ``days_since_action`` was never shown (no per-action
    cooldown can run), as when the counts come from features.
    """

    contacts_7d: np.ndarray
    contacts_30d: np.ndarray
    days_since: np.ndarray
    days_since_action: Mapping[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_features(cls, columns: Columns, policy: ContactPolicy) -> ContactState:
        """Counts from the contact-policy feature columns; a missing value counts as none."""
        needed = [
            policy.contacts_7d_feature,
            policy.contacts_30d_feature,
            policy.days_since_last_feature,
        ]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"contact policy needs feature columns {missing} (or pass an exposure history)"
            )
        c7, c30, since = (np.asarray(columns[c], dtype=np.float64) for c in needed)
        return cls(
            np.where(np.isnan(c7), 0.0, c7),
            np.where(np.isnan(c30), 0.0, c30),
            np.where(np.isnan(since), np.inf, since),
        )


def _history_state(
    features: pd.DataFrame,
    catalog: ActionCatalog,
    history: pd.DataFrame,
    as_of: pd.Timestamp | None,
) -> ContactState:
    """Contact counts from a history of exposures before ``as_of``."""
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
    since_action = {}
    for action in catalog.names:
        if action in per_action.index.get_level_values(1):
            since_action[action] = (
                ids.map(per_action.xs(action, level=1)).fillna(np.inf).to_numpy(float)
            )
    return ContactState(c7, c30, since, since_action)


@dataclass(frozen=True, eq=False)
class ArbitrationPlan:
    """A catalog's arbitration setup, prepared once: arrays, rules and reason texts.

    :func:`arbitrate` and :func:`eligible_mask` take a plan or a catalog (and
    then prepare a plan per call). A caller that decides many times with one
    catalog, like the scoring service's policy, builds the plan once: on one
    row the per-call setup (catalog arrays, rule lists, texts) cost more than
    the arithmetic.

    Examples
    --------
    >>> plan = ArbitrationPlan.of(catalog)  # doctest: +SKIP
    >>> arbitrate(uplift, columns, ids, plan, contacts=None).action  # doctest: +SKIP
    """

    catalog: ActionCatalog
    names: list[str]
    labels: np.ndarray  # the names as an object array, for np.where
    values: np.ndarray
    costs: np.ndarray
    #: (action index, action, its cooldown days) of every catalog action.
    cooldowns: tuple[tuple[int, str, int], ...]
    #: (action index, action, rule) of every eligibility rule, in catalog order.
    rules: tuple[tuple[int, str, Condition], ...]
    #: The fixed parts of each action's "eligible" reason.
    texts: tuple[tuple[str, str], ...]
    held_reason: str

    @classmethod
    def of(cls, catalog: ActionCatalog | ArbitrationPlan) -> ArbitrationPlan:
        """The plan of a catalog (a plan is returned as it is)."""
        if isinstance(catalog, ArbitrationPlan):
            return catalog
        names = catalog.names
        actions = catalog.actions
        return cls(
            catalog=catalog,
            names=names,
            labels=np.asarray(names, dtype=object),
            values=catalog.values(),
            costs=catalog.costs(),
            cooldowns=tuple((a, n, actions[n].cooldown_days) for a, n in enumerate(names)),
            rules=tuple(
                (a, n, rule) for a, n in enumerate(names) for rule in actions[n].eligibility
            ),
            texts=tuple(
                ("eligible; uplift ", f" x value {spec.value:g} - cost {spec.cost:g} = ")
                for spec in (actions[n] for n in names)
            ),
            held_reason=(
                f"hold-out: customer in the {catalog.holdout_share:.0%} untreated measurement group"
            ),
        )


def _cooldown_text(action: str, days: np.ndarray, wait: int) -> Callable[[int], str]:
    return lambda i: f"cooldown: {action} {days[i]:.1f} days ago < {wait}"


def eligible_mask(
    columns: Columns,
    catalog: ActionCatalog | ArbitrationPlan,
    contacts: ContactState | None,
    *,
    n_rows: int,
    reasons: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The eligibility kernel: which (customer, action) pairs may be chosen, and why not.

    Parameters
    ----------
    columns : DataFrame or mapping of name to array
        The features the catalog's eligibility rules name, ``n_rows`` each.
    catalog : ActionCatalog or ArbitrationPlan
    contacts : ContactState or None
        Contact counts; ``None`` applies no contact policy.
    n_rows : int
    reasons : bool
        Also write the first blocking reason of each pair (off in bulk scoring).

    Returns
    -------
    eligible : ndarray of bool, shape (n_rows, n_actions)
    blocked : ndarray of object, shape (n_rows, n_actions), or (0, n_actions) without reasons
        The first rule that blocks each pair, in the order contact caps,
        cooldowns, the action's cooldown, its eligibility rules; "" when eligible.

    Examples
    --------
    >>> columns = {"tenure_days": np.array([10.0])}
    >>> ok, why = eligible_mask(columns, catalog, None, n_rows=1)  # doctest: +SKIP
    """
    plan = ArbitrationPlan.of(catalog)
    k = len(plan.names)
    ok = np.ones((n_rows, k), dtype=bool)
    why = np.full((n_rows, k) if reasons else (0, k), "", dtype=object)

    def block(a: slice | int, mask: np.ndarray, text: Callable[[int], str]) -> None:
        fresh = mask & ok[:, a if isinstance(a, int) else 0]
        if not fresh.any():  # the common case online: one row, nothing blocks
            return
        if reasons:
            for i in np.flatnonzero(fresh).tolist():
                why[i, a] = text(i)
        ok[fresh, a] = False

    if contacts is not None:
        policy = plan.catalog.contact_policy
        c7, c30, since = contacts.contacts_7d, contacts.contacts_30d, contacts.days_since
        capped_7d = c7 >= policy.max_contacts_7d
        capped_30d = c30 >= policy.max_contacts_30d
        resting = since < policy.cooldown_days
        # The contact policy blocks every action alike (column 0 stands for all); one
        # test skips its three passes when it blocks nobody, the common case online.
        if (capped_7d | capped_30d | resting).any():
            block(
                slice(None),
                capped_7d,
                lambda i: (
                    f"contact cap: {c7[i]:g} contacts in 7 days >= max {policy.max_contacts_7d}"
                ),
            )
            block(
                slice(None),
                capped_30d,
                lambda i: (
                    f"contact cap: {c30[i]:g} contacts in 30 days >= max {policy.max_contacts_30d}"
                ),
            )
            block(slice(None), resting, lambda i: (
                f"cooldown: last contact {since[i]:.1f} days ago < {policy.cooldown_days}"
            ))  # fmt: skip
        if contacts.days_since_action:
            for a, action, wait in plan.cooldowns:
                days = contacts.days_since_action.get(action)
                if days is not None:
                    block(a, days < wait, _cooldown_text(action, days, wait))
    for a, action, rule in plan.rules:
        if rule.feature not in columns:
            raise ValueError(
                f"action {action!r}: eligibility rule {rule.describe()!r} needs "
                f"missing feature column {rule.feature!r}"
            )
        column = columns[rule.feature]
        fails = ~rule.holds(column) & ok[:, a]
        if not fails.any():
            continue
        if reasons:
            shown = column.tolist()  # the value as the customer's feature holds it
            for i in np.flatnonzero(fails).tolist():
                why[i, a] = f"ineligible: {rule.describe()} fails ({rule.feature}={shown[i]})"
        ok[fails, a] = False
    return ok, why


def best_eligible(values: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The highest-value eligible action of each row and its value (``-inf`` when none).

    Examples
    --------
    >>> best_eligible(np.array([[1.0, 2.0]]), np.array([[True, False]]))
    (array([0]), array([1.]))
    """
    masked = np.where(eligible, values, -np.inf)
    best = masked.argmax(axis=1)
    return best, masked[np.arange(len(values)), best]


@dataclass(frozen=True)
class Arbitration:
    """What :func:`arbitrate` decided for a batch: arrays, one row per customer.

    Attributes
    ----------
    action : ndarray of object
        The chosen action id, or ``no_action``.
    expected_value : ndarray of float
        Its ``uplift × value − cost`` (0 for ``no_action``).
    holdout : ndarray of bool
    values, uplift : ndarray, shape (n, n_actions)
        Expected value and uplift of every action.
    eligible : ndarray of bool, shape (n, n_actions)
    blocked : ndarray of object
        First blocking reason per pair (empty without reasons).
    """

    plan: ArbitrationPlan
    action: np.ndarray
    expected_value: np.ndarray
    holdout: np.ndarray
    uplift: np.ndarray
    values: np.ndarray
    eligible: np.ndarray
    blocked: np.ndarray
    best: np.ndarray
    best_value: np.ndarray

    @property
    def catalog(self) -> ActionCatalog:
        """The catalog arbitrated over."""
        return self.plan.catalog

    def decisions(self) -> list[dict[str, Any]]:
        """Action, value, reason, hold-out flag and ranked alternatives per row.

        Alternatives rank the eligible actions by value, then the ineligible
        in catalog order.
        """
        if self.blocked.shape[0] != len(self.action):
            raise ValueError("decisions need reasons: arbitrate with reasons=True")
        plan = self.plan
        names, held_reason, texts = plan.names, plan.held_reason, plan.texts
        ok = self.eligible
        ranks = np.argsort(np.where(ok, -self.values, np.inf), axis=1, kind="stable")
        # Python lists: indexing them per (row, action) is several times cheaper than numpy.
        rows = zip(
            ok.tolist(),
            self.uplift.tolist(),
            self.values.tolist(),
            self.blocked.tolist(),
            ranks.tolist(),
            self.best.tolist(),
            self.best_value.tolist(),
            self.holdout.tolist(),
            self.action.tolist(),
            strict=True,
        )
        out = []
        for ok_i, up_i, val_i, why_i, rank_i, best_i, best_value_i, held_i, act_i in rows:
            alts: list[dict[str, Any]] = []
            for j in rank_i:
                if ok_i[j]:
                    head, middle = texts[j]
                    alts.append(
                        {
                            "action": names[j],
                            "expected_value": val_i[j],
                            "eligible": True,
                            "reason": f"{head}{up_i[j]:.3f}{middle}{val_i[j]:.2f}",
                        }
                    )
                else:
                    alts.append(
                        {
                            "action": names[j],
                            "expected_value": None,
                            "eligible": False,
                            "reason": why_i[j],
                        }
                    )
            if held_i:
                action, expected, reason = NO_ACTION, 0.0, held_reason
            elif act_i != NO_ACTION:  # the kernel's choice (it paid, or must_pay was off)
                action, expected, reason = names[best_i], best_value_i, alts[0]["reason"]
            elif alts[0]["eligible"]:
                action, expected = NO_ACTION, 0.0
                reason = "no eligible action pays: best " + alts[0]["reason"].removeprefix(
                    "eligible; "
                )
            else:
                action, expected = NO_ACTION, 0.0
                reason = "no eligible action: " + "; ".join(a["reason"] for a in alts)
            out.append(
                {
                    "action": action,
                    "expected_value": expected,
                    "reason": reason,
                    "holdout": held_i,
                    "alternatives": alts,
                }
            )
        return out


def arbitrate(
    uplift: np.ndarray,
    columns: Columns,
    customer_ids: Sequence[str],
    catalog: ActionCatalog | ArbitrationPlan,
    *,
    contacts: ContactState | None,
    holdout: bool = True,
    reasons: bool = True,
    offered: Sequence[str] | None = None,
    must_pay: bool = True,
) -> Arbitration:
    """The arbitration kernel, numpy in and out: serving, bulk scoring, triggers and evaluation.

    Expected value ``uplift × value − cost`` of every action, the eligibility
    mask (:func:`eligible_mask`), the best eligible action if it pays, and
    the catalog's hold-out share sent to ``no_action``.

    Parameters
    ----------
    uplift : ndarray, shape (n, n_actions)
        Uplift of each catalog action (``catalog.names`` order) on its outcome.
    columns : DataFrame or mapping of name to array
        The features the eligibility rules read, ``n`` rows each.
    customer_ids : sequence of str
        Hash the hold-out membership.
    catalog : ActionCatalog or ArbitrationPlan
        A plan (:meth:`ArbitrationPlan.of`) saves the per-call setup.
    contacts : ContactState or None
        ``None`` applies no contact policy.
    holdout : bool
    reasons : bool
        Keep blocking reasons (needed by :meth:`Arbitration.decisions`).
    offered : sequence of str, optional
        Only these catalog actions may be chosen (a trigger's ``actions``); the
        others are blocked with that reason. Default: every action.
    must_pay : bool
        Take the best eligible action only when its expected value is positive
        (the default); ``False`` takes it whatever its value (a trigger that
        names its action: the campaign decided, the arbitration only checks
        eligibility, contacts and the hold-out).

    Examples
    --------
    >>> result = arbitrate(up, cols, ids, catalog, contacts=None)  # doctest: +SKIP
    >>> result.action.tolist()  # doctest: +SKIP
    ['discount', 'no_action']
    """
    plan = ArbitrationPlan.of(catalog)
    catalog = plan.catalog
    up = np.asarray(uplift, dtype=np.float64)
    n = len(up)
    if up.ndim != 2 or up.shape[1] != len(plan.names):
        raise ValueError(
            f"uplift has shape {up.shape}; expected (n, {len(plan.names)}) columns {plan.names}"
        )
    values = up * plan.values[None, :] - plan.costs[None, :]
    ok, why = eligible_mask(columns, plan, contacts, n_rows=n, reasons=reasons)
    if offered is not None:
        unknown = sorted(set(offered) - set(plan.names))
        if unknown:
            raise ValueError(f"offered actions {unknown} are not in the catalog {plan.names}")
        withheld = [a for a, name in enumerate(plan.names) if name not in set(offered)]
        if reasons:
            why[:, withheld] = np.where(ok[:, withheld], "not offered here", why[:, withheld])
        ok[:, withheld] = False
    best, best_value = best_eligible(values, ok)
    held = (
        in_holdout(list(customer_ids), catalog.holdout_share, catalog.holdout_salt)
        if holdout
        else np.zeros(n, dtype=bool)
    )
    act = ((best_value > 0) if must_pay else np.isfinite(best_value)) & ~held
    return Arbitration(
        plan=plan,
        action=np.where(act, plan.labels[best], NO_ACTION).astype(object),
        expected_value=np.where(act, best_value, 0.0),
        holdout=held,
        uplift=up,
        values=values,
        eligible=ok,
        blocked=why,
        best=best,
        best_value=best_value,
    )


def _decision_time(as_of: Any) -> pd.Timestamp | None:
    timestamp = None if as_of is None else pd.Timestamp(as_of)
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.tz_localize("UTC")
    return timestamp


def _contacts(
    features: pd.DataFrame,
    catalog: ActionCatalog,
    history: pd.DataFrame | None,
    as_of: Any,
    contact_policy: bool,
) -> ContactState | None:
    if not contact_policy:
        return None
    if history is None:
        return ContactState.from_features(features, catalog.contact_policy)
    return _history_state(features, catalog, history, _decision_time(as_of))


def eligibility(
    features: pd.DataFrame,
    catalog: ActionCatalog,
    *,
    history: pd.DataFrame | None = None,
    as_of: Any = None,
    contact_policy: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which actions each customer may receive, and why not (:func:`eligible_mask` on a frame).

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
    contacts = _contacts(features, catalog, history, as_of, contact_policy)
    ok, why = eligible_mask(features, catalog, contacts, n_rows=len(features))
    return (
        pd.DataFrame(ok, index=features.index, columns=catalog.names),
        pd.DataFrame(why, index=features.index, columns=catalog.names),
    )


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
    """Pick the best paying eligible action per customer from given uplifts (:func:`arbitrate`).

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
    ids = (
        features["customer_id"].astype(str).tolist()
        if "customer_id" in features.columns
        else [str(i) for i in features.index]
    )
    result = arbitrate(
        uplift[catalog.names].to_numpy(float),
        features,
        ids,
        catalog,
        contacts=_contacts(features, catalog, history, as_of, contact_policy),
        holdout=holdout,
    )
    decisions = result.decisions()
    out = pd.DataFrame(
        {
            "customer_id": ids,
            "action": [d["action"] for d in decisions],
            "expected_value": [float(d["expected_value"]) for d in decisions],
            "reason": [d["reason"] for d in decisions],
            "holdout": result.holdout,
            "alternatives": [d["alternatives"] for d in decisions],
        },
        index=features.index,
    )
    for j, name in enumerate(catalog.names):
        out[f"value_{name}"] = np.where(result.eligible[:, j], result.values[:, j], np.nan)
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
