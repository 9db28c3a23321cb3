"""Revoked tokens: what the verifier refuses although the signature and every claim check out.

A JWT is good until its `exp`; a leaked token, or a person who leaves, needs cutting off sooner.  `gateway
revoke` adds an entry to a JSON file beside the keys (auth.revocation_file, default
<data_dir>/keys/revoked-tokens.json), which every gateway on the data dir reads; a gateway re-reads it when
the file changes (one stat per request), so a revocation applies to the next request.

    by token id (`jti`)   that one token; the entry goes once the token would have expired anyway
    by subject (`sub`)    every token of that subject issued at or before the revocation plus the clock
                          leeway (`iat` <= at + auth.leeway_seconds): verify accepts an `iat` up to the
                          leeway ahead of its clock, so a token minted just before the revocation on a fast
                          clock is still refused; a token minted after that window works again (an IdP's
                          new session, say)

The file is rewritten atomically under an flock, so two operators revoking at once both land.  A file that
cannot be parsed (edited by hand) is an error at every request until fixed: failing open would quietly undo
the revocations in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from contracts.private_files import ensure_private_dir, write_private_file

__all__ = ["RevocationList", "RevocationListUnreadable"]


class RevocationListUnreadable(ValueError):
    pass


class RevocationList:
    def __init__(self, path: Path, *, leeway_seconds: int = 0) -> None:
        self.path = path
        self.leeway_seconds = max(0, int(leeway_seconds))
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, int] = {}  # jti -> exp
        self._subjects: dict[str, int] = {}  # sub -> revoked at (unix seconds)

    def is_revoked(self, claims: Mapping[str, Any]) -> bool:
        with self._lock:
            self._refresh()
            tokens, subjects = self._tokens, self._subjects
        jti, iat = claims.get("jti"), claims.get("iat")
        if isinstance(jti, str) and jti in tokens:
            return True
        revoked_at = subjects.get(claims.get("sub"))  # type: ignore[arg-type]
        if revoked_at is None:
            return False
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            return True  # no usable `iat` cannot prove the token was minted after the revocation
        return iat <= revoked_at + self.leeway_seconds

    def revoke_token(self, jti: str, expires_at: int) -> None:
        with self._editing() as data:
            data["tokens"][jti] = int(expires_at)

    def revoke_subject(self, subject: str, at: int | None = None) -> None:
        with self._editing() as data:
            data["subjects"][subject] = int(at if at is not None else time.time())

    def counts(self) -> tuple[int, int]:
        """(revoked token ids, revoked subjects) now in force."""
        with self._lock:
            self._refresh()
            return len(self._tokens), len(self._subjects)

    # -- the file ----------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._tokens, self._subjects = None, {}, {}
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            data = self._read()
            self._tokens, self._subjects, self._stamp = data["tokens"], data["subjects"], stamp

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            raw = json.loads(self.path.read_text())
            data = {"tokens": dict(raw.get("tokens", {})), "subjects": dict(raw.get("subjects", {}))}
            if not all(isinstance(v, int) for part in data.values() for v in part.values()):
                raise ValueError("times must be integers")
        except FileNotFoundError:
            return {"tokens": {}, "subjects": {}}
        except (ValueError, TypeError, AttributeError) as exc:
            raise RevocationListUnreadable(f"{self.path} cannot be read: {exc}") from None
        return data

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, int]]]:
        lock_path = ensure_private_dir(self.path.parent) / f".{self.path.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._read()
            yield data
            keep_after = int(time.time()) - 86400  # a day past `exp`: longer than any clock leeway
            data["tokens"] = {jti: exp for jti, exp in data["tokens"].items() if exp >= keep_after}
            write_private_file(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        finally:
            os.close(fd)
