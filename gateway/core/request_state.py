"""What one request carries between the layers it passes through, as one typed object.

AuditMiddleware creates it when the request arrives (the request id) and writes the audit record from it
when the response is done; the auth guard sets the caller (`principal`) and registers the release of the
tenant's in-flight slot; handlers name the resource they touched and report token usage.  It lives in the
ASGI scope, so it reaches every layer without a global.

    state = request_state(connection.scope)
    state.resource_id = job.id
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.principal import Principal

__all__ = ["RequestState", "request_state"]

_KEY = "gateway"  # scope["state"][_KEY]


@dataclass
class RequestState:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    principal: Principal | None = None  # set by the auth guard; None for public routes and refused tokens
    resource_id: str | None = None  # the file, job or model the request touched (audited)
    prompt_tokens: int | None = None  # audited; content never is
    completion_tokens: int | None = None
    on_done: list[Callable[[], None]] = field(default_factory=list)  # run once the response is sent

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def finish(self) -> None:
        """Run the `on_done` callbacks (each once, whatever the others do)."""
        callbacks, self.on_done = self.on_done, []
        errors: list[BaseException] = []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # one failing release must not keep the others held
                errors.append(exc)
        if errors:
            raise errors[0]


def request_state(scope: Any) -> RequestState:
    """The request's state in an ASGI scope, created on first use (a handler run without AuditMiddleware
    gets one too)."""
    holder: dict[str, Any] = scope.setdefault("state", {})
    state = holder.get(_KEY)
    if not isinstance(state, RequestState):
        state = holder[_KEY] = RequestState()
    return state
