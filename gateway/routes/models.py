"""GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id} (fine-tuned models only)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.core.errors import PermissionDenied
from gateway.protocol.models import DeletedModel, Model, ModelList
from gateway.routes.context import principal_of, set_audit
from gateway.serving.registry import ModelEntry, ModelRegistry

__all__ = ["ModelsController"]


def _model(entry: ModelEntry) -> Model:
    return Model(id=entry.id, created=entry.created, owned_by=entry.owned_by)


class ModelsController(Controller):
    path = "/v1/models"

    @get("/", opt={"scope": "models:read", "action": "model.list"})
    async def list_models(
        self, request: Request[Any, Any, Any], registry: NamedDependency[ModelRegistry]
    ) -> ModelList:
        return ModelList(data=[_model(e) for e in registry.visible(principal_of(request))])

    @get("/{model_id:str}", opt={"scope": "models:read", "action": "model.retrieve"})
    async def retrieve(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        model_id: FromPath[str],
    ) -> Model:
        set_audit(request, resource_id=model_id)
        return _model(registry.get(model_id, principal_of(request)))

    @delete("/{model_id:str}", status_code=200, opt={"scope": "fine_tuning:write", "action": "model.delete"})
    async def delete_model(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[ModelRegistry],
        model_id: FromPath[str],
    ) -> DeletedModel:
        set_audit(request, resource_id=model_id)
        entry = registry.get(model_id, principal_of(request))
        if entry.is_base:
            raise PermissionDenied(
                "Base models cannot be deleted through the API", param="model", code="model_not_deletable"
            )
        remover = request.app.state.get("model_remover")
        if remover is not None:  # the fine-tuning store also forgets it, so it stays gone after a restart
            await remover(entry)
        registry.unregister(model_id)
        return DeletedModel(id=model_id, deleted=True)
