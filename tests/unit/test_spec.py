"""The vendored OpenAI spec is present, unchanged, and the validator really checks against it."""

from __future__ import annotations

import hashlib
import re

import jsonschema
import pytest

from tests.e2e.harness import REPO, SPEC
from tests.spec import validate


def test_the_spec_is_vendored_unchanged_with_its_licence() -> None:
    recorded = re.search(r"sha256\s+`([0-9a-f]{64})`", (REPO / "spec" / "README.md").read_text())
    assert recorded, "spec/README.md must record the checksum of the vendored file"
    assert hashlib.sha256(SPEC.read_bytes()).hexdigest() == recorded[1]
    assert "MIT License" in (REPO / "spec" / "openai-openapi.LICENSE").read_text()


def test_validate_accepts_a_good_body_and_rejects_a_bad_one() -> None:
    model = {"id": "m", "object": "model", "created": 1, "owned_by": "system"}
    validate("Model", model)
    with pytest.raises(jsonschema.ValidationError):
        validate("Model", {**model, "created": "yesterday"})
    with pytest.raises(jsonschema.ValidationError):
        validate("ErrorResponse", {"error": {"message": "x", "type": "y", "param": None, "code": 400}})
