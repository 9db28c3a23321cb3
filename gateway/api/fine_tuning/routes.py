"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

import re
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.api.codec import decode_body
from gateway.api.fine_tuning import protocol as p
from gateway.api.fine_tuning.service import JobService
from gateway.api.params import query_int, query_str
from gateway.core.errors import InvalidRequest
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["FineTuningController"]

_METADATA_KEY = re.compile(r"^metadata\[([^\]\"\\]{1,64})\]$")


def _metadata_filter(request: Request[Any, Any, Any]) -> dict[str, str] | None:
    pairs = {}
    for key, value in request.query_params.items():
        if key.startswith("metadata"):
            match = _METADATA_KEY.match(key)
            if match is None:
                raise InvalidRequest("Filter on metadata with metadata[<key>]=<value>.", param="metadata")
            pairs[match.group(1)] = value
    return pairs or None


class FineTuningController(Controller):
    path = "/v1/fine_tuning/jobs"

    @post("/", status_code=200, opt={"scope": "fine_tuning:write", "action": "fine_tuning.job.create"})
    async def create(
        self,
        request: Request[Any, Any, Any],
        jobs: NamedDependency[JobService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
    ) -> p.Job:
        job = await jobs.create(principal, decode_body(await request.body(), p.CreateJobRequest))
        request_state.resource_id = job.id
        return job

    @get("/", sync_to_thread=True, opt={"scope": "fine_tuning:read", "action": "fine_tuning.job.list"})
    def list_jobs(
        self,
        request: Request[Any, Any, Any],
        jobs: NamedDependency[JobService],
        principal: NamedDependency[Principal],
    ) -> p.JobList:
        return jobs.list(
            principal,
            after=query_str(request, "after"),
            limit=query_int(request, "limit", default=20, minimum=1, maximum=100),
            metadata=_metadata_filter(request),
        )

    @get(
        "/{job_id:str}",
        sync_to_thread=True,
        opt={"scope": "fine_tuning:read", "action": "fine_tuning.job.retrieve"},
    )
    def retrieve(
        self,
        jobs: NamedDependency[JobService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        job_id: FromPath[str],
    ) -> p.Job:
        request_state.resource_id = job_id
        return jobs.get(principal, job_id)

    @post(
        "/{job_id:str}/cancel",
        status_code=200,
        sync_to_thread=True,
        opt={"scope": "fine_tuning:write", "action": "fine_tuning.job.cancel"},
    )
    def cancel(
        self,
        jobs: NamedDependency[JobService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        job_id: FromPath[str],
    ) -> p.Job:
        request_state.resource_id = job_id
        return jobs.cancel(principal, job_id)

    @get(
        "/{job_id:str}/events",
        sync_to_thread=True,
        opt={"scope": "fine_tuning:read", "action": "fine_tuning.job.events"},
    )
    def events(
        self,
        request: Request[Any, Any, Any],
        jobs: NamedDependency[JobService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        job_id: FromPath[str],
    ) -> p.JobEventList:
        request_state.resource_id = job_id
        return jobs.events(
            principal,
            job_id,
            after=query_str(request, "after"),
            limit=query_int(request, "limit", default=20, minimum=1, maximum=1000),
        )

    @get(
        "/{job_id:str}/checkpoints",
        sync_to_thread=True,
        opt={"scope": "fine_tuning:read", "action": "fine_tuning.job.checkpoints"},
    )
    def checkpoints(
        self,
        request: Request[Any, Any, Any],
        jobs: NamedDependency[JobService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        job_id: FromPath[str],
    ) -> p.CheckpointList:
        request_state.resource_id = job_id
        return jobs.checkpoints(
            principal,
            job_id,
            after=query_str(request, "after"),
            limit=query_int(request, "limit", default=10, minimum=1, maximum=100),
        )
