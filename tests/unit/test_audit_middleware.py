"""AuditMiddleware: exactly one record per request, whatever happened, with the request id echoed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from litestar import Litestar, Request, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from litestar.testing import TestClient
from litestar.types import Message, Receive, Scope, Send

from gateway.api.errors import EXCEPTION_HANDLERS
from gateway.audit.log import AuditLog
from gateway.audit.middleware import AuditMiddleware
from gateway.audit.verify import verify_chain
from gateway.auth.guards import Gate
from gateway.core.request_state import RequestState, request_state

KEY = b"k" * 32


def _state(request: Request[Any, Any, Any]) -> RequestState:
    return request_state(request.scope)


@get("/items/{item_id:str}", opt={"scope": "chat", "action": "item.read"})
async def item(request: Request[Any, Any, Any], item_id: FromPath[str]) -> dict[str, Any]:
    state = _state(request)
    state.resource_id = item_id
    state.record_usage(11, 4)
    return {
        "request_id": state.request_id,
        "logged_id": structlog.contextvars.get_contextvars()["request_id"],
    }


@post("/echo", opt={"scope": "chat", "action": "echo"})
async def echo(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(data)}


@get("/stream", opt={"scope": "chat", "action": "stream"})
async def stream(request: Request[Any, Any, Any]) -> Stream:
    state = _state(request)

    async def events() -> AsyncIterator[str]:
        for n in range(3):
            yield f"data: {n}\n\n"
        state.completion_tokens = 3  # known only once the stream is done

    return Stream(events(), media_type="text/event-stream")


@get("/boom", opt={"scope": "chat", "action": "boom"})
async def boom() -> None:
    raise RuntimeError("handler bug with SECRET-DETAIL")


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    yield log
    log.close()


@pytest.fixture
def client(tmp_path: Path, audit: AuditLog) -> Iterator[TestClient[Any]]:
    app = Litestar(
        route_handlers=[item, echo, stream, boom],
        guards=Gate(verifier=None).guards,  # authentication off: everyone is ANONYMOUS
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=None,
    )
    with TestClient(AuditMiddleware(app, audit)) as test_client:
        yield test_client


def test_one_record_with_everything_the_handler_left(client: TestClient[Any], audit: AuditLog) -> None:
    response = client.get("/items/file-abc")
    request_id = response.headers["x-request-id"]
    assert response.json() == {"request_id": request_id, "logged_id": request_id}
    [record] = audit.read_page(1)
    assert record["request_id"] == request_id
    assert (record["subject"], record["tenant"], record["client"]) == ("anonymous", "default", "testclient")
    assert (record["method"], record["route"], record["action"]) == (
        "GET",
        "/items/{item_id}",
        "item.read",
    )
    assert (record["resource_id"], record["prompt_tokens"], record["completion_tokens"]) == (
        "file-abc",
        11,
        4,
    )
    assert (record["status"], record["outcome"]) == (200, "allowed")
    assert record["duration_ms"] >= 0
    assert record["time"].endswith("Z")


def test_unrouted_request_is_recorded(client: TestClient[Any], audit: AuditLog) -> None:
    response = client.get("/nope/nothing")
    assert response.status_code == 404
    assert len(response.headers["x-request-id"]) == 32
    [record] = audit.read_page(1)
    assert (record["status"], record["outcome"], record["action"]) == (404, "error", None)
    assert record["route"] == "/nope/nothing"
    assert record["subject"] is None


def test_handler_error_is_recorded_without_its_message(client: TestClient[Any], audit: AuditLog) -> None:
    assert client.get("/boom").status_code == 500
    [record] = audit.read_page(1)
    assert (record["status"], record["outcome"], record["action"]) == (500, "error", "boom")
    assert "SECRET" not in audit.path.read_text()


def test_request_body_never_reaches_the_log(client: TestClient[Any], audit: AuditLog) -> None:
    response = client.post("/echo", json={"messages": [{"role": "user", "content": "SECRET-PROMPT"}]})
    assert response.status_code == 201
    assert "SECRET" not in audit.path.read_text()
    assert audit.read_page(1)[0]["action"] == "echo"


def test_streamed_response_is_recorded_when_it_ends(client: TestClient[Any], audit: AuditLog) -> None:
    response = client.get("/stream")
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    [record] = audit.read_page(1)
    assert (record["status"], record["completion_tokens"]) == (200, 3)


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        (b"trace-123.abc_DEF", True),
        (b"has space", False),
        (b"x" * 65, False),
        ("ünïcode".encode(), False),
        (b"", False),
        (b"a\r\nset-cookie: x=1", False),
    ],
)
def test_incoming_request_id(client: TestClient[Any], audit: AuditLog, incoming: bytes, kept: bool) -> None:
    response = client.get("/items/x", headers={"x-request-id": incoming})
    echoed = response.headers["x-request-id"]
    assert (echoed.encode() == incoming) is kept
    assert audit.read_page(1)[0]["request_id"] == echoed
    assert response.headers.get_list("x-request-id") == [echoed]


def test_each_request_gets_exactly_one_record(client: TestClient[Any], audit: AuditLog) -> None:
    paths = ["/items/a", "/nope", "/boom", "/stream", "/items/b"]
    ids = [client.get(path).headers["x-request-id"] for path in paths]
    records = audit.read_page(1)
    assert [r["request_id"] for r in records] == ids
    assert len(set(ids)) == len(ids)
    assert verify_chain(audit.path, KEY).ok


def test_lifespan_passes_through(tmp_path: Path, audit: AuditLog) -> None:
    started = []
    app = Litestar(route_handlers=[], on_startup=[lambda: started.append(1)], openapi_config=None)
    with TestClient(AuditMiddleware(app, audit)):
        assert started == [1]
    assert audit.read_page(1) == []


# ── raw ASGI: disconnects and cancellation ─────────────────────────────────────────────────────────────────


def _scope() -> Scope:
    return {  # type: ignore[return-value]
        "type": "http",
        "method": "GET",
        "path": "/v1/chat/completions",
        "headers": [],
        "client": ("10.1.2.3", 5555),
    }


async def _receive_disconnect() -> Message:
    return {"type": "http.disconnect"}


def test_client_gone_mid_stream_is_recorded_as_499(audit: AuditLog) -> None:
    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        await receive()  # the client went away; the app stops without finishing the body

    sent: list[Message] = []

    async def collect(message: Message) -> None:
        sent.append(message)

    asyncio.run(AuditMiddleware(streaming_app, audit)(_scope(), _receive_disconnect, collect))
    [record] = audit.read_page(1)
    assert (record["status"], record["outcome"], record["client"]) == (499, "error", "10.1.2.3")
    assert (b"x-request-id", record["request_id"].encode()) in sent[0]["headers"]


def test_cancelled_request_still_leaves_its_record(audit: AuditLog) -> None:
    async def hanging_app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        async def ignore(message: Message) -> None:
            return None

        task = asyncio.create_task(AuditMiddleware(hanging_app, audit)(_scope(), _receive_disconnect, ignore))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [record] = audit.read_page(1)
    assert record["status"] == 499


def test_a_failing_audit_write_turns_the_response_into_a_503(audit: AuditLog) -> None:
    """Fail closed (the rest is in test_audit_fail_closed.py): no answer goes out without its record."""

    def broken_append(record: dict[str, Any]) -> None:
        raise OSError("disk full")

    async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"SECRET-ANSWER"})

    sent: list[Message] = []

    async def collect(message: Message) -> None:
        sent.append(message)

    middleware = AuditMiddleware(ok_app, audit, append=broken_append)
    asyncio.run(middleware(_scope(), _receive_disconnect, collect))
    assert sent[0]["status"] == 503
    assert b"audit_unavailable" in sent[1]["body"] and b"SECRET-ANSWER" not in sent[1]["body"]
    assert not audit.available


def test_the_record_is_on_disk_before_the_response_ends(audit: AuditLog, tmp_path: Path) -> None:
    """Write-ahead: a client that saw the whole response can count on its record, even if the gateway dies
    right after sending it."""

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        request_state(scope).completion_tokens = 1  # as the stream's generator does when it finishes
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    records_on_disk: list[int] = []

    async def collect(message: Message) -> None:
        path = tmp_path / "audit.jsonl"
        records_on_disk.append(len(path.read_bytes().splitlines()) if path.exists() else 0)

    asyncio.run(AuditMiddleware(streaming_app, audit)(_scope(), _receive_disconnect, collect))
    assert records_on_disk == [1, 1, 2]  # the chain's first record, then this request's, before the end
    [record] = audit.read_page(1)
    assert (record["status"], record["completion_tokens"]) == (200, 1)
