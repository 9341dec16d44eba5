from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from jobs_project import Periods, simulate_periods  # noqa: E402


@pytest.fixture(scope="session")
def periods() -> Periods:
    """One small simulation split into two periods (shared, read-only)."""
    return simulate_periods()
