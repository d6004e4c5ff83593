"""Token lifecycle: create (the secret is shown once, optionally expiring), verify, list,
revoke, rotate."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from carrara.audit.service import record
from carrara.auth.cache import TokenCache, forget_everywhere
from carrara.auth.principal import Principal
from carrara.auth.roles import Role
from carrara.errors import Conflict, Forbidden, NotFound, Unauthorized
from carrara.models import ApiToken
from carrara.pagination import PageParams, paginate

TOKEN_PREFIX = "crr_"  # noqa: S105 - a public marker that makes leaked tokens greppable
# The actor of tokens made server-side, without a token (`carrara admin bootstrap`, the demo).
SERVER_ADMIN = Principal(token_id=None, name="server-admin", role=Role.admin)
# Writing `last_used_at` on every request would turn reads into writes; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session,
    name: str,
    role: Role,
    created_by: Principal | None,
    expires_in: timedelta | None = None,
) -> tuple[ApiToken, str]:
    """Create a token (expiring after `expires_in`, if given); returns the row and the secret,
    which is never stored or shown again."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        name=name,
        role=role.value,
        prefix=secret[:12],
        token_hash=hash_token(secret),
        created_by_id=created_by.token_id if created_by else None,
        expires_at=datetime.now(UTC) + expires_in if expires_in is not None else None,
    )
    session.add(row)
    session.flush()
    record(
        session,
        created_by or SERVER_ADMIN,
        "token.create",
        "token",
        row.id,
        after=_audited(row),
    )
    return row, secret


def _audited(row: ApiToken) -> dict[str, str | None]:
    expires = row.expires_at.isoformat() if row.expires_at else None
    return {"name": row.name, "role": row.role, "expires_at": expires}


def is_active(row: ApiToken, now: datetime | None = None) -> bool:
    """Neither revoked nor expired."""
    if row.revoked_at is not None:
        return False
    return row.expires_at is None or (now or datetime.now(UTC)) < row.expires_at


def authenticate_cached(
    secret: str, cache: TokenCache | None, token_hash: str | None = None
) -> Principal | None:
    """The principal of a token `cache` verified recently (expiry checked: 401), else None: the
    part of `authenticate` that needs no database (the API answers it without a thread)."""
    if cache is None:
        return None
    hit = cache.get(token_hash or hash_token(secret))
    if hit is None:
        return None
    if hit.expires_at is not None and datetime.now(UTC) >= hit.expires_at:
        raise Unauthorized(f"token {hit.prefix}… expired at {hit.expires_at.isoformat()}")
    return hit.principal


def authenticate(session: Session, secret: str, cache: TokenCache | None = None) -> Principal:
    """The principal behind a bearer token; 401 when unknown, revoked or expired.

    With a `cache`, a token verified less than `cache.ttl_s` ago is answered from memory (no
    query); its expiry is still checked on every call (see carrara.auth.cache for the bounds).
    """
    token_hash = hash_token(secret)
    cached = authenticate_cached(secret, cache, token_hash)
    if cached is not None:
        return cached
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))
    if row is None:
        raise Unauthorized("the bearer token is not valid")
    if row.revoked_at is not None:
        raise Unauthorized(f"token {row.prefix}… was revoked")
    now = datetime.now(UTC)
    if row.expires_at is not None and now >= row.expires_at:
        raise Unauthorized(f"token {row.prefix}… expired at {row.expires_at.isoformat()}")
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
    principal = Principal(token_id=row.id, name=row.name, role=Role(row.role))
    if cache is not None:
        cache.put(token_hash, principal, row.prefix, row.expires_at)
    return principal


def list_tokens(session: Session, params: PageParams) -> tuple[list[ApiToken], str | None]:
    return paginate(session, select(ApiToken), ApiToken.id, params)


def get_token(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    return row


def revoke_token(session: Session, token_id: int, actor: Principal) -> ApiToken:
    """Revoke a token (it stops working at once); a token cannot revoke itself."""
    if token_id == actor.token_id:
        raise Conflict("a token cannot revoke itself; revoke it with another admin token")
    row = get_token(session, token_id)
    if row.revoked_at is not None:
        raise Conflict(f"token {token_id} is already revoked")
    row.revoked_at = datetime.now(UTC)
    forget_everywhere(row.id)
    record(
        session,
        actor,
        "token.revoke",
        "token",
        row.id,
        before={"name": row.name, "role": row.role},
    )
    return row


def rotate_token(
    session: Session, token_id: int, actor: Principal, expires_in: timedelta | None = None
) -> tuple[ApiToken, str]:
    """Replace a token by a new one with the same name and role, and revoke it at once.

    An admin may rotate any token; any token may rotate itself (a pipeline renewing its own
    credential). The new token expires after `expires_in`, else after as long as the old one
    was valid for (never, if it never expired).
    """
    row = get_token(session, token_id)
    if token_id != actor.token_id and not actor.can(Role.admin):
        raise Forbidden("only an admin may rotate another token; any token may rotate itself")
    now = datetime.now(UTC)
    if not is_active(row, now):
        raise Conflict(f"token {token_id} is revoked or expired; create a new one instead")
    if expires_in is None and row.expires_at is not None:
        expires_in = row.expires_at - row.created_at
    new_row, secret = create_token(session, row.name, Role(row.role), actor, expires_in)
    row.revoked_at = now
    forget_everywhere(row.id)
    record(
        session,
        actor,
        "token.rotate",
        "token",
        row.id,
        before=_audited(row),
        after={**_audited(new_row), "replaced_by": str(new_row.id)},
    )
    return new_row, secret


def bootstrap_admin(
    session: Session, name: str = "admin", expires_in: timedelta | None = None
) -> str | None:
    """Create the first admin token when no active admin exists; None if there already is one."""
    now = datetime.now(UTC)
    active_admins = session.scalar(
        select(func.count())
        .select_from(ApiToken)
        .where(
            ApiToken.role == Role.admin.value,
            ApiToken.revoked_at.is_(None),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )
    )
    if active_admins:
        return None
    _, secret = create_token(session, name, Role.admin, created_by=None, expires_in=expires_in)
    return secret
