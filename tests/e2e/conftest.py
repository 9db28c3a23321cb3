"""Fixtures for end-to-end tests: one converted model per session, one running gateway per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.base_models import embedded_gguf, prepare
from tests.e2e.harness import Gateway, make_certs, running


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF converted once for the whole session (about 25 s)."""
    return prepare("smollm2-135m-instruct", embedded_gguf(), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(out)
    return out


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gw") / "data"
    yield from running(Gateway(data_dir=data, certs=certs, model_dir=model_dir), "--no-worker")
