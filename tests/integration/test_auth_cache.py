"""The token cache: no query for a recently verified token, expiry checked on every request,
revocation honoured at once in the revoking process and within `CARRARA_AUTH_CACHE_S` in others."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from carrara.auth.roles import Role
from carrara.auth.service import create_token
from carrara.db import get_session
from carrara.models import ApiToken
from carrara.settings import Settings, get_settings

TTL_S = 1.0


@pytest.fixture
def cached_client(db_session: Session, test_settings: Settings) -> Iterator[TestClient]:
    """The API on the test transaction, remembering tokens for TTL_S seconds."""
    from carrara.main import create_app

    settings = test_settings.model_copy(update={"auth_cache_s": TTL_S})
    app = create_app(settings)

    def _session() -> Iterator[Session]:
        yield db_session
        db_session.flush()

    app.dependency_overrides[get_session] = _session
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as client:
        yield client


def _token(db_session: Session, role: Role = Role.viewer, **kwargs: Any) -> tuple[int, str]:
    row, secret = create_token(db_session, "cache-test", role, created_by=None, **kwargs)
    db_session.flush()
    return row.id, secret


def _me(client: TestClient, secret: str) -> int:
    return client.get(
        "/api/v1/tokens/me", headers={"Authorization": f"Bearer {secret}"}
    ).status_code


def test_a_recently_verified_token_authenticates_without_a_query(
    cached_client: TestClient, db_session: Session
) -> None:
    _, secret = _token(db_session)
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    bind = db_session.connection()
    assert _me(cached_client, secret) == 200  # verified against the database, remembered
    event.listen(bind, "before_cursor_execute", count)
    try:
        for _ in range(20):
            assert _me(cached_client, secret) == 200
    finally:
        event.remove(bind, "before_cursor_execute", count)
    assert [s for s in statements if "api_tokens" in s] == []


def test_a_revoked_token_is_refused_at_once_here_and_within_the_bound_elsewhere(
    cached_client: TestClient, db_session: Session
) -> None:
    _, admin = _token(db_session, Role.admin)
    victim_id, victim = _token(db_session)
    assert _me(cached_client, victim) == 200

    # Revoked through this process's API: forgotten at once.
    revoked = cached_client.delete(
        f"/api/v1/tokens/{victim_id}", headers={"Authorization": f"Bearer {admin}"}
    )
    assert revoked.status_code == 200, revoked.text
    assert _me(cached_client, victim) == 401

    # Revoked by another process (here: straight in the database, which this process's cache
    # does not hear of): refused within the cache's lifetime.
    other_id, other = _token(db_session)
    assert _me(cached_client, other) == 200
    db_session.execute(
        update(ApiToken).where(ApiToken.id == other_id).values(revoked_at=datetime.now(UTC))
    )
    db_session.flush()
    revoked_at = time.monotonic()
    while _me(cached_client, other) == 200:
        assert time.monotonic() - revoked_at <= TTL_S + 0.5, "still accepted past the bound"
        time.sleep(0.02)
    assert time.monotonic() - revoked_at <= TTL_S + 0.5


def test_the_cache_honours_expiry(cached_client: TestClient, db_session: Session) -> None:
    cached_client.app.state.token_cache.ttl_s = 60.0  # type: ignore[attr-defined]
    _, secret = _token(db_session, expires_in=timedelta(seconds=1.5))
    row_expiry = time.monotonic() + 1.5
    assert _me(cached_client, secret) == 200  # remembered for a minute...
    while time.monotonic() < row_expiry - 0.3:
        assert _me(cached_client, secret) == 200
        time.sleep(0.05)
    deadline = row_expiry + 1.0
    while (status := _me(cached_client, secret)) == 200:  # ...but not past its expiry
        assert time.monotonic() < deadline, "an expired token was accepted from the cache"
        time.sleep(0.02)
    assert status == 401
    response = cached_client.get("/api/v1/tokens/me", headers={"Authorization": f"Bearer {secret}"})
    assert "expired at" in response.json()["detail"]


def test_last_used_at_is_written_at_most_once_a_minute(
    cached_client: TestClient, db_session: Session
) -> None:
    token_id, secret = _token(db_session)
    assert _me(cached_client, secret) == 200
    row = db_session.get(ApiToken, token_id)
    assert row is not None
    assert row.last_used_at is not None
    first = row.last_used_at
    cached_client.app.state.token_cache.clear()  # type: ignore[attr-defined]
    assert _me(cached_client, secret) == 200  # read from the database again: no new write
    db_session.refresh(row)
    assert row.last_used_at == first
