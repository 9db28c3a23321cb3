"""`gateway chat`: an interactive terminal chat against a running gateway, through the official `openai` SDK.

    gateway chat                                   # local dev server: URL, CA and a token from the settings
    gateway chat --url https://llm.intranet:8443 --ca /etc/ssl/corp-ca.pem --token "$TOKEN" --model my-ft

Replies stream as they are generated; the conversation is kept and sent with every turn.  Lines starting with
`/` are commands (see HELP).  Input may be piped: `echo "Hello" | gateway chat`; then each reply ends with a
newline and a blank line separates it from the one before.  When the gateway cannot be reached, its
certificate is not trusted or the token is refused, one line says so (exit status 2).  Any other error (a 400,
an unknown model) is one line on stderr too; on a terminal the session goes on, and with piped input the
remaining lines are still sent but the exit status is 2.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gateway.core.settings import Settings, load_settings

if TYPE_CHECKING:
    import openai

__all__ = ["HELP", "ChatSession", "Command", "add_arguments", "parse_command", "run"]

HELP = """commands:
  /model [ID]     show the model, or switch to ID (the conversation is kept)
  /models         list the models this token can use
  /system [TEXT]  show the system prompt, or set it (/system with no text shows it; /system - clears it)
  /clear          forget the conversation (the system prompt stays)
  /help           this text
  /exit           leave (Ctrl-D works too; Ctrl-C stops a reply that is streaming)"""

_COMMANDS = {"model", "models", "system", "clear", "help", "exit", "quit"}


@dataclass(frozen=True)
class Command:
    """One input line: `name` is "say" for a message, "empty" for a blank line, else the command word."""

    name: str
    arg: str = ""


def parse_command(line: str) -> Command:
    text = line.strip()
    if not text:
        return Command("empty")
    if not text.startswith("/") or text.startswith("//"):
        # "//etc/hosts is ..." sends the text with one slash dropped, for a message that starts with one
        return Command("say", text[1:] if text.startswith("//") else text)
    word, _, arg = text[1:].partition(" ")
    word = word.lower()
    if word == "quit":
        word = "exit"
    if word not in _COMMANDS:
        return Command("unknown", word)
    return Command(word, arg.strip())


@dataclass
class ChatSession:
    """The conversation: what is sent with the next turn."""

    model: str
    system: str = ""
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def remember(self, user_text: str, reply: str) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def clear(self) -> None:
        self.history.clear()


class ChatError(Exception):
    """A one-line, user-facing reason; `fatal` ends the session (nothing else would work either)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


# -- arguments and defaults ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model id (default: the first model the gateway lists)")
    parser.add_argument(
        "--url", default=os.environ.get("GATEWAY_URL"), help="gateway URL (default: $GATEWAY_URL, else local)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("GATEWAY_TOKEN"),
        help="Bearer JWT (default: $GATEWAY_TOKEN, else a dev token minted with the local dev key)",
    )
    parser.add_argument(
        "--ca",
        default=os.environ.get("GATEWAY_CA"),
        help="CA certificate to trust (default: $GATEWAY_CA, else certs/ca.pem if there, else the system's)",
    )
    parser.add_argument("--system", default="", help="system prompt to start with")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.2,
        help="sampling temperature (default 0.2, which keeps a small model on topic; 0: the likeliest reply)",
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default 512)")


def default_url(settings: Settings) -> str:
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a listening address, we only connect to it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "http" if settings.server.plain_http else "https"
    return f"{scheme}://{host}:{settings.server.port}"


def default_ca(settings: Settings) -> str | None:
    """The dev CA next to the configured server certificate (certs/ca.pem), when it is there."""
    candidate = Path(settings.server.tls_cert).parent / "ca.pem"
    return str(candidate) if candidate.is_file() else None


def dev_token(settings: Settings) -> str:
    from gateway.auth.tokens import mint_dev_token

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "chat"
    try:
        return mint_dev_token(settings, sub=user, org=None, scope="chat models:read", ttl_seconds=8 * 3600)
    except FileNotFoundError as exc:
        raise ChatError(
            f"no token given and no dev signing key ({exc.filename}): pass --token or set GATEWAY_TOKEN",
            fatal=True,
        ) from None


