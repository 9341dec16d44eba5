"""Delivery of triggered decisions from the outbound Redis Stream to a webhook.

The outbound stream (``activation.outbound_key``) is the durable queue: this
module is one more consumer group of it (``activation.webhook.group``), read
with :class:`~propensity.jobs.redis_stream.RedisStream`, so a delivery that is
slow, down or killed never holds up the trigger runner that writes it.

Each entry's ``decision`` bytes are POSTed unchanged, with the headers
``Content-Type: application/json``, ``Idempotency-Key`` (the entry's ``key``),
``X-Propensity-Timestamp`` and, with a secret, ``X-Propensity-Signature:
sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` (:func:`sign`;
receivers check it with :func:`verify`).

An entry is acknowledged only after a 2xx answer or once it is in the
dead-letter stream (both in one ``MULTI``), so a delivery killed at any point
and restarted delivers every decision not yet acknowledged (at least once;
receivers dedupe by ``Idempotency-Key``). Connection errors, timeouts, 408,
425, 429 and 5xx are retried with exponential backoff and jitter (honoring
``Retry-After``, capped); another 4xx, or ``max_attempts`` spent, is a dead
letter with the reason.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from propensity.config import Settings, Stream, Webhook
from propensity.jobs.redis_stream import RedisStream, TransportError
from propensity.jobs.transport import DeadLetter, Message

__all__ = [
    "DECISION_FIELD",
    "KEY_FIELD",
    "DeliveryStats",
    "WebhookDelivery",
    "WebhookNotConfigured",
    "deliver",
    "sign",
    "verify",
]

_log = logging.getLogger(__name__)

#: The outbound entry's fields: the decision's JSON, and its idempotency key.
DECISION_FIELD = "decision"
KEY_FIELD = "key"
#: Answers worth another try: the receiver is busy, rate-limiting or broken for now.
_RETRY_STATUS = frozenset({408, 425, 429})
#: How much of a refusing receiver's body goes into the dead letter's reason.
_EXCERPT = 200


class WebhookNotConfigured(ValueError):
    """``activation.webhook.url`` is not set: there is nowhere to deliver."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC of ``timestamp.body``.

    Examples
    --------
    >>> sign("s3cret", 1700000000, b"{}")[:7]
    'sha256='
    """
    message = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    timestamp: int | str,
    body: bytes,
    signature: str,
    tolerance_seconds: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp``, no older than the tolerance.

    The comparison takes constant time; a timestamp further than
    ``tolerance_seconds`` from ``now`` is refused (a replayed request).

    Examples
    --------
    >>> verify("s3cret", 1700000000, b"{}", sign("s3cret", 1700000000, b"{}"), now=1700000001)
    True
    >>> verify("s3cret", 1700000000, b"{ }", sign("s3cret", 1700000000, b"{}"), now=1700000001)
    False
    """
    try:
        at = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - at) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, at, body).encode(), str(signature).encode())


@dataclass
class DeliveryStats:
    """Counts since the delivery started (updated from the worker threads under a lock)."""

    delivered: int = 0
    attempts: int = 0
    retried: int = 0
    timeouts: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    max_in_flight_seen: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    def line(self) -> str:
        """One log line of the counts and the rate."""
        seconds = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.delivered:,} delivered ({self.delivered / seconds:,.1f}/s) in "
            f"{self.attempts:,} attempts: {self.retried:,} retried, {self.timeouts:,} timeouts, "
            f"{self.dead_lettered:,} dead-lettered, {self.in_flight:,} in flight"
        )


@dataclass(frozen=True)
class _Outcome:
    """How one decision ended: delivered, a dead letter, or left pending (stopping)."""

    message: Message
    dead: DeadLetter | None = None
    done: bool = True


