"""Tokens, roles, the audit log and RFC 9457 errors, against the real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carrara.auth.service import bootstrap_admin, hash_token
from carrara.models import ApiToken


def test_api_routes_need_a_token_and_health_does_not(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    response = client.get("/api/v1/audit")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"]


def test_an_unknown_token_is_401(client: TestClient) -> None:
    response = client.get("/api/v1/audit", headers={"Authorization": "Bearer crr_nope"})
    assert response.status_code == 401
    assert response.json()["detail"] == "the bearer token is not valid"


def test_token_secret_is_shown_once_and_stored_hashed(
    client: TestClient, admin_headers: dict[str, str], db_session: Session
) -> None:
    created = client.post(
        "/api/v1/tokens", json={"name": "ci", "role": "editor"}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    secret = created.json()["token"]
    row = db_session.scalar(select(ApiToken).where(ApiToken.id == created.json()["id"]))
    assert row is not None
    assert row.token_hash == hash_token(secret)
    assert secret not in {row.token_hash, row.prefix}
    assert secret.startswith(row.prefix)
    listed = client.get("/api/v1/tokens", headers=admin_headers).json()["items"]
    assert all("token" not in item for item in listed)
    me = client.get("/api/v1/tokens/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.json()["role"] == "editor"


def test_roles_are_enforced(
    client: TestClient, viewer_headers: dict[str, str], editor_headers: dict[str, str]
) -> None:
    for headers in (viewer_headers, editor_headers):
        response = client.post(
            "/api/v1/tokens", json={"name": "x", "role": "admin"}, headers=headers
        )
        assert response.status_code == 403
        assert "needs the admin role" in response.json()["detail"]
    assert client.get("/api/v1/audit", headers=viewer_headers).status_code == 200


def test_revoked_tokens_stop_working_and_revoking_twice_is_409(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    created = client.post(
        "/api/v1/tokens", json={"name": "short-lived", "role": "viewer"}, headers=admin_headers
    ).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert client.get("/api/v1/tokens/me", headers=headers).status_code == 200
    assert (
        client.delete(f"/api/v1/tokens/{created['id']}", headers=admin_headers).status_code == 200
    )
    assert client.get("/api/v1/tokens/me", headers=headers).status_code == 401
    again = client.delete(f"/api/v1/tokens/{created['id']}", headers=admin_headers)
    assert again.status_code == 409
    assert client.delete("/api/v1/tokens/999999", headers=admin_headers).status_code == 404


def test_validation_errors_are_problem_details_naming_the_field(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = client.post(
        "/api/v1/tokens", json={"name": "", "role": "root"}, headers=admin_headers
    )
    assert response.status_code == 422
    body = response.json()
    assert body["status"] == 422
    assert {e["field"] for e in body["errors"]} == {"name", "role"}
    bad_cursor = client.get("/api/v1/tokens?cursor=%%%", headers=admin_headers)
    assert bad_cursor.status_code == 422
    assert "cursor" in bad_cursor.json()["detail"]


def test_mutations_are_audited_with_actor_and_paginated(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    ids = [
        client.post(
            "/api/v1/tokens", json={"name": f"t{i}", "role": "viewer"}, headers=admin_headers
        ).json()["id"]
        for i in range(3)
    ]
    client.delete(f"/api/v1/tokens/{ids[0]}", headers=admin_headers)
    first = client.get(
        "/api/v1/audit",
        params={"resource_type": "token", "actor": "test-admin", "limit": 2},
        headers=admin_headers,
    ).json()
    assert [e["action"] for e in first["items"]] == ["token.revoke", "token.create"]
    assert all(e["actor"] == "test-admin" for e in first["items"])
    second = client.get(
        "/api/v1/audit",
        params={
            "resource_type": "token",
            "actor": "test-admin",
            "limit": 2,
            "cursor": first["next_cursor"],
        },
        headers=admin_headers,
    ).json()
    assert [e["resource_id"] for e in second["items"]] == [str(ids[1]), str(ids[0])]
    assert second["next_cursor"] is None


def test_bootstrap_creates_one_admin_only_when_none_is_active(db_session: Session) -> None:
    for row in db_session.scalars(select(ApiToken).where(ApiToken.role == "admin")):
        row.revoked_at = func.now()
    db_session.flush()
    secret = bootstrap_admin(db_session, "first-admin")
    assert secret is not None
    assert bootstrap_admin(db_session, "second-admin") is None


def test_tokens_may_expire(
    client: TestClient, admin_headers: dict[str, str], db_session: Session
) -> None:
    created = client.post(
        "/api/v1/tokens",
        json={"name": "short-lived", "role": "viewer", "expires_in": 3600},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    expires_at = datetime.fromisoformat(created.json()["expires_at"])
    assert timedelta(minutes=59) < expires_at - datetime.now(UTC) <= timedelta(hours=1)
    headers = {"Authorization": f"Bearer {created.json()['token']}"}
    assert client.get("/api/v1/tokens/me", headers=headers).status_code == 200

    row = db_session.get(ApiToken, created.json()["id"])
    assert row is not None
    row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    db_session.flush()
    # Moving an expiry by hand is no API operation: the cache still knows the old one.
    client.app.state.token_cache.clear()  # type: ignore[attr-defined]
    expired = client.get("/api/v1/tokens/me", headers=headers)
    assert expired.status_code == 401
    assert "expired at" in expired.json()["detail"]

    too_short = client.post(
        "/api/v1/tokens",
        json={"name": "x", "role": "viewer", "expires_in": 5},
        headers=admin_headers,
    )
    assert too_short.status_code == 422


def test_tokens_are_rotated_by_an_admin_or_by_themselves(
    client: TestClient, admin_headers: dict[str, str], db_session: Session
) -> None:
    made = client.post(
        "/api/v1/tokens",
        json={"name": "pipeline", "role": "editor", "expires_in": 86_400},
        headers=admin_headers,
    ).json()
    own = {"Authorization": f"Bearer {made['token']}"}
    rotated = client.post(f"/api/v1/tokens/{made['id']}/rotate", json={}, headers=own)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert (new["name"], new["role"]) == ("pipeline", "editor")
    assert new["id"] != made["id"]
    lifetime = datetime.fromisoformat(new["expires_at"]) - datetime.now(UTC)
    assert timedelta(hours=23) < lifetime < timedelta(days=1, minutes=5)  # as the old one
    assert client.get("/api/v1/tokens/me", headers=own).status_code == 401  # revoked at once
    new_headers = {"Authorization": f"Bearer {new['token']}"}
    assert client.get("/api/v1/tokens/me", headers=new_headers).json()["name"] == "pipeline"

    other = client.post(
        "/api/v1/tokens", json={"name": "other", "role": "viewer"}, headers=admin_headers
    ).json()
    refused = client.post(f"/api/v1/tokens/{other['id']}/rotate", json={}, headers=new_headers)
    assert refused.status_code == 403
    by_admin = client.post(
        f"/api/v1/tokens/{other['id']}/rotate", json={"expires_in": 600}, headers=admin_headers
    )
    assert by_admin.status_code == 201
    assert by_admin.json()["expires_at"] is not None
    again = client.post(f"/api/v1/tokens/{other['id']}/rotate", json={}, headers=admin_headers)
    assert again.status_code == 409
    actions = [
        e["action"]
        for e in client.get("/api/v1/audit", params={"limit": 50}, headers=admin_headers).json()[
            "items"
        ]
    ]
    assert actions.count("token.rotate") == 2
