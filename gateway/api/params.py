"""Query parameters, read the same way on every route: strict ASCII integers in a range, strings from a set.

`int()` would take " 7", "٣" (an Arabic-Indic digit) or "1_000"; a query parameter here is [0-9]+ with an
optional sign, at most 19 digits, or a 400 that names it.
"""

from __future__ import annotations

import re
from typing import Any

from litestar.connection import ASGIConnection

from gateway.core.errors import InvalidRequest

__all__ = ["query_int", "query_str"]

_INTEGER = re.compile(r"-?[0-9]{1,19}")


def query_str(
    request: ASGIConnection[Any, Any, Any, Any], name: str, *, choices: tuple[str, ...] | None = None
) -> str | None:
    value = request.query_params.get(name)
    if value is not None and choices is not None and value not in choices:
        raise InvalidRequest(f"Invalid value for '{name}': expected one of {', '.join(choices)}.", param=name)
    return value


def query_int(
    request: ASGIConnection[Any, Any, Any, Any], name: str, *, default: int, minimum: int, maximum: int
) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        raise InvalidRequest(f"Invalid value for '{name}': expected an integer.", param=name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise InvalidRequest(
            f"Invalid value for '{name}': must be between {minimum} and {maximum}.", param=name
        )
    return value
