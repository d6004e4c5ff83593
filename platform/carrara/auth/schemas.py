from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from carrara.auth.roles import Role


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@-]*$")
    role: Role


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The secret. It is shown only in this response.")


class WhoAmI(BaseModel):
    token_id: int | None
    name: str
    role: Role
