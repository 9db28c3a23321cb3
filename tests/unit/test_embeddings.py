"""Embeddings: the embedded model unpacked once, pooling equal to a hand computation over transformers, the
batching engine, input shapes and their 400s, base64 and dimensions, and the route through the real app."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from litestar.testing import TestClient

from contracts.embedding_models import (
    EMBEDDED_EMBEDDING_MODEL,
    EmbeddingModelError,
    embedded_embedding_zip,
    prepare_embedding_model,
    read_pooling_config,
)
from gateway.api.embeddings.service import parse_inputs, render
from gateway.app import create_app
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.errors import ContextLengthExceeded, InvalidRequest
from gateway.core.settings import LimitSettings, Settings
from gateway.engine.embeddings import EmbeddingStats
from gateway.engine.local.embedder import LocalEmbedder
from tests.unit.fake_engine import FakeEngine

MODEL = EMBEDDED_EMBEDDING_MODEL
CHAT_MODEL = "smollm2-135m-instruct"
TEXTS = ["A short one.", "The quarterly report on credit risk is due on Friday, says the bank's policy."]


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_embedding_model(MODEL, embedded_embedding_zip(), tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> Iterator[LocalEmbedder]:
    engine = LocalEmbedder(MODEL, minilm_dir, max_batch=16, batch_wait_ms=50, threads=1)
    engine.start()
    yield engine
    engine.shutdown()


def _embed(engine: LocalEmbedder, inputs: Any) -> Any:
    return asyncio.run(engine.embed(inputs))


# -- the embedded model --------------------------------------------------------------------------------------


def test_the_embedded_model_is_unpacked_once_and_privately(minilm_dir: Path) -> None:
    data_dir = minilm_dir.parents[1]
    assert minilm_dir == data_dir / "embedding-models" / MODEL
    for path in [minilm_dir, *minilm_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    weights = minilm_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert prepare_embedding_model(MODEL, embedded_embedding_zip(), data_dir) == minilm_dir
    assert weights.stat().st_mtime_ns == before  # the second prepare reads the copy, unpacks nothing


def test_pooling_config_is_read_from_the_model(minilm_dir: Path, tmp_path: Path) -> None:
    config = read_pooling_config(minilm_dir)
    assert (config.mode, config.normalize, config.max_seq_length) == ("mean", True, 256)
    assert read_pooling_config(tmp_path).mode == "mean" and not read_pooling_config(tmp_path).normalize
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert read_pooling_config(tmp_path).mode == "cls"
    modules.append({"type": "sentence_transformers.models.Dense", "path": "2_Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(EmbeddingModelError, match="Dense"):
        read_pooling_config(tmp_path)


# -- the engine ----------------------------------------------------------------------------------------------


def test_vectors_equal_mean_pooling_by_hand_over_transformers(
    embedder: LocalEmbedder, minilm_dir: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    expected = expected / expected.norm(dim=1, keepdim=True)

    result = _embed(embedder, TEXTS)
    assert result.vectors.shape == (2, 384) and result.vectors.dtype == np.float32
    np.testing.assert_allclose(result.vectors, expected.numpy(), atol=2e-5)
    assert result.token_counts == batch["attention_mask"].sum(1).tolist()  # [CLS] and [SEP] counted
    alone = _embed(embedder, [TEXTS[0]])  # padding beside a longer input changes nothing
    np.testing.assert_allclose(alone.vectors[0], result.vectors[0], atol=2e-5)


def test_token_ids_are_the_models_own_and_used_as_given(embedder: LocalEmbedder, minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(minilm_dir))(TEXTS[1])["input_ids"]
    by_text, by_ids = _embed(embedder, [TEXTS[1]]), _embed(embedder, [ids])
    np.testing.assert_allclose(by_ids.vectors, by_text.vectors, atol=2e-5)
    assert by_ids.token_counts == [len(ids)]


def test_inputs_of_concurrent_requests_share_batches(embedder: LocalEmbedder) -> None:
    before: EmbeddingStats = embedder.stats()

    async def eight() -> list[Any]:
        return await asyncio.gather(*(embedder.embed([f"request number {i}"]) for i in range(8)))

    results = asyncio.run(eight())
    after = embedder.stats()
    assert after.inputs - before.inputs == 8
    assert after.batches - before.batches < 8  # requests that arrived together ran together
    assert all(r.vectors.shape == (1, 384) for r in results)
    assert not np.allclose(results[0].vectors, results[1].vectors)


def test_a_large_request_is_split_into_batches_in_order(embedder: LocalEmbedder) -> None:
    texts = [f"document {i} " + "word " * (i % 7) for i in range(40)]
    many = _embed(embedder, texts)
    np.testing.assert_allclose(many.vectors[37], _embed(embedder, [texts[37]]).vectors[0], atol=2e-5)
    assert len(many.token_counts) == 40


def test_bad_inputs_name_their_index(embedder: LocalEmbedder) -> None:
    with pytest.raises(ContextLengthExceeded, match=r"Input 1 is \d+ tokens long.*at most 256") as long:
        _embed(embedder, ["fine", "word " * 300])
    assert long.value.param == "input" and long.value.status_code == 400
    with pytest.raises(InvalidRequest, match="Input 1 holds token id 30522, outside"):
        _embed(embedder, [[101, 102], [101, 30522, 102]])
    with pytest.raises(InvalidRequest, match="Input 0 holds token id -1"):
        _embed(embedder, [[-1]])
    with pytest.raises(InvalidRequest, match="Input 2 is an empty string"):
        _embed(embedder, ["a", "b", ""])
    with pytest.raises(InvalidRequest, match="Input 0 is an empty list"):
        _embed(embedder, [[]])
    assert embedder.stats().queued == 0  # nothing refused was queued


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty string"),
        ([], "empty list"),
        (["a", 1], "item 1"),
        ([[1, 2], [True]], "item 1"),
        ([[1], "a"], "item 1"),
        ([1.5], "item 0"),
        (["x"] * 5, "at most 4"),
    ],
)
def test_input_shapes_refused(raw: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as refused:
        parse_inputs(raw, max_inputs=4)
    assert refused.value.param == "input"


def test_input_shapes_accepted() -> None:
    assert parse_inputs("hi", 4) == ["hi"]
    assert parse_inputs(["a", "b"], 4) == ["a", "b"]
    assert parse_inputs([1, 2, 3], 4) == [[1, 2, 3]]  # one input of token ids
    assert parse_inputs([[1], [2, 3]], 4) == [[1], [2, 3]]


# -- rendering -----------------------------------------------------------------------------------------------


def _vectors() -> np.ndarray[Any, np.dtype[np.float32]]:
    raw = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


def test_base64_is_little_endian_float32_and_equals_the_floats() -> None:
    vectors = _vectors()
    as_float = json.loads(
        render(
            vectors, model=MODEL, prompt_tokens=7, encoding_format="float", dimensions=None, renormalize=True
        )
    )
    as_b64 = json.loads(
        render(
            vectors, model=MODEL, prompt_tokens=7, encoding_format="base64", dimensions=None, renormalize=True
        )
    )
    for row, (f, b) in enumerate(zip(as_float["data"], as_b64["data"], strict=True)):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == f["embedding"] == vectors[row].tolist()  # exact, both ways
        assert b["index"] == f["index"] == row and b["object"] == "embedding"
    assert as_float["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert as_float["object"] == "list" and as_float["model"] == MODEL


def test_dimensions_truncate_and_renormalize() -> None:
    vectors = _vectors()
    body = json.loads(
        render(vectors, model=MODEL, prompt_tokens=1, encoding_format="float", dimensions=5, renormalize=True)
    )
    short = np.array([d["embedding"] for d in body["data"]])
    assert short.shape == (3, 5)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        short, vectors[:, :5] / np.linalg.norm(vectors[:, :5], axis=1, keepdims=True), atol=1e-6
    )
    raw = json.loads(
        render(
            vectors, model=MODEL, prompt_tokens=1, encoding_format="float", dimensions=5, renormalize=False
        )
    )
    np.testing.assert_allclose(np.array([d["embedding"] for d in raw["data"]]), vectors[:, :5], atol=1e-7)


# -- the route, through the real app -------------------------------------------------------------------------


class _Borrowed:
    """The module's engine lent to an app, which shuts down what it started: this one it must not."""

    def __init__(self, engine: LocalEmbedder) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path, embedder: LocalEmbedder) -> Iterator[tuple[TestClient[Any], Settings]]:
    settings = Settings(data_dir=str(tmp_path / "data"), limits=LimitSettings(requests_per_minute=0))
    ensure_dev_keys(settings)
    app = create_app(
        settings,
        engines={CHAT_MODEL: FakeEngine()},
        embedding_engine_factory=lambda name: _Borrowed(embedder),  # type: ignore[arg-type,return-value]
    )
    with TestClient(app) as client:
        yield client, settings


