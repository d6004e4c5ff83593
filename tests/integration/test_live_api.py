"""The API runs as its own process against the test database; the CLI reaches it like CI would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson

from tests.integration.conftest import LiveApi, run_cli


def test_live_api_requires_a_token_and_accepts_the_admin(live_api: LiveApi) -> None:
    assert httpx.get(f"{live_api.url}/api/v1/tokens/me", timeout=10).status_code == 401
    me = httpx.get(
        f"{live_api.url}/api/v1/tokens/me",
        headers={"Authorization": f"Bearer {live_api.admin_token}"},
        timeout=10,
    )
    assert me.status_code == 200
    assert me.json()["role"] == "admin"


def test_cli_creates_lists_and_revokes_a_token(live_api: LiveApi) -> None:
    created = run_cli(live_api, "tokens", "create", "ci-pipeline", "--role", "editor", "--json")
    assert created.returncode == 0, created.stderr
    token = orjson.loads(created.stdout)
    assert token["token"].startswith("crr_")
    listed = orjson.loads(run_cli(live_api, "tokens", "list", "--json").stdout)
    assert token["id"] in [t["id"] for t in listed]
    assert all("token" not in t for t in listed)  # secrets are never listed
    assert run_cli(live_api, "tokens", "revoke", str(token["id"])).returncode == 0
    refused = httpx.get(
        f"{live_api.url}/api/v1/tokens/me",
        headers={"Authorization": f"Bearer {token['token']}"},
        timeout=10,
    )
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]
    again = run_cli(live_api, "tokens", "revoke", str(token["id"]))
    assert again.returncode == 2
    assert "already revoked" in again.stderr


def test_admin_bootstrap_refuses_when_an_admin_exists(
    live_api: LiveApi, test_database_url: str
) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "carrara"), "admin", "bootstrap"],
        env={**os.environ, "CARRARA_DATABASE_URL": test_database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "already exists" in result.stdout
