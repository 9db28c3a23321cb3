"""One frozen settings tree, read from an optional TOML file and then from GATEWAY_* environment variables.

Every field carries its help text in `metadata["help"]`; `gateway config-reference` renders them, so the
README's configuration reference cannot drift from the code.  Environment variables name the path with
double underscores: `GATEWAY_SERVER__PORT=9443`, `GATEWAY_ENGINE__MAX_RUNNING=8`.  Base models are a table:
`[models.base] smollm2-135m-instruct = "/path/to/dir-or.gguf"` or `GATEWAY_MODELS__BASE='{"name": "/path"}'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.base_models import EMBEDDED_MODEL, base_model_sources
from contracts.embedding_models import EMBEDDED_EMBEDDING_MODEL, embedding_model_sources

__all__ = [
    "DEFAULT_MODEL",
    "METRICS_ACCESS",
    "MISSING_TENANT",
    "AuditSettings",
    "AuthSettings",
    "EmbeddingSettings",
    "EngineSettings",
    "FinetuneSettings",
    "LimitSettings",
    "ModelSettings",
    "PrivacySettings",
    "QuotaSettings",
    "ServerSettings",
    "Settings",
    "VllmSettings",
    "auto_value",
    "load_settings",
]

DEFAULT_MODEL = EMBEDDED_MODEL
METRICS_ACCESS = ("loopback", "token", "public")
MISSING_TENANT = ("reject", "subject")
QUANTIZATION = ("auto", "int4", "int8", "none")
BACKENDS = ("local", "vllm")
ENGINE_DEVICES = ("auto", "cpu", "cuda")

# Settings that were removed: naming one is an error that says what replaced it, never silently ignored.
_RETIRED = {
    "auth.metrics_public": 'replaced by auth.metrics_access = "loopback", "token" or "public" '
    '(metrics_public = true was "public", false was "token")',
}


def auto_value(value: int | str) -> int | None:
    """A setting that may be "auto": None for auto, else its number."""
    return None if value == "auto" else int(value)


def _auto_int(name: str, value: Any) -> int | str:
    """ "auto", or a whole number (from TOML, or a string from the environment)."""
    if value == "auto":
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be "auto" or a whole number, not {value!r}') from None
    if isinstance(value, bool) or number < 0 or str(number) != str(value).strip():
        raise ValueError(f'{name} must be "auto" or a whole number, not {value!r}')
    return number


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class ServerSettings:
    host: str = _f("127.0.0.1", "Address to listen on. Use 0.0.0.0 only behind the intranet firewall.")
    port: int = _f(8443, "TCP port.")
    tls_cert: str = _f("certs/server.pem", "Server certificate chain (PEM).")
    tls_key: str = _f("certs/server-key.pem", "Server private key (PEM).")
    plain_http: bool = _f(False, "Serve plain HTTP instead of HTTPS. Only for a TLS-terminating proxy.")
    max_body_bytes: int = _f(1_048_576, "Largest JSON request body; larger -> 413.")
    max_connections: int = _f(
        1024,
        "Open client connections at once; one past it gets a bare 503 and is closed before a request is "
        "read (logged as http.connection_refused; no request, so no audit record).",
    )
    max_connections_per_client: int = _f(
        256, "Open connections from one client address (a proxy counts as one); past it as max_connections."
    )
    header_timeout_seconds: float = _f(
        10.0,
        "Time for a request's headers to arrive, from the connection's start (or the next request's first "
        "byte); past it a bare 408 and the connection is closed (http.header_timeout; no request, no audit).",
    )
    body_timeout_seconds: float = _f(
        120.0,
        "Time for a request's whole body to arrive after its headers; past it 408 (audited) and the "
        "connection is closed. Raise it for large uploads over slow links.",
    )
    log_level: str = _f("info", "Application log level (logs never contain prompts or file content).")


@dataclass(frozen=True)
class ModelSettings:
    default: str = _f(DEFAULT_MODEL, "Model served when none is configured; also the engine's base model.")
    base: dict[str, str] = _f(
        {},
        "Extra base models: name -> local transformers directory or GGUF file. Never downloaded.",
    )
    dtype: str = _f(
        "auto",
        "Engine weight/KV-cache dtype: auto (bfloat16 on GPUs and CPUs with AVX512-BF16/AMX, else float32), "
        "float32, bfloat16 or float16.",
    )
    max_model_len: int = _f(2048, "Longest prompt + completion the engine holds for one sequence.")

    def names(self) -> list[str]:
        """Every base model's name, the default first (without looking at their files)."""
        return [self.default, *[name for name in self.base if name != self.default]]

    def sources(self) -> dict[str, Path]:
        """Every base model: name -> local directory or GGUF (the default first)."""
        return base_model_sources(self.default, self.base)


