"""Fine-tuned model names: `ft:{base}:{tenant}:{suffix}:{short job id}`, as OpenAI names them.

The worker names a finished job's model (and its checkpoints, `<name>:ckpt-step-N`); the gateway checks a
job's suffix against the same rule when the job is created, so every name it will ever serve is valid.
"""

from __future__ import annotations

import re

__all__ = ["checkpoint_name", "fine_tuned_name", "invalid_suffix"]

_NAME_PART = re.compile(r"[^A-Za-z0-9._-]+")


def invalid_suffix(suffix: str) -> bool:
    """A suffix may hold letters, digits, '.', '_' and '-' only (it becomes part of the model's name)."""
    return bool(_NAME_PART.search(suffix))


def fine_tuned_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    tenant_part = _NAME_PART.sub("-", tenant).strip("-") or "tenant"
    return f"ft:{base}:{tenant_part}:{suffix or ''}:{job_id[-8:]}"


def checkpoint_name(model: str, step: int) -> str:
    return f"{model}:ckpt-step-{step}"
