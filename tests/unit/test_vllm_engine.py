"""The vLLM engine against a fake vLLM (tests/unit/fake_vllm.py): translation both ways, errors, the replica
pool (least loaded, taken out, re-probed, 503 + Retry-After), adapters on every replica, and the real app
serving chat through it.  The real vLLM is exercised in tests/e2e/test_vllm.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app, services_of
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest, NotFound
from gateway.core.settings import EngineSettings, LimitSettings, Settings, VllmSettings, load_settings
from gateway.engine.base import ChatMessage, ChoiceDelta, GenerationRequest, SamplingParams
from gateway.engine.factory import build_vllm_engine
from gateway.engine.vllm import server as server_module
from gateway.engine.vllm.engine import VllmEngine
from gateway.engine.vllm.pool import ReplicaPool
from gateway.engine.vllm.server import ManagedServer, server_command
from gateway.engine.vllm.translate import request_body
from gateway.security.egress import vllm_hosts
from tests.spec import validate
from tests.unit.fake_vllm import PROMPT_TOKENS, Fleet

BASE = "smollm2-135m-instruct"


def _engine(fleet: Fleet, **kw: Any) -> VllmEngine:
    transport = fleet.transport()
    engine = VllmEngine(
        BASE,
        ReplicaPool(fleet.urls),
        transport=transport,
        sync_transport=transport,
        health_interval=0.05,
        **kw,
    )
    engine.probe()
    return engine


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(BASE, 2)


def _chat(n: int = 1, adapter: str | None = None, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-1",
        model=BASE,
        messages=(ChatMessage("user", "hi"),),
        sampling=SamplingParams(**sampling),
        n=n,
        adapter=adapter,
    )


async def _drain(engine: VllmEngine, request: GenerationRequest) -> tuple[list[ChoiceDelta], int]:
    stream = await engine.submit(request)
    deltas = [d async for d in stream]
    return deltas, stream.prompt_tokens


# -- translation ---------------------------------------------------------------------------------------


def test_request_body_carries_our_sampling_fields() -> None:
    request = _chat(
        n=2, max_tokens=9, temperature=0.0, top_p=0.5, seed=3, stop=("x",), logprobs=True, top_logprobs=2
    )
    body = request_body(request, "m")
    assert body["model"] == "m" and body["n"] == 2 and body["max_tokens"] == 9 and body["seed"] == 3
    assert body["temperature"] == 0.0 and body["top_p"] == 0.5 and body["stop"] == ["x"]
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["stream"] is True and body["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    legacy = request_body(
        GenerationRequest("r", BASE, prompt="p", sampling=SamplingParams(logprobs=True, top_logprobs=1)), "m"
    )
    assert legacy["prompt"] == "p" and legacy["logprobs"] == 1 and "messages" not in legacy
    assert request_body(_chat(), "m", 300)["max_tokens"] == 300  # None: our default; vLLM shortens it


def test_chat_stream_text_usage_and_finish(fleet: Fleet) -> None:
    engine = _engine(fleet)
    deltas, prompt_tokens = asyncio.run(_drain(engine, _chat(max_tokens=3)))
    assert "".join(d.text for d in deltas) == "w0 w1 w2"
    assert sum(d.token_count for d in deltas) == 3 and prompt_tokens == PROMPT_TOKENS
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]


def test_n_choices_and_logprobs(fleet: Fleet) -> None:
    engine = _engine(fleet)
    deltas, _ = asyncio.run(_drain(engine, _chat(n=2, max_tokens=2, logprobs=True, top_logprobs=1)))
    assert {d.index for d in deltas} == {0, 1} and sum(d.token_count for d in deltas) == 4
    lp = next(d.logprobs for d in deltas if d.logprobs)
    assert lp is not None and lp[0].token == "w0 " and lp[0].bytes == list(b"w0 ") and len(lp[0].top) == 1


def test_legacy_completion(fleet: Fleet) -> None:
    engine = _engine(fleet)
    request = GenerationRequest("r", BASE, prompt="once", sampling=SamplingParams(max_tokens=2))
    deltas, _ = asyncio.run(_drain(engine, request))
    assert "".join(d.text for d in deltas) == "w0 w1" and sum(d.token_count for d in deltas) == 2
    assert fleet.replicas[0].requests[0]["prompt"] == "once"


@pytest.mark.parametrize(
    ("status", "message", "kind", "code"),
    [
        (400, "This model's maximum context length is 2048 tokens. However, you requested 9000",
         ContextLengthExceeded, "context_length_exceeded"),
        (400, "temperature must be non-negative", InvalidRequest, None),
        (404, "The model `x` does not exist.", NotFound, "model_not_found"),
        (503, "busy", EngineUnavailable, "engine_unavailable"),
    ],
)  # fmt: skip
def test_vllm_errors_become_ours_with_string_codes(
    fleet: Fleet, status: int, message: str, kind: type, code: str | None
) -> None:
    for replica in fleet.replicas:
        replica.error = (status, message)
    engine = _engine(fleet)
    with pytest.raises(kind) as raised:
        asyncio.run(_drain(engine, _chat()))
    envelope = raised.value.envelope()["error"]
    assert envelope["code"] == code and (code is None or isinstance(envelope["code"], str))


# -- the replica pool ----------------------------------------------------------------------------------


def test_max_tokens_past_the_context_is_refused_as_on_the_local_engine(fleet: Fleet) -> None:
    for replica in fleet.replicas:
        replica.max_model_len = PROMPT_TOKENS + 4  # read from /v1/models
    engine = _engine(fleet)  # vLLM would shorten max_tokens to fit: we refuse it, as OpenAI does
    with pytest.raises(ContextLengthExceeded) as raised:
        asyncio.run(_drain(engine, _chat(max_tokens=5)))
    assert raised.value.param == "messages" and engine.pool.in_flight() == 0
    deltas, _ = asyncio.run(_drain(engine, _chat(max_tokens=4)))
    assert sum(d.token_count for d in deltas) == 4


def test_least_loaded_replica_gets_the_request(fleet: Fleet) -> None:
    engine = _engine(fleet)

    async def two_open() -> None:
        first = await engine.submit(_chat())
        second = await engine.submit(_chat())  # r0 has one in flight: r1 gets this one
        assert [r.in_flight for r in engine.pool.replicas] == [1, 1]
        await first.aclose()
        await second.aclose()
        assert engine.pool.in_flight() == 0

    asyncio.run(two_open())
    assert len(fleet.replicas[0].requests) == 1 and len(fleet.replicas[1].requests) == 1


def test_unreachable_replica_is_taken_out_and_the_next_serves(fleet: Fleet) -> None:
    engine = _engine(fleet)
    fleet.replicas[0].down = True
    deltas, _ = asyncio.run(_drain(engine, _chat(max_tokens=1)))
    assert deltas and not engine.pool.replicas[0].healthy and engine.pool.replicas[1].healthy
    fleet.replicas[0].down = False
    engine.probe()  # the health thread's round: back in
    assert engine.pool.replicas[0].healthy and engine.restarts == 1


def test_a_stream_that_breaks_is_a_503_and_takes_the_replica_out(fleet: Fleet) -> None:
    engine = _engine(fleet)
    fleet.replicas[0].dies_mid_stream = True
    with pytest.raises(EngineUnavailable, match="went away mid-stream"):
        asyncio.run(_drain(engine, _chat(max_tokens=4)))
    assert not engine.pool.replicas[0].healthy and engine.pool.in_flight() == 0
    deltas, _ = asyncio.run(_drain(engine, _chat(max_tokens=1)))  # the other replica serves
    assert deltas and len(fleet.replicas[1].requests) == 1


def test_none_healthy_is_503_with_retry_after(fleet: Fleet) -> None:
    engine = _engine(fleet, retry_after=7)
    for replica in fleet.replicas:
        replica.down = True
    with pytest.raises(EngineUnavailable) as raised:
        asyncio.run(_drain(engine, _chat()))
    assert raised.value.status_code == 503 and raised.value.headers["Retry-After"] == "7"
    assert not engine.is_ready()


def test_health_thread_takes_a_failing_replica_out_and_back(fleet: Fleet) -> None:
    engine = _engine(fleet)
    engine.start()
    try:
        fleet.replicas[1].healthy = False
        _wait(lambda: not engine.pool.replicas[1].healthy)
        fleet.replicas[1].healthy = True
        _wait(lambda: engine.pool.replicas[1].healthy)
    finally:
        engine.shutdown()


def _wait(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- adapters ------------------------------------------------------------------------------------------


def test_adapter_loads_into_every_replica_and_unloads(fleet: Fleet, tmp_path: Path) -> None:
    engine = _engine(fleet)
    engine.add_adapter("ft:a", tmp_path)
    assert all(r.adapters == {"ft:a": str(tmp_path)} for r in fleet.replicas) and engine.has_adapter("ft:a")
    deltas, _ = asyncio.run(_drain(engine, _chat(adapter="ft:a", max_tokens=1)))
    assert deltas and fleet.replicas[0].requests[-1]["model"] == "ft:a"
    engine.remove_adapter("ft:a")
    assert all(r.adapters == {} for r in fleet.replicas) and not engine.has_adapter("ft:a")
    with pytest.raises(NotFound):
        asyncio.run(_drain(engine, _chat(adapter="ft:a")))


def test_a_replica_that_comes_back_needs_its_adapters_again(fleet: Fleet, tmp_path: Path) -> None:
    engine = _engine(fleet)
    engine.add_adapter("ft:a", tmp_path)
    fleet.replicas[0].down = True
    engine.probe()
    fleet.replicas[0].down = False
    fleet.replicas[0].adapters.clear()  # it restarted: runtime adapters are gone
    engine.probe()
    assert not engine.has_adapter("ft:a")  # the registry will load it again on next use
    engine.add_adapter("ft:a", tmp_path)
    assert fleet.replicas[0].adapters and engine.has_adapter("ft:a")
    assert len([p for p, _ in fleet.replicas[1].admin if p.endswith("load_lora_adapter")]) == 1  # r1 kept it


def test_least_recent_adapters_are_unloaded_past_max(fleet: Fleet, tmp_path: Path) -> None:
    engine = _engine(fleet, max_adapters=2)
    for name in ("ft:a", "ft:b", "ft:c"):
        engine.add_adapter(name, tmp_path)
    assert set(fleet.replicas[0].adapters) == {"ft:b", "ft:c"} and not engine.has_adapter("ft:a")


# -- through the app -----------------------------------------------------------------------------------


Served = tuple[TestClient[Any], Any, Callable[[str], dict[str, str]], Fleet]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    settings = Settings(data_dir=str(tmp_path / "data"), limits=LimitSettings(requests_per_minute=0))
    ensure_dev_keys(settings)
    fleet = Fleet(BASE, 1)
    app = create_app(settings, engines={BASE: _engine(fleet)})

    def headers(org: str) -> dict[str, str]:
        token = mint_dev_token(settings, sub=f"u-{org}", org=org, scope="chat models:read", ttl_seconds=300)
        return {"Authorization": f"Bearer {token}"}

    with TestClient(app) as client:
        yield client, app, headers, fleet


def test_app_chat_and_stream_through_vllm(served: Served) -> None:
    client, _, tenant, fleet = served
    headers = tenant("acme")
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 1}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    result = response.json()
    validate("CreateChatCompletionResponse", result)
    assert result["choices"][0]["message"]["content"] == "w0 w1 w2"
    assert result["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3, "total_tokens": 10}
    assert fleet.replicas[0].requests[-1]["seed"] == 1

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream, headers=headers) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "w0 w1 w2"
    )
    assert (
        chunks[-1]["usage"]["completion_tokens"] == 3
        and chunks[-1]["usage"]["prompt_tokens"] == PROMPT_TOKENS
    )


def test_app_maps_errors_and_503(served: Served) -> None:
    client, _, tenant, fleet = served
    headers = tenant("acme")
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    fleet.replicas[0].error = (400, "This model's maximum context length is 2048 tokens.")
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    fleet.replicas[0].error = None
    fleet.replicas[0].down = True
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "engine_unavailable"


def test_app_fine_tuned_model_hot_loads_and_stays_with_its_tenant(served: Served, tmp_path: Path) -> None:
    client, app, tenant, fleet = served
    headers = tenant("acme")
    model_id = f"ft:{BASE}:acme::abcd1234"
    services_of(app).registry.register_adapter(model_id, base=BASE, tenant="acme", path=tmp_path, created=1)
    assert model_id in fleet.replicas[0].adapters  # hot-loaded at registration
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    sent = len(fleet.replicas[0].requests)
    response = client.post("/v1/chat/completions", json=body, headers=tenant("globex"))
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert len(fleet.replicas[0].requests) == sent  # never reached vLLM
    engine = services_of(app).registry.engines()[0]
    assert isinstance(engine, VllmEngine)
    fleet.replicas[0].down = True
    engine.probe()
    fleet.replicas[0].down = False
    fleet.replicas[0].adapters.clear()  # the replica restarted: reloaded through the registry on next use
    engine.probe()
    assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    assert model_id in fleet.replicas[0].adapters


def test_app_encrypted_adapter_is_plaintext_only_while_vllm_loads_it(served: Served, tmp_path: Path) -> None:
    client, app, tenant, fleet = served
    registry = services_of(app).registry
    seen: list[tuple[Path, bool]] = []
    handle = fleet.replicas[0].handle

    def watching(request: Any) -> Any:  # what vLLM finds at lora_path while it loads
        if request.url.path == "/v1/load_lora_adapter":
            path = Path(json.loads(request.content)["lora_path"])
            seen.append((path, (path / "adapter_config.json").is_file()))
        return handle(request)

    fleet.replicas[0].handle = watching  # type: ignore[method-assign]

    @contextlib.contextmanager
    def decrypting(stored: Path) -> Iterator[Path]:  # as FineTunedModels.open_adapter does
        plain = Path(tempfile.mkdtemp(dir=tmp_path))
        (plain / "adapter_config.json").write_text("{}")
        try:
            yield plain
        finally:
            shutil.rmtree(plain)

    registry.adapter_opener = decrypting
    model_id = f"ft:{BASE}:acme::enc00001"
    registry.register_adapter(model_id, base=BASE, tenant="acme", path=tmp_path / "sealed", created=1)
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=body, headers=tenant("acme")).status_code == 200
    assert len(seen) == 1 and seen[0][1]  # readable while vLLM loaded it ...
    assert not seen[0][0].exists()  # ... and gone right after


# -- settings, egress, managed server ------------------------------------------------------------------


def test_backend_settings() -> None:
    settings = load_settings(
        env={"GATEWAY_ENGINE__BACKEND": "vllm", "GATEWAY_ENGINE__BACKENDS": '{"other": "local"}'}
    )
    assert settings.engine.backend_of(BASE) == "vllm" and settings.engine.backend_of("other") == "local"
    assert Settings().engine.backend_of(BASE) == "local"  # the default stays the local engine
    with pytest.raises(ValueError, match="must be one of local, vllm"):
        EngineSettings(backend="tgi")
    env = {"GATEWAY_VLLM__REPLICAS": '{"m": ["http://10.1.2.3:8000", "http://gpu-b.intra:8000"]}'}
    assert load_settings(env=env).vllm.replicas["m"][1] == "http://gpu-b.intra:8000"


def test_only_configured_replica_hosts_pass_the_egress_guard() -> None:
    replicas = {"m": ["http://10.1.2.3:8000", "http://GPU-B.intra:8000"], "local-one": ["http://x:1"]}
    settings = Settings(engine=EngineSettings(backends={"m": "vllm"}), vllm=VllmSettings(replicas=replicas))
    assert vllm_hosts(settings) == ["10.1.2.3", "gpu-b.intra"]  # local-one is not vllm-backed: not allowed


def test_build_remote_engine_from_settings() -> None:
    settings = Settings(
        engine=EngineSettings(backend="vllm"),
        vllm=VllmSettings(replicas={BASE: ["http://a:1/", "http://b:2"]}),
    )
    engine = build_vllm_engine(settings, BASE)
    assert isinstance(engine, VllmEngine) and engine.server is None
    assert [r.url for r in engine.pool.replicas] == ["http://a:1", "http://b:2"]


def test_server_command_passes_gpu_flags_through(tmp_path: Path) -> None:
    command = server_command(
        "py", tmp_path, BASE, port=8601, max_model_len=1024, max_loras=4, max_lora_rank=16,
        tensor_parallel_size=2, extra=["--gpu-memory-utilization", "0.9"],
    )  # fmt: skip
    assert command[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(command)
    flags = ["--tensor-parallel-size 2", "--enable-lora", "--port 8601", "--host 127.0.0.1"]
    flags += ["--max-cpu-loras 4", "--gpu-memory-utilization 0.9", f"--served-model-name {BASE}"]
    assert [flag for flag in flags if flag not in joined] == []
    assert "--enable-log-requests" not in joined  # prompts never reach vLLM's logs
    off = server_command(
        "py", tmp_path, BASE, port=1, max_model_len=1, max_loras=1, max_lora_rank=1,
        tensor_parallel_size=1, enable_lora=False,
    )  # fmt: skip
    assert not [arg for arg in off if "lora" in arg]


def test_managed_server_is_restarted_after_it_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "BACKOFF_FIRST", 0.05)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", "secret")
    server = ManagedServer(
        "m", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "l" / "v.log"
    )
    server.start()
    try:
        first = server.pid
        assert server.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert not [k for k in server.env if k.startswith("GATEWAY_")]  # no secrets of ours in vLLM's env
        assert (tmp_path / "l" / "v.log").stat().st_mode & 0o777 == 0o600
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        assert not server.poll()  # the backoff first
        _wait(lambda: server.poll())
        assert server.alive() and server.pid != first and server.starts == 2
    finally:
        server.stop()
    assert not server.alive() and not server.poll()  # stopped: not restarted
