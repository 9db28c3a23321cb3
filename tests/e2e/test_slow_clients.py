"""Slow and huge clients against the real server (gateway/security/slow_clients.py, the upload's byte cap).

Raw TLS sockets send half a request, nothing at all, half a body, a WebSocket handshake; httpx sends a
chunked multipart upload with no Content-Length; many sockets hold connections open.  The server runs with
short deadlines and small caps so each bound shows in a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, running

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 3
BODY_TIMEOUT = 3
PER_CLIENT = 6
TOTAL = 8
UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gw-slow") / "data"
    extra = {
        "GATEWAY_SERVER__HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        "GATEWAY_SERVER__BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "GATEWAY_SERVER__MAX_CONNECTIONS": str(TOTAL),
        "GATEWAY_SERVER__MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
        "GATEWAY_LIMITS__MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    }
    yield from running(
        Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=extra), "--no-worker"
    )


@contextlib.contextmanager
def tls(gateway: Gateway, source: str = "127.0.0.1") -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=30, source_address=(source, 0))
    with gateway.verify().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        yield sock


def read_all(sock: ssl.SSLSocket) -> bytes:
    """Everything until the server closes the connection (the socket's timeout bounds the wait)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: ssl.SSLSocket) -> bytes:
    """One response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(parse(head + b"\r\n\r\n")[1]["content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    return int(lines[0].split()[1]), headers, json.loads(body) if body.startswith(b"{") else body


def audit_records(gateway: Gateway) -> list[dict[str, Any]]:
    path = gateway.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_record(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [r for r in audit_records(gateway) if r.get("request_id") == request_id]
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no audit record for {request_id}")


def test_half_sent_headers_get_408_and_the_connection_closes(gateway: Gateway) -> None:
    before = len(audit_records(gateway))
    with tls(gateway) as silent, tls(gateway) as half:
        half.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x")
        for sock in (silent, half):
            status, headers, body = parse(read_all(sock))
            assert (status, headers["connection"]) == (408, "close")
            assert body["error"]["code"] == "request_timeout"
    # No request was read, so there is nothing to audit; the server logged each, with the client only.
    assert len(audit_records(gateway)) == before
    events = [json.loads(line) for line in gateway.logs().splitlines() if '"http.header_timeout"' in line]
    assert len(events) >= 2 and all(e["client"] == "127.0.0.1" for e in events)


def test_a_kept_alive_connection_gets_its_header_deadline_again(gateway: Gateway) -> None:
    with tls(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert parse(read_response(sock))[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 1")  # the next request, half sent
        assert parse(read_all(sock))[0] == 408


def test_a_body_that_does_not_arrive_gets_an_audited_408(gateway: Gateway) -> None:
    token = gateway.token("chat")
    request_id = f"slow-body-{time.monotonic_ns()}"
    with tls(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
            b"x-request-id: " + request_id.encode() + b"\r\n\r\n" + b'{"model": "smollm2'
        )
        status, headers, body = parse(read_all(sock))
    assert (status, headers["connection"]) == (408, "close")
    assert body == {
        "error": {
            "message": f"The request body did not arrive within {BODY_TIMEOUT:g} seconds.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    record = wait_for_record(gateway, request_id)
    assert (record["status"], record["outcome"], record["subject"]) == (408, "error", "tester")


def test_a_chunked_upload_is_cut_off_at_the_limit(gateway: Gateway) -> None:
    """No Content-Length: the multipart preamble alone passes the limit; 413 and nothing kept."""
    boundary = "b0undary"
    request_id = f"chunked-{time.monotonic_ns()}"
    sent = {"bytes": 0}

    def body() -> Iterator[bytes]:
        for _ in range(64):  # 4 MiB of preamble, far past 64 KiB + the form overhead
            sent["bytes"] += 65536
            yield b"p" * 65536
        purpose = 'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune'
        yield f"--{boundary}\r\n{purpose}\r\n--{boundary}--\r\n".encode()

    headers = {
        "Authorization": f"Bearer {gateway.token('files:write files:read')}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "x-request-id": request_id,
    }
    with httpx.Client(base_url=gateway.url, verify=gateway.verify(), timeout=60) as http:
        try:
            response = http.post("/v1/files", content=body(), headers=headers)
        except httpx.TransportError:
            response = None  # the server may close before the client finished sending
    record = wait_for_record(gateway, request_id)
    assert record["status"] == 413 and record["action"] == "file.upload"
    if response is not None:
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    with httpx.Client(base_url=gateway.url, verify=gateway.verify(), headers=headers, timeout=60) as http:
        assert http.get("/v1/files").json()["data"] == []
    assert not list((gateway.data_dir / "tmp").glob("upload-*"))


def test_a_websocket_handshake_is_plain_audited_http(gateway: Gateway) -> None:
    request_id = f"ws-{time.monotonic_ns()}"
    with tls(gateway) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"x-request-id: " + request_id.encode() + b"\r\n\r\n"
        )
        raw = read_all(sock)  # the server closes after its answer
    status, headers, body = parse(raw)
    assert status == 401 and "upgrade" not in headers  # never 101 Switching Protocols
    assert body["error"]["code"] == "invalid_api_key"
    record = wait_for_record(gateway, request_id)
    assert (record["status"], record["route"]) == (401, "/v1/models")


def test_connections_past_the_caps_are_refused_before_a_request(gateway: Gateway) -> None:
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(tls(gateway)) for _ in range(PER_CLIENT)]
        with tls(gateway) as extra:  # one more from the same address
            status, headers, body = parse(read_all(extra))
        assert (status, headers["retry-after"], body["error"]["code"]) == (503, "1", "too_many_connections")
        others = [stack.enter_context(tls(gateway, "127.0.0.2")) for _ in range(TOTAL - PER_CLIENT)]
        with tls(gateway, "127.0.0.2") as extra:  # another address, but the total is reached
            assert parse(read_all(extra))[0] == 503
        for sock in held + others:
            sock.close()
    with gateway.client() as http:  # free again once the server has seen them go
        deadline = time.monotonic() + 30
        while (status := _status_or_none(http)) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200
    refused = [
        json.loads(line) for line in gateway.logs().splitlines() if '"http.connection_refused"' in line
    ]
    assert {e["client"] for e in refused} >= {"127.0.0.1", "127.0.0.2"}


def _status_or_none(http: httpx.Client) -> int | None:
    try:
        return http.get("/healthz").status_code
    except httpx.TransportError:
        return None
