"""`gateway chat` with stdin piped, as a subprocess, against the real HTTPS gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import REPO, Gateway, make_certs

MODEL = "smollm2-135m-instruct"


def chat(
    gateway: Gateway, stdin: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "chat", "--temperature", "0", "--max-tokens", "24", *args],
        input=stdin,
        env=env or gateway.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def chat_records(gateway: Gateway) -> list[dict[str, object]]:
    lines = (gateway.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r.get("route") == "/v1/chat/completions"]


def test_defaults_stream_a_reply_with_a_dev_token(gateway: Gateway) -> None:
    """No flags: the URL, the dev CA and a dev token all come from the gateway's own settings."""
    result = chat(gateway, "What is the capital of France?\n/exit\nThis line is never sent.\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stderr == ""
    assert chat_records(gateway)[-1]["status"] == 200


def test_history_system_prompt_and_clear(gateway: Gateway) -> None:
    before = len(chat_records(gateway))
    script = "\n".join(
        [
            "/system Answer in one short sentence.",
            "/system",
            "My name is Ada.",
            "What is my name?",
            "/clear",
            "What is my name?",
            "/help",
            "/bogus",
        ]
    )
    result = chat(
        gateway, script + "\n", "--url", gateway.url, "--ca", gateway.ca, "--token", gateway.token()
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "system prompt set" in out and "system: Answer in one short sentence." in out
    assert "conversation cleared" in out and "/model [ID]" in out and "unknown command /bogus" in out
    first, second, third = (r["prompt_tokens"] for r in chat_records(gateway)[before:])
    assert isinstance(first, int) and isinstance(second, int) and isinstance(third, int)
    assert second > first + 5  # the second turn carried the first question and its answer
    assert third < second  # /clear dropped them; the system prompt stayed
    assert third >= first - 2


def test_model_switching(gateway: Gateway) -> None:
    result = chat(gateway, "/model no-such-model\n/model\n/models\n/model " + MODEL + "\nSay hi.\n")
    assert result.returncode == 2, result.stderr  # piped: the unknown model was an error, the rest still ran
    assert result.stderr.strip() == (
        "gateway chat: 404: The model 'no-such-model' does not exist or you do not have access to it."
    )
    # /models lists the embedding model too, after the chat model
    assert f"model: {MODEL}\n* {MODEL}\nmodel: {MODEL}\n" in result.stdout  # chat models only


def test_piped_replies_are_separated_and_a_400_exits_2(gateway: Gateway) -> None:
    """Each reply ends with a newline and a blank line separates replies; a 400 (a prompt over the model's
    context) is one line on stderr, the next line is still answered, and the exit status is 2."""
    too_long = "word " * 3000
    stdin = f"What is the capital of France?\n{too_long}\nWhat is the capital of Italy?\n"
    result = chat(gateway, stdin, "--max-tokens", "12")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("gateway chat: 400: This model's maximum context length is ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    first, second = result.stdout.split("\n\n")  # 12 tokens at temperature 0: one line each
    assert "Paris" in first and "\n" not in first
    assert second.strip() and second.endswith("\n") and "\n" not in second[:-1]
    records = chat_records(gateway)[-3:]
    assert [r["status"] for r in records] == [200, 400, 200]


def test_unknown_model_on_the_command_line(gateway: Gateway) -> None:
    result = chat(gateway, "Hi\n", "--model", "nope")
    assert result.returncode == 2
    assert result.stderr == f"gateway chat: model 'nope' is not available; this token can use: {MODEL}\n"


def test_refused_token_is_one_line(gateway: Gateway) -> None:
    result = chat(gateway, "Hi\n", "--token", "not-a-jwt")
    assert result.returncode == 2
    assert result.stderr.startswith("gateway chat: the token was refused (401): ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_untrusted_certificate_is_one_line(gateway: Gateway, tmp_path: Path) -> None:
    make_certs(tmp_path)  # another CA, which did not sign the gateway's certificate
    result = chat(gateway, "Hi\n", "--ca", str(tmp_path / "ca.pem"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"gateway chat: the certificate of {gateway.url} is not trusted (")
    assert "--ca" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("path", ["/definitely/missing/ca.pem"])
def test_missing_ca_file(gateway: Gateway, path: str) -> None:
    result = chat(gateway, "Hi\n", "--ca", path)
    assert (result.returncode, result.stderr) == (2, f"gateway chat: CA file {path} does not exist\n")


def test_interactive_terminal(gateway: Gateway) -> None:
    """On a terminal: a banner, a `> ` prompt, line editing via readline, Ctrl-D to leave."""
    import os
    import select
    import signal
    import time

    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "chat", "--temperature", "0", "--max-tokens", "24"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=gateway.env(),
        cwd=REPO,
        close_fds=True,
    )
    os.close(terminal)
    seen = b""

    def read_until(marker: bytes, count: int = 1, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(marker) < count and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    seen += os.read(controller, 4096)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_until(b"> ")
        os.write(controller, b"What is the capital of France?\r")
        read_until(b"\n> ", count=2)  # the reply, then the next prompt (Ctrl-D before it would be lost)
        os.write(controller, b"half a line")
        read_until(b"half a line")  # echoed by readline, which now waits in select() as it does for a person
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # Ctrl-C (the pty is not its controlling terminal, so by hand)
        read_until(b"\n> ", count=3)
        os.write(controller, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
        read_until(b"never", timeout=1)  # drain what is left
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    text = seen.decode(errors="replace")
    assert f"chatting with {MODEL} at {gateway.url}" in text
    assert "Paris" in text and "Traceback" not in text
    assert "(Ctrl-D or /exit to leave)" in text
