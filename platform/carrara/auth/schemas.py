from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from carrara.auth.roles import Role

# Ten years: longer is "never", which is what leaving `expires_in` out says.
MAX_EXPIRES_IN_S = 10 * 365 * 86_400
ExpiresIn = Annotated[
    int | None,
    Field(
        ge=60,
        le=MAX_EXPIRES_IN_S,
        description="Seconds until the token expires (default: never).",
    ),
]


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@-]*$")
    role: Role
    expires_in: ExpiresIn = None


class TokenRotate(BaseModel):
    expires_in: ExpiresIn = Field(
        default=None,
        description="Seconds until the new token expires (default: as long as the old one was "
        "valid for; never if it never expired).",
    )


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The secret. It is shown only in this response.")


class WhoAmI(BaseModel):
    token_id: int | None
    name: str
    role: Role
