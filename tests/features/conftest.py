"""Fixtures of the feature tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from features_testdata import REPO_FEATURE_REPO

from propensity.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path, feature_repo=REPO_FEATURE_REPO)
