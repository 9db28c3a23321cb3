"""`gateway chat`: command parsing, the conversation it sends, and one-line errors (no server needed)."""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.cli import chat as chat_cli
from gateway.cli.chat import ChatSession, Command, add_arguments, default_url, explain, parse_command, run
from gateway.cli.main import build_parser
from gateway.core.settings import ServerSettings, Settings


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Hello there\n", Command("say", "Hello there")),
        ("   \n", Command("empty")),
        ("/exit", Command("exit")),
        ("/quit", Command("exit")),
        ("/EXIT\n", Command("exit")),
        ("/model", Command("model")),
        ("/model  ft:smollm2:acme:demo:abc  \n", Command("model", "ft:smollm2:acme:demo:abc")),
        ("/models", Command("models")),
        ("/system You answer in French.", Command("system", "You answer in French.")),
        ("/system -", Command("system", "-")),
        ("/clear", Command("clear")),
        ("/help", Command("help")),
        ("/frobnicate now", Command("unknown", "frobnicate")),
        ("//etc/hosts maps names", Command("say", "/etc/hosts maps names")),
        ("what is 1/2?", Command("say", "what is 1/2?")),
    ],
)
def test_parse_command(line: str, expected: Command) -> None:
    assert parse_command(line) == expected


def test_session_sends_system_history_and_the_new_turn() -> None:
    session = ChatSession(model="m", system="Be brief.")
    assert session.messages("Hi") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    session.remember("Hi", "Hello!")
    assert session.messages("And?")[1:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And?"},
    ]
    session.clear()
    session.system = ""
    assert session.messages("x") == [{"role": "user", "content": "x"}]


def test_the_cli_has_a_chat_subcommand() -> None:
    args = build_parser().parse_args(
        ["chat", "--model", "m", "--url", "https://gw:8443", "--max-tokens", "9"]
    )
    assert (args.command, args.model, args.url, args.max_tokens) == ("chat", "m", "https://gw:8443", 9)
    # a small model rambles at the API's default temperature of 1 and no length limit: the CLI's own defaults
    defaults = build_parser().parse_args(["chat"])
    assert (defaults.temperature, defaults.max_tokens) == (0.2, 512)


def test_default_url_follows_the_server_settings() -> None:
    assert default_url(Settings()) == "https://127.0.0.1:8443"
    wildcard = Settings(server=ServerSettings(host="0.0.0.0", port=9443, plain_http=True))
    assert default_url(wildcard) == "http://127.0.0.1:9443"
    assert default_url(Settings(server=ServerSettings(host="::1"))) == "https://[::1]:8443"


def _status_error(cls: type[openai.APIStatusError], status: int, message: str) -> openai.APIStatusError:
    request = httpx.Request("GET", "https://gw/v1/models")
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return cls(message, response=httpx.Response(status, request=request, json=body), body=body)


def test_errors_become_one_line() -> None:
    refused = explain(_status_error(openai.AuthenticationError, 401, "Token expired"), "https://gw")
    assert refused is not None and refused.fatal
    assert str(refused) == "the token was refused (401): Token expired"
    missing = explain(_status_error(openai.NotFoundError, 404, "The model 'x' does not exist"), "https://gw")
    assert missing is not None and not missing.fatal
    assert str(missing) == "404: The model 'x' does not exist"
    assert explain(RuntimeError("bug"), "https://gw") is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_server_down_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"https://127.0.0.1:{_closed_port()}"
    code = run(_args("--url", url, "--token", "t"), stdin=io.StringIO("Hello\n"), out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"gateway chat: cannot reach the gateway at {url}: is it running?")


def test_missing_dev_key_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'data_dir = "{tmp_path / "empty"}"\n')
    code = run(_args("--config", str(config), "--url", "https://127.0.0.1:1"), stdin=io.StringIO(""))
    err = capsys.readouterr().err
    assert code == 2
    assert "no token given and no dev signing key" in err and "--token" in err
    assert err.count("\n") == 1


# -- piped sessions against a scripted server (the real SDK over an in-process transport) ------------------


def _sse(*pieces: str) -> bytes:
    """A chat.completion.chunk stream carrying `pieces` as content deltas, then [DONE]."""
    base = {"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk"}
    chunks = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    chunks += [{"index": 0, "delta": {"content": piece}, "finish_reason": None} for piece in pieces]
    chunks.append({"index": 0, "delta": {}, "finish_reason": "stop"})
    events = [f"data: {json.dumps(base | {'choices': [choice]})}\n\n" for choice in chunks]
    return ("".join(events) + "data: [DONE]\n\n").encode()


