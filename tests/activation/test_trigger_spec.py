"""The triggers file: the shipped file loads, each rule names its trigger, field and rule,
and the vectorized conditions, crossings, windows and hold-outs match per-row references."""

from __future__ import annotations

import copy
import doctest
import math
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from propensity.activation import spec as spec_module
from propensity.activation.spec import (
    Crossing,
    Segment,
    Trigger,
    TriggerFile,
    TriggerFileError,
    default_names,
    load_triggers,
)
from propensity.features.definitions import FEATURES, ON_DEMAND_FEATURES, STREAMING_FEATURES
from propensity.models.arbitration import COMPARISONS, load_catalog

REPO = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(REPO / "models" / "actions.yaml")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)
#: A rule on a made-up column, for triggers built without a names check.
X_RULE = {"feature": "x", "op": ">", "value": 0}


def _valid() -> dict[str, Any]:
    return {
        "triggers": {
            "abandoned_cart": {
                "when": [
                    {"feature": "cart_open_24h", "op": "==", "value": 1},
                    {"feature": "minutes_since_last_cart_add", "op": ">=", "value": 30},
                ],
                "delay_minutes": 30,
                "action": "cart_recovery",
                "segment": "carts",
            },
            "churn_risk": {
                "when": [{"score": "churn_probability", "crosses_above": 0.6}],
                "action": "next_best_action",
                "window_hours": 168,
            },
        },
        "segments": {
            "high_value": {"when": [{"feature": "orders_30d", "op": ">=", "value": 3}]},
            "carts": {"ttl_hours": 24},  # filled by abandoned_cart only
        },
    }


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "triggers.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(path: Path, catalog: Any = CATALOG) -> list[str]:
    with pytest.raises(TriggerFileError) as info:
        load_triggers(path, catalog=catalog)
    text = str(info.value)
    # The user sees the file's problems, not pydantic's report or a traceback.
    for raw in ("errors.pydantic.dev", "Value error", "validation error", "Traceback"):
        assert raw not in text
    assert text.splitlines() == info.value.problems
    return info.value.problems


# --- the shipped file -------------------------------------------------------------


def test_shipped_file_loads_against_the_catalog_and_the_project_names() -> None:
    spec = load_triggers(REPO / "models" / "triggers.yaml", catalog=CATALOG)
    assert {"abandoned_cart", "churn_risk"} <= set(spec.triggers)
    assert {"high_value", "browsing_now"} <= set(spec.segments)
    names = default_names()
    assert set(spec.columns) <= names.features | names.scores

    cart = spec.triggers["abandoned_cart"]
    assert (cart.action, cart.delay_minutes, cart.window_hours) == ("cart_recovery", 30, 24)
    assert cart.name == cart.salt == "abandoned_cart"
    assert cart.candidates(CATALOG) == ["cart_recovery"]
    columns = {
        "cart_open_24h": np.array([1.0, 1.0, 0.0, 1.0]),
        "minutes_since_last_cart_add": np.array([30.0, 29.9, 45.0, np.nan]),
    }
    assert cart.holds(columns).tolist() == [True, False, False, False]

    churn = spec.triggers["churn_risk"]
    assert churn.takes_next_best_action and churn.window_hours == 168
    assert churn.crossing_scores == ("churn_probability",)
    assert churn.candidates(CATALOG) == CATALOG.names
    assert spec.segments["high_value"].holds({"orders_30d": np.array([3, 2])}).tolist() == [
        True,
        False,
    ]
    assert spec.segments["browsing_now"].ttl_hours == 0.5


