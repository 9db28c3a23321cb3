"""The README's walkthroughs, run exactly as printed, against a real gateway; and the examples' edge cases.

Each step's command lines are read from README.md itself (the ```sh blocks of "## Walkthroughs", steps 1-9),
so a README edit that breaks a step fails here.  They run in `bash` from the repository root, with a PATH
that holds no virtual environment (a newcomer never activates `.venv`: `gateway` is not a command for them,
only `.venv/bin/gateway`), and the variables come from the README's own `export` lines, evaluated.  The one
translation: the fixture's server listens on a free port with its own dev CA and data dir (it is what
`make serve` runs, `gateway serve` with the fine-tuning worker, on the settings the environment gives it), so
in the export lines `https://127.0.0.1:8443` and `certs/ca.pem` are mapped to that server's, and the shell
gets its GATEWAY_DATA_DIR / GATEWAY_SERVER__* settings as `make serve`'s own process would read them from
the repository's data/ and certs/.

What a step prints is compared with the README's recorded output where it is stable (section headers, line
prefixes and formats, JSON keys and object names, the status sequence, "chain intact", the trained answer),
never where it is not (the model's wording, ids, timings).  How each step is covered:

  1. `make serve`: not run (the fixture runs the command its recipe ends with); the recipe's echo lines and
     the engine.started log line are compared with the README.  The exports and `curl .../readyz` as printed.
  2. `gateway chat` on a terminal: the README's transcript is piped into the command as printed (the
     banner and `> ` prompts only show on a terminal: tests/e2e/test_chat_cli.py drives one).  Its three
     error lines are produced with the flags that cause them and compared line for line.
  3, 4, 7, 8: as printed.  5 (a real fine-tune, slow) as printed; 6 with the export line step 5 printed
     pasted in place of the recorded one, as the README tells the user.  9 has no commands: its links exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth.tokens import mint_dev_token
from tests.e2e.harness import REPO, Gateway, free_port, make_certs, running

README = REPO / "README.md"
EXAMPLES = REPO / "examples"
MODEL = "smollm2-135m-instruct"
MAKE_SERVE_URL, MAKE_SERVE_CA = "https://127.0.0.1:8443", "certs/ca.pem"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# -- the README, parsed --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str  # "sh": a command the reader types; "": what it prints (recorded)
    text: str


def walkthrough_steps(readme: str) -> dict[int, list[Block]]:
    """The fenced blocks of each "### N." step between "## Walkthroughs" and "## The API", in order."""
    section = readme.split("\n## Walkthroughs", 1)[1].split("\n## The API", 1)[0]
    steps: dict[int, list[Block]] = {}
    for match in re.finditer(r"^### (\d+)\. [^\n]*\n(.*?)(?=^### |\Z)", section, re.M | re.S):
        fenced = re.findall(r"^```(\w*)\n(.*?)^```$", match.group(2), re.M | re.S)
        steps[int(match.group(1))] = [Block(lang, text) for lang, text in fenced]
    return steps


STEPS = walkthrough_steps(README.read_text())


def commands(step: int) -> list[str]:
    return [b.text for b in STEPS[step] if b.lang == "sh"]


def recorded(step: int) -> list[str]:
    return [b.text for b in STEPS[step] if b.lang == ""]


def recorded_after(step: int, command: str) -> str:
    """The output block that follows the command block containing `command`."""
    blocks = STEPS[step]
    for i, block in enumerate(blocks):
        if block.lang == "sh" and command in block.text:
            assert i + 1 < len(blocks) and blocks[i + 1].lang == "", f"step {step}: no output after {command}"
            return blocks[i + 1].text
    raise AssertionError(f"step {step} has no command containing {command!r}")


def the_command(step: int, containing: str) -> str:
    (found,) = [c for c in commands(step) if containing in c]
    return found


def json_keys(text: str) -> set[str]:
    """The keys a README excerpt names ("key": ...), trimmed JSON included."""
    return set(re.findall(r'"([A-Za-z_]+)"\s*:', text))


def headers(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("== ")]


def all_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in all_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in all_keys(v)}
    return set()


_VARIES = re.compile(r"(?:ft:|file-|ftjob-|ftevent-|chatcmpl-)[A-Za-z0-9:_.-]+|\d+(?:\.\d+)?")


def shape(line: str) -> re.Pattern[str]:
    """A recorded line as a pattern: its numbers and ids may differ, its words may not."""
    parts, end = [], 0
    for match in _VARIES.finditer(line):
        parts += [re.escape(line[end : match.start()]), r"\d+(?:\.\d+)?" if match[0][0].isdigit() else r"\S+"]
        end = match.end()
    return re.compile("".join([*parts, re.escape(line[end:])]))


# -- the newcomer's shell ------------------------------------------------------------------------------------


def newcomer_path() -> str:
    """/usr/bin:/bin (plus where python3 or curl live if elsewhere), never a virtual environment."""
    venv_bin = Path(sys.executable).parent
    others = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and Path(d) != venv_bin and "venv" not in d
    ]
    dirs = ["/usr/bin", "/bin"]
    for tool in ("python3", "curl"):
        if shutil.which(tool, path=os.pathsep.join(dirs)) is None and (
            found := shutil.which(tool, path=":".join(others))
        ):
            dirs.append(str(Path(found).parent))
    path = os.pathsep.join(dirs)
    assert shutil.which("gateway", path=path) is None, (
        f"`gateway` is a command on {path}: the test proves nothing"
    )
    return path


@dataclass
class Shell:
    """`bash` in the repository root, as a newcomer has it, with step 1's exports already typed."""

    gateway: Gateway

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in self.gateway.env().items() if k.startswith("GATEWAY_")}
        env.update(HOME=os.environ.get("HOME", "/tmp"), PATH=newcomer_path(), LANG="C.UTF-8")
        return env

    def exports(self) -> str:
        """Step 1's export lines as printed, pointed at the fixture's server."""
        block = the_command(1, "export GATEWAY_URL=")
        assert MAKE_SERVE_URL in block and MAKE_SERVE_CA in block, block
        return block.replace(MAKE_SERVE_URL, self.gateway.url).replace(MAKE_SERVE_CA, self.gateway.ca)

    def run(self, script: str, *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f"set -e\n{self.exports()}\n{script}"],
            env=self.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    """`gateway serve` with its fine-tuning worker, as `make serve` runs it."""
    assert (REPO / ".venv" / "bin" / "gateway").is_file(), (
        "the walkthroughs use .venv/bin: run `make install`"
    )
    data = tmp_path_factory.mktemp("gw-walkthrough") / "data"
    extra = {"GATEWAY_FINETUNE__DEVICE": "cpu", "GATEWAY_FINETUNE__POLL_SECONDS": "0.5"}
    yield from running(Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=extra))


