"""The Engine protocol over vLLM OpenAI servers: one managed process, or a fleet of remote replicas.

`submit()` picks the least-loaded healthy replica (pool.py), opens a streaming request there and returns
once vLLM has accepted it (its 4xx answers become our errors before anything is streamed); a replica that
cannot be reached is taken out and the next one is tried.  With none healthy the answer is a 503 with
Retry-After.  Closing the stream closes the upstream connection, which makes vLLM abort the request.

A health thread probes every replica's /health each `health_interval` (and, in managed mode, restarts a
server process that died: server.py).  Adapters are loaded into every healthy replica through vLLM's runtime
/v1/load_lora_adapter while the plaintext directory exists (the registry decrypts it only around
`add_adapter`); a replica that comes back has lost them, so `has_adapter` turns false and the registry loads
them again on next use.  At most `max_adapters` stay loaded (least recently used are unloaded), which is
also vLLM's --max-cpu-loras: vLLM never has to re-read an adapter from a directory that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import structlog

from gateway.core.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest, NotFound
from gateway.engine.base import ChoiceDelta, EngineStats, GenerationRequest
from gateway.engine.vllm.pool import Replica, ReplicaPool
from gateway.engine.vllm.server import ManagedServer
from gateway.engine.vllm.translate import UsageCounter, deltas_of, error_from, path_of, request_body

__all__ = ["VllmEngine"]

log = structlog.get_logger(__name__)


class _Stream:
    def __init__(self, engine: VllmEngine, replica: Replica, response: httpx.Response) -> None:
        self._engine = engine
        self._replica = replica
        self._response = response
        self._lines = response.aiter_lines()
        self._usage = UsageCounter()
        self._first: list[ChoiceDelta] = []
        self.prompt_tokens = 0
        self._closed = False

    async def prime(self) -> None:
        """Read up to vLLM's first chunk, which carries the prompt's token count (see VllmEngine._open)."""
        async for deltas in self._chunks():
            self._first = deltas
            return

    async def _chunks(self) -> AsyncIterator[list[ChoiceDelta]]:
        try:
            async for line in self._lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise self._engine.lost(self._replica, "sent a malformed chunk") from None
                deltas = deltas_of(chunk, self._usage)
                self.prompt_tokens = self._usage.prompt_tokens
                yield deltas
        except httpx.TransportError:
            raise self._engine.lost(self._replica, "went away mid-stream") from None

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        try:
            for delta in self._first:
                yield delta
            self._first = []
            async for deltas in self._chunks():
                for delta in deltas:
                    yield delta
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.pool.release(self._replica)
        await self._response.aclose()  # vLLM sees the disconnect and aborts the request


class VllmEngine:
    def __init__(
        self,
        model_name: str,
        pool: ReplicaPool,
        *,
        server: ManagedServer | None = None,
        api_key: str = "",
        max_model_len: int = 2048,
        max_adapters: int = 8,
        default_max_tokens: int = 512,
        health_interval: float = 2.0,
        connect_timeout: float = 5.0,
        retry_after: int = 5,
        startup_timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sync_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.pool = pool
        self.server = server
        self.max_adapters = max_adapters
        self.default_max_tokens = default_max_tokens
        self.health_interval = health_interval
        self.retry_after = retry_after
        self.startup_timeout = startup_timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(None, connect=connect_timeout)
        self._headers = headers
        self._transport = transport
        self._clients: dict[int, httpx.AsyncClient] = {}  # one per event loop (tests run several)
        self._sync = httpx.Client(
            headers=headers, timeout=httpx.Timeout(300.0, connect=connect_timeout), transport=sync_transport
        )
        self._adapters: OrderedDict[str, None] = OrderedDict()  # registered names, least recent first
        self._adapter_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0  # replicas that came back after being out
        self._up_before: set[str] = set()
        self.failed_requests = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the managed server (if any) and the health thread; return once a replica is healthy (managed:
        up to startup_timeout; remote: after the first round of probes, healthy or not)."""
        if self.server is not None:
            self.server.start()
        self.probe()
        self._thread = threading.Thread(
            target=self._watch, name=f"vllm-health-{self.model_name}", daemon=True
        )
        self._thread.start()
        if self.server is None:
            return
        deadline = time.monotonic() + self.startup_timeout
        while not self.pool.any_healthy():
            if time.monotonic() > deadline:
                raise EngineUnavailable(
                    f"the vLLM server for {self.model_name} did not become healthy in time"
                )
            time.sleep(0.5)
        log.info("engine.started", model=self.model_name, backend="vllm", replicas=len(self.pool.replicas))

    def _watch(self) -> None:
        while not self._stop.wait(self.health_interval):
            if self.server is not None:
                self.server.poll()
            try:
                self.probe()
            except Exception as exc:  # never let the thread die
                log.error("vllm.probe_failed", model=self.model_name, error_type=type(exc).__name__)

    def probe(self) -> None:
        """One round of /health probes: replicas in and out of the pool."""
        for replica in self.pool.replicas:
            try:
                ok = (
                    self._sync.get(f"{replica.url}/health", timeout=self.health_interval + 3).status_code
                    == 200
                )
                if ok and not replica.healthy:
                    self._read_model_len(replica)
            except httpx.HTTPError:
                ok = False
            if ok and self.pool.mark_up(replica):
                if replica.url in self._up_before:
                    self.restarts += 1  # it was serving before: it came back
                self._up_before.add(replica.url)
                log.info("vllm.replica_up", model=self.model_name, replica=replica.url)
            elif not ok and self.pool.mark_down(replica):
                log.warning("vllm.replica_down", model=self.model_name, replica=replica.url)

    def _read_model_len(self, replica: Replica) -> None:
        response = self._sync.get(f"{replica.url}/v1/models")
        for model in response.json().get("data", []):
            if model.get("id") == self.model_name and isinstance(model.get("max_model_len"), int):
                self.max_model_len = model["max_model_len"]

    def lost(self, replica: Replica, what: str) -> EngineUnavailable:
        """A replica failed under a request: take it out; the error to raise."""
        self.failed_requests += 1
        if self.pool.mark_down(replica):
            log.warning("vllm.replica_down", model=self.model_name, replica=replica.url, reason=what)
        return self._unavailable(f"the vLLM server {what}; retry shortly")

    def _unavailable(self, message: str) -> EngineUnavailable:
        return EngineUnavailable(message, headers={"Retry-After": str(self.retry_after)})

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.health_interval + 10)
            self._thread = None
        if self.server is not None:
            self.server.stop()
        self._sync.close()

    def is_ready(self) -> bool:
        return self.pool.any_healthy()

    def is_failed(self) -> bool:
        return False  # a managed server is restarted for ever; remote replicas are re-probed for ever

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.pool.in_flight(),
            queued=0,
            adapters=len(self._adapters),
            max_running=0,
            max_queued=0,
            restarts=self.restarts,
            failed_steps=self.failed_requests,
        )

    # -- adapters ----------------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: Path) -> None:
        """Load into every healthy replica that lacks it (blocking; the registry calls it off the loop)."""
        live = self.pool.healthy()
        if not live:
            raise self._unavailable("no vLLM server is healthy; retry shortly")
        for replica in live:
            if name in replica.adapters:
                continue
            response = self._sync.post(
                f"{replica.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
            )
            if response.status_code != 200 and "already" not in response.text:
                raise error_from(response.status_code, _json(response))
            replica.adapters.add(name)
        with self._adapter_lock:
            self._adapters[name] = None
            self._adapters.move_to_end(name)
            evicted = []
            while len(self._adapters) > self.max_adapters:
                evicted.append(self._adapters.popitem(last=False)[0])
        for old in evicted:
            self._unload(old)
            log.info("engine.adapter_evicted", adapter=old)
        log.info("vllm.adapter_loaded", model=self.model_name, replicas=len(live))

    def remove_adapter(self, name: str) -> None:
        with self._adapter_lock:
            self._adapters.pop(name, None)
        self._unload(name)

    def _unload(self, name: str) -> None:
        for replica in self.pool.holding(name):
            replica.adapters.discard(name)
            with contextlib.suppress(httpx.HTTPError):  # it is down: it lost the adapter anyway
                self._sync.post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name})

    def has_adapter(self, name: str) -> bool:
        with self._adapter_lock:
            registered = name in self._adapters
        return registered and self.pool.all_hold(name)

    # -- requests ----------------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        key = id(asyncio.get_running_loop())
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = httpx.AsyncClient(
                headers=self._headers,
                timeout=self._timeout,
                transport=self._transport,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            )
        return client

    async def submit(self, request: GenerationRequest) -> _Stream:
        if request.model != self.model_name:
            raise NotFound(
                f"The model '{request.model}' does not exist", param="model", code="model_not_found"
            )
        if request.adapter is not None:
            with self._adapter_lock:
                if request.adapter not in self._adapters:
                    raise NotFound(
                        f"The model '{request.adapter}' is not loaded", param="model", code="model_not_found"
                    )
                self._adapters.move_to_end(request.adapter)
        if request.messages is None and not request.prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        body = request_body(request, request.adapter or self.model_name, self.default_max_tokens)
        tried: set[str] = set()
        while True:
            replica = self.pool.pick(request.adapter, frozenset(tried))
            if replica is None:
                raise self._unavailable("no vLLM server is healthy; retry shortly")
            tried.add(replica.url)
            self.pool.acquire(replica)
            try:
                return await self._open(replica, request, body)
            except httpx.TransportError:
                self.pool.release(replica)
                self.lost(replica, "could not be reached")
            except BaseException:
                self.pool.release(replica)
                raise

    async def _open(self, replica: Replica, request: GenerationRequest, body: dict[str, Any]) -> _Stream:
        client = self._client()
        response = await client.send(
            client.build_request("POST", f"{replica.url}{path_of(request)}", json=body), stream=True
        )
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            prompt_param = "messages" if request.messages is not None else "prompt"
            error = error_from(response.status_code, _loads(raw), prompt_param)
            if response.status_code == 404 and request.adapter is not None:
                replica.adapters.discard(request.adapter)  # it restarted between two probes
                raise self._unavailable("the fine-tuned model is being reloaded; retry shortly")
            if response.status_code >= 500:
                self.failed_requests += 1
            raise error
        stream = _Stream(self, replica, response)
        try:
            await stream.prime()
        except BaseException:
            await response.aclose()
            raise
        # vLLM shortens a max_tokens that does not fit the context; the local engine (and OpenAI) refuse it
        wanted = request.sampling.max_tokens
        prompt = stream.prompt_tokens
        if wanted is not None and prompt + wanted > self.max_model_len:
            await response.aclose()
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt + wanted} tokens ({prompt} in the messages, {wanted} in the completion). Please "
                "reduce the length of the messages or completion.",
                param="messages" if request.messages is not None else "prompt",
            )
        return stream


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _json(response: httpx.Response) -> Any:
    return _loads(response.content)
