"""Fuzz every route we serve with requests schemathesis generates from the vendored OpenAI spec.

Valid requests (schemathesis' positive mode) and invalid ones (negative mode), for each (method, path) in
`OURS`, sent over HTTPS with a token holding every tenant scope.  Each answer is checked, never shrunk (a
failure is recorded and the run goes on, so the count stays bounded):

- no 5xx;
- a 2xx JSON body matches the spec's response schema for that operation and status; an SSE stream's every
  `data:` chunk matches the stream schema;
- a 4xx body is the OpenAI error envelope (`ErrorResponse`: message, type, param, code);
- a 429 carries `Retry-After`.

Schemas are checked with tests/spec.py (the same reading of the spec's OpenAPI-3.0 leftovers as every e2e
test), not schemathesis' own conformance check, which takes `nullable: true` in this 3.1 document literally.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests

from tests.e2e.harness import SPEC, Gateway
from tests.spec import validate

__all__ = ["OURS", "FuzzReport", "fuzz"]

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
# (method, spec path) -> weight: the bodies with the most to get wrong get the most requests.
OURS: dict[tuple[str, str], int] = {
    ("POST", "/chat/completions"): 4,
    ("POST", "/completions"): 4,
    ("POST", "/files"): 3,
    ("POST", "/fine_tuning/jobs"): 3,
    ("POST", "/responses"): 3,
    ("POST", "/embeddings"): 2,
    ("GET", "/models"): 1,
    ("GET", "/models/{model}"): 1,
    ("DELETE", "/models/{model}"): 1,
    ("GET", "/files"): 2,
    ("GET", "/files/{file_id}"): 1,
    ("DELETE", "/files/{file_id}"): 1,
    ("GET", "/files/{file_id}/content"): 1,
    ("GET", "/fine_tuning/jobs"): 2,
    ("GET", "/fine_tuning/jobs/{fine_tuning_job_id}"): 1,
    ("POST", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): 1,
    ("GET", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): 1,
    ("GET", "/fine_tuning/jobs/{fine_tuning_job_id}/events"): 1,
    ("GET", "/responses/{response_id}"): 1,
    ("DELETE", "/responses/{response_id}"): 1,
    ("POST", "/responses/{response_id}/cancel"): 1,
    ("GET", "/responses/{response_id}/input_items"): 1,
}


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    seconds_per_operation: Counter[str] = field(default_factory=Counter)  # generating and sending
    failures: list[str] = field(default_factory=list)  # the first few, for the assertion message
    failure_count: int = 0
    seconds: float = 0.0

    def fail(self, label: str, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(f"{label}: {message}")

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def _schema_name(definition: dict[str, Any], status: int, media_type: str) -> str | None:
    response = definition.get("responses", {}).get(str(status))
    if response is None:
        return None
    ref = response.get("content", {}).get(media_type, {}).get("schema", {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _header(response: Any, name: str) -> str | None:
    """A header of schemathesis' Response (a dict of lists) or of a requests/httpx one."""
    for key, value in response.headers.items():
        if key.lower() == name:
            return str(value[0] if isinstance(value, list) else value)
    return None


def _check(report: FuzzReport, label: str, definition: dict[str, Any], response: Any) -> None:
    status = response.status_code
    media_type = (_header(response, "content-type") or "").split(";")[0].strip()
    if status >= 500:
        report.fail(label, f"{status} {response.text[:300]}")
        return
    if status == 429 and _header(response, "retry-after") is None:
        report.fail(label, "429 without Retry-After")
    try:
        if 200 <= status < 300 and media_type == "text/event-stream":
            name = _schema_name(definition, status, "text/event-stream")
            for line in response.text.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        report.fail(label, f"an error after the 200: {line[:300]}")
                    elif name:
                        validate(name, chunk)
        elif 200 <= status < 300 and media_type == "application/json":
            name = _schema_name(definition, status, "application/json")
            if name:
                validate(name, response.json())
        elif 400 <= status < 500:
            validate("ErrorResponse", response.json())
    except Exception as exc:  # a body that is not JSON, or one the schema refuses
        report.fail(label, f"{status} body violates the spec: {type(exc).__name__}: {str(exc)[:300]}")


def _operations() -> list[tuple[Any, int]]:
    import schemathesis

    schema = schemathesis.openapi.from_path(str(SPEC))
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()
        weight = OURS.get((operation.method.upper(), operation.path))
        if weight:
            found.append((operation, weight))
    missing = set(OURS) - {(op.method.upper(), op.path) for op, _ in found}
    assert not missing, f"routes we serve are missing from the vendored spec: {missing}"
    return found


def _run_operation(
    report: FuzzReport, operation: Any, examples: int, mode: Any, gateway: Gateway, http: requests.Session
) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    label = f"{operation.method.upper()} {operation.path}"
    definition = operation.definition.raw
    rng = random.Random(f"{label}:{report.requests}")

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        if isinstance(case.body, dict) and "model" in case.body and rng.random() < 0.6:
            # past the 404 for an unknown model, into the engine
            case.body["model"] = EMBEDDING_MODEL if operation.path == "/embeddings" else MODEL
        try:
            # our token on every request: negative mode would otherwise spend a third of its requests on 401s
            # (tests/e2e/test_security.py covers bad tokens)
            case.headers = {**(case.headers or {}), "Authorization": http.headers["Authorization"]}
            response = case.call(base_url=gateway.base_url, session=http, verify=gateway.ca, timeout=120)
        except requests.RequestException as exc:
            report.fail(label, f"transport error: {type(exc).__name__}: {exc}")
            report.requests += 1
            assert report.failure_count < 50, report.failures  # the server is gone: stop here
            return
        report.requests += 1
        report.per_operation[label] += 1
        report.statuses[response.status_code] += 1
        _check(report, label, definition, response)

    started = time.monotonic()
    send()
    report.seconds_per_operation[label] += round(time.monotonic() - started, 1)


def fuzz(gateway: Gateway, token: str, total: int) -> FuzzReport:
    """Send at least `total` generated requests, spread over OURS by weight, half valid and half not."""
    from schemathesis import GenerationMode

    operations = _operations()
    weights = sum(w for _, w in operations)
    report = FuzzReport()
    started = time.monotonic()
    with requests.Session() as http:
        http.verify = gateway.ca
        http.headers["Authorization"] = f"Bearer {token}"
        while report.requests < total:  # an operation with few distinct requests may run short: top up
            remaining = total - report.requests
            for operation, weight in operations:
                share = max(1, math.ceil(remaining * weight / weights / 2))
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    _run_operation(report, operation, share, mode, gateway, http)
    report.seconds = time.monotonic() - started
    return report