def test_default_names_are_the_features_and_served_scores_without_bentoml() -> None:
    from propensity.serving.scorer import SCORE_FIELDS

    names = default_names()
    assert names.scores == set(SCORE_FIELDS.values())
    expected = {f.name for f in FEATURES} | set(ON_DEMAND_FEATURES)
    assert names.features == expected | {f.name for f in STREAMING_FEATURES}
    # The runner and the CLI call this; the service's web framework must not come along.
    code = (
        "import sys; from propensity.activation import default_names; default_names(); "
        "assert 'bentoml' not in sys.modules, 'bentoml imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_module_examples_run() -> None:
    result = doctest.testmod(spec_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --- validation: each rule names the trigger (or segment), the field and the rule -------------


def _at(*path: Any) -> Callable[[dict[str, Any]], Any]:
    """Set one value deep in the valid file."""

    def get(data: dict[str, Any]) -> Any:
        for key in path[:-1]:
            data = data[key]
        return data, path[-1]

    return get


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        parent, key = _at(*path)(data)
        parent[key] = value

    return mutate


def _drop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        parent, key = _at(*path)(data)
        del parent[key]

    return mutate


def _rename_trigger(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["triggers"][new] = data["triggers"].pop(old)

    return mutate


CART, CHURN = ("triggers", "abandoned_cart"), ("triggers", "churn_risk")
T_CART, T_CHURN = "trigger 'abandoned_cart'", "trigger 'churn_risk'"
RULES = [
    pytest.param(
        _set(*CART, "when", 0, "feature", value="cart_opne"),
        T_CART,
        "when[0].feature",
        "unknown feature 'cart_opne' (did you mean 'cart_open_24h'?)",
        id="unknown-feature",
    ),
    pytest.param(
        _set(*CART, "when", 1, value={"feature": "churn_probability", "op": ">", "value": 0.5}),
        T_CART,
        "when[1].feature",
        "'churn_probability' is a score, not a feature",
        id="score-as-feature",
    ),
    pytest.param(
        _set(*CHURN, "when", 0, value={"score": "churn_prob", "op": ">=", "value": 0.5}),
        T_CHURN,
        "when[0].score",
        "unknown score 'churn_prob' (did you mean 'churn_probability'?)",
        id="unknown-score",
    ),
    pytest.param(
        _set(*CHURN, "when", 0, value={"score": "orders_30d", "op": ">=", "value": 3}),
        T_CHURN,
        "when[0].score",
        "'orders_30d' is a feature, not a score",
        id="feature-as-score",
    ),
    pytest.param(
        _set(*CHURN, "when", 0, value={"score": "events_30m", "crosses_above": 1}),
        T_CHURN,
        "when[0].score",
        "crossings are on scores only and 'events_30m' is a feature",
        id="crossing-on-feature",
    ),
    pytest.param(
        _set(*CHURN, "when", 0, "crosses_below", value=0.3),
        T_CHURN,
        "when[0]",
        "exactly one of crosses_above and crosses_below",
        id="crossing-both-ways",
    ),
    pytest.param(
        _set(*CHURN, "when", 0, value={"score": "churn_probability", "crosses_abov": 0.6}),
        T_CHURN,
        "when[0].crosses_abov",
        "unknown key (did you mean 'crosses_above'?)",
        id="crossing-misspelt",
    ),
    pytest.param(
        _set(*CART, "when", 0, "op", value="=>"),
        T_CART,
        "when[0].op",
        "Input should be",
        id="bad-operator",
    ),
    pytest.param(
        _set(*CART, "when", 1, "value", value={"minutes": 30}),
        T_CART,
        "when[1].value",
        "Input should be a valid number or a valid string or a valid list",
        id="bad-value",
    ),
    pytest.param(
        _set(*CART, "when", 1, value="minutes_since_last_cart_add >= 30"),
        T_CART,
        "when[1]",
        "expected a mapping, not a string",
        id="condition-as-text",
    ),
    pytest.param(
        _set(*CHURN, "when", value=[]),
        T_CHURN,
        "when",
        "a trigger needs at least one condition",
        id="no-condition",
    ),
    pytest.param(
        _set(*CART, "action", value="cart_recovry"),
        T_CART,
        "action",
        "unknown action 'cart_recovry' (did you mean 'cart_recovery'?)",
        id="unknown-action",
    ),
    pytest.param(
        _set(*CHURN, "actions", value=["discount", "coupon"]),
        T_CHURN,
        "actions",
        "'coupon' is not a catalog action",
        id="unknown-restriction",
    ),
    pytest.param(
        _set(*CHURN, "actions", value=["discount", "discount"]),
        T_CHURN,
        "actions",
        "'discount' listed more than once",
        id="restriction-twice",
    ),
    pytest.param(
        _set(*CART, "actions", value=["discount"]),
        T_CART,
        "actions",
        "actions restricts next_best_action only, and the action is 'cart_recovery'",
        id="restriction-without-nba",
    ),
    pytest.param(
        _set(*CART, "segment", value="cart"),
        T_CART,
        "segment",
        "unknown segment 'cart' (did you mean 'carts'?)",
        id="unknown-segment",
    ),
    pytest.param(
        _set(*CART, "delay_minutes", value=-5),
        T_CART,
        "delay_minutes",
        "greater than or equal to 0",
        id="negative-delay",
    ),
    pytest.param(
        _set(*CART, "delay_minutes", value=float("inf")),
        T_CART,
        "delay_minutes",
        "finite",
        id="infinite-delay",
    ),
    pytest.param(
        _set(*CHURN, "window_hours", value=0),
        T_CHURN,
        "window_hours",
        "greater than 0",
        id="empty-window",
    ),
    pytest.param(
        _set(*CHURN, "holdout_share", value=1.0),
        T_CHURN,
        "holdout_share",
        "less than 1",
        id="holdout-everyone",
    ),
    pytest.param(
        _set(*CHURN, "holdout_salt", value=""),
        T_CHURN,
        "holdout_salt",
        "at least 1 character",
        id="empty-salt",
    ),
    pytest.param(
        _set(*CART, "delay_minute", value=30),
        T_CART,
        "delay_minute",
        "unknown key (did you mean 'delay_minutes'?)",
        id="unknown-key",
    ),
    pytest.param(_drop(*CART, "action"), T_CART, "action", "required", id="missing-action"),
    pytest.param(
        _rename_trigger("churn_risk", "Churn-Risk"),
        "trigger 'Churn-Risk'",
        "name",
        "'Churn-Risk' is not a name: lowercase letters, digits and _",
        id="bad-name",
    ),
    pytest.param(
        _set("segments", "high_value", "when", 0, "feature", value="orders_3d"),
        "segment 'high_value'",
        "when[0].feature",
        "unknown feature 'orders_3d' (did you mean 'orders_30d'?)",
        id="segment-unknown-feature",
    ),
    pytest.param(
        _set(
            "segments",
            "high_value",
            "when",
            value=[{"score": "churn_probability", "crosses_above": 0.5}],
        ),
        "segment 'high_value'",
        "when",
        "[0] is a crossing: a crossing is an event and a segment a state",
        id="segment-crossing",
    ),
    pytest.param(
        _set("segments", "carts", value={}),
        "segment 'carts'",
        "",
        "a segment with no conditions (filled by triggers only) needs ttl_hours",
        id="segment-never-left",
    ),
    pytest.param(
        _set("segments", "idle", value={"ttl_hours": 1}),
        "segment 'idle'",
        "when",
        "no conditions and no trigger puts customers in it",
        id="segment-never-entered",
    ),
    pytest.param(
        _set("segment", value={}),
        "",
        "segment",
        "unknown key (did you mean 'segments'?)",
        id="unknown-section",
    ),
    pytest.param(_drop("triggers"), "", "triggers", "required", id="no-triggers"),
]


@pytest.mark.parametrize(("mutate", "owner", "field", "rule"), RULES)
def test_each_rule_names_the_trigger_the_field_and_the_rule(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], owner: str, field: str, rule: str
) -> None:
    data = _valid()
    load_triggers(_write(tmp_path, data), catalog=CATALOG)  # valid before the change
    mutate(data)
    path = _write(tmp_path, data)
    problems = _problems(path)
    head = ": ".join(p for p in (str(path), owner, field) if p) + ": "
    assert len(problems) == 1, problems
    assert problems[0].startswith(head), problems[0]
    assert rule in problems[0].removeprefix(head), problems[0]


def test_the_message_reads_file_trigger_field_rule(tmp_path: Path) -> None:
    data = _valid()
    data["triggers"]["abandoned_cart"]["when"][0]["feature"] = "cart_opne"
    path = _write(tmp_path, data)
    assert _problems(path) == [
        f"{path}: trigger 'abandoned_cart': when[0].feature: unknown feature 'cart_opne' "
        "(did you mean 'cart_open_24h'?)"
    ]


def test_actions_need_a_catalog(tmp_path: Path) -> None:
    data = _valid()
    data["triggers"]["record_only"] = {
        "when": [{"feature": "events_30m", "op": ">", "value": 0}],
        "action": "none",
    }
    problems = _problems(_write(tmp_path, data), catalog=None)
    assert [p.split(": ")[1:3] for p in problems] == [
        ["trigger 'abandoned_cart'", "action"],
        ["trigger 'churn_risk'", "action"],
    ]
    assert "action 'cart_recovery' needs an action catalog" in problems[0]
    assert "action 'next_best_action' needs an action catalog" in problems[1]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = _valid()
    data["triggers"]["abandoned_cart"]["when"][0]["feature"] = "cart_opne"
    data["triggers"]["abandoned_cart"]["when"][1]["op"] = "=>"
    data["triggers"]["churn_risk"]["window_hours"] = 0
    data["triggers"]["churn_risk"]["action"] = "discont"
    # A later key silently replaces the earlier in plain YAML: reported, and the later one read.
    text = yaml.safe_dump(data, sort_keys=False) + (
        "  high_value:\n    when:\n    - {feature: orders_3d, op: '>=', value: 3}\n"
    )
    problems = _problems(_write(tmp_path, text))
    assert len(problems) == 6, problems
    found = " | ".join(problems)
    for piece in (
        "trigger 'abandoned_cart': when[0].feature: unknown feature 'cart_opne'",
        "trigger 'abandoned_cart': when[1].op: ",
        "trigger 'churn_risk': window_hours: ",
        "trigger 'churn_risk': action: unknown action 'discont' (did you mean 'discount'?)",
        "segment 'high_value': when[0].feature: unknown feature 'orders_3d'",
        "key 'high_value' appears twice",
    ):
        assert piece in found


def test_duplicate_trigger_names_are_reported_with_their_line(tmp_path: Path) -> None:
    text = (
        "triggers:\n"
        "  churn_risk:\n"
        "    when: [{score: churn_probability, crosses_above: 0.6}]\n"
        "    action: next_best_action\n"
        "  churn_risk:\n"
        "    when: [{score: churn_probability, crosses_above: 0.8}]\n"
        "    action: none\n"
    )
    path = _write(tmp_path, text)
    assert _problems(path) == [
        f"{path}: line 5: key 'churn_risk' appears twice (the later would silently replace "
        "the earlier)"
    ]


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("triggers: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with triggers: and segments:, not a list"),
        ("", "triggers: required"),
    ],
    ids=["not-yaml", "not-a-mapping", "empty"],
)
def test_unreadable_files_are_one_clear_problem(tmp_path: Path, text: str, rule: str) -> None:
    path = _write(tmp_path, text)
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: ") and rule in problems[0]


