"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

import re
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.core.errors import InvalidRequest
from gateway.protocol import fine_tuning as p
from gateway.protocol.codec import decode_body
from gateway.routes.context import principal_of, set_audit
from gateway.routes.files import query_int, query_str
from gateway.serving.jobs import JobService

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

    @post(
        "/",
        status_code=200,
        opt={"scope": "fine_tuning:write", "action": "fine_tuning.job.create"},
    )
    async def create(self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService]) -> p.Job:
        body = decode_body(await request.body(), p.CreateJobRequest)
        job = await jobs.create(principal_of(request), body)
        set_audit(request, resource_id=job.id)
        return job

    @get("/", sync_to_thread=True, opt={"scope": "fine_tuning:read", "action": "fine_tuning.job.list"})
    def list_jobs(self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService]) -> p.JobList:
        return jobs.list(
            principal_of(request),
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
        self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService], job_id: FromPath[str]
    ) -> p.Job:
        set_audit(request, resource_id=job_id)
        return jobs.get(principal_of(request), job_id)

    @post(
        "/{job_id:str}/cancel",
        status_code=200,
        sync_to_thread=True,
        opt={"scope": "fine_tuning:write", "action": "fine_tuning.job.cancel"},
    )
    def cancel(
        self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService], job_id: FromPath[str]
    ) -> p.Job:
        set_audit(request, resource_id=job_id)
        return jobs.cancel(principal_of(request), job_id)

    @get(
        "/{job_id:str}/events",
        sync_to_thread=True,
        opt={"scope": "fine_tuning:read", "action": "fine_tuning.job.events"},
    )
    def events(
        self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService], job_id: FromPath[str]
    ) -> p.JobEventList:
        set_audit(request, resource_id=job_id)
        return jobs.events(
            principal_of(request),
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
        self, request: Request[Any, Any, Any], jobs: NamedDependency[JobService], job_id: FromPath[str]
    ) -> p.CheckpointList:
        set_audit(request, resource_id=job_id)
        return jobs.checkpoints(
            principal_of(request),
            job_id,
            after=query_str(request, "after"),
            limit=query_int(request, "limit", default=10, minimum=1, maximum=100),
        )
