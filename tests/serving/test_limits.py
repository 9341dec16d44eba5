"""Limits of the scoring API against the real server: body size and time, content type,
id rules, audience caps, and the metrics of unknown paths."""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlparse

import pytest
from conftest import API_KEY, BODY_TIMEOUT, Server

from propensity.serving.schemas import MAX_AUDIENCE_FILTERS, MAX_AUDIENCE_K

pytestmark = pytest.mark.slow

MiB = 1 << 20


def _connect(server: Server, timeout: float = 10.0) -> socket.socket:
    url = urlparse(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=timeout)


def _head(path: str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nX-API-Key: {API_KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """Status and JSON body of one HTTP response read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length] or b"null")


def _log_since(server: Server, offset: int) -> str:
    time.sleep(0.5)  # let the server flush its log
    return server.log.read_bytes()[offset:].decode(errors="replace")


def test_declared_oversize_body_is_413_before_it_is_read(server: Server) -> None:
    with _connect(server, timeout=5) as sock:
        started = time.perf_counter()
        # 200 MB announced, not a byte sent: the answer cannot wait for the body.
        sock.sendall(_head("/score", "Content-Length: 200000000\r\n"))
        status, body = _answer(sock)
        elapsed = time.perf_counter() - started
    assert status == 413
    assert isinstance(body, dict) and "200000000" in str(body["error"])
    assert elapsed < 2


def test_streamed_oversize_body_is_413_at_the_limit(server: Server) -> None:
    chunk = b"x" * (256 * 1024)
    with _connect(server) as sock:
        sock.sendall(_head("/score_batch", "Transfer-Encoding: chunked\r\n"))
        sent = 0
        try:
            while sent < 8 * MiB:  # far past the 1 MiB limit; the server stops reading
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: expected
        status, body = _answer(sock)
    assert status == 413
    assert isinstance(body, dict) and str(MiB) in str(body["error"])


def test_body_at_the_limit_is_read(server: Server) -> None:
    padding = " " * (MiB - 100)
    payload = ('{"customer_id": "C0000001"' + padding + "}").encode()
    assert len(payload) <= MiB
    with server.client() as client:
        response = client.post(
            "/score", content=payload, headers={"content-type": "application/json"}
        )
    assert response.status_code == 200


def test_stalled_body_is_408_after_the_timeout(server: Server) -> None:
    with _connect(server) as sock:
        started = time.perf_counter()
        sock.sendall(_head("/score", "Content-Length: 100\r\n") + b'{"customer_id"')
        status, body = _answer(sock)  # the rest of the body never comes
        elapsed = time.perf_counter() - started
    assert status == 408
    assert isinstance(body, dict) and "not received within" in str(body["error"])
    assert BODY_TIMEOUT * 0.9 < elapsed < BODY_TIMEOUT + 3


def test_client_disconnect_is_not_logged_as_an_error(server: Server) -> None:
    offset = server.log.stat().st_size
    for _ in range(3):
        with _connect(server) as sock:
            sock.sendall(_head("/score", "Content-Length: 100\r\n") + b'{"custo')
        # closed with the body incomplete
    time.sleep(0.3)
    with server.client() as client:  # the server carries on
        assert client.post("/score", json={"customer_id": "C0000001"}).status_code == 200
    text = _log_since(server, offset)
    assert "Traceback" not in text
    assert "ERROR" not in text
    assert "Exception in ASGI application" not in text


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 415),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ],
)
def test_content_type_must_be_json(server: Server, content_type: str | None, status: int) -> None:
    headers = {"content-type": content_type} if content_type else {}
    payload = b'{"customer_ids": ["C0000001"]}'
    with server.client() as client:
        response = client.post("/score_batch", content=payload, headers=headers)
    assert response.status_code == status
    if status == 415:
        assert "application/json" in response.json()["error"]


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        (["C0000001", ""], "customer_ids.1"),
        (["C0000001", "C0000002", "x" * 129], "customer_ids.2"),
        ([1], "customer_ids.0"),
    ],
)
def test_batch_ids_follow_the_single_customer_rule(
    server: Server, ids: list[object], field: str
) -> None:
    with server.client() as client:
        batch = client.post("/score_batch", json={"customer_ids": ids})
        # The same id through /score is refused by the same rule.
        single = client.post("/score", json={"customer_id": ids[-1]})
    assert batch.status_code == 422
    assert batch.json()["field"] == field and field in batch.json()["error"]
    assert single.status_code == 422 and single.json()["field"] == "customer_id"


def test_batch_id_of_128_characters_is_accepted(server: Server) -> None:
    with server.client() as client:
        response = client.post("/score_batch", json={"customer_ids": ["x" * 128]})
    assert response.status_code == 200
    assert response.json()["unknown"] == ["x" * 128]


def test_audience_filters_and_k_are_capped(server: Server) -> None:
    rule = {"field": "churn_probability", "op": ">=", "value": 0.0}
    with server.client() as client:
        started = time.perf_counter()
        at_cap = client.post("/audience", json={"filters": [rule] * MAX_AUDIENCE_FILTERS})
        at_cap_seconds = time.perf_counter() - started
        over = client.post("/audience", json={"filters": [rule] * (MAX_AUDIENCE_FILTERS + 1)})
        big_k = client.post("/audience", json={"k": MAX_AUDIENCE_K + 1})
    assert at_cap.status_code == 200
    assert at_cap_seconds < 5
    assert over.status_code == 422 and over.json()["field"] == "filters"
    assert str(MAX_AUDIENCE_FILTERS) in over.json()["error"]
    assert big_k.status_code == 422 and big_k.json()["field"] == "k"


def test_unknown_paths_share_one_metrics_series(server: Server) -> None:
    with server.client() as client:
        client.get("/no-such-route")  # the shared series exist before the measurement
        client.post("/no-such-route", json={})
        before = client.get("/metrics").text
        for i in range(500):
            path = f"/{uuid.uuid4().hex}/{i}"
            response = client.get(path) if i % 2 else client.post(path, json={})
            assert response.status_code == 404
        after = client.get("/metrics").text
        assert client.get("/healthz").status_code == 200  # known routes still route
    assert abs(len(after) - len(before)) < 4096, (len(before), len(after))
    assert 'endpoint="__unknown__"' in after
    assert "/no-such-route" not in after
    assert 'endpoint="/score"' in after or 'endpoint="/healthz"' in after
