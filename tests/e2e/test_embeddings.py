"""POST /v1/embeddings on the real HTTPS gateway with the embedded all-MiniLM-L6-v2: the openai SDK (float and
its default base64), curl, LangChain's OpenAIEmbeddings ranking the relevant document first, the 400s and the
scope, every body checked against the vendored spec."""

from __future__ import annotations

import base64
import json
import math
import shutil
import stat
import subprocess
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import OpenAIEmbeddings

from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
SCOPE = "embeddings models:read"
DOCUMENTS = [
    "Refunds for cancelled card payments are credited to the customer's account within 14 days.",
    "The cafeteria on the ground floor serves lunch from noon until two o'clock.",
    "Patients must fast for eight hours before a blood glucose test.",
    "Mortgage applications need two recent payslips and a proof of address.",
    "The server room on floor three is cooled to eighteen degrees Celsius.",
]


def _sdk(gateway: Gateway, scope: str = SCOPE) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(scope),
        http_client=httpx.Client(verify=gateway.verify(), timeout=120),
        max_retries=0,
    )


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return _sdk(gateway)


def _tokens(gateway: Gateway, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gateway.data_dir / "embedding-models" / MODEL))
    ids: list[int] = tokenizer(text)["input_ids"]
    return ids


def test_sdk_float_vectors_match_the_spec_and_count_tokens(client: openai.OpenAI, gateway: Gateway) -> None:
    result = client.embeddings.create(model=MODEL, input=DOCUMENTS[:2], encoding_format="float")
    validate("CreateEmbeddingResponse", result.model_dump())
    assert result.object == "list" and result.model == MODEL
    assert [d.index for d in result.data] == [0, 1] and {d.object for d in result.data} == {"embedding"}
    for item in result.data:
        assert len(item.embedding) == 384
        assert math.isclose(math.fsum(x * x for x in item.embedding), 1.0, rel_tol=1e-5)
    expected = sum(len(_tokens(gateway, text)) for text in DOCUMENTS[:2])
    assert result.usage.prompt_tokens == result.usage.total_tokens == expected


def test_the_unpacked_model_is_private(client: openai.OpenAI, gateway: Gateway) -> None:
    client.embeddings.create(model=MODEL, input="warm up")
    model_dir = gateway.data_dir / "embedding-models" / MODEL
    for path in [model_dir, *model_dir.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_sdk_default_base64_decodes_to_the_same_vectors(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=DOCUMENTS[2], encoding_format="float")
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=DOCUMENTS[2])  # the SDK's default
    body = raw.http_response.json()
    assert isinstance(body["data"][0]["embedding"], str)  # it asked for base64 and got it
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == floats.data[0].embedding
    assert raw.parse().data[0].embedding == floats.data[0].embedding  # what the SDK hands its caller


def test_token_ids_and_dimensions(client: openai.OpenAI, gateway: Gateway) -> None:
    text = DOCUMENTS[3]
    by_text = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
    ids = _tokens(gateway, text)
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids[:5]], encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, by_text, atol=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids) + 5
    short = client.embeddings.create(model=MODEL, input=text, dimensions=64).data[0].embedding
    head = np.array(by_text[:64])
    assert len(short) == 64 and np.allclose(short, head / np.linalg.norm(head), atol=1e-5)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(gateway: Gateway) -> None:
    request = {"model": MODEL, "input": ["What is a refund?", "Who cools the server room?"]}
    validate("CreateEmbeddingRequest", request)
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            gateway.ca,
            "-H",
            f"Authorization: Bearer {gateway.token(SCOPE)}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(request),
            f"{gateway.base_url}/embeddings",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    body = json.loads(out.stdout)
    validate("CreateEmbeddingResponse", body)
    assert len(body["data"]) == 2 and len(body["data"][1]["embedding"]) == 384


def test_langchain_retrieval_ranks_the_relevant_document_first(gateway: Gateway) -> None:
    embeddings = OpenAIEmbeddings(
        model=MODEL,
        base_url=gateway.base_url,
        api_key=gateway.token(SCOPE),  # type: ignore[arg-type]
        http_client=httpx.Client(verify=gateway.verify(), timeout=120),
        check_embedding_ctx_length=False,  # the one setting a private deployment needs (README)
    )
    store = InMemoryVectorStore.from_texts(DOCUMENTS, embeddings)
    questions = {
        "How long until I get my money back for a cancelled payment?": 0,
        "What should I do before my blood sugar test?": 2,
        "Which documents do I need to apply for a home loan?": 3,
        "How cold is it where the servers are?": 4,
    }
    for question, relevant in questions.items():
        hits = store.similarity_search(question, k=2)
        assert hits[0].page_content == DOCUMENTS[relevant], (question, [h.page_content for h in hits])
    vectors = embeddings.embed_documents(DOCUMENTS[:2])
    assert len(vectors) == 2 and len(vectors[0]) == 384


def _bad(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    assert refused.value.status_code == 400
    body: dict[str, Any] = refused.value.body  # type: ignore[assignment]
    validate("ErrorResponse", {"error": body})
    return body


def test_bad_requests_are_400s_that_say_what(client: openai.OpenAI, gateway: Gateway) -> None:
    create = client.embeddings.create
    assert _bad(lambda: create(model=MODEL, input=[]))["param"] == "input"
    assert _bad(lambda: create(model=MODEL, input=""))["param"] == "input"
    long = _bad(lambda: create(model=MODEL, input=["fine", "word " * 400]))
    assert "Input 1" in long["message"] and long["code"] == "context_length_exceeded"
    assert "Input 0" in _bad(lambda: create(model=MODEL, input=[[101, 10**6, 102]]))["message"]
    assert _bad(lambda: create(model=MODEL, input="hi", dimensions=1000))["param"] == "dimensions"
    wrong = _bad(lambda: create(model=CHAT_MODEL, input="hi"))
    assert wrong["param"] == "model" and "chat model" in wrong["message"]
    chat = _sdk(gateway, "chat models:read")
    reverse = _bad(
        lambda: chat.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    )
    assert reverse["param"] == "model" and "embedding model" in reverse["message"]
    with pytest.raises(openai.NotFoundError):
        create(model="no-such-model", input="hi")


def test_the_scope_gates_it(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        _sdk(gateway, "chat models:read").embeddings.create(model=MODEL, input="hi")
    assert denied.value.status_code == 403


def test_listed_with_the_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    validate("ListModelsResponse", models.model_dump())
    ids = [m.id for m in models.data]
    assert ids.index(CHAT_MODEL) < ids.index(MODEL)
    assert client.models.retrieve(MODEL).owned_by == "system"


def test_audited_with_token_counts_and_never_logged(client: openai.OpenAI, gateway: Gateway) -> None:
    canary = "canary-5e1d patient Jane Roe, diagnosis withheld"
    result = client.embeddings.create(model=MODEL, input=canary)
    audit = (gateway.data_dir / "audit" / "audit.jsonl").read_text()
    assert canary not in audit and "canary-5e1d" not in gateway.logs()
    records = [json.loads(line) for line in audit.splitlines()]
    mine = [r for r in records if r.get("action") == "embedding.create" and r.get("status") == 200]
    assert mine[-1]["prompt_tokens"] == result.usage.prompt_tokens
    assert mine[-1]["route"] == "/v1/embeddings"
