"""GET /v1/models, GET/DELETE /v1/models/{id}."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

__all__ = ["DeletedModel", "Model", "ModelList"]


class Model(Struct):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"


class ModelList(Struct):
    data: list[Model]
    object: Literal["list"] = "list"


class DeletedModel(Struct):
    id: str
    deleted: bool
    object: Literal["model"] = "model"
