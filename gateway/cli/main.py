"""`gateway` — one entry point for operators.

gateway serve              run the HTTPS gateway (and a fine-tuning worker unless disabled)
gateway prepare            convert the GGUF base models, unpack the embedded embedding model, create dev keys
gateway token              mint a dev JWT:  gateway token --sub alice --org acme --scope "chat models:read"
gateway revoke             revoke a token (--token JWT | --jti ID) or every token of a subject (--sub S)
gateway keys               create a signing key pair (ed25519 | rsa | ec)
gateway keys rotate-master re-encrypt every encrypted file under a new master key (service stopped)
gateway chat               interactive chat with a running gateway (streams; /help inside)
gateway audit verify       check the audit log's hash chain; names the first bad line
gateway audit restart-chain  archive a damaged audit log as evidence and start a new chain (service stopped)
gateway config-reference   print every setting with its default and help (Markdown)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from jwt import PyJWTError

from contracts.private_files import ensure_private_dir, restrict_umask
from gateway.audit.log import AuditChainBroken, AuditLogBusy
from gateway.core.settings import Settings, iter_fields, load_settings
from gateway.core.worker_supervisor import WorkerSupervisor

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_prepare(args: argparse.Namespace) -> int:
    from contracts.base_models import prepare
    from contracts.embedding_models import prepare_embedding_model
    from gateway.auth.keys import ensure_dev_keys

    settings = _settings(args)
    ensure_private_dir(settings.data_path)
    for path in ensure_dev_keys(settings).created:
        print(f"created {path}")
    for name, source in settings.models.sources().items():
        print(f"model {name}: {prepare(name, source, settings.data_path)}")
    for name, source in settings.embeddings.sources().items():
        print(f"embedding model {name}: {prepare_embedding_model(name, source, settings.data_path)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ssl

    import uvicorn

    from gateway.app import create_app
    from gateway.auth.keys import ensure_dev_keys
    from gateway.core.logs import configure_logging
    from gateway.security.egress import install_from_settings
    from gateway.security.slow_clients import bounded_protocol

    settings = _settings(args)
    configure_logging(settings.server.log_level)
    # Before anything loads a model or opens a client: nothing past loopback and privacy.egress_allow.
    guard = install_from_settings(settings)
    ensure_private_dir(settings.data_path)
    ensure_dev_keys(settings)
    server_settings = settings.server
    tls = (
        {}
        if server_settings.plain_http
        else {"ssl_certfile": server_settings.tls_cert, "ssl_keyfile": server_settings.tls_key}
    )
    if not server_settings.plain_http:
        for path in (server_settings.tls_cert, server_settings.tls_key):
            if not Path(path).is_file():
                print(
                    f"TLS file {path} is missing: run `make certs` (or set server.plain_http behind a proxy)",
                    file=sys.stderr,
                )
                return 2
    engine_failed = False
    server: uvicorn.Server | None = None

    def on_engine_failed() -> None:  # exit non-zero so systemd / the container runtime restarts us
        nonlocal engine_failed
        engine_failed = True
        if server is not None:
            server.should_exit = True

    app = create_app(settings, worker=_worker_supervisor(args, settings), on_engine_failed=on_engine_failed)
    config = uvicorn.Config(
        app,
        host=server_settings.host,
        port=server_settings.port,
        log_config=None,
        access_log=False,  # the audit log records every request; access logs would duplicate it
        server_header=False,
        timeout_graceful_shutdown=10,
        # Connection cap and header deadline (gateway/security/slow_clients.py; the body deadline is in the
        # app); no WebSockets: a handshake is served as a plain, audited HTTP request.
        http=bounded_protocol(server_settings),
        ws="none",
        # uvloop opens sockets in C, out of the guard's reach; the asyncio loop goes through `socket`.
        loop="asyncio" if guard is not None else "auto",
        **tls,  # type: ignore[arg-type]
    )
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    server = uvicorn.Server(config)
    server.run()
    if engine_failed:
        print("gateway: the engine failed and could not be rebuilt; exiting to be restarted", file=sys.stderr)
        return 1
    return 0


def _worker_supervisor(args: argparse.Namespace, settings: Settings) -> WorkerSupervisor | None:
    """The fine-tuning worker runs as its own process: it owns the training device, and a crash there never
    takes the gateway down.  The supervisor starts it with the app and restarts it when it dies."""
    if not settings.finetune.run_worker or args.no_worker:
        return None
    if importlib.util.find_spec("finetune") is None:  # a gateway-only install: no worker to run
        return None
    command = [sys.executable, "-m", "finetune.worker"]
    if args.config:
        command += ["--config", args.config]
    return WorkerSupervisor(command)


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth.tokens import mint_dev_token, parse_ttl

    settings = _settings(args)
    print(
        mint_dev_token(
            settings, sub=args.sub, org=args.org, scope=args.scope, ttl_seconds=parse_ttl(args.ttl)
        )
    )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    import time

    import jwt

    from gateway.auth.revocations import RevocationList

    settings = _settings(args)
    revocations = RevocationList(
        settings.key_path(settings.auth.revocation_file, "revoked-tokens.json"),
        leeway_seconds=settings.auth.leeway_seconds,
    )
    if args.sub:
        revocations.revoke_subject(args.sub)
        print(
            f"revoked every token of subject {args.sub!r} issued until now "
            f"(and up to {revocations.leeway_seconds} s ahead, the clock leeway)"
        )
    else:
        jti, expires = args.jti, int(time.time()) + 366 * 86400  # no exp known: keep it a year
        if args.token:  # read, not verified: revoking a forged token only lists an id nobody holds
            claims = jwt.decode(args.token, options={"verify_signature": False})
            jti = claims.get("jti")
            if not isinstance(jti, str) or not jti:
                raise ValueError("the token has no `jti` claim: revoke its subject with --sub instead")
            expires = int(claims.get("exp", expires))
        revocations.revoke_token(jti, expires)
        print(f"revoked token {jti}")
    tokens, subjects = revocations.counts()
    print(f"in force: {tokens} revoked tokens, {subjects} revoked subjects ({revocations.path})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.auth.keys import generate_keypair

    private, public = generate_keypair(args.kind, Path(args.out), name=args.name)
    print(f"wrote {private} (keep secret) and {public} (configure as auth.public_key_file)")
    return 0


@contextlib.contextmanager
def _service_stopped(settings: Settings) -> Iterator[None]:
    """Refuse while a gateway or worker on this host uses the data dir; hold the gateway off until done.

    The gateway holds an flock on its audit log and each worker one on its slot file (workers/*.lock) for as
    long as it runs; taking them shows that none runs.  The audit log's lock is kept for the block, so a
    gateway started meanwhile fails at start-up instead of sealing files under the key being retired.
    """
    audit = Path(settings.audit.path)
    audit = audit if audit.is_absolute() else settings.data_path / audit
    held: list[int] = []
    try:
        for path in [audit, *sorted((settings.data_path / "workers").glob("*.lock"))]:
            if not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = "the gateway" if path == audit else "a fine-tuning worker"
                raise ValueError(f"{who} is running ({path} is locked): stop the service first") from None
        yield
    finally:
        for fd in held:
            os.close(fd)


def cmd_keys_rotate_master(args: argparse.Namespace) -> int:
    from gateway.security.master_key import read_key_file, rotate_master_key

    settings = _settings(args)
    if not settings.privacy.encrypt_at_rest:
        raise ValueError("privacy.encrypt_at_rest is off: there is no master key to rotate")
    owner = settings.data_path.stat().st_uid
    if owner != os.geteuid():
        raise ValueError(
            f"run this as the data dir's owner (uid {owner}, e.g. sudo -u privacy-gateway): files rewritten "
            "by another user would be unreadable to the service"
        )
    new_key = read_key_file(Path(args.new_key_file)) if args.new_key_file else None
    try:
        with _service_stopped(settings):
            done = rotate_master_key(settings, new_key=new_key, keep_old=args.keep_old)
    except PermissionError as exc:
        raise ValueError(
            f"cannot read or replace {exc.filename}: run this as the service user, who must own the data dir"
        ) from None
    report, env = done.report, settings.privacy.master_key_env
    print(
        f"{'finished the interrupted' if done.resumed else 'master key'} rotation: new key id {report.key_id}"
    )
    print(f"  {report.rewritten} files re-encrypted, {report.skipped} already under the new key (skipped)")
    for path in report.unknown:
        print(f"  left alone, sealed under a key this run does not hold: {path}", file=sys.stderr)
    for path in report.failed:
        print(f"  did not verify (tampered or cut), left as it was: {path}", file=sys.stderr)
    if report.failed:
        old = f"leave {env} as it is" if done.from_env else f"the old key stays in {done.retired_key}"
        print(
            f"{old}: move the files named above out of the data dir (or restore them from a backup), then run"
            " the command again to finish",
            file=sys.stderr,
        )
        return 1
    if done.from_env:
        print(f"  now set {env} to `base64 -w0 {args.new_key_file}` before starting the service again")
    elif done.retired_key is not None:
        print(f"  the old key is kept in {done.retired_key}: move it offline, with backups made before now")
    else:
        print("  the old key file was removed")
    return 0


AUDIT_VERIFY_EXIT = {"intact": 0, "tampered": 1, "incomplete": 3}  # 2: nothing recorded there, or usage


def _audit_log_path(settings: Settings) -> Path:
    path = Path(settings.audit.path)
    return path if path.is_absolute() else settings.data_path / path


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.log import read_key
    from gateway.audit.verify import NoAuditLog, format_result, verify_chain

    settings = _settings(args)
    path = Path(args.log) if args.log else _audit_log_path(settings)
    key = read_key(settings.key_path(settings.audit.key_file, "audit.key"))
    try:
        result = verify_chain(path, key, head_path=Path(args.head) if args.head else None)
    except NoAuditLog as exc:
        print(f"gateway audit verify: {exc}", file=sys.stderr)
        return 2
    print(format_result(result, path))
    return AUDIT_VERIFY_EXIT[result.verdict]


def cmd_audit_restart_chain(args: argparse.Namespace) -> int:
    from gateway.audit.log import read_key
    from gateway.audit.restart import ChainIntact, restart_chain
    from gateway.audit.verify import NoAuditLog

    settings = _settings(args)
    path = _audit_log_path(settings)
    key = read_key(settings.key_path(settings.audit.key_file, "audit.key"))
    try:
        done = restart_chain(path, key)
    except (ChainIntact, NoAuditLog) as exc:
        print(f"gateway audit restart-chain: {exc}", file=sys.stderr)
        return 1
    first = done.first_record
    print(f"damage found: {done.damage}")
    print(f"archived as evidence (moved, not changed): {done.archive}/")
    head = (
        f"the old head (seq {first['previous_head_seq']}, mac {first['previous_head_mac'][:16]}...)"
        if "previous_head_seq" in first
        else "no verifiable old head"
    )
    print(
        f"new chain started at {path}: record 1 ({first.get('action')}) names {head}, "
        f"{first.get('previous_records')} record(s) verified before the damage, and the damage"
    )
    print("the gateway can start again; keep the archive (and a copy off this machine) as evidence")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gateway.cli.chat import run

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

    sub.add_parser(
        "prepare", help="convert base models, unpack embedding models, create dev keys"
    ).set_defaults(func=cmd_prepare)

    token = sub.add_parser("token", help="mint a dev JWT with the local signing key")
    token.add_argument("--sub", required=True)
    token.add_argument("--org", default=None, help="tenant, the org claim (defaults to the subject)")
    token.add_argument(
        "--scope",
        default="models:read chat",
        help="space-separated, from: models:read chat embeddings files:read files:write fine_tuning:read "
        'fine_tuning:write admin (e.g. "chat embeddings models:read")',
    )
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 30m, 1h, 7d")
    token.set_defaults(func=cmd_token)

    revoke = sub.add_parser("revoke", help="revoke a token, or every token of a subject, before it expires")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--token", help="the token itself (its jti and exp are read from it)")
    which.add_argument("--jti", help="a token id (the `jti` claim)")
    which.add_argument("--sub", help="a subject: every token it holds now stops working")
    revoke.set_defaults(func=cmd_revoke)

    keys = sub.add_parser("keys", help="create a signing key pair; rotate the master key")
    keys.add_argument("--kind", choices=["ed25519", "rsa", "ec"], default="ed25519")
    keys.add_argument("--out", default=".")
    keys.add_argument("--name", default="jwt")
    keys.set_defaults(func=cmd_keys)
    keys_sub = keys.add_subparsers(dest="keys_command")  # none given: the signing key pair, as before
    rotate = keys_sub.add_parser(
        "rotate-master", help="re-encrypt every encrypted file under a new master key (service stopped)"
    )
    rotate.add_argument(
        "--new-key-file",
        help="the new key (32 bytes or base64) instead of a random one; required when the "
        "master key is in the environment",
    )
    rotate.add_argument(
        "--keep-old",
        action="store_true",
        help="keep the old key as <key file>.retired-<id> instead of removing it",
    )
    rotate.set_defaults(func=cmd_keys_rotate_master)

    from gateway.cli.chat import add_arguments as add_chat_arguments

    chat = sub.add_parser("chat", help="interactive chat with a running gateway")
    add_chat_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain")
    verify.add_argument("--log", help="audit log path (default: <data_dir>/<audit.path>)")
    verify.add_argument("--head", help="its head file, when not beside it as <log>.head")
    verify.epilog = (
        "exit status: 0 intact, 1 tampered, 2 nothing recorded at that path (no log, or an empty one, and no "
        "head file), 3 incomplete (head file missing)"
    )
    verify.set_defaults(func=cmd_audit_verify)
    restart = audit_sub.add_parser(
        "restart-chain",
        help="archive a damaged log as evidence and start a new chain naming the damage (service stopped)",
    )
    restart.epilog = (
        "exit status: 0 restarted, 1 refused (the chain is intact, or nothing was recorded), 2 the gateway "
        "is running, or another error"
    )
    restart.set_defaults(func=cmd_audit_restart_chain)

    sub.add_parser("config-reference", help="print the settings reference").set_defaults(
        func=cmd_config_reference
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    restrict_umask()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (
        FileNotFoundError,
        FileExistsError,
        ValueError,
        AuditChainBroken,
        AuditLogBusy,
        PyJWTError,
    ) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
