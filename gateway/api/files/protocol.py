"""The Files API: OpenAIFile, ListFilesResponse, DeleteFileResponse."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

__all__ = ["UPLOAD_PURPOSES", "DeletedFile", "FileList", "FileObject"]

# Purposes a client may upload with; this server trains on `fine-tune` files and writes `fine-tune-results`.
UPLOAD_PURPOSES = ("fine-tune",)


class FileObject(Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: Literal["file"] = "file"
    status: Literal["uploaded", "processed", "error"] = "processed"


class FileList(Struct):
    data: list[FileObject]
    has_more: bool
    first_id: str  # the spec types both as strings: an empty page carries ""
    last_id: str
    object: Literal["list"] = "list"


class DeletedFile(Struct):
    id: str
    deleted: bool
    object: Literal["file"] = "file"
