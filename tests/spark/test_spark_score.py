"""Bulk scores on Spark equal the in-process bulk path's (to 1e-6), the same actions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))

from project import fit_model, fit_nba  # noqa: E402

from propensity.features.definitions import FEATURES  # noqa: E402
from propensity.pipeline.score import _nba_columns, score_table  # noqa: E402
from propensity.spark.score import score_frame_spark  # noqa: E402


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any, Any]:
    churn = fit_model([f.name for f in FEATURES[:12]], seed=1, n_rows=1500, n_estimators=20)
    purchase = fit_model([f.name for f in FEATURES[10:24]], seed=2, n_rows=1500, n_estimators=20)
    nba = fit_nba([f.name for f in FEATURES[:10]], seed=3, n_rows=1500, n_estimators=15)
    return churn, purchase, nba


def _frame(n: int, columns: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.gamma(2.0, 3.0, size=(n, len(columns))), columns=columns)
    frame.iloc[rng.random(n) < 0.1, 0] = np.nan
    frame.insert(0, "customer_id", [f"C{i:07d}" for i in rng.permutation(n)])
    return frame


def test_spark_bulk_scores_equal_in_process_scores(spark: Any, models: Any) -> None:
    churn, purchase, nba = models
    columns = list(
        dict.fromkeys([*churn.feature_names_, *purchase.feature_names_, *_nba_columns(nba)])
    )
    frame = _frame(3000, columns, seed=7)
    expected = score_table(frame, churn, purchase, nba)
    # Several partitions: each executor batch is scored and arbitrated on its own.
    got = score_frame_spark(spark.createDataFrame(frame).repartition(3), churn, purchase, nba)
    got = got.toPandas()
    assert len(got) == len(expected)
    key = "customer_id"
    got = got.sort_values(key).reset_index(drop=True)
    expected = expected.sort_values(key).reset_index(drop=True)
    assert got[key].tolist() == expected[key].tolist()
    for column in ("churn", "purchase_propensity", "expected_value"):
        np.testing.assert_allclose(got[column], expected[column], rtol=0, atol=1e-6)
    assert got["action"].tolist() == expected["action"].tolist()
    assert expected["action"].nunique() > 1  # the arbitration had choices to get wrong
