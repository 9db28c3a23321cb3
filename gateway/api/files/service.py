"""Files: uploads streamed to disk, validated as training data, stored private (0600), optionally encrypted.

An upload is written to a staging file in `<data_dir>/tmp/` while it arrives (never buffered in memory, never
in the system temp dir), checked against the size limit chunk by chunk, validated with
contracts.training_data, and only then moved (or encrypted) to `<data_dir>/files/<id>` and recorded.  Whatever
fails on the way, the staging file is removed and nothing is recorded.  Bodies live in blob storage
(contracts.blobs), rows in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import structlog

from contracts.blobs import BlobStorage
from contracts.private_files import ensure_private_dir
from gateway.api.files.protocol import UPLOAD_PURPOSES, DeletedFile, FileList, FileObject
from gateway.auth.quotas import Quotas
from gateway.core.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from gateway.core.principal import Principal
from gateway.store import ACTIVE, FileRecord, Store, new_id

__all__ = ["FileService", "Upload", "file_not_found"]

log = structlog.get_logger(__name__)

_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
_STALE_SECONDS = 3600


def file_not_found(file_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param=param, code="file_not_found")


class Upload:
    """A staging file receiving one upload; `write` raises PayloadTooLarge past `limit` bytes."""

    def __init__(self, directory: Path, limit: int) -> None:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=ensure_private_dir(directory))
        self.path = Path(name)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self.limit = limit
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"The file is larger than this server's limit of {self.limit} bytes.", param="file"
            )
        self._fh.write(chunk)

    def finish(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def discard(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FileService:
    """The Files API for one tenant at a time; every lookup is scoped to the caller's tenant."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStorage,
        *,
        max_upload_bytes: int,
        max_train_rows: int,
        quotas: Quotas | None = None,
        max_record_bytes: int = 1 << 20,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.max_upload_bytes = max_upload_bytes
        self.max_train_rows = max_train_rows
        self.quotas = quotas
        self._quota_lock = threading.Lock()  # usage check + insert as one step (this process owns uploads)
        self.max_record_bytes = max_record_bytes
        # validation gets a thread of its own: a large upload queues here, never on the default pool that
        # also runs job creation and the hot-load poll
        self._validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validate-upload")

    def check_quota(self, principal: Principal, incoming_bytes: int = 0) -> None:
        """403 quota_exceeded when one more file of `incoming_bytes` passes the tenant's quotas."""
        if self.quotas is None:
            return
        used_files, used_bytes = self.store.usage(principal.tenant, self.blobs.data_dir)
        self.quotas.check_storage(
            principal.tenant, used_files=used_files, used_bytes=used_bytes, incoming_bytes=incoming_bytes
        )

    def receive(self) -> Upload:
        return Upload(self.blobs.tmp_dir, self.max_upload_bytes)

    def _commit(self, plain: Path, record: FileRecord, principal: Principal) -> None:
        """The body into blob storage, then its row: a file is recorded only once its body is in place.
        The quota is checked again here, under the lock, so two concurrent uploads cannot both squeeze in."""
        with self._quota_lock:
            self.check_quota(principal, record.bytes)
            self.blobs.put(plain, record.path)
            try:
                self.store.files.add(record)
            except BaseException:
                self.blobs.remove(record.path)
                raise

    async def create(
        self, principal: Principal, *, purpose: str | None, filename: str | None, upload: Upload
    ) -> FileObject:
        """Validate and keep a received upload.  The caller discards `upload` whatever happens."""
        if purpose is None:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"Invalid value for 'purpose': {purpose!r}; this server accepts "
                f"{', '.join(UPLOAD_PURPOSES)}.",
                param="purpose",
            )
        if filename is None:
            raise InvalidRequest(
                "Missing required parameter: 'file' (send it as a multipart file part).", param="file"
            )
        upload.finish()
        if upload.size == 0:
            raise InvalidRequest("The uploaded file is empty.", param="file")
        await asyncio.to_thread(self.check_quota, principal, upload.size)  # before the costly validation
        stats = await asyncio.get_running_loop().run_in_executor(self._validator, self._validate, upload.path)
        file_id = new_id("file-")
        record = FileRecord(
            id=file_id,
            tenant=principal.tenant,
            filename=_clean_name(filename),
            purpose=purpose,
            bytes=upload.size,
            created_at=int(time.time()),
            path=f"files/{file_id}",
            rows=stats[0],
            format=stats[1],
        )
        await asyncio.to_thread(self._commit, upload.path, record, principal)
        log.info("file.stored", file_id=file_id, bytes=upload.size, rows=stats[0], format=stats[1])
        return file_object(record)

    def _validate(self, path: Path) -> tuple[int, str]:
        from contracts.training_data import DataError, validate_file

        try:
            stats = validate_file(path, max_rows=self.max_train_rows, max_record_bytes=self.max_record_bytes)
        except DataError as exc:  # "line N: what is wrong" (never the content itself)
            raise InvalidRequest(
                f"Invalid training file: {exc}", param="file", code="invalid_file_format"
            ) from None
        return int(stats.rows), str(stats.format)

    def get(self, principal: Principal, file_id: str, *, param: str | None = None) -> FileRecord:
        record = self.store.files.get(file_id, None if principal.is_admin else principal.tenant)
        if record is None:
            raise file_not_found(file_id, param)
        return record

    def retrieve(self, principal: Principal, file_id: str) -> FileObject:
        return file_object(self.get(principal, file_id))

    def list(
        self, principal: Principal, *, purpose: str | None, after: str | None, limit: int, order: str
    ) -> FileList:
        page = self.store.files.list_page(
            None if principal.is_admin else principal.tenant,
            purpose=purpose,
            after=after,
            limit=limit,
            newest_first=order == "desc",
        )
        data = [file_object(r) for r in page.items]
        return FileList(
            data=data,
            has_more=page.has_more,
            first_id=data[0].id if data else "",
            last_id=data[-1].id if data else "",
        )

    def delete(self, principal: Principal, file_id: str) -> DeletedFile:
        record = self.get(principal, file_id)
        for job in self.store.jobs.with_status(ACTIVE):
            if file_id in (job.training_file, job.validation_file):
                raise Conflict(
                    f"File {file_id} is used by fine-tuning job {job.id}, which is {job.status}; "
                    "cancel the job or wait for it to finish first.",
                    param="file_id",
                    code="file_in_use",
                )
        self.store.files.delete(file_id)
        self.blobs.remove(record.path)
        log.info("file.deleted", file_id=file_id)
        return DeletedFile(id=file_id, deleted=True)

    def content(self, principal: Principal, file_id: str) -> tuple[int, Iterator[bytes]]:
        """The file's size and its plaintext, chunk by chunk."""
        record = self.get(principal, file_id)
        if not self.blobs.exists(record.path):
            raise file_not_found(file_id)
        return record.bytes, self.blobs.chunks(record.path)

    def sweep(self, tmp_max_age_seconds: float = _STALE_SECONDS) -> int:
        """Remove what a crash left behind: staging files and decrypted adapter copies in tmp/ untouched for
        `tmp_max_age_seconds`, and file bodies with no record (an hour old, so none being committed)."""
        removed, now = 0, time.time()
        known = {Path(p).name for p in self.store.files.all_paths()}
        for directory, keep, age in (
            (self.blobs.tmp_dir, set(), tmp_max_age_seconds),
            (self.blobs.files_dir, known, _STALE_SECONDS),
        ):
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                try:
                    fresh = path.stat().st_mtime >= now - age
                except FileNotFoundError:  # gone meanwhile (an upload committed)
                    continue
                if path.name in keep or fresh:
                    continue
                if path.is_dir() and directory == self.blobs.tmp_dir:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        return removed


def file_object(record: FileRecord) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        filename=record.filename,
        purpose=record.purpose,
    )


def _clean_name(filename: str) -> str:
    """The client's file name, as metadata only (never a path): base name, no control characters."""
    name = _UNSAFE_NAME.sub("_", filename.replace("\\", "/").rsplit("/", 1)[-1]).strip() or "upload"
    return name[:255]