@dataclass(frozen=True)
class EngineSettings:
    device: str = _f(
        "auto",
        "Where the local engine serves: auto (the first CUDA GPU torch sees, else the CPU), cpu or cuda. On "
        "CUDA the weights, KV cache and adapters live on the GPU in models.dtype (auto: bfloat16) and "
        "attention runs on torch's SDPA kernels; cuda without a GPU is a start-up error.",
    )
    max_running: int | str = _f(
        "auto",
        "Sequences decoded together in one batch (continuous batching). auto: sized at start-up, as many as "
        "the KV cache budget holds at models.max_model_len (engine.memory_fraction), at most 32 per core "
        "on a CPU and 256 on a GPU. A number whose KV cache cannot fit is a start-up error.",
    )
    max_queued: int | str = _f(
        "auto", "Requests waiting for a slot; past this the API answers 429. auto: 4 x max_running."
    )
    prefill_token_budget: int | str = _f(
        "auto",
        "Prompt tokens prefilled together in one engine step. auto: 512 per core on a CPU (512..4096), "
        "4096 on a GPU.",
    )
    memory_fraction: float = _f(
        0.5,
        "Share of the memory free at start-up (host memory, cgroup limit aware, or the GPU's), after the "
        "weights and one step's activations, that the KV cache may take; the rest stays for the fine-tuning "
        "worker and the OS. The chosen sizes are logged (engine.sized) and exported as metrics.",
    )
    max_adapters: int = _f(8, "LoRA adapters kept loaded at once (least recently used are evicted).")
    default_max_tokens: int = _f(512, "Completion length when a request names none.")
    threads: int = _f(0, "torch intra-op threads for the engine; 0 = all cores.")
    quantization: str = _f(
        "auto",
        "Weight-only quantized copy of the weights for steps of at most quantized_max_rows rows, where "
        "decoding is bound by the bytes of weights read: int4 (groups of 32), int8 (per row) or none. auto = "
        "as many bits as the GGUF the model was converted from (int4 for Q4 files), none for other models. "
        "CPU only, with bfloat16 or float32 weights (models.dtype; fp32 steps hand the kernels bf16 "
        "activations).",
    )
    quantized_max_rows: int | str = _f(
        "auto",
        "Largest step (rows) the quantized copy serves; larger use dense ones. auto: 16 with bfloat16 "
        "weights (the int4 kernel's crossover with dense bf16 on AVX-512/AMX CPUs), 12 with float32 weights "
        "(CPUs without native bf16: on AVX2 int4 beats dense fp32 up to 12 rows and loses from 16).",
    )
    backend: str = _f(
        "local",
        "Which engine serves the base models: local (the gateway's own, in-process) or vllm (vLLM OpenAI "
        "servers, managed by the gateway or remote: see [vllm]).",
    )
    backends: dict[str, str] = _f(
        {}, "Per base model: name -> local or vllm, overriding engine.backend for that model."
    )

    def __post_init__(self) -> None:
        for name in ("max_running", "max_queued", "prefill_token_budget", "quantized_max_rows"):
            object.__setattr__(self, name, _auto_int(f"engine.{name}", getattr(self, name)))
        if self.device not in ENGINE_DEVICES:
            raise ValueError(f"engine.device must be one of {', '.join(ENGINE_DEVICES)}, not {self.device!r}")
        if self.quantization not in QUANTIZATION:
            raise ValueError(
                f"engine.quantization must be one of {', '.join(QUANTIZATION)}, not {self.quantization!r}"
            )
        for name, backend in {"engine.backend": self.backend, **self.backends}.items():
            if backend not in BACKENDS:
                raise ValueError(f"backend of {name} must be one of {', '.join(BACKENDS)}, not {backend!r}")

    def backend_of(self, model: str) -> str:
        """local or vllm for base model `model`."""
        return self.backends.get(model, self.backend)


