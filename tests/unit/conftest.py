"""Fixtures for the engine's unit tests: a tiny random model on disk, and engines over it that stop at the
end of each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.engine.local.engine import LocalEngine
from tests.unit.tiny_engine import NAME, make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Positions up to 2048, so a test can grow the KV cache well past its first 256 slots."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), max_position_embeddings=2048)


@pytest.fixture
def engine_factory(tiny_model_dir: Path) -> Iterator[Callable[..., LocalEngine]]:
    engines: list[LocalEngine] = []

    def make(model_dir: object = tiny_model_dir, **kw: object) -> LocalEngine:
        options: dict[str, object] = {"dtype": "float32", "max_model_len": 256, "threads": 1}
        options.update(kw)
        engine = LocalEngine(NAME, model_dir, **options)  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()