def _api_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def make_client(url: str, token: str, ca: str | None) -> openai.OpenAI:
    import openai

    verify: ssl.SSLContext | bool = True
    if ca:
        if not Path(ca).is_file():
            raise ChatError(f"CA file {ca} does not exist", fatal=True)
        verify = ssl.create_default_context(cafile=ca)
    http = openai.DefaultHttpxClient(verify=verify, timeout=openai.Timeout(600, connect=10))
    # No retries: a person is waiting, and a clear message now beats a silent backoff.
    return openai.OpenAI(base_url=_api_url(url), api_key=token, http_client=http, max_retries=0)


# -- errors -> one line ----------------------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message


def explain(exc: Exception, url: str) -> ChatError | None:
    """An SDK exception as one line (None: not an SDK error); address, certificate, token errors are fatal."""
    import openai

    if isinstance(exc, openai.APIConnectionError):
        for cause in _causes(exc):
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
                reason = getattr(cause, "verify_message", None) or "certificate verify failed"
                return ChatError(
                    f"the certificate of {url} is not trusted ({reason}): pass --ca <the CA that signed it>",
                    fatal=True,
                )
        if isinstance(exc, openai.APITimeoutError):
            return ChatError(f"{url} did not answer in time")
        return ChatError(f"cannot reach the gateway at {url}: is it running? ({_root(exc)})", fatal=True)
    if isinstance(exc, openai.AuthenticationError):
        return ChatError(f"the token was refused (401): {_server_message(exc)}", fatal=True)
    if isinstance(exc, openai.PermissionDeniedError):
        return ChatError(f"not allowed (403): {_server_message(exc)}")
    if isinstance(exc, openai.APIStatusError):
        return ChatError(f"{exc.status_code}: {_server_message(exc)}")
    if isinstance(exc, openai.APIError):
        return ChatError(f"error from the gateway: {exc.message}")
    return None


def _root(exc: BaseException) -> str:
    last = list(_causes(exc))[-1]
    return str(last) or type(last).__name__


# -- the loop --------------------------------------------------------------------------------------------


class _ReplyWriter:
    """A streamed reply as it arrives, trailing newlines held back so that it ends with exactly one."""

    def __init__(self, out: IO[str], *, blank_line_first: bool) -> None:
        self.out, self.blank_line_first = out, blank_line_first
        self.parts: list[str] = []
        self.pending = ""  # newlines not written yet: the reply may end here
        self.started = self.ended = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def write(self, piece: str) -> None:
        self.parts.append(piece)
        if not self.started:
            self.started = True
            if self.blank_line_first:
                self.out.write("\n")
        combined = self.pending + piece
        shown = combined.rstrip("\n")
        self.pending = combined[len(shown) :]
        if shown:
            self.out.write(shown)
            self.out.flush()

    def end(self) -> None:
        """The reply's one final newline (once; nothing when no text arrived)."""
        if self.started and not self.ended:
            self.ended = True
            self.out.write("\n")
            self.out.flush()