def test_a_missing_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "models" / "triggers.yaml"
    with pytest.raises(TriggerFileError, match="no triggers file") as info:
        load_triggers(path, catalog=CATALOG)
    assert str(path) in str(info.value)


def test_names_are_checked_against_the_names_given(tmp_path: Path) -> None:
    data = {"triggers": {"t": {"when": [dict(X_RULE)], "action": "none"}}}
    path = _write(tmp_path, data)
    spec = load_triggers(path, catalog=None, features={"x"}, scores=set())
    assert spec.triggers["t"].columns == ("x",)
    assert "unknown feature 'x'" in _problems(path)[0]


# --- evaluation -------------------------------------------------------------------


def _trigger(when: list[dict[str, Any]], **fields: Any) -> Trigger:
    trigger = {"when": when, "action": "none", **fields}
    return TriggerFile.model_validate({"triggers": {"t": trigger}}).triggers["t"]


def _reference(op: str, x: float, value: Any) -> bool:
    if math.isnan(x):
        return False  # a missing value never satisfies a rule
    if op == "in":
        return x in value
    if op == "not_in":
        return x not in value
    return bool(COMPARISONS[op](x, value))


_VALUES = st.one_of(
    st.sampled_from([math.nan, -1.0, 0.0, 0.5, 1.0, 2.0, 30.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_THRESHOLDS = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 30.0])


@st.composite
def _rule(draw: st.DrawFn, columns: list[str]) -> dict[str, Any]:
    op = draw(st.sampled_from([*COMPARISONS, "in", "not_in"]))
    if op in ("in", "not_in"):
        value: Any = draw(st.lists(_THRESHOLDS, min_size=1, max_size=3))
    else:
        value = draw(_THRESHOLDS)
    kind = draw(st.sampled_from(["feature", "score"]))
    return {kind: draw(st.sampled_from(columns)), "op": op, "value": value}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 40))
