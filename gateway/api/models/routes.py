"""GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id} (fine-tuned models only)."""

from __future__ import annotations

from litestar import Controller, delete, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.api.models.protocol import DeletedModel, Model, ModelList
from gateway.api.models.service import ModelsService
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["ModelsController"]


class ModelsController(Controller):
    path = "/v1/models"

    @get("/", opt={"scope": "models:read", "action": "model.list"})
    async def list_models(
        self, models: NamedDependency[ModelsService], principal: NamedDependency[Principal]
    ) -> ModelList:
        return models.list(principal)

    @get("/{model_id:str}", opt={"scope": "models:read", "action": "model.retrieve"})
    async def retrieve(
        self,
        models: NamedDependency[ModelsService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        model_id: FromPath[str],
    ) -> Model:
        request_state.resource_id = model_id
        return models.retrieve(principal, model_id)

    @delete("/{model_id:str}", status_code=200, opt={"scope": "fine_tuning:write", "action": "model.delete"})
    async def delete_model(
        self,
        models: NamedDependency[ModelsService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        model_id: FromPath[str],
    ) -> DeletedModel:
        request_state.resource_id = model_id
        return await models.delete(principal, model_id)
