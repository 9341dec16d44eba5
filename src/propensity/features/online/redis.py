"""The Redis online-store plugin: Feast's Redis store with bulk writes and erasure.

Selected in the Feast configuration by its class path::

    online_store:
      type: propensity.features.online.redis.BulkRedisOnlineStore
      connection_string: "localhost:6379,db=0"

It keeps Feast's layout (one hash per entity, key = serialized entity key +
project; fields = murmur3 of ``view:feature`` and ``_ts:<view>``), so
``get_online_features``, ``push`` and ``materialize`` work unchanged (Feast's
own ``online_write_batch`` is kept: it already sends one pipeline per batch,
and compares each row with the stored timestamp, which ``push`` relies on).
On top it has

* :meth:`BulkRedisOnlineStore.bulk_writer`, the Arrow path of
  :func:`~propensity.features.online.write_many`: one ``HSET`` per customer
  carrying every view of the chunk, pipelined;
* :meth:`BulkRedisOnlineStore.materialized_views`, which views hold rows
  (the scoring service's readiness);
* :meth:`BulkRedisOnlineStore.delete_entities`: ``DEL`` of the customers' hashes;
* the materialization marks, hash ``_materialized:<project>``, so an
  incremental write into a fresh Redis writes everything.

Reads go through Feast's ``online_read`` (the adapter's reader wraps
``get_online_features``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from feast.infra.online_stores.helpers import compute_versioned_name
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.repo_config import RepoConfig

from ._bulk import BulkWrites, Chunk, ViewPlan, _utc
from ._codec import redis_field, timestamp_protos

__all__ = ["BulkRedisOnlineStore", "BulkRedisOnlineStoreConfig", "marks_key"]


#: Project hashes :meth:`BulkRedisOnlineStore.materialized_views` looks into without marks.
_PROBE_KEYS = 200


def marks_key(project: str) -> bytes:
    """The hash of a project's materialization marks (view -> end of the last interval).

    Ends with the project like Feast's entity keys, so a project's keys stay one pattern.
    """
    return b"_materialized:" + project.encode("utf8")


class BulkRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Configuration of :class:`BulkRedisOnlineStore` (that of Feast's Redis store)."""

    # The class path Feast resolves the store from (type: in feature_store.yaml).
    type: Literal["propensity.features.online.redis.BulkRedisOnlineStore"] = (
        "propensity.features.online.redis.BulkRedisOnlineStore"  # type: ignore[assignment]
    )


class BulkRedisOnlineStore(BulkWrites, RedisOnlineStore):
    """Feast's Redis online store with bulk writes and erasure."""

    kind = "redis"

    def bulk_writer(self, config: RepoConfig, wal: bool) -> _RedisWriter:
        return _RedisWriter(self._get_client(config.online_store), config)

    def delete_entities(self, config: RepoConfig, keys: Sequence[bytes]) -> int:
        """Delete the hashes of these serialized entity keys; returns how many existed."""
        if not keys:
            return 0
        client = self._get_client(config.online_store)
        project = config.project.encode("utf8")
        try:
            return int(client.delete(*[k + project for k in keys]))
        finally:
            client.close()
            self._client = None

    def materialized_views(self, config: RepoConfig, views: Sequence[str]) -> set[str]:
        """Those of ``views`` that hold materialized rows in this Redis.

        A view counts when it has a materialization mark, or, for a store
        written without marks, when one of the first project hashes a
        ``SCAN`` meets carries the view's ``_ts:<view>`` field (a bounded
        look: a probe must not walk a whole production database).
        """
        client = self._get_client(config.online_store)
        project = config.project.encode("utf8")
        try:
            marked = client.hkeys(marks_key(config.project))
            found = {raw.decode() for raw in marked} & set(views)
            missing = [v for v in views if v not in found]
            if missing:
                for looked, key in enumerate(client.scan_iter(match=b"*" + project, count=500)):
                    if looked >= _PROBE_KEYS or not missing:
                        break
                    if key.startswith(b"_"):  # marks and streaming state, not an entity
                        continue
                    for view in list(missing):
                        if client.hexists(key, f"_ts:{view}"):
                            found.add(view)
                            missing.remove(view)
            return found
        finally:
            client.close()
            self._client = None


class _RedisWriter:
    def __init__(self, client: Any, config: RepoConfig, pipeline_size: int = 2_000) -> None:
        self.config = config.online_store
        self.client = client
        self.project = config.project.encode("utf8")
        self.ttl = getattr(self.config, "key_ttl_seconds", None)
        self.pipeline_size = pipeline_size

    def prepare(self, plan: ViewPlan) -> None:
        return None

    def encode(self, parts: list[tuple[ViewPlan, Chunk]]) -> list[tuple[bytes, list[bytes]]]:
        # Merge every view of this chunk into one HSET per entity key, so a reader
        # sees a customer's features (of all views written together) change at once.
        fields: dict[bytes, list[bytes]] = {}
        for plan, chunk in parts:
            name = compute_versioned_name(plan.view, plan.versioning)
            ts_key = f"_ts:{name}".encode()
            hkeys = [redis_field(name, feature) for feature, _ in plan.features]
            stamps = timestamp_protos(chunk.event_ts)
            for i, row in enumerate(zip(*chunk.values(plan), strict=True)):
                flat = fields.setdefault(chunk.keys[i] + self.project, [])
                flat += (ts_key, stamps[i])
                flat += itertools.chain.from_iterable(zip(hkeys, row, strict=True))
        return list(fields.items())

    def write(self, items: list[tuple[bytes, list[bytes]]]) -> None:
        for lo in range(0, len(items), self.pipeline_size):
            with self.client.pipeline(transaction=False) as pipe:
                for key, flat in items[lo : lo + self.pipeline_size]:
                    pipe.execute_command("HSET", key, *flat)
                    if self.ttl:
                        pipe.expire(name=key, time=self.ttl)
                pipe.execute()

    def _marks(self) -> bytes:
        return marks_key(self.project.decode("utf8"))

    def written_end(self, plan: ViewPlan) -> datetime | None:
        raw = self.client.hget(self._marks(), plan.view.name)
        return _utc(datetime.fromisoformat(raw.decode())) if raw else None

    def mark(self, plan: ViewPlan, end: datetime) -> None:
        self.client.hset(self._marks(), plan.view.name, end.isoformat())

    def close(self) -> None:
        return None