def test_holds_matches_a_per_row_reference(data: st.DataObject, n: int) -> None:
    names = ["a", "b", "c"]
    columns: dict[str, np.ndarray] = {
        name: np.array(data.draw(st.lists(_VALUES, min_size=n, max_size=n))) for name in names
    }
    # An integer column (counts from a store) takes the same path as floats.
    columns["d"] = np.array(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)))
    when = data.draw(st.lists(_rule(names + ["d"]), min_size=1, max_size=4))
    trigger = _trigger(when)
    expected = [
        all(
            _reference(r["op"], float(columns[r.get("feature", r.get("score"))][i]), r["value"])
            for r in when
        )
        for i in range(n)
    ]
    assert trigger.holds(columns).tolist() == expected
    assert trigger.still_holds(columns).tolist() == expected  # no crossing: the same test
    segment = Segment.model_validate({"when": when})
    assert segment.holds(columns).tolist() == expected


def _crossed(above: bool, t: float, before: float | None, now: float) -> bool:
    if math.isnan(now):
        return False
    if above:
        return now >= t and (before is None or math.isnan(before) or before < t)
    return now < t and (before is None or math.isnan(before) or before >= t)


_SCORES = st.one_of(st.sampled_from([math.nan, 0.0, 0.3, 0.6, 1.0]), st.floats(0, 1))


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 40),
    above=st.booleans(),
    t=st.sampled_from([0.0, 0.3, 0.6, 1.0]),
    with_previous=st.booleans(),
)
def test_crossings_match_a_per_row_reference(
    data: st.DataObject, n: int, above: bool, t: float, with_previous: bool
) -> None:
    now = np.array(data.draw(st.lists(_SCORES, min_size=n, max_size=n)))
    before = np.array(data.draw(st.lists(_SCORES, min_size=n, max_size=n)))
    key = "crosses_above" if above else "crosses_below"
    gate = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    trigger = _trigger(
        [
            {"score": "churn_probability", key: t},
            {"feature": "cart_open_24h", "op": "==", "value": 1},
        ]
    )
    columns = {"churn_probability": now, "cart_open_24h": np.array(gate)}
    previous = {"churn_probability": before} if with_previous else None
    expected = [
        gate[i] == 1 and _crossed(above, t, before[i] if with_previous else None, now[i])
        for i in range(n)
    ]
    assert trigger.holds(columns, previous).tolist() == expected
    # A due timer asks only which side of the threshold the score is on now.
    side = [gate[i] == 1 and not math.isnan(now[i]) and ((now[i] >= t) == above) for i in range(n)]
    assert trigger.still_holds(columns).tolist() == side


