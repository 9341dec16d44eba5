"""Streaming-feature state in Redis: tiles, sessions, applied ids, staged events.

The same state and semantics as :class:`~propensity.features.online.tiles.SqliteTileStore`,
for a project whose online store is Redis. Keys end with the Feast project,
as the Feast plugin's do, so ``SCAN MATCH *<project>`` finds all of a project:

* ``_stream:c:<customer>:<project>``, a hash per customer: field ``t<minute>``
  holds a tile (``events,sessions,product_views,cart_adds,purchases,last_event_us,
  last_cart_us,last_purchase_us``, an empty latest time for "none") and field
  ``s<session_id>`` a session (``last_us,views``); a read is one ``HGETALL``
  per customer, all of a request's customers in one pipeline;
* ``_stream:ids:<customer>:<project>``, a sorted set of the customer's applied
  ``event_id`` s scored by minute (erasure and expiry find them there);
* ``_stream:applied:<project>``, every applied ``event_id`` scored by its
  minute: the dedupe (``ZSCORE``) and its expiry (``ZREMRANGEBYSCORE``);
* ``_stream:customers:<project>``, each customer scored by the oldest minute it
  holds, so :meth:`RedisTileStore.expire` visits only customers with something
  to drop;
* ``_stream:dirty:<project>``, each customer changed since the trigger runner
  last looked, scored by the batch that changed it (the change feed);
* ``_stream:staged:<project>`` (batch → Arrow IPC), ``_stream:staged_rows:<project>``
  (batch → rows) and the counter ``_stream:batch:<project>``: events waiting
  for the lake, batch numbers increasing.

:meth:`RedisTileStore.apply` is one Lua script: it looks up every id first and
writes nothing when one was applied already (it answers with those, and the
batch is recomputed without them); otherwise it adds the tiles and sessions,
records the ids and stages the batch. Redis runs a script alone and writes it
to its append-only file as one transaction, so the dedupe and the increments
happen together or not at all: a client killed before the reply changed
nothing or everything, and a redelivery finds every id applied.

**Durability.** An acknowledgement after ``apply`` survives a Redis crash
only when Redis runs with the append-only file (``appendonly yes``):
``appendfsync always`` makes every write durable before the reply,
``everysec`` within about a second. With the append-only file on, ``apply``
also waits for the local fsync (``WAITAOF 1 0``, Redis 7.2 and later; an older
server is noted once in the log and relies on ``appendfsync``). Without it a
Redis restart loses the streaming state (the lake still holds what was flushed).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from propensity.features.tiles import (
    NONE_US,
    READ_SPAN_MINUTES,
    TILE_COLUMNS,
    TILE_US,
    merge,
    session_rows,
    tile_rows,
    today_start_minutes,
)

from .redis_client import connect
from .tiles import (
    ApplyReport,
    _from_ipc,
    _ipc,
    _sessions,
    _tiles,
    first_new,
    tile_rows_minutes,
)

__all__ = ["RedisTileStore", "stream_keys"]

_log = logging.getLogger(__name__)

#: Customers per expire / forget script, and per holds pipeline.
_CHUNK = 500
#: Addresses whose durability was noted in the log already (once per process).
_NOTED: set[tuple[str, str]] = set()

# Decimal integers are compared as text: exact beyond 2^53, where Lua's doubles are not.
_LUA_HELPERS = """
local function above(a, b)
  local na, nb = string.byte(a, 1) == 45, string.byte(b, 1) == 45
  if na ~= nb then return nb end
  if na then a, b = string.sub(b, 2), string.sub(a, 2) end
  if #a ~= #b then return #a > #b end
  return a > b
end
local function latest(a, b)
  if a == '' then return b end
  if b == '' or not above(b, a) then return a end
  return b
