"""The activation's durable state in Redis: timers, fired windows, segments, contacts.

Keys start with ``activation.prefix`` (``P`` below):

* ``P:timers``, a sorted set of pending delayed checks, member
  ``<trigger>\\x1f<customer>`` scored by the due time (epoch milliseconds): a
  restart finds every pending timer where it was; re-arming moves it;
* ``P:fired:<trigger>:<window>:<customer>``, set when a trigger fires for a
  customer in a window, expiring with the window: at most one firing each;
* ``P:last:<score>``, a hash of the score each customer had at the last
  evaluation (what a crossing compares with);
* ``P:segment:<name>``, the members of a live segment (a sorted set ordered by
  id, paged by id), and ``P:member:<customer>``, the segments of a customer;
* ``P:contacts:<customer>``, the decisions delivered to a customer scored by
  their time: the contact policy counts them on the next decision;
* ``P:exposures``, decisions fired and not yet written to the event lake as
  ``campaign_exposure`` events (an outbox, drained by the runner).

A firing is one Lua script (:data:`_FIRE`): the fired mark, the outbound
entry (unless held out), the contact and the exposure outbox entry are written
together or not at all, so a runner killed at any point neither loses a
decision (the change or timer that caused it is evaluated again) nor delivers
one twice (the mark is there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from propensity.features.online.redis_client import connect

__all__ = ["MARKER_FILE", "ActivationState", "Decision"]

#: In the jobs folder: this project runs triggers, so erasure must reach their state.
MARKER_FILE = "activation.json"
_SEP = "\x1f"
#: Contacts older than this are dropped (the longest contact-policy window).
CONTACT_DAYS = 30

# KEYS: fired, outbound, contacts, exposures. ARGV: ttl seconds, decision id, decision JSON,
# delivered (1/0), epoch seconds, oldest contact kept (epoch seconds).
_FIRE = """
if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1]) then return 0 end
if ARGV[4] == '1' then
  redis.call('XADD', KEYS[2], '*', 'key', ARGV[2], 'decision', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[6])