def test_crossing_examples_and_missing_columns() -> None:
    rule = Crossing(score="churn_probability", crosses_below=0.3)
    before, now = np.array([0.5, 0.3, 0.1, np.nan, 0.5]), np.array([0.2, 0.2, 0.2, 0.2, np.nan])
    assert rule.holds(now, before).tolist() == [True, True, False, True, False]
    assert rule.describe() == "churn_probability crosses below 0.3"
    trigger = _trigger([{"score": "churn_probability", "crosses_above": 0.6}])
    with pytest.raises(ValueError, match="trigger 't': previous lacks score 'churn_probability'"):
        trigger.holds({"churn_probability": now}, {})
    with pytest.raises(ValueError, match="reads column 'churn_probability', absent"):
        trigger.holds({"purchase_propensity": now})
    empty = TriggerFile.model_validate(
        {
            "triggers": {"t": {"when": [dict(X_RULE)], "action": "none", "segment": "fed"}},
            "segments": {"fed": {"ttl_hours": 1}},
        }
    ).segments["fed"]
    assert empty.holds({"x": np.ones(3)}).tolist() == [False, False, False]


def test_candidates_follow_the_catalog_order() -> None:
    nba = _trigger(
        [dict(X_RULE)],
        action="next_best_action",
        actions=["cart_recovery", "discount"],
    )
    assert nba.candidates(CATALOG) == ["discount", "cart_recovery"]
    assert _trigger([dict(X_RULE)]).candidates(CATALOG) == []