def _auth(settings: Settings, scope: str) -> dict[str, str]:
    token = mint_dev_token(settings, sub="alice", org="acme", scope=scope, ttl_seconds=60)
    return {"Authorization": f"Bearer {token}"}


def _error(response: Any, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return str(error["message"])


def test_the_route_embeds_lists_and_audits(api: tuple[TestClient[Any], Settings]) -> None:
    client, settings = api
    canary = "canary-7f3a secret clinical note"
    response = client.post(
        "/v1/embeddings", json={"model": MODEL, "input": [canary, "x"]}, headers=_auth(settings, "embeddings")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4

    ids = [m["id"] for m in client.get("/v1/models", headers=_auth(settings, "models:read")).json()["data"]]
    assert ids == [
        CHAT_MODEL,
        MODEL,
    ]  # chat models first: a client that takes the first one gets a chat model

    audit = (Path(settings.data_dir) / "audit" / "audit.jsonl").read_text()
    assert canary not in audit
    records = [json.loads(line) for line in audit.splitlines()]
    created = [r for r in records if r.get("action") == "embedding.create"]
    assert created and created[0]["prompt_tokens"] == body["usage"]["prompt_tokens"]


def test_the_route_refuses_what_it_should(api: tuple[TestClient[Any], Settings]) -> None:
    client, settings = api
    auth = _auth(settings, "embeddings")

    def post(body: dict[str, Any], headers: dict[str, str] = auth) -> Any:
        return client.post("/v1/embeddings", json=body, headers=headers)

    assert "chat model" in _error(post({"model": CHAT_MODEL, "input": "hi"}), 400, "model")
    assert _error(post({"model": "nope", "input": "hi"}), 404, "model")
    assert "embedding model" in _error(
        client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers=_auth(settings, "chat"),
        ),
        400,
        "model",
    )
    assert _error(post({"model": MODEL, "input": []}), 400, "input")
    assert _error(post({"model": MODEL, "input": ""}), 400, "input")
    assert "Input 1" in _error(post({"model": MODEL, "input": ["ok", "long " * 300]}), 400, "input")
    assert "Input 0" in _error(post({"model": MODEL, "input": [[99999]]}), 400, "input")
    assert _error(post({"model": MODEL, "input": "hi", "encoding_format": "int8"}), 400, "encoding_format")
    for dimensions in (0, 385):
        assert "between 1 and 384" in _error(
            post({"model": MODEL, "input": "hi", "dimensions": dimensions}), 400, "dimensions"
        )
    assert _error(post({"input": "hi"}), 400, "model")
    assert post({"model": MODEL, "input": "hi"}, _auth(settings, "chat models:read")).status_code == 403
    ok = post({"model": MODEL, "input": "hi", "encoding_format": "base64", "dimensions": 8, "user": "u1"})
    assert ok.status_code == 200
    vector = np.frombuffer(base64.b64decode(ok.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (8,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5


def test_gateway_prepare_unpacks_the_embedded_model(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.main import main

    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GATEWAY_MODELS__BASE", json.dumps({CHAT_MODEL: str(tiny_model_dir)}))
    assert main(["prepare"]) == 0
    target = tmp_path / "data" / "embedding-models" / MODEL
    assert f"embedding model {MODEL}: {target}" in capsys.readouterr().out
    assert read_pooling_config(target).max_seq_length == 256


def test_a_model_that_cannot_start_is_a_503_not_a_500(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), limits=LimitSettings(requests_per_minute=0))
    ensure_dev_keys(settings)

    def broken(name: str) -> Any:
        raise EmbeddingModelError("no such directory")

    app = create_app(settings, engines={CHAT_MODEL: FakeEngine()}, embedding_engine_factory=broken)
    with TestClient(app) as client:
        response = client.post(
            "/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=_auth(settings, "embeddings")
        )
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
