"""The triggers and segments file (``models/triggers.yaml``): declared, checked, evaluated.

A :class:`Trigger` fires for a customer when all its ``when`` conditions hold
after one of their events: conditions on features (batch, on-demand and
streaming) and on scores, plus *crossings*, a score passing a threshold
with that event. A firing takes the next-best-action under the catalog's
eligibility, contact policy and hold-out, or one named catalog action, or
nothing (a firing only recorded, or only entering a segment); it happens at
most once per customer and fixed time window, and a share of customers is
held out of it, untreated and logged, to measure it. A :class:`Segment` is a
live audience: the customers whose conditions hold.

This module is the declaration and its arithmetic only: :func:`load_triggers`
reads and checks a file before anything runs (every problem at once, each
naming the trigger or segment, the field and the rule), and the models
evaluate conditions, windows and hold-outs on numpy arrays of many
customers. The trigger runner owns events, state, timers and firing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, overload

import numpy as np
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from propensity.features.definitions import FEATURES, ON_DEMAND_FEATURES, STREAMING_FEATURES
from propensity.models.arbitration import ActionCatalog, Condition, in_holdout

__all__ = [
    "NEXT_BEST_ACTION",
    "NO_TRIGGER_ACTION",
    "FeatureCondition",
    "ScoreCondition",
    "Crossing",
    "TriggerCondition",
    "Trigger",
    "Segment",
    "TriggerFile",
    "TriggerFileError",
    "KnownNames",
    "default_names",
    "load_triggers",
]

#: ``action:`` value that takes the next-best-action of the catalog.
NEXT_BEST_ACTION = "next_best_action"
#: ``action:`` value of a trigger that sends nothing (the firing is recorded, a segment entered).
NO_TRIGGER_ACTION = "none"

#: Names of triggers and segments (the API documents the segments' with it).
NAME_PATTERN = "[a-z][a-z0-9_]*"
_US_PER_MINUTE = 60_000_000
_US_PER_HOUR = 60 * _US_PER_MINUTE
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
#: pydantic's names of the members of ``Condition.value`` in an error's location.
_MEMBER = re.compile(r"float|str|int|bool|list\[.*\]")
#: Key of the validation context that carries the names a file may refer to.
_CONTEXT = "propensity.activation.references"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- what a file may refer to -------------------------------------------------------


@dataclass(frozen=True)
class KnownNames:
    """The feature and score names a triggers file may use."""

    features: frozenset[str]
    scores: frozenset[str]


def default_names() -> KnownNames:
    """The project's names: batch, on-demand and streaming features, and the served scores.

    Examples
    --------
    >>> names = default_names()
    >>> "cart_open_24h" in names.features, "churn_probability" in names.scores
    (True, True)
    """
    # The scorer pulls LightGBM (not BentoML); imported here so that importing
    # this module stays light for processes that only deliver decisions.
    from propensity.serving.scorer import SCORE_FIELDS

    features = [f.name for f in FEATURES] + list(ON_DEMAND_FEATURES)
    features += [f.name for f in STREAMING_FEATURES]
    return KnownNames(frozenset(features), frozenset(SCORE_FIELDS.values()))


def _hint(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class _References:
    """What :func:`load_triggers` checks names against (absent: no reference checks)."""

    features: frozenset[str]
    scores: frozenset[str]
    catalog: ActionCatalog | None
    segments: frozenset[str]

    def feature(self, name: str) -> None:
        if name in self.features:
            return
        if name in self.scores:
            raise ValueError(
                f"{name!r} is a score, not a feature: write {{score: {name}, op: ..., value: ...}}"
            )
        raise ValueError(f"unknown feature {name!r}{_hint(name, self.features)}")

    def score(self, name: str, *, crossing: bool = False) -> None:
        if name in self.scores:
            return
        if name in self.features:
            if crossing:
                raise ValueError(
                    f"crossings are on scores only and {name!r} is a feature: "
                    f"write {{feature: {name}, op: ..., value: ...}}"
                )
            raise ValueError(
                f"{name!r} is a feature, not a score: "
                f"write {{feature: {name}, op: ..., value: ...}}"
            )
        raise ValueError(
            f"unknown score {name!r}{_hint(name, self.scores)}; "
            f"the scores are {', '.join(sorted(self.scores))}"
        )

    def action(self, name: str) -> None:
        if name == NO_TRIGGER_ACTION:
            return
        if self.catalog is None:
            raise ValueError(f"action {name!r} needs an action catalog, and none was given")
        if name == NEXT_BEST_ACTION or name in self.catalog.actions:
            return
        choices = [NEXT_BEST_ACTION, NO_TRIGGER_ACTION, *self.catalog.names]
        raise ValueError(
            f"unknown action {name!r}{_hint(name, choices)}; expected {NEXT_BEST_ACTION}, "
            f"{NO_TRIGGER_ACTION} or a catalog action ({', '.join(self.catalog.names)})"
        )

    def catalog_action(self, name: str) -> None:
        # Without a catalog, ``action`` already says so; one problem is enough.
        if self.catalog is not None and name not in self.catalog.actions:
            raise ValueError(
                f"{name!r} is not a catalog action{_hint(name, self.catalog.names)}; "
                f"the catalog has {', '.join(self.catalog.names)}"
            )


def _references(info: ValidationInfo) -> _References | None:
    context = info.context
    return context.get(_CONTEXT) if isinstance(context, dict) else None


def _check_segment(name: str, segments: Collection[str]) -> None:
    if name not in segments:
        known = f"the segments are {', '.join(sorted(segments))}" if segments else "none is defined"
        raise ValueError(
            f"unknown segment {name!r}{_hint(name, segments)}; {known} (define it under segments:)"
        )


# --- conditions ---------------------------------------------------------------------


class FeatureCondition(Condition):
    """``{feature: name, op: ">=", value: 3}``: a feature level (NaN never satisfies it).

    Examples
    --------
    >>> rule = FeatureCondition(feature="orders_30d", op=">=", value=3)
    >>> rule.holds(np.array([1.0, 3.0, np.nan])).tolist()
    [False, True, False]
    """

    @field_validator("feature")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        refs = _references(info)
        if refs is not None:
            refs.feature(name)
        return name


class ScoreCondition(Condition):
    """``{score: churn_probability, op: ">=", value: 0.8}``: a score level.

    The score's name is held in ``feature`` (``score`` in YAML), so it is a
    :class:`~propensity.models.arbitration.Condition` like any other.

    Examples
    --------
    >>> rule = ScoreCondition(score="churn_probability", op=">=", value=0.8)
    >>> rule.describe()
    'churn_probability >= 0.8'
    """

    feature: str = Field(alias="score")

    @field_validator("feature")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        refs = _references(info)
        if refs is not None:
            refs.score(name)
        return name


class Crossing(_Strict):
    """``{score: churn_probability, crosses_above: 0.6}``: a score passing a threshold.

    ``crosses_above: t`` holds when the value before the event was below ``t``
    or absent, and the current value is at least ``t``; ``crosses_below: t``
    when the value before was at least ``t`` or absent, and the current value
    is below ``t``. A missing current value never crosses.

    Examples
    --------
    >>> rule = Crossing(score="churn_probability", crosses_above=0.6)
    >>> rule.holds(np.array([0.7, 0.7, 0.5, 0.7]), np.array([0.5, 0.6, 0.4, np.nan])).tolist()
    [True, False, False, True]
    """

    score: str
    crosses_above: float | None = Field(default=None, allow_inf_nan=False)
    crosses_below: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("score")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        refs = _references(info)
        if refs is not None:
            refs.score(name, crossing=True)
        return name

    @model_validator(mode="after")
    def _one_direction(self) -> Crossing:
        if (self.crosses_above is None) == (self.crosses_below is None):
            raise ValueError("a crossing has exactly one of crosses_above and crosses_below")
        return self

    @property
    def above(self) -> bool:
        """True for ``crosses_above``."""
        return self.crosses_above is not None

    @property
    def threshold(self) -> float:
        """The threshold crossed."""
        value = self.crosses_above if self.crosses_above is not None else self.crosses_below
        assert value is not None  # one of the two, by validation
        return value

    def describe(self) -> str:
        """The rule as text, for reasons and logs."""
        return f"{self.score} crosses {'above' if self.above else 'below'} {self.threshold:g}"

    def level(self, current: np.ndarray) -> np.ndarray:
        """True where the current value is on the far side of the threshold (the crossing's state).

        A delayed trigger re-checks a crossing this way: at its due time there
        is no event, only the question whether the score is still past the
        threshold.
        """
        values = np.asarray(current, dtype=np.float64)
        t = self.threshold
        # Comparisons with NaN are False: a missing value is on neither side.
        return values >= t if self.above else values < t

    def holds(self, current: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """True where the score crossed: ``previous`` before the event, ``current`` after it.

        ``previous`` ``None`` (or NaN in it) means no value before: the first
        value past the threshold counts as a crossing.
        """
        now = self.level(current)
        if previous is None:
            return now
        before = np.asarray(previous, dtype=np.float64)
        t = self.threshold
        # Negating the far-side test keeps NaN (absent) on the near side.
        near = ~(before >= t) if self.above else ~(before < t)
        return now & near


def _condition_kind(value: Any) -> str:
    if isinstance(value, dict):
        # Any ``cross...`` key makes it a crossing, so a misspelt direction
        # is reported as such rather than as a level missing ``op``.
        if any(isinstance(k, str) and k.startswith("cross") for k in value):
            return "crossing"
        return "score" if "score" in value else "feature"
    if isinstance(value, Crossing):
        return "crossing"
    return "score" if isinstance(value, ScoreCondition) else "feature"


#: One entry of ``when``: a feature level, a score level or a score crossing.
TriggerCondition = Annotated[
    Annotated[FeatureCondition, Tag("feature")]
    | Annotated[ScoreCondition, Tag("score")]
    | Annotated[Crossing, Tag("crossing")],
    Discriminator(_condition_kind),
]
_TAG_MODELS: dict[str, type[BaseModel]] = {
    "feature": FeatureCondition,
    "score": ScoreCondition,
    "crossing": Crossing,
}


def _column(columns: Mapping[str, Any], name: str, owner: str) -> np.ndarray:
    try:
        raw = columns[name]
    except KeyError:
        raise ValueError(f"{owner} reads column {name!r}, absent from the columns given") from None
    values = np.asarray(raw)
    # Integer and boolean columns go the float path of Condition.holds (numpy, no pandas).
    return values.astype(np.float64) if values.dtype.kind in "biu" else values


def _level(rule: Condition, columns: Mapping[str, Any], owner: str) -> np.ndarray:
    return np.asarray(rule.holds(_column(columns, rule.feature, owner)), dtype=bool)


def _all_hold(
    when: Sequence[Condition | Crossing],
    columns: Mapping[str, Any],
    owner: str,
    crossing: Callable[[Crossing, np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """Where every rule holds; ``crossing`` evaluates crossings (none in a segment)."""
    result = np.ones(0, dtype=bool)
    for i, rule in enumerate(when):
        if isinstance(rule, Crossing):
            assert crossing is not None  # segments reject crossings, by validation
            held = np.asarray(crossing(rule, _column(columns, rule.score, owner)), dtype=bool)
        else:
            held = _level(rule, columns, owner)
        result = held if i == 0 else result & held
    return result


def _names(when: Sequence[Condition | Crossing]) -> tuple[str, ...]:
    names = [rule.score if isinstance(rule, Crossing) else rule.feature for rule in when]
    return tuple(dict.fromkeys(names))


# --- triggers and segments ----------------------------------------------------------


class Trigger(_Strict):
    """A condition on a customer's features and scores, and what to do when it holds.

    Attributes
    ----------
    description : str
    when : list of FeatureCondition, ScoreCondition or Crossing
        All must hold (at least one).
    delay_minutes : float
        ``0`` fires on the event. Otherwise the event arms a timer when the
        conditions hold at its due time (the event's time plus the delay,
        streaming windows read at that clock, as if no other event came);
        when it is due the conditions are checked again on the state then
        (:meth:`still_holds`), and the trigger fires only if they still hold.
    action : str
        ``next_best_action`` (the catalog's arbitration: eligibility, contact
        policy, hold-out), the name of one catalog action, or ``none``.
    actions : list of str, optional
        Restrict ``next_best_action`` to these catalog actions.
    segment : str, optional
        A firing also puts the customer in this segment.
    window_hours : float
        At most one firing per customer in each fixed window: epoch-aligned
        buckets of this length in UTC (24 h: UTC days; 168 h: weeks from
        Thursday 00:00 UTC, the weekday of 1970-01-01).
    holdout_share : float
        Share of customers kept out of this trigger: they receive nothing,
        and the firing is logged as held out.
    holdout_salt : str, optional
        Salt of the hold-out hash; the trigger's name when unset, so each
        trigger holds out its own customers.

    Examples
    --------
    >>> spec = TriggerFile.model_validate({"triggers": {"risk": {
    ...     "when": [{"score": "churn_probability", "crosses_above": 0.6}],
    ...     "action": "next_best_action", "window_hours": 168}}})
    >>> trigger = spec.triggers["risk"]
    >>> trigger.holds({"churn_probability": np.array([0.7, 0.7])},
    ...               {"churn_probability": np.array([0.2, 0.65])}).tolist()
    [True, False]
    >>> trigger.window_key(0), trigger.salt
    ('1970-01-01T00:00:00Z', 'risk')
    """

    description: str = ""
    when: list[TriggerCondition]
    delay_minutes: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    action: str
    actions: list[str] | None = None
    segment: str | None = None
    window_hours: float = Field(default=24.0, gt=0, allow_inf_nan=False)
    holdout_share: float = Field(default=0.1, ge=0, lt=1)
    holdout_salt: str | None = Field(default=None, min_length=1)
    _name: str = PrivateAttr(default="")

    @field_validator("when")
    @classmethod
    def _some(cls, when: list[Any]) -> list[Any]:
        if not when:
            raise ValueError("a trigger needs at least one condition (all of them must hold)")
        return when

    @field_validator("action")
    @classmethod
    def _action(cls, action: str, info: ValidationInfo) -> str:
        refs = _references(info)
        if refs is not None:
            refs.action(action)
        return action

    @field_validator("actions")
    @classmethod
    def _actions(cls, actions: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if actions is None:
            return None
        action = info.data.get("action")  # absent when ``action`` itself failed
        if action is not None and action != NEXT_BEST_ACTION:
            raise ValueError(
                f"actions restricts {NEXT_BEST_ACTION} only, and the action is {action!r}: "
                f"drop actions, or set action: {NEXT_BEST_ACTION}"
            )
        if not actions:
            raise ValueError(f"empty: list the actions {NEXT_BEST_ACTION} may take, or drop it")
        twice = sorted({a for a in actions if actions.count(a) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed more than once")
        refs = _references(info)
        if refs is not None:
            for name in actions:
                refs.catalog_action(name)
        return actions

    @field_validator("segment")
    @classmethod
    def _segment(cls, segment: str | None, info: ValidationInfo) -> str | None:
        refs = _references(info)
        if segment is not None and refs is not None:
            _check_segment(segment, refs.segments)
        return segment

    @field_validator("window_hours")
    @classmethod
    def _window(cls, hours: float) -> float:
        if hours * 3600 < 1:
            raise ValueError("a window is at least one second long")
        return hours

    @property
    def name(self) -> str:
        """The trigger's key in its file ("" for a trigger built on its own)."""
        return self._name

    @property
    def salt(self) -> str:
        """The hold-out salt: ``holdout_salt``, else the trigger's name."""
        salt = self.holdout_salt or self._name
        if not salt:
            raise ValueError("a trigger outside a TriggerFile has no name: set holdout_salt")
        return salt

    @property
    def takes_next_best_action(self) -> bool:
        """True when a firing arbitrates over the catalog (``action: next_best_action``)."""
        return self.action == NEXT_BEST_ACTION

    @property
    def columns(self) -> tuple[str, ...]:
        """The feature and score columns the conditions read."""
        return _names(self.when)

    @property
    def crossing_scores(self) -> tuple[str, ...]:
        """The scores whose value before the event :meth:`holds` needs in ``previous``."""
        return _names([rule for rule in self.when if isinstance(rule, Crossing)])

    @property
    def delay_us(self) -> int:
        """The delay in µs: a timer armed by an event at ``t`` is due at ``t + delay_us``."""
        return round(self.delay_minutes * _US_PER_MINUTE)

    @property
    def window_us(self) -> int:
        """The length of the firing window in microseconds."""
        return round(self.window_hours * _US_PER_HOUR)

    def describe(self) -> str:
        """The conditions as text, for reasons and logs."""
        return " and ".join(rule.describe() for rule in self.when)

    def candidates(self, catalog: ActionCatalog) -> list[str]:
        """The catalog actions a firing may send, in catalog order (none for ``action: none``).

        Examples
        --------
        >>> trigger.candidates(catalog)  # doctest: +SKIP
        ['cart_recovery']
        """
        if self.action == NO_TRIGGER_ACTION:
            return []
        if self.action != NEXT_BEST_ACTION:
            return [self.action]
        allowed = set(self.actions) if self.actions is not None else set(catalog.names)
        return [name for name in catalog.names if name in allowed]

    def holds(
        self,
        columns: Mapping[str, np.ndarray],
        previous: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Where the trigger's conditions all hold after an event, one value per customer.

        Parameters
        ----------
        columns : mapping of name to 1-d array
            Every column of :attr:`columns`, ``n`` customers each, as of after the event.
        previous : mapping of name to 1-d array, optional
            The scores of :attr:`crossing_scores` before the event (NaN where
            there was none); ``None`` when no customer had a value before.

        Returns
        -------
        ndarray of bool, shape (n,)

        Examples
        --------
        >>> trigger.holds({"cart_open_24h": np.array([1.0, 0.0]),
        ...                "minutes_since_last_cart_add": np.array([45.0, 50.0])})  # doctest: +SKIP
        array([ True, False])
        """
        owner = f"trigger {self._name!r}"

        def crossed(rule: Crossing, current: np.ndarray) -> np.ndarray:
            if previous is None:
                return rule.holds(current)
            if rule.score not in previous:
                # Taking it for absent would make every customer cross.
                raise ValueError(f"{owner}: previous lacks score {rule.score!r} (NaN marks none)")
            return rule.holds(current, np.asarray(previous[rule.score]))

        return _all_hold(self.when, columns, owner, crossed)

    def still_holds(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The check of a due timer: levels as in :meth:`holds`, crossings as the score's side.

        Examples
        --------
        >>> trigger.still_holds({"churn_probability": np.array([0.7, 0.5])})  # doctest: +SKIP
        array([ True, False])
        """
        return _all_hold(self.when, columns, f"trigger {self._name!r}", Crossing.level)

    @overload
    def window_index(self, clock_us: int) -> int: ...
    @overload
    def window_index(self, clock_us: np.ndarray) -> np.ndarray: ...
    def window_index(self, clock_us: int | np.ndarray) -> int | np.ndarray:
        """The number of the firing window a clock (µs since 1970 UTC) falls in, scalar or array.

        Examples
        --------
        >>> trigger.window_index(86_400_000_000)  # doctest: +SKIP
        1
        """
        if isinstance(clock_us, np.ndarray):
            return np.floor_divide(clock_us.astype(np.int64), self.window_us)
        return int(clock_us) // self.window_us

    def window_key(self, clock_us: int) -> str:
        """The start of the firing window of a clock (µs since 1970 UTC), as ISO text in UTC.

        The runner keys "fired once per customer, trigger and window" with it.

        Examples
        --------
        >>> trigger.window_key(1_796_304_600_000_000)  # 2026-12-03T13:30Z, 24 h  # doctest: +SKIP
        '2026-12-03T00:00:00Z'
        """
        start = _EPOCH + self.window_index(int(clock_us)) * self.window_us * _ONE_US
        spec = "seconds" if start.microsecond == 0 else "microseconds"
        return start.isoformat(timespec=spec).replace("+00:00", "Z")

    def window_start(self, clock: datetime) -> datetime:
        """The start of the firing window of an aware datetime.

        Examples
        --------
        >>> trigger.window_start(datetime(2026, 12, 3, 13, 30, tzinfo=UTC))  # doctest: +SKIP
        datetime.datetime(2026, 12, 3, 0, 0, tzinfo=datetime.timezone.utc)
        """
        if clock.tzinfo is None:
            raise ValueError("the clock must be timezone-aware")
        us = (clock - _EPOCH) // _ONE_US
        return _EPOCH + self.window_index(us) * self.window_us * _ONE_US

    def in_holdout(self, customer_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Which customers this trigger holds out (a hash of the id and :attr:`salt`).

        Examples
        --------
        >>> trigger.in_holdout(["C0000001", "C0000002"])  # doctest: +SKIP
        array([False, False])
        """
        return in_holdout(customer_ids, self.holdout_share, self.salt)


class Segment(_Strict):
    """A live audience: customers whose conditions hold, and those that triggers put in it.

    Attributes
    ----------
    description : str
    when : list of FeatureCondition or ScoreCondition
        A customer is a member while all hold (re-evaluated as their events
        arrive). Empty for a segment filled only by triggers (``segment:``).
    ttl_hours : float, optional
        A membership lapses this long after it last entered or was
        confirmed. Windowed conditions (``events_30m > 0``) change with no
        event, so this bounds how stale a membership can be; required when
        ``when`` is empty, else no member would ever leave.

    Examples
    --------
    >>> rule = {"feature": "orders_30d", "op": ">=", "value": 3}
    >>> segment = Segment.model_validate({"when": [rule]})
    >>> segment.holds({"orders_30d": np.array([3, 1])}).tolist()
    [True, False]
    """

    description: str = ""
    when: list[TriggerCondition] = []
    ttl_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    _name: str = PrivateAttr(default="")

    @field_validator("when")
    @classmethod
    def _levels(cls, when: list[Any]) -> list[Any]:
        for i, rule in enumerate(when):
            if isinstance(rule, Crossing):
                raise ValueError(
                    f"[{i}] is a crossing: a crossing is an event and a segment a state; "
                    f"write a level ({{score: {rule.score}, op: ..., value: ...}}) or use "
                    "the crossing in a trigger with segment:"
                )
        return when

    @model_validator(mode="after")
    def _leaves(self) -> Segment:
        if not self.when and self.ttl_hours is None:
            raise ValueError(
                "a segment with no conditions (filled by triggers only) needs ttl_hours, "
                "else no member ever leaves"
            )
        return self

    @property
    def name(self) -> str:
        """The segment's key in its file."""
        return self._name

    @property
    def columns(self) -> tuple[str, ...]:
        """The feature and score columns the conditions read."""
        return _names(self.when)

    def holds(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Where all conditions hold, one value per customer (all False with no conditions).

        Examples
        --------
        >>> segment.holds({"events_30m": np.array([2.0, 0.0])})  # doctest: +SKIP
        array([ True, False])
        """
        if not self.when:  # members only by triggers
            return np.zeros(len(next(iter(columns.values()))) if columns else 0, dtype=bool)
        return _all_hold(self.when, columns, f"segment {self._name!r}", None)


def _check_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"{name!r} is not a name: lowercase letters, digits and _, starting with a letter"
        )
    return name


_Name = Annotated[str, AfterValidator(_check_name)]


class TriggerFile(_Strict):
    """The triggers and segments of a project (``models/triggers.yaml``).

    Examples
    --------
    >>> spec = load_triggers("models/triggers.yaml", catalog=catalog)  # doctest: +SKIP
    >>> sorted(spec.triggers), sorted(spec.segments)  # doctest: +SKIP
    (['abandoned_cart', 'churn_risk'], ['browsing_now', 'high_value'])
    """

    triggers: dict[_Name, Trigger]
    segments: dict[_Name, Segment] = {}

    @model_validator(mode="after")
    def _link(self) -> TriggerFile:
        for name, trigger in self.triggers.items():
            trigger._name = name
        for name, segment in self.segments.items():
            segment._name = name
        problems = []
        fed = {t.segment for t in self.triggers.values() if t.segment is not None}
        for name, trigger in self.triggers.items():
            if trigger.segment is not None:
                try:  # already checked when load_triggers validated; here for model_validate
                    _check_segment(trigger.segment, self.segments)
                except ValueError as exc:
                    problems.append(f"trigger {name!r}: segment: {exc}")
        for name, segment in self.segments.items():
            if not segment.when and name not in fed:
                problems.append(
                    f"segment {name!r}: when: no conditions and no trigger puts customers "
                    "in it (segment: on a trigger), so it would stay empty"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Every feature and score column the triggers and segments read."""
        names = [c for t in self.triggers.values() for c in t.columns]
        return tuple(dict.fromkeys(names + [c for s in self.segments.values() for c in s.columns]))


# --- loading ------------------------------------------------------------------------


class TriggerFileError(ValueError):
    """A triggers file that cannot be used: every problem, one line each.

    Attributes
    ----------
    problems : list of str
        ``<file>: trigger '<name>': <field>: <rule>`` (or ``segment``).
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Loader(yaml.SafeLoader):
    """Safe YAML that records duplicate keys: a later one silently replaces the earlier."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any]] = []


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool):
            continue  # an unhashable key: YAML's own constructor reports it
        if key in seen:
            loader.duplicates.append((key_node.start_mark.line + 1, key))
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _read_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TriggerFileError([f"{source}: not valid YAML: {problem}{where}"]) from None
    finally:
        loader.dispose()
    return data, [
        f"{source}: line {line}: key {key!r} appears twice (the later would silently replace "
        "the earlier)"
        for line, key in loader.duplicates
    ]


def _owner_and_path(loc: tuple[Any, ...]) -> tuple[str, str]:
    parts = list(loc)
    owner = ""
    if len(parts) >= 2 and parts[0] in ("triggers", "segments"):
        owner = f"{parts[0][:-1]} {parts[1]!r}"
        parts = parts[2:]
    path = ""
    previous: Any = None
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(previous, int) and part in _TAG_MODELS:
            pass  # the union member pydantic tried (a tag, not a field of the file)
        elif "value" in parts and _MEMBER.fullmatch(str(part)):
            pass  # a type of ``value: float | str | list``: the same as above
        else:
            path += ("." if path else "") + ("name" if part == "[key]" else str(part))
        previous = part
    return owner, path


def _fields_at(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = None
    if not parent:
        model = TriggerFile
    elif len(parent) == 2 and parent[0] == "triggers":
        model = Trigger
    elif len(parent) == 2 and parent[0] == "segments":
        model = Segment
    elif len(parent) == 5 and parent[2] == "when":
        model = _TAG_MODELS.get(parent[4])
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _rule(error: Any) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "missing":
        return "required"
    if error["type"] == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        hint = _hint(str(loc[-1]), fields)
        if hint or not fields:
            return f"unknown key{hint}"
        return "unknown key; expected one of " + ", ".join(fields)
    if error["type"] == "model_type":
        return f"expected a mapping, not {_kind_of(error['input'])}"
    return str(error["msg"]).removeprefix("Value error, ")


def _kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return kinds.get(type(value), type(value).__name__)


def _problems(exc: ValidationError, source: str) -> list[str]:
    rules: dict[tuple[str, str], list[str]] = {}
    for error in exc.errors():
        rules.setdefault(_owner_and_path(tuple(error["loc"])), []).append(_rule(error))
    out = []
    for (owner, path), found in rules.items():
        if len(found) > 1 and all(r.startswith("Input should be ") for r in found):
            # One value that fits no member of a union: one problem, the members as options.
            found = ["Input should be " + " or ".join(r[16:] for r in found)]
        for rule in found:
            for line in rule.split("\n"):  # a file-level check lists one problem a line
                out.append(": ".join(p for p in (source, owner, path, line) if p))
    return out


def load_triggers(
    path: str | Path,
    *,
    catalog: ActionCatalog | None,
    features: Collection[str] | None = None,
    scores: Collection[str] | None = None,
) -> TriggerFile:
    """Read and check a triggers file: structure, values and every name it refers to.

    Parameters
    ----------
    path : str or Path
        The YAML file (``activation.triggers_file``, ``models/triggers.yaml``).
    catalog : ActionCatalog or None
        The action catalog (:func:`~propensity.models.arbitration.load_catalog`);
        without one, only ``action: none`` triggers are valid.
    features, scores : collection of str, optional
        The names conditions may use; by default the project's
        (:func:`default_names`).

    Returns
    -------
    TriggerFile

    Raises
    ------
    TriggerFileError
        Every problem of the file, each naming the trigger or segment, the
        field and the rule; or the missing file.

    Examples
    --------
    >>> from propensity.models.arbitration import load_catalog
    >>> spec = load_triggers("models/triggers.yaml",
    ...                      catalog=load_catalog("models/actions.yaml"))  # doctest: +SKIP
    >>> spec.triggers["abandoned_cart"].action  # doctest: +SKIP
    'cart_recovery'
    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise TriggerFileError(
            [f"{source}: no triggers file here (activation.triggers_file names it)"]
        )
    data, problems = _read_yaml(file.read_text(encoding="utf-8"), source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TriggerFileError(
            [
                f"{source}: expected a mapping with triggers: and segments:, "
                f"not a {type(data).__name__}"
            ]
        )
    if features is None or scores is None:
        names = default_names()
        features = names.features if features is None else features
        scores = names.scores if scores is None else scores
    segments = data.get("segments")
    refs = _References(
        features=frozenset(features),
        scores=frozenset(scores),
        catalog=catalog,
        segments=frozenset(str(k) for k in segments) if isinstance(segments, dict) else frozenset(),
    )
    try:
        spec = TriggerFile.model_validate(data, context={_CONTEXT: refs})
    except ValidationError as exc:
        problems += _problems(exc, source)
    if problems:
        raise TriggerFileError(problems)
    return spec