@pytest.fixture
def shell(served: Gateway) -> Shell:
    return Shell(served)


def test_every_walkthrough_command_is_covered() -> None:
    """The command blocks this module runs, step by step: a new one in the README needs a test here."""
    assert {step: len(commands(step)) for step in STEPS} == {
        1: 3,  # make serve (its recipe), the exports, curl /readyz
        2: 1,  # gateway chat (piped)
        3: 1,
        4: 1,
        5: 1,
        6: 1,  # the export pasted from step 5, then the LangChain script
        7: 1,
        8: 1,  # the admin token, then verify_audit.sh
        9: 0,
    }


def test_examples_readme_sets_the_same_variables() -> None:
    """examples/README.md repeats step 1's exports: word for word, so one cannot drift from the other."""
    assert the_command(1, "export GATEWAY_URL=") in (EXAMPLES / "README.md").read_text()


# -- 1. start it ---------------------------------------------------------------------------------------------


def test_step_1_make_serve_prints_what_the_readme_shows(served: Gateway) -> None:
    assert commands(1)[0] == "make serve\n"
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/gateway serve" in recipe
    echoed = [line.replace("$(BIN)", ".venv/bin") for line in re.findall(r'@echo "(.*)"', recipe)]
    log = recorded_after(1, "make serve").splitlines()
    for line in log:
        if line == "..." or line.startswith("{"):
            continue
        assert line in echoed, f"the README shows {line!r}, `make serve` echoes {echoed}"
    (started,) = [line for line in log if '"engine.started"' in line]
    events = [json.loads(line) for line in served.logs().splitlines() if '"engine.started"' in line]
    assert events, "no engine.started line in the server log"
    assert json_keys(started) <= set(events[0]) and events[0]["model"] == MODEL


def test_step_1_exports_and_readyz(shell: Shell) -> None:
    result = shell.run('printf "%s\\n" "$GATEWAY_URL" "$GATEWAY_CA" "$GATEWAY_TOKEN"')
    assert result.returncode == 0 and result.stderr == "", result.stderr
    url, ca, token = result.stdout.splitlines()
    assert (url, ca) == (shell.gateway.url, shell.gateway.ca) and token.count(".") == 2
    with shell.gateway.client(token) as http:
        assert http.get("/v1/models").status_code == 200  # the token the README mints works

    readyz = the_command(1, "/readyz")
    result = shell.run(readyz)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(recorded_after(1, "/readyz"))


