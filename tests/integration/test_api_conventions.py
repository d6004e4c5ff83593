"""HTTP conventions every /api/v1 operation keeps: 405 answers carry `Allow` (RFC 9110), query
date-times are date-times (never a bare number read as a Unix timestamp), and the pagination
cursor is described exactly in the OpenAPI schema. `schemathesis --checks all` confirms them on
the operations that take those parameters.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from carrara.pagination import CURSOR_PATTERN
from carrara.settings import Settings
from tests.integration.conftest import RUN_ID, LiveApi, migrated_database, running_api

HTTP_METHODS = {"get", "put", "post", "delete", "patch"}


def _openapi(client: TestClient) -> dict:
    return client.get("/openapi.json").json()


def test_a_405_lists_every_method_of_the_path_in_allow(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    paths = _openapi(client)["paths"]
    templates = {
        re.compile(re.sub(r"\{[^}]+\}", "[^/]+", p) + "$"): ops for p, ops in paths.items()
    }
    checked = 0
    for path in paths:
        if "{" in path:
            continue
        # Methods served at this path, also by templated paths (`/tokens/me` vs `/tokens/{id}`).
        documented = {
            m.upper()
            for template, operations in templates.items()
            if template.match(path)
            for m in operations
            if m in HTTP_METHODS
        }
        unsupported = sorted({m.upper() for m in HTTP_METHODS} - documented)
        if not unsupported:
            continue
        response = client.request(unsupported[0], path, headers=admin_headers)
        assert response.status_code == 405, (path, unsupported[0], response.text)
        allowed = {m.strip() for m in response.headers["Allow"].split(",")} - {"HEAD"}
        assert allowed == documented, path
        assert response.headers["content-type"].startswith("application/problem+json")
        checked += 1
    assert checked >= 5


def test_a_405_on_a_path_with_parameters_lists_its_methods(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = client.request("PATCH", "/api/v1/tokens/1", headers=admin_headers)
    assert response.status_code == 405
    assert response.headers["Allow"] == "DELETE"


@pytest.mark.parametrize("value", ["0.5", "1714557600", "-1", "2024-05-01", "yesterday"])
def test_a_query_date_time_is_never_a_number(
    client: TestClient, viewer_headers: dict[str, str], value: str
) -> None:
    response = client.get("/api/v1/audit", params={"since": value}, headers=viewer_headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert [e["field"] for e in body["errors"]] == ["query.since"]
    assert "since" in body["detail"]
    assert "RFC 3339" in body["detail"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/api/v1/alerts", "since"),
        ("/api/v1/deployments/some-deployment/metrics", "from"),
        ("/api/v1/deployments/some-deployment/drift", "to"),
    ],
)
def test_every_query_date_time_refuses_a_number(
    client: TestClient, viewer_headers: dict[str, str], path: str, name: str
) -> None:
    response = client.get(path, params={name: "0.5"}, headers=viewer_headers)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [f"query.{name}"]


@pytest.mark.parametrize(
    "value", ["2024-05-01T10:00:00Z", "2024-05-01T10:00:00.123+02:00", "2024-05-01T10:00:00"]
)
def test_a_query_date_time_takes_rfc3339(
    client: TestClient, viewer_headers: dict[str, str], value: str
) -> None:
    response = client.get("/api/v1/audit", params={"since": value}, headers=viewer_headers)
    assert response.status_code == 200, response.text


def test_every_cursor_parameter_is_described_by_its_pattern(client: TestClient) -> None:
    described = 0
    for path, operations in _openapi(client)["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] != "cursor":
                    continue
                schema = parameter["schema"]
                variants = schema.get("anyOf", [schema])
                assert {"type": "string", "maxLength": 10, "pattern": CURSOR_PATTERN} in variants, (
                    method,
                    path,
                )
                assert "next_cursor" in parameter["description"]
                described += 1
    assert described >= 5


def test_cursors_the_api_returns_match_the_documented_pattern(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    for i in range(3):
        created = client.post(
            "/api/v1/tokens", json={"name": f"page-{i}", "role": "viewer"}, headers=admin_headers
        )
        assert created.status_code == 201, created.text
    seen: list[int] = []
    cursor = None
    for _ in range(3):
        params = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/v1/tokens", params=params, headers=admin_headers).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        assert cursor is not None
        assert re.fullmatch(CURSOR_PATTERN, cursor)
    assert seen == sorted(seen, reverse=True)
    assert len(set(seen)) == 3


@pytest.mark.parametrize("cursor", ["0", "abc", "01", "1" * 11, "aWQ6NQ", "-5"])
def test_a_cursor_outside_the_pattern_is_refused_naming_it(
    client: TestClient, admin_headers: dict[str, str], cursor: str
) -> None:
    response = client.get("/api/v1/tokens", params={"cursor": cursor}, headers=admin_headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.cursor"


@pytest.fixture(scope="module")
def conventions_api(stack_settings: Settings) -> Iterator[LiveApi]:
    """An API on a database of its own: schemathesis creates tokens."""
    with (
        migrated_database(stack_settings, f"carrara_conventions_{RUN_ID}") as url,
        running_api(
            url, "conventions", CARRARA_DEPLOYMENTS_TOPIC=f"test-{RUN_ID}-conventions-deployments"
        ) as api,
    ):
        yield api


def test_schemathesis_all_checks_pass_on_paginated_and_dated_operations(
    conventions_api: LiveApi, tmp_path: Path
) -> None:
    """`schemathesis run --checks all`, positive data acceptance and unsupported methods
    included, on the operations that take a cursor or a query date-time."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{conventions_api.url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing",
            "--include-path-regex",
            r"^/api/v1/(audit|tokens|alerts)$",
            "--max-examples",
            "30",
            "--seed",
            "12",
            "--header",
            f"Authorization: Bearer {conventions_api.admin_token}",
            "--generation-database",
            "none",
            "--report-dir",
            str(tmp_path),
            "--no-color",
        ],
        cwd=tmp_path,  # whatever else it keeps (a crash cache) stays out of the checkout
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