@dataclass
class Chat:
    client: openai.OpenAI
    session: ChatSession
    url: str
    out: IO[str]
    err: IO[str]
    temperature: float | None = None
    max_tokens: int | None = None
    separate: bool = False  # a blank line between replies (piped input: no prompt shows where one starts)
    replies: int = 0
    embedders: frozenset[str] = frozenset()  # /v1/models lists embedding models too; they cannot chat

    def say(self, text: str) -> None:
        """Stream one reply; remember the turn only if it completed.

        A reply always ends with exactly one newline, also when it stops early (Ctrl-C, an error mid-stream),
        so what comes next starts on a line of its own; with `separate` a blank line precedes every reply
        after the first, so successive replies to piped lines never run together."""
        import openai

        messages: Any = self.session.messages(text)
        stream = self.client.chat.completions.create(
            model=self.session.model,
            messages=messages,
            stream=True,
            temperature=openai.omit if self.temperature is None else self.temperature,
            max_tokens=openai.omit if self.max_tokens is None else self.max_tokens,
        )
        reply = _ReplyWriter(self.out, blank_line_first=self.separate and self.replies > 0)
        try:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        reply.write(choice.delta.content)
            reply.write("")  # a reply with no text is still a line of its own
        except KeyboardInterrupt:
            stream.close()
            reply.end()
            self.out.write("[stopped]\n")
            self.out.flush()
            return
        finally:
            reply.end()  # after an error mid-stream too: the error line never lands on the reply's line
        self.replies += 1
        self.session.remember(text, reply.text)

    def model_ids(self) -> list[str]:
        return [m.id for m in self.client.models.list().data if m.id not in self.embedders]

    def switch_model(self, model: str) -> None:
        import openai

        # A token without models:read can still chat; then the next turn says whether the id is right.
        with contextlib.suppress(openai.PermissionDeniedError):
            model = self.client.models.retrieve(model).id
        self.session.model = model
        self.out.write(f"model: {model}\n")

    def handle(self, command: Command) -> bool:
        """Act on one input line; False ends the session."""
        if command.name == "exit":
            return False
        if command.name == "say":
            self.say(command.arg)
        elif command.name == "model":
            if command.arg:
                self.switch_model(command.arg)
            else:
                self.out.write(f"model: {self.session.model}\n")
        elif command.name == "models":
            for model_id in self.model_ids():
                self.out.write(f"{'*' if model_id == self.session.model else ' '} {model_id}\n")
        elif command.name == "system":
            if command.arg == "-":
                self.session.system = ""
                self.out.write("system prompt cleared\n")
            elif command.arg:
                self.session.system = command.arg
                self.out.write("system prompt set\n")
            else:
                self.out.write(f"system: {self.session.system or '(none)'}\n")
        elif command.name == "clear":
            self.session.clear()
            self.out.write("conversation cleared\n")
        elif command.name == "help":
            self.out.write(HELP + "\n")
        elif command.name == "unknown":
            self.out.write(f"unknown command /{command.arg}; /help lists the commands\n")
        return True


def _lines(stdin: IO[str], out: IO[str], interactive: bool) -> Iterator[str]:
    """Input lines until end of input.  On a terminal, Ctrl-C drops the line being typed."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                out.write("\n")
                return
            except KeyboardInterrupt:
                out.write("\n(Ctrl-D or /exit to leave)\n")
                continue
            yield line
        else:
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                return
            if not line:
                return
            yield line


def run(args: argparse.Namespace, *, stdin: IO[str] | None = None, out: IO[str] | None = None) -> int:
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    err = sys.stderr
    interactive = stdin is sys.stdin and sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  - line editing and history for input()
    settings = load_settings(args.config)
    url = args.url or default_url(settings)
    try:
        ca = args.ca or (default_ca(settings) if url.startswith("https") else None)
        client = make_client(url, args.token or dev_token(settings), ca)
        chat = Chat(client, ChatSession(model=""), url, out, err, args.temperature, args.max_tokens)
        chat.session.system = args.system
        chat.embedders = frozenset(settings.embeddings.names())
        try:
            models = chat.model_ids()  # one call proves the address, the certificate and the token
        except Exception as exc:
            problem = explain(exc, url)
            if problem is None:
                raise
            if problem.fatal or not args.model:
                raise problem from None
            models = []
        chat.session.model = args.model or (models[0] if models else "")
        if not chat.session.model:
            raise ChatError("the gateway lists no models", fatal=True)
        if args.model and models and args.model not in models:
            raise ChatError(f"model {args.model!r} is not available; this token can use: {', '.join(models)}")
    except ChatError as exc:
        err.write(f"gateway chat: {exc}\n")
        return 2
    if interactive:
        out.write(f"chatting with {chat.session.model} at {url} (/help for commands, Ctrl-D to leave)\n")
    chat.separate = not interactive
    failed = False  # piped input: any error makes the exit status 2 (the remaining lines are still sent)
    for line in _lines(stdin, out, interactive):
        try:
            if not chat.handle(parse_command(line)):
                break
        except ChatError as exc:
            failed = True
            out.flush()
            err.write(f"gateway chat: {exc}\n")
            err.flush()
        except KeyboardInterrupt:  # before the first token arrived; once streaming, say() handles it
            out.write("\n[stopped]\n")
        except Exception as exc:
            problem = explain(exc, url)
            if problem is None:
                raise
            failed = True
            out.flush()
            err.write(f"gateway chat: {problem}\n")
            err.flush()
            if problem.fatal:
                return 2
    return 2 if failed and not interactive else 0
