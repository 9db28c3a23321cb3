"""The Models API: which models a caller sees, and deleting a fine-tuned one.

Listing and lookup are the registry's (gateway/api/models/registry.py: visibility per tenant); deleting a
fine-tuned model also forgets it in the fine-tuning store and removes its files, which the hot-load bridge
owns (`remove_fine_tuned`, wired in by the app), so that it stays gone after a restart and on every gateway
that shares the data dir.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.api.models.protocol import DeletedModel, Model, ModelList
from gateway.api.models.registry import ModelEntry, ModelRegistry
from gateway.core.errors import PermissionDenied
from gateway.core.principal import Principal

__all__ = ["ModelsService", "RemoveFineTuned"]

# A fine-tuned model's entry -> the ids removed with it (a job's model takes its checkpoints along).
RemoveFineTuned = Callable[[ModelEntry], Awaitable[list[str]]]


class ModelsService:
    def __init__(self, registry: ModelRegistry, remove_fine_tuned: RemoveFineTuned | None = None) -> None:
        self.registry = registry
        self.remove_fine_tuned = remove_fine_tuned

    def list(self, principal: Principal) -> ModelList:
        return ModelList(data=[_model(e) for e in self.registry.visible(principal)])

    def retrieve(self, principal: Principal, model_id: str) -> Model:
        return _model(self.registry.get(model_id, principal))

    async def delete(self, principal: Principal, model_id: str) -> DeletedModel:
        entry = self.registry.get(model_id, principal)
        if entry.is_base:
            raise PermissionDenied(
                "Base models cannot be deleted through the API", param="model", code="model_not_deletable"
            )
        if self.remove_fine_tuned is not None:
            await self.remove_fine_tuned(entry)
        self.registry.unregister(model_id)
        return DeletedModel(id=model_id, deleted=True)


def _model(entry: ModelEntry) -> Model:
    return Model(id=entry.id, created=entry.created, owned_by=entry.owned_by)
