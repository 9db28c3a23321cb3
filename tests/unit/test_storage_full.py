"""A full disk (ENOSPC, EDQUOT, SQLITE_FULL) is a 503 with Retry-After and the error envelope; any other
OSError or sqlite error stays a 500 that names nothing."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from gateway.api.errors import EXCEPTION_HANDLERS


def _full_sqlite() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = 13  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 503),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 503),
        (_full_sqlite(), 503),
        (OSError(errno.EACCES, "Permission denied"), 500),
        (sqlite3.OperationalError("database is locked"), 500),
    ],
    ids=["ENOSPC", "EDQUOT", "SQLITE_FULL", "EACCES", "locked"],
)
def test_a_full_disk_is_a_503_and_other_failures_stay_500(exc: Exception, status: int) -> None:
    @get("/boom")
    async def boom() -> None:
        raise exc

    with TestClient(Litestar([boom], exception_handlers=EXCEPTION_HANDLERS)) as client:
        response = client.get("/boom")
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if status == 503:
        assert error["code"] == "insufficient_storage" and response.headers["retry-after"] == "30"
        assert "storage is full" in error["message"]
    else:
        assert error["code"] == "internal_error"
    assert "Permission" not in error["message"] and "locked" not in error["message"]
