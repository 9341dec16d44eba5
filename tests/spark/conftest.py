"""One local[2] Spark session for the whole test session (its JVM takes seconds to start)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "features"))

from propensity.config import Spark  # noqa: E402
from propensity.spark.session import spark_session, stop_session  # noqa: E402

#: The tests' session: two cores, few shuffle partitions (tiny data), a small heap.
TEST_SPARK = Spark(master="local[2]", shuffle_partitions=2, driver_memory="1g")


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    session = spark_session(TEST_SPARK)
    yield session
    stop_session()