SSE = {"content-type": "text/event-stream"}


class ScriptedGateway:
    """Answers GET /v1/models with one model and each chat turn with the next scripted reply: a list of
    content pieces (streamed), an int (that HTTP status with OpenAI's error envelope) or ("cut", pieces)."""

    def __init__(self, *replies: list[str] | int | tuple[str, list[str]]) -> None:
        self.replies = list(replies)
        self.sent: list[list[dict[str, str]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [_model("m")]})
        if request.url.path == "/v1/models/nope":
            return _error(404, "The model 'nope' does not exist or you do not have access to it.")
        self.sent.append(json.loads(request.content)["messages"])
        reply = self.replies.pop(0)
        if isinstance(reply, int):
            return _error(reply, "This model's maximum context length is 2048 tokens.")
        if isinstance(reply, tuple):  # ("cut", pieces): the pieces, then the connection drops
            events = _sse(*reply[1]).split(b"\n\n")[: 1 + len(reply[1])]

            def cut() -> Iterator[bytes]:
                yield from (event + b"\n\n" for event in events)
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )

            return httpx.Response(200, content=cut(), headers=SSE)
        return httpx.Response(200, content=_sse(*reply), headers=SSE)


def _model(model_id: str) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": 1, "owned_by": "system"}


def _error(status: int, message: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return httpx.Response(status, json=body)


def piped(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedGateway, stdin: str
) -> tuple[int, str, str, list[list[dict[str, str]]]]:
    """`gateway chat` with `stdin` piped, against `server`: (exit status, stdout, stderr, turns sent)."""

    def client(url: str, token: str, ca: str | None) -> openai.OpenAI:
        http = httpx.Client(transport=httpx.MockTransport(server))
        return openai.OpenAI(base_url=f"{url}/v1", api_key=token, http_client=http, max_retries=0)

    monkeypatch.setattr(chat_cli, "make_client", client)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    code = run(_args("--url", "https://gw", "--token", "t"), stdin=io.StringIO(stdin), out=out)
    return code, out.getvalue(), err.getvalue(), server.sent


def test_piped_replies_are_separated_and_end_with_one_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ScriptedGateway(["Hello", " there."], ["Line one.\n\n", "Line two.\n\n\n"], ["Bye", "."])
    code, out, err, _ = piped(monkeypatch, server, "Hi\nTwo lines?\nBye\n")
    assert (code, err) == (0, "")
    assert out == "Hello there.\n\nLine one.\n\nLine two.\n\nBye.\n"


def test_piped_exit_status_is_2_after_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 400 does not end the session (the next line is still answered) but the exit status says it."""
    server = ScriptedGateway(["First."], 400, ["Third."])
    code, out, err, sent = piped(monkeypatch, server, "one\n" + "word " * 3000 + "\nthree\n")
    assert code == 2
    assert err == "gateway chat: 400: This model's maximum context length is 2048 tokens.\n"
    assert out == "First.\n\nThird.\n"
    # the failed turn is not part of the conversation: the third turn carries the first and itself only
    assert [m["content"] for m in sent[2]] == ["one", "First.", "three"]


def test_piped_exit_status_is_2_after_an_unknown_model(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err, _ = piped(monkeypatch, ScriptedGateway(["Hi."]), "/model nope\nHello\n")
    assert code == 2
    assert err == "gateway chat: 404: The model 'nope' does not exist or you do not have access to it.\n"
    assert out == "Hi.\n"


def test_piped_commands_alone_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err, _ = piped(monkeypatch, ScriptedGateway(), "/system Be brief.\n/models\n/bogus\n/clear\n")
    assert (code, err) == (0, "")
    assert (
        out
        == "system prompt set\n* m\nunknown command /bogus; /help lists the commands\nconversation cleared\n"
    )


def test_an_empty_reply_is_an_empty_line(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _, _ = piped(monkeypatch, ScriptedGateway([], ["Two."]), "one\ntwo\n")
    assert (code, out) == (0, "\n\nTwo.\n")


def test_a_reply_cut_off_mid_stream_still_ends_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops after some text arrived: the text is closed with a newline before the error."""
    code, out, err, _ = piped(monkeypatch, ScriptedGateway(("cut", ["Partial", " an"]), ["Never."]), "a\nb\n")
    assert code == 2
    assert out == "Partial an\n"
    assert err.startswith("gateway chat: cannot reach the gateway at https://gw") and err.count("\n") == 1
