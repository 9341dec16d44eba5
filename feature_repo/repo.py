"""Feast definitions of the propensity feature store.

Declarative: one entity, one Parquet source and feature view per theme, one
push source and feature view of the streaming features, one on-demand view
computed at request time, and the versioned feature services.
Names, schemas and services all come from ``propensity.features.definitions``,
the single feature registry; the Parquet tables are written by
``propensity.features.snapshots.build_features``.

``propensity.features.store.FeatureStoreAdapter`` calls :func:`definitions`
with the project's ``features_dir``. The module-level objects below exist for
the ``feast`` CLI (``feast apply`` run in this folder) and read the project
settings of the parent folder.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path
from typing import Any

from feast import (
    Entity,
    FeatureService,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    RequestSource,
    ValueType,
)
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.types import Float64, String

from propensity.features.definitions import (
    ENTITY,
    ON_DEMAND_FEATURES,
    SERVICES,
    STREAMING_FEATURES,
    STREAMING_VIEW,
    VIEWS,
    features_of,
    request_features,
)

# Weekly snapshots: a row stays valid until the next one, plus a day of slack.
TTL = timedelta(days=8)
# The longest streaming window: a pushed row says nothing about the day after.
STREAMING_TTL = timedelta(days=1)


def definitions(features_dir: Path) -> list[Any]:
    """Build every Feast object, reading the feature tables under ``features_dir``."""
    customer = Entity(
        name="customer",
        join_keys=[ENTITY],
        value_type=ValueType.STRING,
        description="A customer, identified by customer_id (e.g. C0000001).",
    )

    def view(name: str, source: Any, ttl: timedelta, features: Any, text: str) -> FeatureView:
        return FeatureView(
            name=name,
            entities=[customer],
            ttl=ttl,
            schema=[Field(name=ENTITY, dtype=String)]
            + [Field(name=f.name, dtype=Float64, description=f.description) for f in features],
            source=source,
            online=True,
            description=text,
        )

    def parquet(name: str) -> FileSource:
        return FileSource(
            name=f"{name}_source",
            path=str(Path(features_dir) / f"{name}.parquet"),
            timestamp_field="event_timestamp",
        )

    views: dict[str, Any] = {
        name: view(name, parquet(name), TTL, features_of(name), text)
        for name, text in VIEWS.items()
    }
    # Pushed rows (``store.push("streaming_push", frame)``) hold the values at their
    # event_timestamp; propensity's own reader merges the tiles at the request clock
    # instead, so its windows decay. The batch source is declared for Feast's push
    # API only: training frames compute these features from the event lake.
    push = PushSource(name=f"{STREAMING_VIEW}_push", batch_source=parquet(STREAMING_VIEW))
    views[STREAMING_VIEW] = view(
        STREAMING_VIEW,
        push,
        STREAMING_TTL,
        STREAMING_FEATURES,
        "In-session and recent-activity features from the live events.",
    )
    request = RequestSource(name="request", schema=[Field(name="request_time", dtype=Float64)])
    # Built without the decorator on purpose: the decorator rewrites the function's
    # module to __main__ to pickle it by value; the package function pickles by
    # reference instead, so any process with propensity installed can load it.
    odfv = OnDemandFeatureView(
        name="request_features",
        sources=[views["lifecycle"][["last_event_epoch"]], request],
        schema=[Field(name=name, dtype=Float64) for name in ON_DEMAND_FEATURES],
        mode="python",
        udf=request_features,
        udf_string=inspect.getsource(request_features),
        description="Values computed at request time.",
    )
    views[odfv.name] = odfv
    services = [
        FeatureService(name=name, features=[views[v] for v in members])
        for name, members in SERVICES.items()
    ]
    return [customer, *views.values(), *services]


def _cli_objects() -> dict[str, Any]:
    from propensity.config import load_settings

    settings = load_settings(Path(__file__).resolve().parent.parent)
    return {
        f"{type(o).__name__}_{o.name}": o for o in definitions(settings.path(settings.features_dir))
    }


# The feast CLI collects module attributes; the adapter only calls definitions().
if __name__ != "propensity_feature_repo":
    globals().update(_cli_objects())
