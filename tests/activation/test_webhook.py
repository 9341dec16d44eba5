"""Webhook delivery of the outbound decisions, against a real Redis and a real HTTP receiver."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from propensity.activation.webhook import WebhookDelivery, sign, verify
from propensity.config import Settings, load_settings
from propensity.jobs.redis_stream import connect

REDIS_URL = os.environ.get("REDIS_URL", "localhost:6379")
SECRET = "whsec-" + uuid.uuid4().hex
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], seconds: float = 60, what: str = "") -> None:
    """Wait for ``condition`` (the deadline only bounds a hung test; nothing is timed)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what or condition}")
        time.sleep(0.02)


class Receiver:
    """A webhook receiver on loopback: records requests, checks signatures, misbehaves on demand.

    ``fail_first`` requests get 503 (with ``Retry-After: 0``), keys in ``refuse``
    get 400, each request first sleeps ``sleep`` seconds.
    """

    def __init__(self, port: int | None = None, secret: str = SECRET) -> None:
        self.port = port or _free_port()
        self.secret = secret
        self.requests: list[tuple[str, bytes, dict[str, str], bool]] = []
        self.fail_first = 0
        self.refuse: set[str] = set()
        self.sleep = 0.0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def keys(self) -> set[str]:
        with self.lock:
            return {key for key, *_ in self.requests}

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers.items())
                key = headers.get("Idempotency-Key", "")
                ok = verify(
                    receiver.secret,
                    headers.get("X-Propensity-Timestamp", ""),
                    body,
                    headers.get("X-Propensity-Signature", ""),
                )
                time.sleep(receiver.sleep)
                with receiver.lock:
                    receiver.requests.append((key, body, headers, ok))
                    failing = receiver.fail_first > 0
                    receiver.fail_first -= failing
                if failing:
                    self._answer(503, b"busy", {"Retry-After": "0"})
                elif key in receiver.refuse:
                    self._answer(400, b"unknown   customer\n" + b"x" * 500)
                else:
                    self._answer(200, b"ok")

            def _answer(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                # The client may have given up (a timeout): its socket is gone.
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _redis_or_skip() -> None:
    try:
        connect(REDIS_URL, timeout=1).ping()
    except Exception:
        if "REDIS_URL" in os.environ:
            pytest.fail(f"REDIS_URL is set but no redis-server answers at {REDIS_URL}")
        pytest.skip(f"no redis-server at {REDIS_URL}")


def _activation(prefix: str, url: str, **webhook: Any) -> dict[str, Any]:
    return {
        "url": REDIS_URL,
        "outbound_key": f"{prefix}:decisions",
        "webhook": {
            "url": url,
            "secret": SECRET,
            "timeout_seconds": 2,
            "backoff_seconds": 0.01,
            "max_backoff_seconds": 0.05,
            "max_attempts": 5,
            "group": f"{prefix}-webhook",
            "dead_letter_key": f"{prefix}:dead",
            **webhook,
        },
    }


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix unique to the test; its keys are deleted afterwards."""
    _redis_or_skip()
    prefix = f"test-webhook-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = connect(REDIS_URL)
    client.delete(f"{prefix}:decisions", f"{prefix}:dead")
    client.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def _settings(tmp_path: Path, prefix: str, url: str, **webhook: Any) -> Settings:
    config = {
        "stream": {"url": REDIS_URL, "block_ms": 50, "claim_idle_ms": 500, "log_seconds": 1},
        "activation": _activation(prefix, url, **webhook),
    }
    (tmp_path / "propensity.yaml").write_text(yaml.safe_dump(config))
    return load_settings(tmp_path, environ={})


def _decision(key: str) -> bytes:
    trigger, customer, window = key.split(":")
    return json.dumps(
        {
            "decision_id": key,
            "trigger": trigger,
            "customer_id": customer,
            "fired_at": "2026-12-03T12:00:00Z",
            "action": "discount_10",
            "expected_value": 1.5,
            "reasons": ["cart open 30 min"],
            "model_versions": {"next_best_action": "3"},
            "holdout": False,
        }
    ).encode()


def _add(settings: Settings, n: int, start: int = 0) -> list[str]:
    keys = [f"abandoned_cart:C{i:07d}:493317" for i in range(start, start + n)]
    client = connect(settings.activation_url)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xadd(settings.activation.outbound_key, {"key": key, "decision": _decision(key)})
    pipe.execute()
    client.close()
    return keys


def _dead(settings: Settings) -> list[dict[bytes, bytes]]:
    client = connect(settings.activation_url)
    entries = client.xrange(settings.activation.webhook.dead_letter_key)
    client.close()
    return [fields for _, fields in entries]


def _pending(settings: Settings) -> int:
    client = connect(settings.activation_url)
    try:
        info = client.xpending(settings.activation.outbound_key, settings.activation.webhook.group)
    finally:
        client.close()
    return int(info["pending"])


def _drain(settings: Settings, **kwargs: Any) -> WebhookDelivery:
    delivery = WebhookDelivery(settings, "a", **kwargs)
    try:
        delivery.run(stop_when_idle=True)
    finally:
        delivery.close()
    return delivery


# -- signatures ---------------------------------------------------------------


@hypothesis_settings(max_examples=100, deadline=None)
@given(secret=st.text(min_size=1), body=st.binary(), timestamp=st.integers(0, 2**40))
def test_sign_verify_round_trip_and_a_tampered_body_fails(
    secret: str, body: bytes, timestamp: int
) -> None:
    signature = sign(secret, timestamp, body)
    assert signature.startswith("sha256=")
    assert verify(secret, timestamp, body, signature, now=timestamp)
    assert not verify(secret, timestamp, body + b" ", signature, now=timestamp)
    assert not verify(secret + "x", timestamp, body, signature, now=timestamp)
    assert not verify(secret, timestamp, body, signature, now=timestamp + 301)  # a replay


def test_delivery_posts_the_body_unchanged_with_signed_headers(
    tmp_path: Path, prefix: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, prefix, receiver.url)
    keys = _add(settings, 5)
    delivery = _drain(settings)
    assert delivery.stats.delivered == 5 and delivery.stats.attempts == 5
    by_key = {key: (body, headers, ok) for key, body, headers, ok in receiver.requests}
    assert set(by_key) == set(keys)
    for key, (body, headers, ok) in by_key.items():
        assert ok, f"{key}: signature does not verify"
        assert body == _decision(key)
        assert headers["Content-Type"] == "application/json"
        assert headers["Idempotency-Key"] == key
    assert _pending(settings) == 0 and _dead(settings) == []
    assert SECRET not in caplog.text
    assert SECRET not in repr(settings) and SECRET not in repr(delivery.config)


# -- retries and dead letters ---------------------------------------------------


def test_503s_are_retried_until_delivered_once_per_key(
    tmp_path: Path, prefix: str, receiver: Receiver
) -> None:
    settings = _settings(tmp_path, prefix, receiver.url, max_in_flight=2)
    receiver.fail_first = 4
    keys = _add(settings, 6)
    delivery = _drain(settings)
    stats = delivery.stats
    accepted = [key for key, *_ in receiver.requests[4:]]
    assert sorted(accepted) == sorted(keys)  # deduped by Idempotency-Key: each once
    assert stats.delivered == 6 and stats.retried == 4 and stats.attempts == 10
    assert stats.dead_lettered == 0 and _pending(settings) == 0


def test_a_4xx_is_dead_lettered_at_once_with_the_reason_and_acknowledged(
    tmp_path: Path, prefix: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, prefix, receiver.url)
    keys = _add(settings, 4)
    receiver.refuse = {keys[1]}
    delivery = _drain(settings)
    assert delivery.stats.delivered == 3 and delivery.stats.dead_lettered == 1
    assert [key for key, *_ in receiver.requests].count(keys[1]) == 1  # not retried
    [letter] = _dead(settings)
    assert letter[b"rule"] == b"http_400"
    assert letter[b"reason"].startswith(b"http 400: unknown customer x")
    assert len(letter[b"reason"]) < 250  # an excerpt, not the whole body
    assert letter[b"payload"] == _decision(keys[1]) and letter[b"field"] == b"decision"
    assert _pending(settings) == 0
    assert SECRET not in caplog.text


def test_retry_budget_exhausted_is_a_dead_letter(
    tmp_path: Path, prefix: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, prefix, receiver.url, max_attempts=3)
    receiver.fail_first = 10**9
    _add(settings, 2)
    delivery = _drain(settings)
    assert delivery.stats.attempts == 6 and delivery.stats.retried == 4
    letters = _dead(settings)
    assert [d[b"rule"] for d in letters] == [b"retries_exhausted"] * 2
    assert all(d[b"reason"] == b"3 attempts, last: http 503: busy" for d in letters)
    assert _pending(settings) == 0
    assert SECRET not in caplog.text


def test_slow_receiver_times_out_within_the_in_flight_bound(
    tmp_path: Path, prefix: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(
        tmp_path, prefix, receiver.url, timeout_seconds=0.1, max_attempts=2, max_in_flight=3
    )
    receiver.sleep = 0.5
    _add(settings, 9)
    delivery = _drain(settings)
    stats = delivery.stats
    assert stats.timeouts == 18 and stats.attempts == 18 and stats.delivered == 0
    assert 1 <= stats.max_in_flight_seen <= 3
    letters = _dead(settings)
    assert len(letters) == 9
    assert {d[b"reason"] for d in letters} == {b"2 attempts, last: timeout"}
    assert _pending(settings) == 0
    assert SECRET not in caplog.text


def test_a_receiver_down_then_up_gets_everything(tmp_path: Path, prefix: str) -> None:
    late = Receiver()  # its port is known, nothing listens yet
    settings = _settings(tmp_path, prefix, late.url, max_attempts=1_000)
    keys = _add(settings, 5)
    delivery = WebhookDelivery(settings, "a")
    worker = threading.Thread(target=delivery.run)
    worker.start()
    try:
        _wait(lambda: delivery.stats.retried >= 10, what="connection errors")
        assert delivery.stats.delivered == 0 and _pending(settings) == 5
        late.start()
        _wait(lambda: delivery.stats.delivered == 5, what="delivery after the receiver is up")
        assert late.keys() == set(keys)
    finally:
        delivery.stop()
        worker.join(30)
        delivery.close()
        late.stop()
    assert _pending(settings) == 0 and _dead(settings) == []


# -- the command ------------------------------------------------------------------


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


def _deliver_cli(root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "propensity.cli", "deliver", "--config", str(root)],
        env=_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_deliver_without_a_webhook_says_so(tmp_path: Path) -> None:
    (tmp_path / "propensity.yaml").write_text(yaml.safe_dump({"stream": {"url": REDIS_URL}}))
    process = _deliver_cli(tmp_path)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out
    assert "no webhook is configured" in out and "Traceback" not in out


def test_deliver_sigkilled_midway_and_restarted_delivers_every_decision(
    tmp_path: Path, prefix: str, receiver: Receiver
) -> None:
    settings = _settings(tmp_path, prefix, receiver.url, max_in_flight=10)
    receiver.sleep = 0.01  # slow enough that the kill lands mid-way
    keys = _add(settings, 300)
    first = _deliver_cli(tmp_path)
    try:
        _wait(lambda: len(receiver.keys()) >= 60, what="the first deliveries")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        seen_before = len(receiver.keys())
        assert seen_before < 300, "the kill came too late to prove anything"
        second = _deliver_cli(tmp_path)
        try:
            _wait(lambda: receiver.keys() == set(keys), what="every key delivered")
            _wait(lambda: _pending(settings) == 0, what="nothing left pending")
            second.send_signal(signal.SIGTERM)
            out, _ = second.communicate(timeout=60)
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert second.returncode == 0, out
    assert "delivered" in out and SECRET not in out
    assert _dead(settings) == []
    assert all(ok for *_, ok in receiver.requests)
    redelivered = len(receiver.requests) - len(keys)
    print(
        f"kill test: 300 decisions, {seen_before} keys received before the kill, "
        f"{len(receiver.requests)} requests in all, {redelivered} redelivered"
    )
