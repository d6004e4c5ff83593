"""Annotated parameter types shared by the routers, bounded so no input can overflow Postgres."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

PG_INT_MAX = 2_147_483_647

# A row id in a path: Postgres `integer` columns hold at most 2**31 - 1.
DbId = Annotated[int, Path(ge=1, le=PG_INT_MAX, description="Numeric id")]