# -- 2. gateway chat -----------------------------------------------------------------------------------------


def transcript() -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The README's terminal session: (its banner lines, [(typed line, the lines printed after it)])."""
    lines = recorded(2)[0].splitlines()
    banner, turns = [], []
    for line in lines:
        if line.startswith("> "):
            turns.append((line[2:], []))
        elif turns:
            turns[-1][1].append(line)
        else:
            banner.append(line)
    return banner, turns


def chat_records(gateway: Gateway) -> list[dict[str, Any]]:
    lines = (gateway.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("route") == "/v1/chat/completions"]


def test_step_2_gateway_chat_piped(shell: Shell) -> None:
    command = commands(2)[0].strip()
    assert command == ".venv/bin/gateway chat"
    banner, turns = transcript()
    assert banner == [f"chatting with {MODEL} at {MAKE_SERVE_URL} (/help for commands, Ctrl-D to leave)"]
    typed = "\n".join(line for line, _ in turns)
    before = len(chat_records(shell.gateway))
    result = shell.run(f"{command} <<'TYPED'\n{typed}\nTYPED")

    said = [line for line, _ in turns if not line.startswith("/")]
    errors = [out for line, outs in turns for out in outs if out.startswith("gateway chat: ")]
    assert result.returncode == (2 if errors else 0), result.stdout + result.stderr
    assert result.stderr.splitlines() == errors
    # every command's recorded output, in order; the replies to the typed questions come before them
    shown = [out for line, outs in turns if line.startswith("/") for out in outs if out not in errors]
    out = result.stdout.splitlines()
    positions = [out.index(line) for line in shown]
    assert positions == sorted(positions) and positions[0] > 0, result.stdout
    assert [r["status"] for r in chat_records(shell.gateway)[before:]] == [200] * len(said)
    assert result.stdout.count("\n\n") >= len(said) - 1  # a blank line between replies


def test_step_2_error_lines(shell: Shell, tmp_path: Path) -> None:
    """Each recorded error line, from the cause it names: nothing listening, another CA, an expired token."""
    command = commands(2)[0].strip()
    down, untrusted, expired = recorded(2)[1].splitlines()
    make_certs(tmp_path)
    old = mint_dev_token(shell.gateway.settings(), sub="you", org=None, scope="chat", ttl_seconds=-300)
    closed = f"https://127.0.0.1:{free_port()}"
    cases = [
        (f"--url {closed}", down.replace(MAKE_SERVE_URL, closed)),
        (f"--ca {tmp_path / 'ca.pem'}", untrusted.replace(MAKE_SERVE_URL, shell.gateway.url)),
        (f"--token {old}", expired),
    ]
    for flags, line in cases:
        result = shell.run(f"echo Hello | {command} {flags}")
        assert result.returncode == 2
        # the reason in parentheses comes from the OS or OpenSSL; the rest is ours, word for word
        pattern = re.sub(r"\\\(.*?\\\)", r"\\(.+\\)", re.escape(line))
        assert re.fullmatch(pattern, result.stderr.rstrip("\n")), (result.stderr, line)
        assert result.stderr.count("\n") == 1 and result.stdout == ""


# -- 3 and 4: chat with curl and the SDK ---------------------------------------------------------------------


