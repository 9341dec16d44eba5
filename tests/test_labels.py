"""Labels on hand-built events: exact entity frames, window closure, cutoffs."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pytest

from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA
from propensity.labels import (
    DataWindow,
    LabelWindowError,
    check_label_window,
    choose_cutoffs,
    data_window,
    entity_frame,
    population_frame,
    to_cutoff,
)
from propensity.models.spec import LabelSpec, SplitSpec

T = pd.Timestamp("2024-02-05", tz="UTC")


def _events(rows: list[tuple[str, str, str]]) -> pa.Table:
    data = {f.name: [None] * len(rows) for f in ARROW_SCHEMA}
    data["customer_id"] = [r[0] for r in rows]
    data["event_type"] = [r[1] for r in rows]
    data["event_timestamp"] = [pd.Timestamp(r[2], tz="UTC") for r in rows]
    data["event_id"] = [f"e{i}" for i in range(len(rows))]
    return pa.Table.from_pydict(data, schema=ARROW_SCHEMA)


@pytest.fixture()
def lake(tmp_path) -> EventLake:
    rows = [
        ("C1", "session_start", "2024-01-20 10:00"),
        ("C1", "session_start", "2024-02-10 10:00"),
        ("C2", "purchase", "2024-01-25 09:00"),
        ("C3", "page_view", "2024-01-10 08:00"),  # known, never active
        ("C4", "session_start", "2024-02-05 00:00"),  # first seen exactly at T: not known at T
        ("C5", "session_start", "2024-02-04 23:59:59"),
        ("C5", "purchase", "2024-02-18 23:59"),  # last minute of the 14-day window
        ("C6", "session_start", "2024-01-01 12:00"),  # active only before the lookback
        ("C7", "session_start", "2024-01-30 12:00"),
        ("C7", "purchase", "2024-02-19 00:00"),  # first instant after the 14-day window
        ("C8", "page_view", "2024-03-31 12:00"),  # sets the data end
    ]
    lake = EventLake(tmp_path / "lake")
    lake.append(_events(rows))
    return lake


def _by_customer(frame: pd.DataFrame) -> dict[str, tuple[int, float]]:
    return {r.customer_id: (int(r.label), r.days_since_last) for r in frame.itertuples(index=False)}


def test_churn_labels_exact(lake):
    frame = entity_frame(lake, [T], LabelSpec(kind="churn", horizon_days=30), "active")
    got = _by_customer(frame)
    assert set(got) == {"C1", "C2", "C5", "C7"}
    assert {c: v[0] for c, v in got.items()} == {"C1": 0, "C2": 1, "C5": 0, "C7": 0}
    assert {c: v[1] for c, v in got.items()} == {"C1": 16.0, "C2": 11.0, "C5": 1.0, "C7": 6.0}
    assert (frame["event_timestamp"] == T).all()
    assert str(frame["event_timestamp"].dt.tz) == "UTC"


def test_purchase_labels_exact(lake):
    frame = entity_frame(lake, [T], LabelSpec(kind="purchase", horizon_days=14), "known")
    got = _by_customer(frame)
    assert set(got) == {"C1", "C2", "C3", "C5", "C6", "C7"}
    assert {c: v[0] for c, v in got.items()} == {c: int(c == "C5") for c in got}
    assert got["C2"][1] == 11.0
    assert all(math.isnan(got[c][1]) for c in ("C1", "C3", "C5", "C6", "C7"))


def test_several_cutoffs_and_lookback(lake):
    cuts = [T, T + pd.Timedelta(days=7)]
    frame = entity_frame(lake, cuts, LabelSpec(kind="churn", horizon_days=30), "active")
    second = _by_customer(frame[frame["event_timestamp"] == cuts[1]])
    # C4's first session at T makes it active for the second cutoff; C1 was seen on 02-10
    assert second["C4"][0] == 1 and second["C1"][0] == 1 and second["C5"][0] == 0
    assert list(frame["event_timestamp"]) == sorted(frame["event_timestamp"])


def test_window_closure_error_names_as_of_horizon_and_end(lake):
    with pytest.raises(LabelWindowError, match=r"2024-03-04.*30 days.*2024-03-31"):
        entity_frame(
            lake,
            [pd.Timestamp("2024-03-04", tz="UTC")],
            LabelSpec(kind="churn", horizon_days=30),
            "active",
        )
    window = data_window(lake)
    # as-of is the date the data runs to: a date after the data end is refused
    with pytest.raises(LabelWindowError, match="2024-04-05 is after the data ends"):
        choose_cutoffs(window, 14, SplitSpec(), as_of="2024-04-05")
    # the last window that still closes is accepted
    check_label_window(pd.Timestamp("2024-03-01", tz="UTC"), 30, window.end)


def test_choose_cutoffs_weekly_grid_and_history():
    window = DataWindow(
        pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-06-28 23:00", tz="UTC")
    )
    cuts = choose_cutoffs(window, 30, SplitSpec(n_cutoffs=30, min_history_days=28))
    assert all(c.weekday() == 0 and c == c.normalize() for c in cuts)
    assert cuts[-1] + pd.Timedelta(days=30) <= window.end
    assert cuts[-1] + pd.Timedelta(days=37) > window.end  # the latest grid date was chosen
    assert cuts[0] >= pd.Timestamp("2024-01-29", tz="UTC")
    assert all(b - a == pd.Timedelta(days=7) for a, b in zip(cuts, cuts[1:], strict=False))
    # the data runs to 2024-05-01: the latest labelled cutoff is 30 days before
    explicit = choose_cutoffs(window, 30, SplitSpec(n_cutoffs=3), as_of="2024-05-01")
    assert [str(c.date()) for c in explicit] == ["2024-03-18", "2024-03-25", "2024-04-01"]


def test_to_cutoff_rejects_non_midnight():
    with pytest.raises(ValueError, match="midnight"):
        to_cutoff("2024-01-01 10:00")


def test_population_frame(lake):
    frame = population_frame(lake, T)
    assert list(frame["customer_id"]) == ["C1", "C2", "C3", "C5", "C6", "C7"]