@dataclass(frozen=True)
class VllmSettings:
    replicas: dict[str, list[str]] = _f(
        {},
        "Remote mode, per base model: name -> vLLM server URLs (http://host:port) serving that model under "
        "the same name; the least-loaded healthy one gets each request. Their hosts pass the egress guard. "
        "A vllm-backed model not listed here is managed: the gateway starts its vLLM server itself.",
    )
    python: str = _f(
        ".venv-vllm/bin/python",
        "Managed mode: the Python of the environment vLLM is installed in (`make vllm` makes .venv-vllm).",
    )
    port: int = _f(8600, "Managed mode: loopback port of the first managed vLLM server; the next models +1.")
    tensor_parallel_size: int = _f(1, "Managed mode: GPUs one model is split over (--tensor-parallel-size).")
    args: list[str] = _f(
        [],
        "Managed mode: more vLLM server arguments, passed through as given (e.g. --gpu-memory-utilization "
        "0.9 --max-num-seqs 256). Space-separated in the environment.",
    )
    startup_timeout_seconds: float = _f(
        600.0, "Managed mode: how long a starting vLLM server may take to answer /health before a retry."
    )
    max_lora_rank: int = _f(64, "Managed mode: largest LoRA rank vLLM accepts (--max-lora-rank).")
    enable_lora: bool = _f(
        True,
        "Managed mode: start vLLM with --enable-lora, so fine-tuned models are served on it. Off decodes the "
        "base model faster (vLLM's LoRA kernels cost every step, much on a CPU), and fine-tuned models fail.",
    )
    api_key_file: str = _f(
        "", "File holding the API key the vLLM servers require (sent as a Bearer token); empty: none."
    )
    health_interval_seconds: float = _f(
        2.0, "How often each replica's /health is probed; a failed one is re-probed as often."
    )
    connect_timeout_seconds: float = _f(5.0, "Connecting to a replica; past it the replica is taken out.")
    retry_after_seconds: int = _f(5, "Retry-After of the 503 answered while no replica is healthy.")

    def remote(self, model: str) -> bool:
        return model in self.replicas


@dataclass(frozen=True)
class EmbeddingSettings:
    embedded: bool = _f(
        True,
        f"Serve the embedded embedding model all-MiniLM-L6-v2 as {EMBEDDED_EMBEDDING_MODEL!r} (384 "
        "dimensions, inputs up to 256 tokens; unpacked once into the data dir on first use or by "
        "`gateway prepare`).",
    )
    models: dict[str, str] = _f(
        {},
        "Extra embedding models: name -> local sentence-transformers directory (pooling and normalization "
        "as its modules.json and 1_Pooling/config.json say). Never downloaded.",
    )
    max_batch: int = _f(32, "Inputs embedded together in one forward pass, across requests.")
    batch_wait_ms: float = _f(
        2.0, "How long an idle embedding engine waits for more inputs to join the first one's batch."
    )
    max_queued: int = _f(4096, "Inputs waiting for the embedding engine; past this the API answers 429.")
    max_inputs: int = _f(2048, "Largest list of inputs in one embeddings request (OpenAI's limit too).")
    threads: int = _f(0, "torch intra-op threads for the embedding engine; 0 = torch's default.")
    device: str = _f("cpu", "Embedding device: cpu or cuda (fp32 on either).")

    def sources(self) -> dict[str, Path]:
        """Every embedding model: name -> local directory, or the embedded zip."""
        return embedding_model_sources(self.embedded, self.models)

    def names(self) -> list[str]:
        """Every embedding model's name (without looking at its files)."""
        embedded = (
            [EMBEDDED_EMBEDDING_MODEL]
            if self.embedded and EMBEDDED_EMBEDDING_MODEL not in self.models
            else []
        )
        return [*embedded, *self.models]


@dataclass(frozen=True)
class LimitSettings:
    max_tokens_cap: int = _f(4096, "Largest max_tokens a request may ask for; more -> 400.")
    max_n: int = _f(8, "Largest n (choices per request).")
    max_prompts: int = _f(32, "Largest list of prompts in one legacy /v1/completions request.")
    requests_per_minute: int = _f(600, "Per-subject request rate; past it -> 429 with Retry-After.")
    tenant_concurrency: int | str = _f(
        "auto",
        "Requests one tenant may have in flight at once; past it -> 429. auto: 2 x the engine's max_running "
        "once the engine is sized (32 until then); 0 = no limit.",
    )
    max_upload_bytes: int = _f(64 * 1024 * 1024, "Largest uploaded file; larger -> 413, nothing kept.")
    unauthenticated_per_minute: int = _f(
        60,
        "Requests without a valid token one client address may make per minute (a token bucket); past it "
        "429 with Retry-After and no audit record of its own: one `auth.unauthenticated_flood` record per "
        "address and window counts them. 0 = no limit.",
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "tenant_concurrency", _auto_int("limits.tenant_concurrency", self.tenant_concurrency)
        )