def _backoff(config: Webhook, retry: int, retry_after: float | None) -> float:
    """The wait before retry number ``retry`` (1, 2, …)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), config.max_backoff_seconds)
    ceiling = min(config.backoff_seconds * 2 ** (retry - 1), config.max_backoff_seconds)
    # Jitter spreads the retries of many decisions refused at once over time.
    return random.uniform(ceiling / 2, ceiling)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def _excerpt(response: httpx.Response) -> str:
    text = response.content[:_EXCERPT].decode("utf8", "replace")
    return " ".join(text.split())


class WebhookDelivery:
    """One delivery consumer of the outbound stream: bounded, at least once.

    Parameters
    ----------
    settings : Settings
        ``activation.webhook`` (with its ``url``), ``activation.outbound_key``
        in ``activation_url``; ``stream.claim_idle_ms``/``block_ms`` for the
        consumer group's timings.
    consumer : str, optional
        This consumer's name in the group (default: the host name), so a
        restarted delivery re-reads its own pending entries first.
    client : httpx.Client, optional
        Defaults to one with the webhook's timeout.

    Raises
    ------
    WebhookNotConfigured
        ``activation.webhook.url`` is not set.

    Examples
    --------
    >>> delivery = WebhookDelivery(load_settings())  # doctest: +SKIP
    >>> delivery.run(stop_when_idle=True).line()  # doctest: +SKIP
    '300 delivered (...) in 300 attempts: 0 retried, ...'
    """

    def __init__(
        self,
        settings: Settings,
        consumer: str | None = None,
        *,
        client: httpx.Client | None = None,
    ) -> None:
        self.config = settings.activation.webhook
        if not self.config.url:
            raise WebhookNotConfigured(
                "no webhook is configured: set activation.webhook.url "
                "(or PROPENSITY_ACTIVATION__WEBHOOK__URL)"
            )
        self.url = self.config.url
        outbound = Stream(
            key=settings.activation.outbound_key,
            group=self.config.group,
            dead_letter_key=self.config.dead_letter_key,
            claim_idle_ms=settings.stream.claim_idle_ms,
            block_ms=settings.stream.block_ms,
            log_seconds=settings.stream.log_seconds,
            trim=False,  # the outbound stream is the trigger runner's to trim
        )
        self.stream: RedisStream = RedisStream(
            settings,
            consumer,
            config=outbound,
            url=settings.activation_url,
            field=DECISION_FIELD,
            extra=(KEY_FIELD,),
        )
        # Threads, not asyncio: the consumer group is read with blocking redis-py calls, and a
        # pool of max_in_flight threads bounds the work in progress (and the memory) by itself.
        self.client = client or httpx.Client(timeout=self.config.timeout_seconds)
        self.stats = DeliveryStats()
        self.stopping = threading.Event()
        self._done: queue.Queue[_Outcome] = queue.Queue()
        self._in_flight: set[str] = set()

    def stop(self) -> None:
        """Finish the POSTs under way, leave decisions waiting for a retry pending, and stop."""
        self.stopping.set()

    # -- one decision ----------------------------------------------------------

    def _headers(self, key: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-Propensity-Timestamp": timestamp,
        }
        if self.config.secret is not None:
            secret = self.config.secret.get_secret_value()
            headers["X-Propensity-Signature"] = sign(secret, timestamp, body)
        return headers

    def _attempt(self, key: str, body: bytes) -> tuple[str, str, float | None]:
        """One POST: ``("ok" | "retry" | "refused", reason, retry_after)``."""
        self.stats.add(attempts=1)
        try:
            response = self.client.post(self.url, content=body, headers=self._headers(key, body))
        except httpx.TimeoutException:
            self.stats.add(timeouts=1)
            return "retry", "timeout", None
        except httpx.TransportError as exc:
            # The class name only: a message could quote the request.
            return "retry", f"connection error ({type(exc).__name__})", None
        status = response.status_code
        if 200 <= status < 300:
            return "ok", "", None
        reason = f"http {status}: {_excerpt(response)}".rstrip(": ")
        if status in _RETRY_STATUS or status >= 500:
            return "retry", reason, _retry_after(response)
        return "refused", reason, None

    def _deliver(self, message: Message) -> _Outcome:
        """Try one decision until delivered, refused, out of attempts, or stopping."""
        body = message.payload or b""
        key = message.fields.get(KEY_FIELD, "")
        reason = ""
        for attempt in range(1, self.config.max_attempts + 1):
            verdict, reason, retry_after = self._attempt(key, body)
            if verdict == "ok":
                self.stats.add(delivered=1)
                return _Outcome(message)
            if verdict == "refused":
                status = reason.split(":")[0].replace(" ", "_")
                return _Outcome(message, self._letter(message, status, reason))
            if attempt == self.config.max_attempts:
                break
            wait = _backoff(self.config, attempt, retry_after)
            _log.info("deliver: %s %s, retry %d in %.1f s", key, reason, attempt, wait)
            self.stats.add(retried=1)
            if self.stopping.wait(wait):
                return _Outcome(message, done=False)  # stays pending: the restart retries it
        reason = f"{self.config.max_attempts} attempts, last: {reason}"
        return _Outcome(message, self._letter(message, "retries_exhausted", reason))

    def _letter(self, message: Message, rule: str, reason: str) -> DeadLetter:
        key = message.fields.get(KEY_FIELD, "")
        _log.warning("deliver: %s dead-lettered (%s): %s", key, rule, reason)
        return DeadLetter(message.id, None, DECISION_FIELD, rule, reason, message.payload or b"")

    # -- the loop --------------------------------------------------------------

    def _settle(self, block: float) -> None:
        """Acknowledge the decisions that ended (dead letters with them, in one MULTI)."""
        outcomes = []
        try:
            outcomes.append(self._done.get(timeout=block) if block else self._done.get_nowait())
            while True:
                outcomes.append(self._done.get_nowait())
        except queue.Empty:
            pass
        if not outcomes:
            return
        # Out of flight first: if the ack fails (Redis down), the entries stay pending and are
        # read again from our own pending list after the outage (delivered twice, never lost).
        for outcome in outcomes:
            self._in_flight.discard(outcome.message.id)
        self.stats.add(in_flight=-len(outcomes))
        ended = [o for o in outcomes if o.done]
        dead = [o.dead for o in ended if o.dead is not None]
        self.stream.ack([o.message.id for o in ended], dead)
        self.stats.add(dead_lettered=len(dead))

    def _submit(self, pool: ThreadPoolExecutor, free: int) -> int:
        messages = self.stream.read(free)
        fresh = [m for m in messages if m.id not in self._in_flight]  # a claim of our own
        for message in fresh:
            self._in_flight.add(message.id)
            self.stats.add(in_flight=1)
            pool.submit(self._run_one, message)
        return len(fresh)

    def _run_one(self, message: Message) -> None:
        try:
            outcome = self._deliver(message)
        except Exception:  # a bug, not the receiver: leave it pending for a restart
            _log.exception("deliver: entry %s failed", message.id)
            outcome = _Outcome(message, done=False)
        self._done.put(outcome)

    def _step(self, pool: ThreadPoolExecutor, limit: int) -> int | None:
        """Acknowledge what ended, then read as many as the bound allows (``None``: full)."""
        self._settle(0)
        free = limit - len(self._in_flight)
        if free <= 0:  # the bound: wait for one to end before reading more
            self._settle(0.2)
            return None
        return self._submit(pool, free)

    def _idle(self) -> bool:
        return not self._in_flight and not any(self.stream.backlog())

    def run(self, *, stop_when_idle: bool = False, log_seconds: float = 10.0) -> DeliveryStats:
        """Deliver until :meth:`stop` (or, with ``stop_when_idle``, nothing is left).

        Returns
        -------
        DeliveryStats
        """
        limit = self.config.max_in_flight
        next_log = time.monotonic() + log_seconds
        with ThreadPoolExecutor(limit, thread_name_prefix="deliver") as pool:
            while not self.stopping.is_set():
                try:
                    if self._step(pool, limit) == 0 and stop_when_idle and self._idle():
                        break
                except TransportError as exc:
                    # Redis restarting: what is not acknowledged stays pending in the group.
                    _log.warning("deliver: %s; retrying in 1 s", exc)
                    self.stopping.wait(1.0)
                if time.monotonic() >= next_log:
                    _log.info("deliver: %s", self.stats.line())
                    next_log = time.monotonic() + log_seconds
            self.stopping.set()  # workers waiting for a retry give up; POSTs under way finish
        self._settle(0)
        _log.info("deliver stopped: %s", self.stats.line())
        return self.stats

    def close(self) -> None:
        self.client.close()
        self.stream.close()


def deliver(
    settings: Settings, *, consumer: str | None = None, stop_when_idle: bool = False
) -> DeliveryStats:
    """Deliver the outbound decisions to the webhook until SIGTERM/SIGINT (or idle).

    Parameters
    ----------
    settings : Settings
        ``activation.webhook`` must have a ``url``.
    consumer : str, optional
        This consumer's name in the group (default: the host name).
    stop_when_idle : bool
        Stop once nothing is left to read, pending or in flight.

    Returns
    -------
    DeliveryStats

    Raises
    ------
    WebhookNotConfigured
        No ``activation.webhook.url``.

    Examples
    --------
    >>> deliver(load_settings(), stop_when_idle=True).delivered  # doctest: +SKIP
    300
    """
    from propensity.jobs.stream import stop_on_signals

    delivery = WebhookDelivery(settings, consumer)
    try:
        with stop_on_signals(delivery):
            return delivery.run(
                stop_when_idle=stop_when_idle, log_seconds=settings.stream.log_seconds
            )
    finally:
        delivery.close()
