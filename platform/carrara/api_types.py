"""Annotated parameter types shared by the routers, bounded so no input can overflow Postgres."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import Path
from pydantic import BeforeValidator

PG_INT_MAX = 2_147_483_647

# A row id in a path: Postgres `integer` columns hold at most 2**31 - 1.
DbId = Annotated[int, Path(ge=1, le=PG_INT_MAX, description="Numeric id")]

# RFC 3339 date-time; the offset may be left out (the API then reads the time as UTC).
_DATE_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)


def _rfc3339(value: object) -> object:
    """Pydantic would read a bare number (`0.5`, `1714557600`) as a Unix timestamp; the schema
    says `date-time`, so only a date-time string is taken."""
    if isinstance(value, str) and not _DATE_TIME.fullmatch(value):
        raise ValueError(
            f"expected an RFC 3339 date-time such as 2024-05-01T10:00:00Z, got {value!r}"
        )
    return value


# A date-time in a query string (`?since=...`): a number is refused with a 422 naming the parameter.
QueryDateTime = Annotated[datetime, BeforeValidator(_rfc3339)]
