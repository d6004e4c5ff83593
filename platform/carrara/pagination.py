"""Keyset pagination: `limit` + an opaque `cursor` (the last id seen), stable under inserts.

The cursor is opaque to clients but exactly described in the OpenAPI schema (`CURSOR_PATTERN`), so
a generated client or a fuzzer can tell a well-formed cursor from a bad one: every string the
pattern accepts is a cursor this API would accept.
"""

from __future__ import annotations

import re
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from carrara.api_types import PG_INT_MAX
from carrara.errors import Invalid

T = TypeVar("T")
M = TypeVar("M")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class PageParams(BaseModel):
    limit: int
    after_id: int | None


# The last id seen, in decimal. Ids are Postgres integers (at most 2**31 - 1); a larger cursor is
# still well-formed and pages as if it were past the newest id.
CURSOR_PATTERN = r"^[1-9][0-9]{0,9}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(last_id: int) -> str:
    return str(last_id)


def decode_cursor(cursor: str) -> int:
    if not _CURSOR.fullmatch(cursor):
        raise Invalid(f"cursor {cursor!r} is not a cursor this API returned")
    return int(cursor)


async def page_params(
    limit: Annotated[int, Query(ge=1, le=500, description="Items per page")] = 50,
    cursor: Annotated[
        str | None,
        Query(
            description="The `next_cursor` of the previous page (omit it for the first page). "
            "Opaque: pass back what the API returned.",
            pattern=CURSOR_PATTERN,
            max_length=10,
            examples=["1234"],
        ),
    ] = None,
) -> PageParams:
    """FastAPI dependency reading `limit` and `cursor` (async: no thread-pool hop to compute)."""
    return make_page_params(limit, cursor)


def make_page_params(limit: int, cursor: str | None) -> PageParams:
    """The page asked for by `limit` and a `cursor` this API returned (Invalid otherwise)."""
    return PageParams(limit=limit, after_id=decode_cursor(cursor) if cursor else None)


def next_cursor(ids: list[int], limit: int) -> str | None:
    """Cursor for the page after one whose item ids are `ids` (fetched with `limit + 1`)."""
    return encode_cursor(ids[limit - 1]) if len(ids) > limit else None


def paginate(
    session: Session,
    stmt: Select[M],
    id_column: InstrumentedAttribute[int],
    params: PageParams,
    *,
    newest_first: bool = True,
) -> tuple[list[M], str | None]:
    """Run `stmt` one page at a time, ordered by `id_column`; returns (items, next cursor)."""
    if params.after_id is not None and params.after_id > PG_INT_MAX:
        # Past every id: newest first, the page starts at the newest; oldest first, nothing is left.
        if not newest_first:
            return [], None
    elif params.after_id is not None:
        stmt = stmt.where(
            id_column < params.after_id if newest_first else id_column > params.after_id
        )
    stmt = stmt.order_by(id_column.desc() if newest_first else id_column.asc())
    rows = list(session.scalars(stmt.limit(params.limit + 1)))
    ids = [getattr(row, id_column.key) for row in rows]
    return rows[: params.limit], next_cursor(ids, params.limit)