# --- windows and hold-outs ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    minutes=st.integers(1, 60 * 24 * 14),
    clock=st.integers(-(2**52), 2**52),
    step=st.floats(-2.5, 2.5),
)
def test_window_keys_are_epoch_aligned_buckets(minutes: int, clock: int, step: float) -> None:
    trigger = _trigger([dict(X_RULE)], window_hours=minutes / 60)
    width = minutes * 60_000_000
    assert trigger.window_us == width
    other = clock + int(step * width)  # nearby: the same bucket, or one or two away
    same_bucket = clock // width == other // width
    assert (trigger.window_key(clock) == trigger.window_key(other)) == same_bucket
    start = datetime.fromisoformat(trigger.window_key(clock).replace("Z", "+00:00"))
    start_us = (start - EPOCH) // US
    assert start_us % width == 0 and start_us <= clock < start_us + width
    assert trigger.window_start(EPOCH + clock * US) == start
    assert trigger.window_index(np.array([clock, other])).tolist() == [
        trigger.window_index(clock),
        trigger.window_index(other),
    ]


def test_daily_and_weekly_windows() -> None:
    clock = datetime(2026, 12, 3, 13, 30, tzinfo=UTC)
    clock_us = (clock - EPOCH) // US
    daily = _trigger([dict(X_RULE)])
    assert daily.window_key(clock_us) == "2026-12-03T00:00:00Z"
    weekly = _trigger([dict(X_RULE)], window_hours=168)
    start = weekly.window_start(clock)
    assert start.weekday() == 3 and start.time().isoformat() == "00:00:00"  # Thursdays, UTC
    assert start <= clock < start + timedelta(days=7)
    with pytest.raises(ValueError, match="timezone-aware"):
        daily.window_start(clock.replace(tzinfo=None))


_IDS = [f"C{i:07d}" for i in range(20_000)]


@settings(max_examples=20, deadline=None)
@given(share=st.floats(0, 0.95), salt=st.text(min_size=1, max_size=8))
def test_holdout_share_is_binomial_and_stable(share: float, salt: str) -> None:
    trigger = _trigger([dict(X_RULE)], holdout_share=share, holdout_salt=salt)
    held = trigger.in_holdout(_IDS)
    n = len(_IDS)
    assert abs(held.mean() - share) <= 5 * math.sqrt(share * (1 - share) / n) + 1 / n
    # The same customer always lands the same way, whatever the batch around it.
    assert trigger.in_holdout(_IDS[::-1])[::-1].tolist() == held.tolist()
    assert trigger.in_holdout(np.array(_IDS[:100])).tolist() == held[:100].tolist()


def test_each_trigger_holds_out_its_own_customers() -> None:
    spec = TriggerFile.model_validate(
        {
            "triggers": {
                name: {"when": [dict(X_RULE)], "action": "none", "holdout_share": 0.5}
                for name in ("first", "second")
            }
        }
    )
    a, b = (spec.triggers[name].in_holdout(_IDS) for name in ("first", "second"))
    # Salted by name: independent draws overlap on about a quarter, not a half.
    assert abs((a & b).mean() - 0.25) < 0.02
    alone = Trigger.model_validate({"when": [dict(X_RULE)], "action": "none"})
    with pytest.raises(ValueError, match="set holdout_salt"):
        alone.in_holdout(_IDS[:1])


def test_round_trip_keeps_the_file() -> None:
    spec = load_triggers(REPO / "models" / "triggers.yaml", catalog=CATALOG)
    again = TriggerFile.model_validate(copy.deepcopy(spec.model_dump(by_alias=True)))
    assert again == spec
