"""Who makes a change: an API token's principal, or a system actor without a token."""

from __future__ import annotations

from dataclasses import dataclass

from carrara.auth.roles import Role


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role (no token id for a system actor)."""

    token_id: int | None
    name: str
    role: Role

    def can(self, required: Role) -> bool:
        return self.role.allows(required)
