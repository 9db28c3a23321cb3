"""Decoding request bodies into protocol Structs, with errors that name the offending field."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gateway.core.errors import InvalidRequest

__all__ = ["decode_body"]

T = TypeVar("T")
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `(\w+)`")


def decode_body(body: bytes, kind: type[T]) -> T:
    """JSON body -> Struct; InvalidRequest (400) with `param` set to the field path on any problem."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        path = _PATH.search(message)
        missing = _MISSING.search(message)
        parts = [p for p in (path.group(1) if path else None, missing.group(1) if missing else None) if p]
        raise InvalidRequest(f"Invalid request: {message}", param=".".join(parts) or None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
