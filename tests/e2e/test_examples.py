"""Every walkthrough in examples/ runs, unchanged, against the real HTTPS gateway, configured only through the
environment variables its header tells a newcomer to set (GATEWAY_URL, GATEWAY_CA, GATEWAY_TOKEN)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import REPO, Gateway, running

EXAMPLES = REPO / "examples"
MODEL = "smollm2-135m-instruct"
FINETUNE_SCOPES = "files:write files:read fine_tuning:write fine_tuning:read chat models:read"

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def example_env(gateway: Gateway, scope: str = "chat models:read", **extra: str) -> dict[str, str]:
    env = gateway.env()  # the server's own settings too, for the scripts that run `gateway` locally
    env.update(GATEWAY_URL=gateway.url, GATEWAY_CA=gateway.ca, GATEWAY_TOKEN=gateway.token(scope), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"  # `gateway`, `python3`
    return env


def run_example(
    command: list[str], env: dict[str, str], *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@needs_curl
def test_chat_curl(gateway: Gateway) -> None:
    result = run_example(["bash", str(EXAMPLES / "chat_curl.sh")], example_env(gateway))
    assert result.returncode == 0, result.stderr
    plain, _, streamed = result.stdout.partition("== streamed")
    body = json.loads(plain.split("\n", 1)[1])
    assert body["object"] == "chat.completion" and "Paris" in body["choices"][0]["message"]["content"]
    events = [line for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@needs_curl
def test_chat_curl_says_what_is_missing(gateway: Gateway) -> None:
    env = example_env(gateway)
    del env["GATEWAY_TOKEN"]
    result = run_example(["bash", str(EXAMPLES / "chat_curl.sh")], env)
    assert result.returncode != 0
    assert "set GATEWAY_TOKEN" in result.stderr and result.stdout == ""


@needs_curl
def test_chat_curl_escapes_the_question(gateway: Gateway) -> None:
    question = 'Repeat exactly: "quoted" and back\\slash'
    result = run_example(["bash", str(EXAMPLES / "chat_curl.sh"), question], example_env(gateway))
    assert result.returncode == 0, result.stdout + result.stderr


def test_chat_sdk(gateway: Gateway) -> None:
    result = run_example([sys.executable, str(EXAMPLES / "chat_sdk.py")], example_env(gateway))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"models: {MODEL}"
    assert lines[1].startswith("answer: ") and "Paris" in lines[1]
    assert lines[2].startswith("tokens: ") and lines[2].endswith(" completion")
    assert lines[3].startswith("streamed: ") and "Paris" in lines[3]


def test_langchain_with_a_model_id(gateway: Gateway) -> None:
    """The same script serves a fine-tuned id (test_finetune_curl); here with the base model."""
    command = [sys.executable, str(EXAMPLES / "langchain_finetuned.py"), MODEL]
    result = run_example(command, example_env(gateway))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"[{MODEL}] ") and "Paris" in result.stdout
    assert "tokens: " in result.stdout


@needs_curl
def test_verify_audit(gateway: Gateway) -> None:
    result = run_example(["bash", str(EXAMPLES / "verify_audit.sh")], example_env(gateway, "admin"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\nOK " in result.stdout
    page = json.loads(result.stdout.rsplit("(GET /v1/audit needs the admin scope) ==\n", 1)[1])
    assert page["object"] == "list" and [r["seq"] for r in page["data"]] == [1, 2, 3]


def test_verify_audit_fails_on_a_tampered_copy(gateway: Gateway, tmp_path: Path) -> None:
    live = gateway.data_dir / "audit" / "audit.jsonl"
    head = Path(f"{live}.head")
    copy = tmp_path / "audit.jsonl"
    shutil.copyfile(head, f"{copy}.head")  # head first: the log can only be longer than it, never shorter
    shutil.copyfile(live, copy)
    lines = copy.read_text().splitlines(keepends=True)
    tampered = lines[1].replace('"client":"127.0.0.1"', '"client":"10.9.8.7"', 1)
    assert tampered != lines[1]
    lines[1] = tampered
    copy.write_text("".join(lines))
    env = example_env(gateway, GATEWAY_AUDIT__PATH=str(copy))
    del env["GATEWAY_URL"]  # the chain check only
    result = run_example(["bash", str(EXAMPLES / "verify_audit.sh")], env)
    assert result.returncode == 1
    assert "TAMPERED" in result.stdout and "first bad line 2" in result.stdout


# -- fine-tuning: needs the worker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_gateway(
    tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path
) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gw-ft") / "data"
    extra = {"GATEWAY_FINETUNE__DEVICE": "cpu", "GATEWAY_FINETUNE__POLL_SECONDS": "0.5"}
    yield from running(Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=extra))


@pytest.mark.slow
@needs_curl
def test_finetune_curl_then_langchain(training_gateway: Gateway) -> None:
    # One epoch of the 16 demo rows: 8 optimizer steps, a few minutes on two busy CPU cores.
    env = example_env(training_gateway, FINETUNE_SCOPES, FT_EPOCHS="1", FT_TIMEOUT="780")
    result = run_example(["bash", str(EXAMPLES / "finetune_curl.sh")], env, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "status: running" in result.stdout and "status: succeeded" in result.stdout
    fine_tuned = result.stdout.rsplit("FINE_TUNED_MODEL=", 1)[1].strip()
    assert fine_tuned.startswith(f"ft:{MODEL}:")
    reply = json.loads(result.stdout.split("== 4. chat with it ==\n", 1)[1].split("\nFINE_TUNED_MODEL=")[0])
    assert reply["model"] == fine_tuned and reply["choices"][0]["message"]["content"]

    command = [sys.executable, str(EXAMPLES / "langchain_finetuned.py"), fine_tuned, "What is 3 + 3?"]
    answer = run_example(command, env)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith(f"[{fine_tuned}] ")
