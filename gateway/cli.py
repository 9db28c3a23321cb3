"""`gateway` — one entry point for operators.

gateway serve              run the HTTPS gateway (and a fine-tuning worker unless disabled)
gateway prepare            convert the configured GGUF base models once and create dev keys
gateway token              mint a dev JWT:  gateway token --sub alice --org acme --scope "chat models:read"
gateway keys               create a signing key pair (ed25519 | rsa | ec)
gateway chat               interactive chat with a running gateway (streams; /help inside)
gateway audit verify       check the audit log's hash chain; names the first bad line
gateway config-reference   print every setting with its default and help (Markdown)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from gateway.audit.log import AuditChainBroken, AuditLogBusy
from gateway.private_files import ensure_private_dir, restrict_umask
from gateway.settings import Settings, iter_fields, load_settings

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_prepare(args: argparse.Namespace) -> int:
    from finetune.base_model import base_model_sources, prepare
    from gateway.auth.keys import ensure_dev_keys

    settings = _settings(args)
    ensure_private_dir(settings.data_path)
    for path in ensure_dev_keys(settings).created:
        print(f"created {path}")
    for name, source in base_model_sources(settings).items():
        print(f"model {name}: {prepare(name, source, settings.data_path)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ssl

    import uvicorn

    from gateway.app import create_app
    from gateway.auth.keys import ensure_dev_keys
    from gateway.egress import install_from_settings
    from gateway.logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.server.log_level)
    # Before anything loads a model or opens a client: nothing past loopback and privacy.egress_allow.
    guard = install_from_settings(settings)
    ensure_private_dir(settings.data_path)
    ensure_dev_keys(settings)
    server = settings.server
    tls = {} if server.plain_http else {"ssl_certfile": server.tls_cert, "ssl_keyfile": server.tls_key}
    if not server.plain_http:
        for path in (server.tls_cert, server.tls_key):
            if not Path(path).is_file():
                print(
                    f"TLS file {path} is missing: run `make certs` (or set server.plain_http behind a proxy)",
                    file=sys.stderr,
                )
                return 2
    config = uvicorn.Config(
        create_app(settings),
        host=server.host,
        port=server.port,
        log_config=None,
        access_log=False,  # the audit log records every request; access logs would duplicate it
        server_header=False,
        timeout_graceful_shutdown=10,
        # uvloop opens sockets in C, out of the guard's reach; the asyncio loop goes through `socket`.
        loop="asyncio" if guard is not None else "auto",
        **tls,  # type: ignore[arg-type]
    )
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    worker = _start_worker(args, settings)
    try:
        uvicorn.Server(config).run()
    finally:
        if worker is not None:
            _stop_worker(worker)
    return 0


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets the worker hand its job back (it resumes from the last checkpoint); kill if it hangs."""
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _start_worker(args: argparse.Namespace, settings: Settings) -> subprocess.Popen[bytes] | None:
    """The fine-tuning worker runs as its own process: it owns the training device, and a crash there never
    takes the gateway down."""
    if not settings.finetune.run_worker or args.no_worker:
        return None
    try:
        import finetune.worker  # noqa: F401
    except ImportError:
        return None
    command = [sys.executable, "-m", "finetune.worker"]
    if args.config:
        command += ["--config", args.config]
    return subprocess.Popen(command)


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth.tokens import mint_dev_token, parse_ttl

    settings = _settings(args)
    print(
        mint_dev_token(
            settings, sub=args.sub, org=args.org, scope=args.scope, ttl_seconds=parse_ttl(args.ttl)
        )
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.auth.keys import generate_keypair

    private, public = generate_keypair(args.kind, Path(args.out), name=args.name)
    print(f"wrote {private} (keep secret) and {public} (configure as auth.public_key_file)")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.log import read_key
    from gateway.audit.verify import format_result, verify_chain

    settings = _settings(args)
    path = Path(args.log) if args.log else settings.data_path / settings.audit.path
    result = verify_chain(path, read_key(settings.key_path(settings.audit.key_file, "audit.key")))
    print(format_result(result, path))
    return 0 if result.ok else 1


def cmd_chat(args: argparse.Namespace) -> int:
    from gateway.chat_cli import run

    return run(args)


def cmd_config_reference(args: argparse.Namespace) -> int:
    print("| setting | environment variable | default | meaning |\n|---|---|---|---|")
    for name, default, _kind, help_text in iter_fields():
        env = "GATEWAY_" + name.upper().replace(".", "__")
        shown = f"`{default!r}`" if not isinstance(default, str) else f"`{default}`" if default else '`""`'
        print(f"| `{name}` | `{env}` | {shown} | {help_text} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML settings file (or GATEWAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTPS gateway")
    serve.add_argument("--no-worker", action="store_true", help="do not start a fine-tuning worker")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("prepare", help="convert base models once and create dev keys").set_defaults(
        func=cmd_prepare
    )

    token = sub.add_parser("token", help="mint a dev JWT with the local signing key")
    token.add_argument("--sub", required=True)
    token.add_argument("--org", default=None, help="tenant (defaults to the subject)")
    token.add_argument("--scope", default="models:read chat", help='space-separated, e.g. "chat models:read"')
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 30m, 1h, 7d")
    token.set_defaults(func=cmd_token)

    keys = sub.add_parser("keys", help="create a signing key pair")
    keys.add_argument("--kind", choices=["ed25519", "rsa", "ec"], default="ed25519")
    keys.add_argument("--out", default=".")
    keys.add_argument("--name", default="jwt")
    keys.set_defaults(func=cmd_keys)

    from gateway.chat_cli import add_arguments as add_chat_arguments

    chat = sub.add_parser("chat", help="interactive chat with a running gateway")
    add_chat_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain")
    verify.add_argument("--log", help="audit log path (default: <data_dir>/<audit.path>)")
    verify.set_defaults(func=cmd_audit_verify)

    sub.add_parser("config-reference", help="print the settings reference").set_defaults(
        func=cmd_config_reference
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    restrict_umask()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, FileExistsError, ValueError, AuditChainBroken, AuditLogBusy) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