@dataclass(frozen=True)
class QuotaSettings:
    stored_bytes: int = _f(
        10 * 1024**3,
        "Bytes one tenant may keep on disk: its files (uploads, job results) plus its fine-tuned models' "
        "adapters (every checkpoint export and final adapter). An upload past it -> 403 quota_exceeded, "
        "nothing kept; at or past it a new fine-tuning job -> 403 too. 0 = no limit.",
    )
    files: int = _f(1000, "Uploaded files one tenant may keep; one more -> 403 quota_exceeded. 0 = no limit.")
    running_jobs: int = _f(
        1,
        "Fine-tuning jobs of one tenant the workers run at once; the tenant's next job waits queued while "
        "other tenants' jobs may start. 0 = no limit.",
    )
    queued_jobs: int = _f(
        8,
        "Fine-tuning jobs one tenant may have waiting (validating_files or queued); one more -> 429 "
        "quota_exceeded with Retry-After. 0 = no limit.",
    )
    tokens_per_minute: int = _f(
        1_000_000,
        "Prompt + completion tokens one tenant may use per minute (a token bucket refilled continuously; a "
        "request is charged its real usage when it ends); while the bucket is empty -> 429 with Retry-After. "
        "0 = no limit.",
    )


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = _f(
        True, "Require a Bearer JWT on every route but /healthz, /readyz (and /metrics: metrics_access)."
    )
    issuer: str = _f("privacy-gateway-dev", "Required `iss` claim (exact match).")
    audience: str = _f("privacy-gateway", "Required `aud` claim (exact match).")
    algorithms: list[str] = _f(["EdDSA"], "Accepted JWT algorithms; bound to the configured key type.")
    public_key_file: str = _f("", "Verification key: PEM public key. Empty: <data_dir>/keys/jwt-public.pem.")
    jwks_file: str = _f("", "Verification keys: a local JWKS file (never fetched). Overrides the PEM.")
    hs256_secret_file: str = _f("", "Development only: an HS256 shared secret file. Overrides both.")
    private_key_file: str = _f(
        "", "Dev signing key for `gateway token`. Empty: <data_dir>/keys/jwt-private.pem."
    )
    leeway_seconds: int = _f(30, "Clock skew allowed on exp/nbf/iat.")
    missing_tenant: str = _f(
        "reject",
        "A token without an `org` (tenant) claim: reject (401) or subject (its own tenant `user:<sub>`, a "
        "namespace no organisation can enter: an `org` holding ':' is refused). `gateway token` without "
        "--org sets org to the subject.",
    )
    revocation_file: str = _f(
        "",
        "Revoked tokens (`gateway revoke`), re-read on change. Empty: <data_dir>/keys/revoked-tokens.json.",
    )
    metrics_access: str = _f(
        "loopback",
        "Who may scrape /metrics: loopback (no token from 127.0.0.0/8 or ::1 unless the request came through "
        "a proxy, else a token with `admin`), token (always a token with `admin`) or public (anyone: only "
        "for a firewalled scrape network).",
    )

    def __post_init__(self) -> None:
        if self.metrics_access not in METRICS_ACCESS:
            raise ValueError(
                f"auth.metrics_access must be one of {', '.join(METRICS_ACCESS)}, not {self.metrics_access!r}"
            )
        if self.missing_tenant not in MISSING_TENANT:
            raise ValueError(
                f"auth.missing_tenant must be one of {', '.join(MISSING_TENANT)}, not {self.missing_tenant!r}"
            )


@dataclass(frozen=True)
class AuditSettings:
    path: str = _f("audit/audit.jsonl", "Audit log (JSON Lines), relative to the data dir.")
    key_file: str = _f(
        "", "HMAC key for the audit chain, kept apart from the log. Empty: <data_dir>/keys/audit.key."
    )
    probe_seconds: float = _f(
        2.0,
        "Fail closed: after a failed audit append (disk full, I/O error) every request gets 503 "
        'audit_unavailable and /readyz says "audit": false; this often the gateway tries to append an '
        "`audit.recovered` record, and serves again once it is written.",
    )


