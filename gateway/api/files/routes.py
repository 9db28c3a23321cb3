"""POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content.

The upload handler parses multipart/form-data itself, incrementally, so the file part goes straight from the
socket into a private staging file under the size limit instead of into memory or the system temp dir.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream
from multipart import MultipartError, MultipartSegment, PushMultipartParser

from gateway.api.files.protocol import DeletedFile, FileList, FileObject
from gateway.api.files.service import FileService, Upload
from gateway.api.params import query_int, query_str
from gateway.core.errors import InvalidRequest, PayloadTooLarge
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["FilesController"]

_FIELD_LIMIT = 4096  # bytes of a non-file form field (purpose, ...)
_FORM_OVERHEAD = 64 * 1024  # multipart headers and small fields on top of the file itself


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The file is larger than this server's limit of {limit} bytes.", param="file")


async def _read_form(
    body: AsyncIterator[bytes], boundary: str, upload: Upload
) -> tuple[dict[str, str], str | None]:
    """Stream a multipart body: the `file` part into `upload`, other small fields into a dict.

    Every byte counts against the limit as it arrives, the preamble and headers included, so a body sent
    without Content-Length (chunked) is cut off as soon as it passes the limit, whatever part it is in.
    """
    fields: dict[str, str] = {}
    filename: str | None = None
    segment: MultipartSegment | None = None
    value = bytearray()
    received, limit = 0, upload.limit + _FORM_OVERHEAD
    try:
        parser = PushMultipartParser(boundary, max_segment_count=32)
        async for chunk in body:
            received += len(chunk)
            if received > limit:
                raise _too_large(upload.limit)
            for event in parser.parse(chunk):  # the request stream ends with b"", which closes the parser
                if isinstance(event, MultipartSegment):
                    segment, value = event, bytearray()
                    if segment.name == "file":
                        if filename is not None:
                            raise InvalidRequest("Send exactly one 'file' part.", param="file")
                        filename = segment.filename or "upload"
                elif event and segment is not None:
                    if segment.name == "file":
                        upload.write(event)
                    else:
                        value += event
                        if len(value) > _FIELD_LIMIT:
                            raise InvalidRequest(
                                f"The form field '{segment.name}' is too long.", param=segment.name
                            )
                elif segment is not None:
                    if segment.name != "file":
                        fields[segment.name] = value.decode("utf-8", errors="replace")
                    segment = None
        if not parser.closed:
            raise InvalidRequest("The multipart/form-data body ended before its closing boundary.")
    except MultipartError as exc:
        raise InvalidRequest(f"The request body is not valid multipart/form-data: {exc}") from None
    return fields, filename


class FilesController(Controller):
    path = "/v1/files"

    @post(
        "/",
        status_code=200,
        request_max_body_size=None,
        opt={"scope": "files:write", "action": "file.upload"},
    )
    async def upload(
        self,
        request: Request[Any, Any, Any],
        files: NamedDependency[FileService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
    ) -> FileObject:
        content_type, options = request.content_type
        boundary = options.get("boundary")
        if content_type != "multipart/form-data" or not boundary:
            raise InvalidRequest(
                "Upload files as multipart/form-data with a 'file' part and a 'purpose' field."
            )
        length = request.content_length
        if length is not None and length > files.max_upload_bytes + _FORM_OVERHEAD:
            raise _too_large(files.max_upload_bytes)
        await asyncio.to_thread(
            files.check_quota, principal
        )  # a tenant at its quota: refused before the body
        upload = files.receive()
        try:
            fields, filename = await _read_form(request.stream(), boundary, upload)
            created = await files.create(
                principal, purpose=fields.get("purpose"), filename=filename, upload=upload
            )
        finally:
            upload.discard()
        request_state.resource_id = created.id
        return created

    @get("/", sync_to_thread=True, opt={"scope": "files:read", "action": "file.list"})
    def list_files(
        self,
        request: Request[Any, Any, Any],
        files: NamedDependency[FileService],
        principal: NamedDependency[Principal],
    ) -> FileList:
        return files.list(
            principal,
            purpose=query_str(request, "purpose"),
            after=query_str(request, "after"),
            limit=query_int(request, "limit", default=10_000, minimum=1, maximum=10_000),
            order=query_str(request, "order", choices=("asc", "desc")) or "desc",
        )

    @get("/{file_id:str}", sync_to_thread=True, opt={"scope": "files:read", "action": "file.retrieve"})
    def retrieve(
        self,
        files: NamedDependency[FileService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        file_id: FromPath[str],
    ) -> FileObject:
        request_state.resource_id = file_id
        return files.retrieve(principal, file_id)

    @delete(
        "/{file_id:str}",
        status_code=200,
        sync_to_thread=True,
        opt={"scope": "files:write", "action": "file.delete"},
    )
    def delete_file(
        self,
        files: NamedDependency[FileService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        file_id: FromPath[str],
    ) -> DeletedFile:
        request_state.resource_id = file_id
        return files.delete(principal, file_id)

    @get("/{file_id:str}/content", sync_to_thread=True, opt={"scope": "files:read", "action": "file.content"})
    def content(
        self,
        files: NamedDependency[FileService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
        file_id: FromPath[str],
    ) -> Response[Any]:
        request_state.resource_id = file_id
        size, chunks = files.content(principal, file_id)
        return Stream(chunks, media_type="application/octet-stream", headers={"Content-Length": str(size)})
