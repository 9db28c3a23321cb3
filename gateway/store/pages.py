"""Cursor pagination shared by the list endpoints: `after=<id>` continues past that row in list order."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.store.db import Database

__all__ = ["Page", "page"]

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


def page(
    db: Database,
    table: str,
    where: Sequence[str],
    params: Sequence[Any],
    *,
    after: str | None,
    limit: int,
    newest_first: bool,
    convert: Callable[[sqlite3.Row], T],
) -> Page[T]:
    """Rows of `table` matching `where`, ordered by insertion (`seq`), starting after the row `after`.

    An `after` id that does not match (unknown, or not visible to the caller) yields an empty page rather
    than the first one, so a client paging with a stale cursor stops instead of looping.
    """
    clauses, values = list(where), list(params)
    if after is not None:
        row = db.one(
            f"SELECT seq FROM {table} WHERE id = ?" + "".join(f" AND {w}" for w in where),  # noqa: S608
            (after, *params),
        )
        if row is None:
            return Page([], False)
        clauses.append("seq < ?" if newest_first else "seq > ?")
        values.append(row["seq"])
    sql = f"SELECT * FROM {table}"  # noqa: S608 - table and clauses are ours; values are bound
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
    rows = db.query(sql, (*values, limit + 1))
    return Page([convert(r) for r in rows[:limit]], len(rows) > limit)