end
local function split(s)
  local out, from = {}, 1
  while true do
    local at = string.find(s, ',', from, true)
    if not at then out[#out + 1] = string.sub(s, from); return out end
    out[#out + 1] = string.sub(s, from, at - 1)
    from = at + 1
  end
end
local function add(a, b)
  return string.format('%d', tonumber(a) + tonumber(b))
end
"""

# KEYS: applied, customers, staged, staged_rows, batch, dirty, then per customer j
# its hash (KEYS[5 + 2j]) and ids (KEYS[6 + 2j]).
# ARGV: customers, events, tiles, sessions, rows, blob; then per customer
# (id, oldest minute); per event (id, customer, minute); per tile (customer,
# minute, 8 values); per session (customer, session_id, last_us, views); last, 1 to mark
# the customers in the change feed (0 not to).
_APPLY = (
    _LUA_HELPERS
    + """
local nc, ne, nt, ns = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ev = 6 + 2 * nc
-- The dedupe first, before any write: a batch holding an applied id changes nothing.
local known = {}
for i = 0, ne - 1 do
  local id = ARGV[ev + 3 * i + 1]
  if redis.call('ZSCORE', KEYS[1], id) then known[#known + 1] = id end
end
if #known > 0 then return {0, known} end
for j = 1, nc do
  local cid, oldest = ARGV[5 + 2 * j], ARGV[6 + 2 * j]
  local now = redis.call('ZSCORE', KEYS[2], cid)
  if (not now) or tonumber(now) > tonumber(oldest) then
    redis.call('ZADD', KEYS[2], oldest, cid)
  end
end
for i = 0, ne - 1 do
  local o = ev + 3 * i
  local who, minute = tonumber(ARGV[o + 2]), ARGV[o + 3]
  redis.call('ZADD', KEYS[1], minute, ARGV[o + 1])
  redis.call('ZADD', KEYS[6 + 2 * who], minute, ARGV[o + 1])
end
local tl = ev + 3 * ne
for i = 0, nt - 1 do
  local o = tl + 10 * i
  local key, field = KEYS[5 + 2 * tonumber(ARGV[o + 1])], 't' .. ARGV[o + 2]
  local v = {}
  for k = 1, 8 do v[k] = ARGV[o + 2 + k] end
  local old = redis.call('HGET', key, field)
  if old then
    local was = split(old)
    for k = 1, 5 do v[k] = add(was[k], v[k]) end
    for k = 6, 8 do v[k] = latest(was[k], v[k]) end
  end
  redis.call('HSET', key, field, table.concat(v, ','))
end
local sl = tl + 10 * nt
for i = 0, ns - 1 do
  local o = sl + 4 * i
  local key, field = KEYS[5 + 2 * tonumber(ARGV[o + 1])], 's' .. ARGV[o + 2]
  local last, views = ARGV[o + 3], ARGV[o + 4]
  local old = redis.call('HGET', key, field)
  if old then
    local was = split(old)
    last, views = latest(was[1], last), add(was[2], views)
  end
  redis.call('HSET', key, field, last .. ',' .. views)
end
local batch = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[3], batch, ARGV[6])
redis.call('HSET', KEYS[4], batch, ARGV[5])
if ARGV[#ARGV] == '1' then
  for j = 1, nc do redis.call('ZADD', KEYS[6], batch, ARGV[5 + 2 * j]) end
end
return {1, batch}
"""
)

# KEYS: customers, then per customer j its hash (KEYS[2j]) and ids (KEYS[2j + 1]).
# ARGV: before minute, the same in µs, then the customer ids.
_EXPIRE = (
    _LUA_HELPERS
    + """
local before, before_us = ARGV[1], ARGV[2]
local deleted = 0
for j = 1, #ARGV - 2 do
  local cid, state, ids = ARGV[2 + j], KEYS[2 * j], KEYS[2 * j + 1]
  local score = redis.call('ZSCORE', KEYS[1], cid)
  if score and tonumber(score) < tonumber(before) then
    local flat = redis.call('HGETALL', state)
    local gone, oldest = {}, nil
    for f = 1, #flat, 2 do
      local field, minute = flat[f], nil
      if string.byte(field, 1) == 116 then  -- 't': a tile
        minute = tonumber(string.sub(field, 2))
        if minute < tonumber(before) then
          gone[#gone + 1] = field
          deleted = deleted + 1
          minute = nil
        end
      else  -- 's': a session, dropped once its latest event is before the cut
        local last = tonumber(split(flat[f + 1])[1])
        if last < tonumber(before_us) then gone[#gone + 1] = field
        else minute = math.floor(last / 60000000) end
      end
      if minute and ((not oldest) or minute < oldest) then oldest = minute end
    end
    for lo = 1, #gone, 1000 do
      redis.call('HDEL', state, unpack(gone, lo, math.min(lo + 999, #gone)))
    end
    redis.call('ZREMRANGEBYSCORE', ids, '-inf', '(' .. before)
    local first = redis.call('ZRANGE', ids, 0, 0, 'WITHSCORES')
    if first[2] and ((not oldest) or tonumber(first[2]) < oldest) then
      oldest = tonumber(first[2])
    end
    if oldest then
      redis.call('ZADD', KEYS[1], oldest, cid)
    else
      redis.call('DEL', state, ids)
      redis.call('ZREM', KEYS[1], cid)
    end
  end
end
return deleted
"""
)

# KEYS: applied, customers, dirty, then per customer j its hash (KEYS[2 + 2j]) and ids
# (KEYS[3 + 2j]). ARGV: the customer ids. Returns the fields, ids and marks removed.
_FORGET = """
local removed = 0
for j = 1, #ARGV do
  local state, ids = KEYS[2 + 2 * j], KEYS[3 + 2 * j]
  removed = removed + redis.call('ZREM', KEYS[3], ARGV[j])
  removed = removed + redis.call('HLEN', state)
  local members = redis.call('ZRANGE', ids, 0, -1)
  removed = removed + #members
  for lo = 1, #members, 1000 do
    redis.call('ZREM', KEYS[1], unpack(members, lo, math.min(lo + 999, #members)))
  end
  redis.call('DEL', state, ids)
  redis.call('ZREM', KEYS[2], ARGV[j])
end
return removed
"""

# KEYS: staged, staged_rows. ARGV: batch, sha1 of the blob read, new blob ('' drops), rows.
# The batch is rewritten only if it still holds what was read (a flush may have
# unstaged it, another erasure rewritten it): 1 done, 0 gone, -1 changed.
_RESTAGE = """
local blob = redis.call('HGET', KEYS[1], ARGV[1])
if not blob then return 0 end
if redis.sha1hex(blob) ~= ARGV[2] then return -1 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
end
return 1
"""

# KEYS: staged, staged_rows. ARGV: last batch.
_UNSTAGE = """
local last, n = tonumber(ARGV[1]), 0
for _, batch in ipairs(redis.call('HKEYS', KEYS[2])) do
  if tonumber(batch) <= last then
    redis.call('HDEL', KEYS[1], batch)
    redis.call('HDEL', KEYS[2], batch)
    n = n + 1
  end
end
return n
"""


# KEYS: dirty. ARGV: pairs (customer, batch): removed only if still marked with that batch.
_CLEAN = """
for i = 1, #ARGV, 2 do
  local now = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if now and tonumber(now) == tonumber(ARGV[i + 1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""


def stream_keys(project: str) -> dict[str, bytes]:
    """The project-wide keys of a project's streaming state in Redis.

    Examples
    --------
    >>> stream_keys("propensity")["applied"]
    b'_stream:applied:propensity'
    """
    kinds = ("applied", "customers", "staged", "staged_rows", "batch", "dirty")
    return {kind: f"_stream:{kind}:{project}".encode() for kind in kinds}


class RedisTileStore:
    """The streaming state of one project in Redis (``online_store.kind: redis``).

    Same interface and values as
    :class:`~propensity.features.online.tiles.SqliteTileStore`.

    Parameters
    ----------
    url : str
        ``online_store.redis_url``: ``host:port[,db=N,…]`` or ``redis://host:port/db``.
    project : str
        Feast project name (the keys' suffix).
    timezone : str
        Project time zone, for "today".
    timeout : float
        Socket timeout in seconds: a Redis that stops answering is an error,
        not a hang (the stream consumer retries it).
    durable_timeout_ms : int
        How long ``apply`` waits for the append-only file's fsync (``WAITAOF``).

    Examples
    --------
    >>> store = RedisTileStore("localhost:6379", "propensity")  # doctest: +SKIP
    >>> store.apply(events).applied  # doctest: +SKIP
    500
    >>> store.read(["C1"], clock_us).shape  # doctest: +SKIP
    (1, 15)
    """

    def __init__(
        self,
        url: str,
        project: str,
        timezone: str = "UTC",
        *,
        timeout: float = 30.0,
        durable_timeout_ms: int = 5_000,
    ) -> None:
        self.url = url
        self.project = project
        self.timezone = timezone
        self.timeout = timeout
        self.durable_timeout_ms = durable_timeout_ms
        self.keys = stream_keys(project)
        self._suffix = b":" + project.encode("utf8")
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._waitaof: bool | None = None

    # -- connection ------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The Redis client (connects on first use; thread-safe, pooled)."""
        if self._client is None:
            self._client = connect(self.url, timeout=self.timeout)
            self._scripts = {
                name: self._client.register_script(text)
                for name, text in (
                    ("apply", _APPLY),
                    ("expire", _EXPIRE),
                    ("forget", _FORGET),
                    ("restage", _RESTAGE),
                    ("unstage", _UNSTAGE),
                    ("clean", _CLEAN),
                )
            }
        return self._client

    def _script(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        _ = self.client  # registers the scripts on first use
        return self._scripts[name](keys=list(keys), args=list(args))

    def close(self) -> None:
        """Close the client's connections (the next call reconnects)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def state_key(self, customer_id: str) -> bytes:
        """The hash of a customer's tiles and sessions."""
        return b"_stream:c:" + customer_id.encode("utf8") + self._suffix

    def ids_key(self, customer_id: str) -> bytes:
        """The sorted set of a customer's applied event ids."""
        return b"_stream:ids:" + customer_id.encode("utf8") + self._suffix

    def _customer_keys(self, customers: Sequence[str]) -> list[bytes]:
        keys: list[bytes] = []
        for c in customers:
            keys += (self.state_key(c), self.ids_key(c))
        return keys

    # -- writing ---------------------------------------------------------------

    def apply(self, events: pa.Table, *, changes: bool = True) -> ApplyReport:
        """Apply canonical events not applied before, atomically (one Lua script).

        Within ``events`` the first row of each ``event_id`` wins; an id
        applied earlier (by any caller) is a duplicate and changes nothing.
        The new events update their tiles and sessions, are recorded as
        applied and are staged for the lake, all in one script.

        Parameters
        ----------
        events : pa.Table
            Validated canonical events (``ARROW_SCHEMA`` columns).
        changes : bool
            Mark their customers in the change feed (:meth:`dirty`).

        Returns
        -------
        ApplyReport
        """
        ids = events.column("event_id").to_pylist()
        known: set[str] = set()
        while True:
            new = first_new(events, ids, known)
            if not new.num_rows:
                break
            keys, args = self._apply_args(new, changes)
            done, detail = self._script("apply", keys, args)
            if int(done) == 1:
                self._durable()
                break
            # Applied meanwhile (a redelivery, or another consumer): drop those, try again.
            known.update(raw.decode("utf8") for raw in detail)
        return ApplyReport(applied=new.num_rows, duplicates=len(ids) - new.num_rows)

    def _apply_args(self, new: pa.Table, changes: bool) -> tuple[list[bytes], list[Any]]:
        tiles = tile_rows(new)
        sessions = session_rows(new)
        tile_customers = tiles.column("customer_id").to_pylist()
        tile_minutes = tiles.column("minute").to_numpy().tolist()
        order: dict[str, int] = {}  # customer -> its 1-based place in the script's keys
        oldest: dict[str, int] = {}
        for c, m in zip(tile_customers, tile_minutes, strict=True):
            if c not in order:
                order[c] = len(order) + 1
            oldest[c] = min(oldest.get(c, m), m)
        customers = list(order)
        event_customers = new.column("customer_id").to_pylist()
        args: list[Any] = [len(customers), new.num_rows, tiles.num_rows, sessions.num_rows]
        args += [new.num_rows, _ipc(new)]
        for c in customers:
            args += (c, oldest[c])
        for triple in zip(
            new.column("event_id").to_pylist(),
            [order[c] for c in event_customers],
            tile_rows_minutes(new).tolist(),
            strict=True,
        ):
            args += triple
        columns = [[order[c] for c in tile_customers], tile_minutes]
        columns += [tiles.column(c).to_numpy().tolist() for c in TILE_COLUMNS[:5]]
        columns += [_latest_text(tiles.column(c)) for c in TILE_COLUMNS[5:]]
        for row in zip(*columns, strict=True):
            args += row
        for row in zip(
            [order[c] for c in sessions.column("customer_id").to_pylist()],
            sessions.column("session_id").to_pylist(),
            sessions.column("last_us").to_numpy().tolist(),
            sessions.column("views").to_numpy().tolist(),
            strict=True,
        ):
            args += row
        args.append(int(changes))
        fixed = ("applied", "customers", "staged", "staged_rows", "batch", "dirty")
        return [self.keys[k] for k in fixed] + self._customer_keys(customers), args

    def _durable(self) -> None:
        """Wait for the append-only file's fsync of the write just made, when Redis has one."""
        if self._waitaof is None:
            self._waitaof = self._aof_enabled()
            if not self._waitaof:
                self._note(
                    "no_aof",
                    "Redis at %s runs without the append-only file: streaming state "
                    "acknowledged by apply is lost if Redis restarts (appendonly yes, "
                    "appendfsync always or everysec, makes it durable)",
                )
        if not self._waitaof:
            return
        import redis

        try:
            local, _ = self.client.execute_command("WAITAOF", 1, 0, self.durable_timeout_ms)
        except redis.ResponseError as exc:
            if "unknown command" not in str(exc).lower():
                raise
            self._waitaof = False
            self._note(
                "no_waitaof",
                "Redis at %s has no WAITAOF (7.2 and later): apply's durability is "
                "that of its appendfsync setting",
            )
            return
        if int(local) < 1:
            # Not known to be on disk: the caller must not acknowledge (a retry is harmless).
            raise redis.TimeoutError(
                f"Redis did not fsync its append-only file within {self.durable_timeout_ms} ms"
            )

    def _aof_enabled(self) -> bool:
        import redis

        try:
            info = self.client.info("persistence")
        except redis.ResponseError:  # INFO refused (a managed Redis): assume none
            return False
        return bool(int(info.get("aof_enabled", 0)))

    def _note(self, what: str, message: str) -> None:
        if (self.url, what) not in _NOTED:
            _NOTED.add((self.url, what))
            _log.warning(message, self.url)

    # -- the change feed ---------------------------------------------------------

    def dirty(self, limit: int) -> list[tuple[str, int]]:
        """Customers changed since :meth:`clean` last saw them, oldest first: ``(id, batch)``.

        Marked by the apply script itself, so a change is never missed.
        """
        rows = self.client.zrange(self.keys["dirty"], 0, limit - 1, withscores=True)
        return [(raw.decode("utf8"), int(score)) for raw, score in rows]

    def clean(self, marks: Sequence[tuple[str, int]]) -> None:
        """Drop the customers of :meth:`dirty`'s marks unless they changed again since."""
        for start in range(0, len(marks), _CHUNK):
            part = marks[start : start + _CHUNK]
            args = [x for customer, batch in part for x in (customer, batch)]
            self._script("clean", [self.keys["dirty"]], args)

    # -- the lake's side -------------------------------------------------------

    def _staged_index(self) -> list[tuple[int, int]]:
        rows = self.client.hgetall(self.keys["staged_rows"])
        return sorted((int(b), int(n)) for b, n in rows.items())

    def staged(self, limit_rows: int | None = None) -> tuple[int, pa.Table | None]:
        """The oldest staged batches (up to about ``limit_rows``): last batch number and rows."""
        chosen: list[int] = []
        total = 0
        for batch, n in self._staged_index():
            if limit_rows is not None and chosen and total + n > limit_rows:
                break
            chosen.append(batch)
            total += n
        if not chosen:
            return 0, None
        blobs = self.client.hmget(self.keys["staged"], chosen)
        # A batch an erasure emptied meanwhile is gone: nothing of it to flush.
        parts = [_from_ipc(blob) for blob in blobs if blob is not None]
        return chosen[-1], (pa.concat_tables(parts) if parts else None)

    def staged_rows(self) -> int:
        """Events staged and not yet in the lake."""
        return sum(int(n) for n in self.client.hvals(self.keys["staged_rows"]))

    def unstage(self, last_batch: int) -> None:
        """Drop staged batches up to ``last_batch`` (the lake holds them now)."""
        self._script("unstage", [self.keys["staged"], self.keys["staged_rows"]], [last_batch])

    def expire(self, before_minute: int) -> int:
        """Delete tiles, sessions and applied ids before ``before_minute``; return tiles deleted.

        Only the customers holding something older are visited (the
        ``customers`` index is scored by each one's oldest minute), in
        scripts of a few hundred customers each.
        """
        deleted = 0
        customers_key = self.keys["customers"]
        cut = f"({before_minute}"
        while True:
            due = self.client.zrangebyscore(customers_key, "-inf", cut, start=0, num=_CHUNK)
            if not due:
                break
            names = [raw.decode("utf8") for raw in due]
            keys = [customers_key, *self._customer_keys(names)]
            args = [before_minute, before_minute * TILE_US, *names]
            deleted += int(self._script("expire", keys, args))
        self.client.zremrangebyscore(self.keys["applied"], "-inf", cut)
        return deleted

    def forget(self, customer_ids: Sequence[str]) -> int:
        """Remove customers' tiles, sessions, applied ids and staged events; return rows removed.

        ``DEL`` of each customer's two keys and its ids out of the applied
        set (one script per few hundred customers), then every staged batch
        naming one is rewritten without their events.
        """
        wanted = sorted({str(c) for c in customer_ids})
        if not wanted:
            return 0
        removed = 0
        head = [self.keys["applied"], self.keys["customers"], self.keys["dirty"]]
        for start in range(0, len(wanted), _CHUNK):
            part = wanted[start : start + _CHUNK]
            removed += int(self._script("forget", head + self._customer_keys(part), part))
        value_set = pa.array(wanted, pa.string())
        staged = [self.keys["staged"], self.keys["staged_rows"]]
        pending = [batch for batch, _ in self._staged_index()]
        while pending:
            batch = pending.pop()
            blob = self.client.hget(self.keys["staged"], batch)
            if blob is None:
                continue
            table = _from_ipc(blob)
            hit = pc.is_in(table.column("customer_id"), value_set=value_set)
            if not pc.any(hit).as_py():
                continue
            kept = table.filter(pc.invert(hit))
            digest = hashlib.sha1(blob).hexdigest()
            args = [batch, digest, _ipc(kept) if kept.num_rows else b"", kept.num_rows]
            done = int(self._script("restage", staged, args))
            if done == 1:
                removed += table.num_rows - kept.num_rows
            elif done == -1:
                pending.append(batch)  # rewritten meanwhile: read it again
        return removed

    def holds(self, customer_ids: Sequence[str]) -> int:
        """Rows of any streaming key (staged events included) naming these customers."""
        wanted = sorted({str(c) for c in customer_ids})
        found = 0
        for start in range(0, len(wanted), _CHUNK):
            with self.client.pipeline(transaction=False) as pipe:
                for c in wanted[start : start + _CHUNK]:
                    pipe.hlen(self.state_key(c))
                    pipe.zcard(self.ids_key(c))
                    pipe.zscore(self.keys["dirty"], c)
                replies = pipe.execute()
                found += sum(int(n) for n in replies[0::3]) + sum(int(n) for n in replies[1::3])
                found += sum(score is not None for score in replies[2::3])
        value_set = pa.array(wanted, pa.string())
        for blob in self.client.hvals(self.keys["staged"]):
            table = _from_ipc(blob)
            found += int(
                pc.sum(pc.is_in(table.column("customer_id"), value_set=value_set)).as_py() or 0
            )
        return found

    # -- reading ---------------------------------------------------------------

    def read(self, customer_ids: Sequence[str], clock_us: int) -> np.ndarray:
        """Streaming feature values of customers at one request clock.

        One pipelined ``HGETALL`` per distinct customer (one round trip).

        Parameters
        ----------
        customer_ids : sequence of str
        clock_us : int
            The request clock, µs since 1970 UTC.

        Returns
        -------
        np.ndarray
            ``(len(customer_ids), len(STREAMING_NAMES))`` float64.
        """
        ids = [str(c) for c in customer_ids]
        position: dict[str, list[int]] = {}
        for i, c in enumerate(ids):
            position.setdefault(c, []).append(i)
        distinct = list(position)
        k = clock_us // TILE_US
        lo = k - READ_SPAN_MINUTES
        since = (k - 30) * TILE_US
        with self.client.pipeline(transaction=False) as pipe:
            for c in distinct:
                pipe.hgetall(self.state_key(c))
            replies = pipe.execute() if distinct else []
        tile_parts: list[tuple] = []
        session_parts: list[tuple] = []
        for c, fields in zip(distinct, replies, strict=True):
            for field, value in fields.items():
                parts = value.split(b",")
                if field[:1] == b"t":
                    minute = int(field[1:])
                    if lo < minute <= k:
                        tile_parts.append((c, minute, *[int(p) if p else NONE_US for p in parts]))
                else:
                    last = int(parts[0])
                    if last >= since:
                        session_parts.append((c, last, int(parts[1])))
        tiles = _tiles(tile_parts, position)
        sessions = _sessions(session_parts, position)
        clocks = np.full(len(ids), clock_us, np.int64)
        return merge(tiles, sessions, clocks, today_start_minutes(clocks, self.timezone))


def _latest_text(column: pa.ChunkedArray) -> list[Any]:
    """A latest-time column as script arguments: "none" (``NONE_US``) as empty text."""
    return ["" if v == NONE_US else v for v in column.to_numpy().tolist()]