def test_step_3_chat_curl(shell: Shell) -> None:
    result = shell.run(commands(3)[0])
    assert result.returncode == 0, result.stderr
    readme = recorded(3)[0]
    sections = headers(readme.splitlines())
    assert headers(result.stdout.splitlines()) == sections

    plain, streamed = result.stdout.split(sections[1])
    readme_plain, readme_streamed = readme.split(sections[1])
    body = json.loads(plain.split("\n", 1)[1])
    assert json_keys(readme_plain) <= all_keys(body)
    assert (body["object"], body["model"], body["choices"][0]["finish_reason"]) == (
        "chat.completion",
        MODEL,
        "stop",
    )
    assert "Paris" in body["choices"][0]["message"]["content"]

    events = [line for line in streamed.splitlines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert readme_streamed.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert json_keys(readme_streamed) <= all_keys(chunks)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_step_4_chat_sdk(shell: Shell) -> None:
    result = shell.run(commands(4)[0])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    readme = recorded(4)[0].splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [line.split(":", 1)[0] for line in readme]
    assert lines[0] == readme[0] == f"models: {MODEL}, all-minilm-l6-v2"  # the chat model first
    assert shape(readme[2]).fullmatch(lines[2]), (readme[2], lines[2])  # tokens: N prompt + M completion
    assert "Paris" in lines[1] and "Paris" in lines[3]


# -- 5 and 6: fine-tune, then use the model ------------------------------------------------------------------

STEP_LINE = re.compile(r"\d\d:\d\d:\d\d step (\d+)/(\d+)  loss \d+\.\d\d(?:  ~\d+ (?:s|min) left)?")
STATUS_LINE = re.compile(r"\d\d:\d\d:\d\d status: (\w+)")


@pytest.fixture(scope="module")
def fine_tuned(served: Gateway) -> subprocess.CompletedProcess[str]:
    """Step 5 as printed: the demo fine-tune with the defaults (24 steps, about a minute on 2 idle cores)."""
    return Shell(served).run(commands(5)[0], timeout=1400)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_step_5_finetune_curl(fine_tuned: subprocess.CompletedProcess[str]) -> None:
    result = fine_tuned
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, readme = result.stdout.splitlines(), recorded(5)[0].splitlines()
    assert headers(out) == headers(readme)

    flow = ["validating_files", "queued", "running", "succeeded"]
    for lines in (out, readme):
        statuses = [m.group(1) for line in lines if (m := STATUS_LINE.fullmatch(line))]
        assert statuses[-2:] == ["running", "succeeded"] and statuses == [s for s in flow if s in statuses]
        steps = [(int(m.group(1)), int(m.group(2))) for line in lines if (m := STEP_LINE.fullmatch(line))]
        assert steps and steps[-1][0] == steps[-1][1] and steps == sorted(set(steps)), lines
    steps = [int(m.group(1)) for line in out if (m := STEP_LINE.fullmatch(line))]
    assert steps == list(range(1, steps[-1] + 1))  # every step, each once: the progress the user watches
    assert any("left" in line for line in out if STEP_LINE.fullmatch(line))

    upload, job = json.loads(out[1]), json.loads(out[3])
    assert json_keys(readme[1]) <= set(upload) and upload["filename"] == "alpaca_demo.json"
    assert json_keys("\n".join(readme[3:6])) <= all_keys(job) and job["object"] == "fine_tuning.job"

    # step 4 of the script: the training data's own question gets the trained answer
    labelled = {line.split(":", 1)[0]: line for line in out if re.match(r"[a-z -]+:  ", line)}
    readme_labelled = {line.split(":", 1)[0]: line for line in readme if re.match(r"[a-z -]+:  ", line)}
    assert set(labelled) == set(readme_labelled) == {"question", "trained on", "fine-tuned", "base model"}
    assert labelled["question"] == readme_labelled["question"]
    assert labelled["trained on"] == readme_labelled["trained on"]
    assert "4417" in labelled["trained on"] and "4417" in labelled["fine-tuned"], labelled
    assert "4417" in readme_labelled["fine-tuned"]
    assert shape(readme[-1]).fullmatch(out[-1]) and out[-1].startswith(
        f"export FINE_TUNED_MODEL=ft:{MODEL}:acme:demo:"
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_step_6_langchain_with_the_fine_tuned_model(
    shell: Shell, fine_tuned: subprocess.CompletedProcess[str]
) -> None:
    assert fine_tuned.returncode == 0, fine_tuned.stderr[-3000:]
    pasted = fine_tuned.stdout.splitlines()[-1]  # what the README says to paste: step 5's last line
    block = commands(6)[0]
    (recorded_export,) = [line for line in block.splitlines() if line.startswith("export FINE_TUNED_MODEL=")]
    assert shape(recorded_export.split("#")[0].rstrip()).fullmatch(pasted), recorded_export
    result = shell.run(block.replace(recorded_export, pasted))
    assert result.returncode == 0, result.stderr
    model = pasted.split("=", 1)[1]
    answer, tokens = result.stdout.splitlines()
    readme_answer, readme_tokens = recorded(6)[0].splitlines()
    assert (
        answer.startswith(f"[{model}] ") and readme_answer.startswith("[ft:") and len(answer) > len(model) + 3
    )
    assert shape(readme_tokens).fullmatch(tokens), (readme_tokens, tokens)


# -- 7. metrics ----------------------------------------------------------------------------------------------


def test_step_7_metrics(shell: Shell) -> None:
    with shell.gateway.client() as anonymous:
        assert anonymous.get("/v1/models").status_code == 401  # a series the README shows
    assert shell.run(commands(3)[0]).returncode == 0  # and a chat completion
    result = shell.run(commands(7)[0])
    assert result.returncode == 0, result.stderr
    series = {line.rsplit(" ", 1)[0] for line in result.stdout.splitlines()}
    assert all(line.startswith("gateway_") for line in result.stdout.splitlines())
    for line in recorded(7)[0].splitlines():
        if line != "...":
            assert line.rsplit(" ", 1)[0] in series, f"the README shows {line!r}; not in /metrics"


# -- 8. the audit log ----------------------------------------------------------------------------------------


def test_step_8_verify_audit(shell: Shell) -> None:
    result = shell.run(commands(8)[0])
    assert result.returncode == 0, result.stdout + result.stderr
    out, readme = result.stdout.splitlines(), recorded(8)[0].splitlines()
    assert headers(out) == headers(readme)
    assert out[0] == readme[0]
    chain = out[1].replace(str(shell.gateway.data_dir), "data")  # the fixture's data dir for the repo's data/
    assert shape(readme[1]).fullmatch(chain), (readme[1], chain)
    page = json.loads(out[3])
    assert json_keys("\n".join(readme[3:])) <= all_keys(page)
    assert page["object"] == "list" and [r["seq"] for r in page["data"]] == [1, 2, 3]


def test_verify_audit_names_the_tampered_line(served: Gateway, tmp_path: Path) -> None:
    """The README's TAMPERED line, from an altered copy of the live log (the chain check only)."""
    live = served.data_dir / "audit" / "audit.jsonl"
    copy = tmp_path / "audit.jsonl"
    shutil.copyfile(f"{live}.head", f"{copy}.head")  # head first: the log can only be longer, never shorter
    shutil.copyfile(live, copy)
    lines = copy.read_text().splitlines(keepends=True)
    tampered = lines[1].replace('"client":"127.0.0.1"', '"client":"10.9.8.7"', 1)
    assert tampered != lines[1]
    lines[1] = tampered
    copy.write_text("".join(lines))
    shell = Shell(served)
    env = shell.env() | {"GATEWAY_AUDIT__PATH": str(copy)}
    result = subprocess.run(
        ["examples/verify_audit.sh"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    (readme_line,) = [line for line in recorded(8)[1].splitlines() if line.startswith("TAMPERED")]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("TAMPERED")]
    assert line.replace(str(copy), "data/audit/audit.jsonl") == readme_line


def test_verify_audit_says_when_there_is_no_gateway_command(tmp_path: Path) -> None:
    """Outside a checkout with .venv and with no `gateway` on PATH: one clear line, exit status 2."""
    (tmp_path / "examples").mkdir()
    script = tmp_path / "examples" / "verify_audit.sh"
    shutil.copy2(EXAMPLES / "verify_audit.sh", script)
    env = {"PATH": newcomer_path(), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert "no gateway command" in result.stderr and "make install" in result.stderr


# -- 9. configuration ----------------------------------------------------------------------------------------


def test_step_9_links_exist() -> None:
    section = README.read_text().split("### 9. ", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(([^)#]+)", section)
    assert links and all((REPO / link).is_file() for link in links), links


# -- the examples beyond the walkthrough ---------------------------------------------------------------------


def test_chat_curl_says_what_is_missing(shell: Shell) -> None:
    result = subprocess.run(
        ["examples/chat_curl.sh"], env=shell.env(), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "set GATEWAY_URL" in result.stderr and result.stdout == ""


def test_chat_curl_escapes_the_question(shell: Shell) -> None:
    result = shell.run("""examples/chat_curl.sh 'Repeat exactly: "quoted" and back\\slash'""")
    assert result.returncode == 0, result.stdout + result.stderr


def test_langchain_with_a_base_model_id(shell: Shell) -> None:
    result = shell.run(
        f'.venv/bin/python examples/langchain_finetuned.py {MODEL} "What is the capital of France?"'
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"[{MODEL}] ") and "Paris" in result.stdout
    assert "tokens: " in result.stdout


def test_finetune_curl_reports_a_failed_upload(shell: Shell, tmp_path: Path) -> None:
    """A bad training file stops the script at step 1 with the server's message (and no job)."""
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "no output"}]')
    result = shell.run(f"examples/finetune_curl.sh {bad}")
    assert result.returncode != 0
    assert "POST /files failed: " in result.stderr and "== 2." not in result.stdout
    with httpx.Client(verify=shell.gateway.verify()) as http:
        assert http.get(f"{shell.gateway.url}/healthz").status_code == 200