@dataclass(frozen=True)
class PrivacySettings:
    encrypt_at_rest: bool = _f(False, "Encrypt uploaded files, adapters and checkpoints (AES-256-GCM).")
    master_key_file: str = _f(
        "", "Master key wrapping per-file data keys. Empty: <data_dir>/keys/master.key."
    )
    master_key_env: str = _f(
        "GATEWAY_MASTER_KEY", "Env var holding the master key (base64); wins over the file."
    )
    tmp_sweep_seconds: float = _f(
        600.0,
        "How often <data_dir>/tmp (uploads being staged, decrypted copies) is swept, besides at every start; "
        "0 sweeps only at start.",
    )
    tmp_max_age_seconds: float = _f(
        300.0,
        "A file in <data_dir>/tmp untouched this long is removed by the sweep (longer than an upload's body "
        "timeout and a job lease, so nothing in use goes).",
    )
    block_egress: bool = _f(
        True,
        "Refuse, in-process, every outbound connection and DNS lookup past loopback and egress_allow "
        "(`gateway serve` and the fine-tuning worker). Keep a host firewall too.",
    )
    egress_allow: list[str] = _f(
        [],
        "Extra destinations when block_egress is on: IPs, CIDRs (10.20.0.0/16) or exact host names "
        "(an intranet IdP, a vLLM backend). Comma- or space-separated in the environment.",
    )


@dataclass(frozen=True)
class FinetuneSettings:
    run_worker: bool = _f(True, "`gateway serve` also starts one fine-tuning worker process.")
    poll_seconds: float = _f(1.0, "How often an idle worker looks for queued jobs.")
    device: str = _f("auto", "Training device: auto, cpu, cuda.")
    max_train_rows: int = _f(100_000, "Largest training file in rows.")
    keep_checkpoints: int = _f(
        2,
        "Checkpoints a job keeps, the newest: trainer checkpoints (adapter + optimizer state) in its work "
        "dir and their exports under adapters/ (the servable :ckpt-step-N models; an older one loses its "
        "model and checkpoint rows, then its files). 0 = keep all.",
    )
    max_lora_rank: int = _f(64, "Largest lora_rank a job may ask for; more -> 400 (a rank's cost is linear).")
    max_checkpoints_per_job: int = _f(
        100,
        "Floor on save_steps: a job may save at most this many checkpoints, so save_steps must be at least "
        "its total steps / this (0 = only the last is always allowed); less -> 400.",
    )
    max_record_bytes: int = _f(
        1_048_576, "Largest single record (one JSONL line or one element of a JSON array) of a training file."
    )


@dataclass(frozen=True)
class Settings:
    data_dir: str = _f("data", "Everything the service writes lives here (mode 0700).")
    server: ServerSettings = field(default_factory=ServerSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    embeddings: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    vllm: VllmSettings = field(default_factory=VllmSettings)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def key_path(self, configured: str, default_name: str) -> Path:
        """A configured key path, or the default file under <data_dir>/keys/."""
        return Path(configured) if configured else self.data_path / "keys" / default_name

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if kind is bool:
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    if origin is dict:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    if origin is list:
        return [part for part in raw.replace(",", " ").split() if part]
    return raw


def _build(cls: type, values: dict[str, Any], env: dict[str, str], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        env_name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            section = values.get(f.name, {})
            if not isinstance(section, dict):
                raise ValueError(f"[{f.name}] must be a table")
            kwargs[f.name] = _build(kind, section, env, f"{env_name}__")
            continue
        if env_name in env:
            try:
                kwargs[f.name] = _coerce(env[env_name], kind)
            except ValueError as exc:
                raise ValueError(f"{env_name}: {exc}") from exc
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    return cls(**kwargs)


def load_settings(config_file: str | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file (GATEWAY_CONFIG or the argument), then GATEWAY_* variables."""
    env = dict(os.environ if env is None else env)
    path = config_file or env.get("GATEWAY_CONFIG")
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    _refuse_retired(values, env)
    settings: Settings = _build(Settings, values, env, "GATEWAY_")
    return settings


def _refuse_retired(values: dict[str, Any], env: dict[str, str]) -> None:
    for name, replacement in _RETIRED.items():
        section, _, leaf = name.rpartition(".")
        table = values.get(section, {}) if section else values
        env_name = "GATEWAY_" + name.upper().replace(".", "__")
        if (isinstance(table, dict) and leaf in table) or env_name in env:
            raise ValueError(f"{name} ({env_name}) is no longer read: {replacement}")


def iter_fields(cls: type = Settings, prefix: str = "") -> typing.Iterator[tuple[str, Any, str, str]]:
    """(dotted name, default, type, help) for every leaf setting, for the configuration reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            yield from iter_fields(kind, f"{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        type_name = (
            kind.__name__
            if isinstance(kind, type) and not isinstance(kind, types.GenericAlias)
            else str(kind)
        )
        yield name, default, type_name, f.metadata.get("help", "")
