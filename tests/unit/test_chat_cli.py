"""`gateway chat`: command parsing, the conversation it sends, and one-line errors (no server needed)."""

from __future__ import annotations

import argparse
import io
import socket
from pathlib import Path

import httpx
import openai
import pytest

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
