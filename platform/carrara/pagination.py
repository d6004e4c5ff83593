"""Keyset pagination: `limit` + an opaque `cursor` (the last id seen), stable under inserts."""

from __future__ import annotations

import base64
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from carrara.errors import Invalid

T = TypeVar("T")
M = TypeVar("M")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class PageParams(BaseModel):
    limit: int
    after_id: int | None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, value = raw.split(":", 1)
        if prefix != "id":
            raise ValueError(prefix)
        last_id = int(value)
        if not 0 < last_id <= 2**63 - 1:
            raise ValueError(value)
        return last_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"cursor {cursor!r} is not a cursor this API returned") from exc


def page_params(
    limit: Annotated[int, Query(ge=1, le=500, description="Items per page")] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> PageParams:
    """FastAPI dependency reading `limit` and `cursor`."""
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
    if params.after_id is not None:
        stmt = stmt.where(
            id_column < params.after_id if newest_first else id_column > params.after_id
        )
    stmt = stmt.order_by(id_column.desc() if newest_first else id_column.asc())
    rows = list(session.scalars(stmt.limit(params.limit + 1)))
    ids = [getattr(row, id_column.key) for row in rows]
    return rows[: params.limit], next_cursor(ids, params.limit)