end
redis.call('XADD', KEYS[4], '*', 'decision', ARGV[3])
return 1
"""

# KEYS: timers. ARGV: pairs (member, due ms): removed only if still due at that time.
_DISARM = """
for i = 1, #ARGV, 2 do
  local due = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if due and tonumber(due) == tonumber(ARGV[i + 1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""


@dataclass(frozen=True)
class Decision:
    """One firing of a trigger for a customer: what was decided, and whether it is sent."""

    decision_id: str
    trigger: str
    customer_id: str
    fired_at: str
    action: str | None
    expected_value: float | None
    reasons: list[Any]
    model_versions: dict[str, str]
    holdout: bool
    window: str
    ttl_seconds: int

    @property
    def delivered(self) -> bool:
        """Sent to the outbound stream: not held out, and an action to take.

        A held-out decision keeps the action it would have taken, for measurement.
        """
        return not self.holdout and self.action is not None

    def to_json(self) -> bytes:
        """The outbound entry's ``decision`` field."""
        body = {
            "decision_id": self.decision_id,
            "trigger": self.trigger,
            "customer_id": self.customer_id,
            "fired_at": self.fired_at,
            "action": self.action,
            "expected_value": self.expected_value,
            "reasons": self.reasons,
            "model_versions": self.model_versions,
            "holdout": self.holdout,
        }
        return json.dumps(body, separators=(",", ":")).encode()


class ActivationState:
    """The activation keys of one project in Redis.

    Parameters
    ----------
    url : str
        The Redis (``Settings.activation_url``).
    prefix : str
        ``activation.prefix``.
    outbound_key : str
        ``activation.outbound_key``.
    dead_letter_key : str, optional
        ``activation.webhook.dead_letter_key``: erasure reaches its decisions too.

    Examples
    --------
    >>> state = ActivationState("localhost:6379", "propensity:activation", "out")  # doctest: +SKIP
    >>> state.arm("abandoned_cart", ["C1"], due_ms=1_700_000_000_000)  # doctest: +SKIP
    """

    def __init__(
        self, url: str, prefix: str, outbound_key: str, dead_letter_key: str | None = None
    ) -> None:
        self.prefix = prefix
        self.outbound_key = outbound_key
        self.dead_letter_key = dead_letter_key
        self.client: Any = connect(url, timeout=30)
        self._fire = self.client.register_script(_FIRE)
        self._disarm = self.client.register_script(_DISARM)

    def key(self, *parts: str) -> str:
        """``prefix:part:part…``."""
        return ":".join((self.prefix, *parts))

    # -- timers ----------------------------------------------------------------

    def arm(self, trigger: str, customers: Iterable[str], due_ms: int) -> None:
        """Set (or move) each customer's timer of ``trigger`` to ``due_ms``."""
        mapping = {f"{trigger}{_SEP}{c}": due_ms for c in customers}
        if mapping:
            self.client.zadd(self.key("timers"), mapping)

    def due(self, now_ms: int, limit: int) -> list[tuple[str, str, int]]:
        """Timers due by ``now_ms``, earliest first: ``(trigger, customer, due_ms)``."""
        rows = self.client.zrangebyscore(
            self.key("timers"), "-inf", now_ms, start=0, num=limit, withscores=True
        )
        out = []
        for member, score in rows:
            trigger, customer = member.decode("utf8").split(_SEP, 1)
            out.append((trigger, customer, int(score)))
        return out

    def disarm(self, timers: Sequence[tuple[str, str, int]]) -> None:
        """Remove handled timers, unless re-armed since (a newer event moved them)."""
        args = [x for t, c, due in timers for x in (f"{t}{_SEP}{c}", due)]
        if args:
            self._disarm(keys=[self.key("timers")], args=args)

    def pending_timers(self) -> int:
        """Timers waiting."""
        return int(self.client.zcard(self.key("timers")))

    # -- crossings -------------------------------------------------------------

    def previous(self, score: str, customers: Sequence[str]) -> np.ndarray:
        """Each customer's ``score`` at the last evaluation (NaN: none yet)."""
        if not customers:
            return np.zeros(0)
        raw = self.client.hmget(self.key("last", score), list(customers))
        return np.array([np.nan if v is None else float(v) for v in raw])

    def remember(self, score: str, customers: Sequence[str], values: np.ndarray) -> None:
        """Keep the scores of this evaluation for the next one's crossings."""
        mapping = {
            c: repr(float(v)) for c, v in zip(customers, values.tolist(), strict=True) if v == v
        }
        if mapping:
            self.client.hset(self.key("last", score), mapping=mapping)

    # -- firing ----------------------------------------------------------------

    def fire(self, decisions: Sequence[Decision], now_s: float) -> list[bool]:
        """Record each decision unless its trigger fired for the customer in this window.

        Returns, per decision, whether it was new (and so sent, when delivered).
        """
        oldest = int(now_s - CONTACT_DAYS * 86400)
        # One round trip for the batch: each script still runs alone and whole, so a
        # runner killed mid-pipeline left every decision recorded or not at all.
        with self.client.pipeline(transaction=False) as pipe:
            for d in decisions:
                keys = [
                    self._fired_key(d.trigger, d.window, d.customer_id),
                    self.outbound_key,
                    self.key("contacts", d.customer_id),
                    self.key("exposures"),
                ]
                args: list[Any] = [
                    d.ttl_seconds,
                    d.decision_id,
                    d.to_json(),
                    int(d.delivered),
                    now_s,
                    oldest,
                ]
                self._fire(keys=keys, args=args, client=pipe)
            out = [bool(int(reply)) for reply in pipe.execute()]
        return out

    def _fired_key(self, trigger: str, window: str, customer: str) -> str:
        return self.key("fired", trigger, window, customer)

    def fired(self, trigger: str, window: str, customers: Sequence[str]) -> np.ndarray:
        """Whether ``trigger`` fired for each customer in ``window`` (by its mark)."""
        with self.client.pipeline(transaction=False) as pipe:
            for c in customers:
                pipe.exists(self._fired_key(trigger, window, c))
            return np.array(pipe.execute(), dtype=bool).reshape(len(customers))

    def contacts(
        self, customers: Sequence[str], since_s: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decisions delivered to each customer after its ``since_s``, flat.

        Returns ``(row, time)``: per decision, the index of its customer in
        ``customers`` and its time (epoch s).
        """
        with self.client.pipeline(transaction=False) as pipe:
            for c, since in zip(customers, since_s, strict=True):
                pipe.zrangebyscore(self.key("contacts", c), f"({since}", "+inf", withscores=True)
            replies = pipe.execute()
        rows = np.repeat(np.arange(len(replies)), [len(r) for r in replies])
        times = np.array([score for r in replies for _, score in r], dtype=np.float64)
        return rows, times

    def exposures(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Fired decisions not yet in the event lake: ``(entry id, decision)``."""
        rows = self.client.xrange(self.key("exposures"), count=limit)
        return [(i.decode(), json.loads(f[b"decision"])) for i, f in rows]

    def drop_exposures(self, ids: Sequence[str]) -> None:
        """Remove outbox entries written to the lake."""
        if ids:
            self.client.xdel(self.key("exposures"), *ids)

    # -- segments --------------------------------------------------------------

    def update_segments(self, membership: Mapping[str, tuple[list[str], list[str]]]) -> None:
        """Per segment, ``(customers entering, customers leaving)``."""
        with self.client.pipeline(transaction=True) as pipe:
            for name, (entering, leaving) in membership.items():
                if entering:
                    pipe.zadd(self.key("segment", name), dict.fromkeys(entering, 0))
                    for c in entering:
                        pipe.sadd(self.key("member", c), name)
                if leaving:
                    pipe.zrem(self.key("segment", name), *leaving)
                    for c in leaving:
                        pipe.srem(self.key("member", c), name)
            pipe.execute()

    def segment_members(
        self, name: str, *, after: str | None = None, limit: int = 100
    ) -> tuple[list[str], int]:
        """A page of a segment's members (ids after ``after``, in id order) and its size."""
        start = "-" if after is None else f"({after}"
        key = self.key("segment", name)
        rows = self.client.zrangebylex(key, start, "+", start=0, num=limit)
        return [r.decode("utf8") for r in rows], int(self.client.zcard(key))

    def customer_segments(self, customer_id: str) -> list[str]:
        """The live segments a customer is in, sorted."""
        members = self.client.smembers(self.key("member", customer_id))
        return sorted(m.decode("utf8") for m in members)

    def segment_sizes(self, names: Iterable[str]) -> dict[str, int]:
        """Members of each segment (the Prometheus gauge)."""
        names = list(names)
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zcard(self.key("segment", name))
            return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    # -- erasure ---------------------------------------------------------------

    def forget(self, customers: Sequence[str], triggers: Iterable[str]) -> int:
        """Remove customers' timers, segments, marks, contacts, last scores and decisions.

        Decisions naming them leave the outbound stream and the exposure outbox.
        """
        removed = self._forget_decisions(set(customers))
        triggers = list(triggers)
        for c in customers:
            names = [m.decode("utf8") for m in self.client.smembers(self.key("member", c))]
            with self.client.pipeline(transaction=True) as pipe:
                for t in triggers:
                    pipe.zrem(self.key("timers"), f"{t}{_SEP}{c}")
                for name in names:
                    pipe.zrem(self.key("segment", name), c)
                pipe.delete(self.key("member", c), self.key("contacts", c))
                for raw in self.client.scan_iter(match=self.key("fired", "*", "*", c)):
                    pipe.delete(raw)
                for raw in self.client.scan_iter(match=self.key("last", "*")):
                    pipe.hdel(raw, c)
                removed += sum(int(n) for n in pipe.execute())
        return removed

    def _forget_decisions(self, wanted: set[str]) -> int:
        removed = 0
        streams = [(self.outbound_key, b"decision"), (self.key("exposures"), b"decision")]
        if self.dead_letter_key is not None:  # decisions the webhook gave up on
            streams.append((self.dead_letter_key, b"payload"))
        for key, field in streams:
            start = "-"
            while True:
                rows = self.client.xrange(key, min=start, count=1000)
                doomed = [i for i, f in rows if _customer_of(f.get(field)) in wanted]
                if doomed:
                    removed += int(self.client.xdel(key, *doomed))
                if len(rows) < 1000:
                    break
                start = "(" + rows[-1][0].decode()
        return removed


def _customer_of(raw: bytes | None) -> str | None:
    """The ``customer_id`` of a decision's JSON (``None`` when it is not one)."""
    try:
        value = json.loads(raw or b"null")
    except ValueError:
        return None
    return value.get("customer_id") if isinstance(value, dict) else None
