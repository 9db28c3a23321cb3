"""Who is calling: the verified subject, its tenant and its scopes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALL_SCOPES", "Principal"]

ALL_SCOPES = frozenset(
    {
        "models:read",
        "chat",
        "embeddings",
        "files:read",
        "files:write",
        "fine_tuning:read",
        "fine_tuning:write",
        "admin",
    }
)


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes
