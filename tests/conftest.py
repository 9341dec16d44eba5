"""Test-run wide settings: how tests share the two CI workers (pytest-xdist).

``make test`` runs the suite on 2 workers with ``--dist loadgroup``. A module's tests stay
on one worker, in order (module fixtures are built once, and some tests build on the
state the previous ones left); the folders whose tests share an expensive session
fixture stay on one worker (each worker would otherwise build it again); and the tests
that use the shared ``redis-server`` (one Feast project, one keyspace) run on one worker,
one after another, so they never see each other's keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Folders whose tests share a session fixture (the served project, the Spark session).
_SESSION_GROUPS = ("serving", "spark")
#: Modules that talk to the shared Redis server (test_erasure starts a server of its own).
_REDIS_MODULES = {
    "test_online_writer.py",
    "test_readiness.py",
    "test_redis_stream.py",
    "test_redis_tiles.py",
    "test_store.py",
    "test_stream.py",
    "test_trigger_runner.py",
    "test_webhook.py",
}


def _group(item: pytest.Item) -> str:
    path = Path(str(item.fspath))
    if path.name in _REDIS_MODULES:
        return "redis"
    folder = path.parent.name
    return folder if folder in _SESSION_GROUPS else path.name


# First: xdist's own hook reads the groups into the node ids, and a conftest registers after it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
